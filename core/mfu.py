"""Model FLOPs utilization: the FLOPs a training step needs, over what the hardware could do meanwhile.

FLOPs per token follow the PaLM paper (appendix B), as nanoGPT counts them: 6 per parameter that
takes part in a matmul (2 forward, 4 backward), plus attention's QK^T and AV, 6 x 2 x n_layer x
n_embd x T. The position embedding is a lookup, so it is left out; the token embedding counts once,
as the tied output head. A peak that is not known is said to be unknown, never guessed: a
hard-coded A100 peak read 104% MFU on an H100 (nanoGPT #464).
"""

from __future__ import annotations

import time

import torch

from core.devices import synchronize
from model import GPT

# Dense (no sparsity) tensor-core peaks in FLOP/s, by the exact name torch.cuda.get_device_name gives:
# bfloat16 (FP32 accumulate), and float32 as TF32 (what float32 matmuls run as with TF32 allowed, as
# every stage allows it on CUDA). Datasheets list sparse figures too, twice these. Sources: NVIDIA's
# datasheets for A100 (40/80 GB, SXM4 and PCIe), H100 (SXM5, PCIe, NVL), H200 (SXM, NVL), L4, L40, L40S
# and A10; the Ampere GA102 whitepaper (RTX 3090), the Ada whitepaper (RTX 4090), the Blackwell RTX
# whitepaper (RTX 5090); AWS publishes none for its A10G: Baseten's comparison of A10 and A10G.
_A100 = {torch.bfloat16: 312e12, torch.float32: 156e12}
_H100_SXM = {torch.bfloat16: 989.4e12, torch.float32: 494.7e12}
_NVL = {torch.bfloat16: 835.5e12, torch.float32: 417.5e12}  # H100 NVL and H200 NVL, per GPU
PEAK_FLOPS: dict[str, dict[torch.dtype, float]] = {
    "NVIDIA A100-SXM4-40GB": _A100,
    "NVIDIA A100-SXM4-80GB": _A100,
    "NVIDIA A100-PCIE-40GB": _A100,
    "NVIDIA A100 80GB PCIe": _A100,
    "NVIDIA H100 80GB HBM3": _H100_SXM,  # the SXM5 part's name
    "NVIDIA H100 SXM5 80GB": _H100_SXM,
    "NVIDIA H100 PCIe": {torch.bfloat16: 756e12, torch.float32: 378e12},
    "NVIDIA H100 NVL": _NVL,
    "NVIDIA H200": _H100_SXM,  # H200 SXM: H100's compute, more memory
    "NVIDIA H200 NVL": _NVL,
    "NVIDIA L4": {torch.bfloat16: 121e12, torch.float32: 60e12},
    "NVIDIA L40": {torch.bfloat16: 181e12, torch.float32: 90.5e12},
    "NVIDIA L40S": {torch.bfloat16: 362e12, torch.float32: 183e12},
    "NVIDIA A10": {torch.bfloat16: 125e12, torch.float32: 62.5e12},
    "NVIDIA A10G": {torch.bfloat16: 70e12, torch.float32: 35e12},
    "NVIDIA GeForce RTX 3090": {torch.bfloat16: 71e12, torch.float32: 35.6e12},
    "NVIDIA GeForce RTX 4090": {torch.bfloat16: 165.2e12, torch.float32: 82.6e12},
    "NVIDIA GeForce RTX 5090": {torch.bfloat16: 209.5e12, torch.float32: 104.8e12},
}


def flops_per_token(model: GPT, seq_len: int) -> float:
    config = model.config
    matmul_params = model.num_params() - model.transformer.wpe.weight.numel()
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * seq_len


def table_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """The peak of this GPU from the table, by its exact name; None (MFU unknown) for any other name:
    a substring match would give an L40S the L4's peak, and an H100 NVL the SXM part's."""
    if device.type != "cuda":
        return None
    return PEAK_FLOPS.get(torch.cuda.get_device_name(device).strip(), {}).get(dtype)


def measured_peak(device: torch.device, dtype: torch.dtype, size: int = 2048, seconds: float = 0.5) -> float:
    """FLOP/s of a square matmul in `dtype` on `device`, timed here: the ceiling on a CPU, where no
    table can know the cores, their vector units or their clocks. The fastest of the calls made in
    `seconds` (at least three): on a shared machine a burst of load elsewhere slows some calls, and an
    average over them moved by almost 2x from run to run."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: thread pools, kernel choice
    fastest, calls, deadline = float("inf"), 0, time.perf_counter() + seconds
    while calls < 3 or time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        synchronize(device)
        fastest = min(fastest, time.perf_counter() - start)
        calls += 1
    return 2 * size**3 / fastest


def peak_flops(device: torch.device, dtype: torch.dtype, override: float = 0.0) -> float | None:
    """The peak FLOP/s of one device: `override` when given, the table for GPUs, a measurement on a CPU."""
    if override > 0:
        return override
    if device.type == "cpu":
        return measured_peak(device, dtype)
    return table_peak(device, dtype)
