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

# Dense (no sparsity) tensor-core peaks in FLOP/s: bfloat16, and float32 as TF32 (what float32 matmuls
# run as on these GPUs with TF32 allowed, as the training loop does). Sources: NVIDIA's datasheets
# (A100 80GB, H100 SXM5 / PCIe, H200, L4, A10) and architecture whitepapers (Ada for the RTX 4090,
# GA102 for the RTX 3090), "with FP32 accumulate" figures for the GeForce cards.
PEAK_FLOPS: dict[str, dict[torch.dtype, float]] = {
    "H200": {torch.bfloat16: 989e12, torch.float32: 494e12},
    "H100 SXM": {torch.bfloat16: 989e12, torch.float32: 494e12},
    "H100 PCIe": {torch.bfloat16: 756e12, torch.float32: 378e12},
    "H100": {torch.bfloat16: 989e12, torch.float32: 494e12},  # "NVIDIA H100 80GB HBM3" is the SXM part
    "A100": {torch.bfloat16: 312e12, torch.float32: 156e12},  # before "A10", which it contains
    "A10": {torch.bfloat16: 125e12, torch.float32: 62.5e12},
    "L4": {torch.bfloat16: 121e12, torch.float32: 60e12},
    "RTX 4090": {torch.bfloat16: 165.2e12, torch.float32: 82.6e12},
    "RTX 3090": {torch.bfloat16: 71e12, torch.float32: 35.6e12},
}


def flops_per_token(model: GPT, seq_len: int) -> float:
    config = model.config
    matmul_params = model.num_params() - model.transformer.wpe.weight.numel()
    return 6 * matmul_params + 12 * config.n_layer * config.n_embd * seq_len


def table_peak(device: torch.device, dtype: torch.dtype) -> float | None:
    """The peak of this GPU from the table, matched on its name; None when it is not there."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_FLOPS.items():  # the table lists specific names before general ones
        if key in name:
            return peaks.get(dtype)
    return None


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
