"""New tokens per second of core/generation.py against HF `generate` and against no cache at all.

    python bench/bench_sample.py [--device cpu] [--dtype float32] [--repeats 3]

It also measures two ceilings of the machine, in the same run and dtype, that no generator can pass:
a decode step's weight FLOPs at the dtype's measured matmul peak (a large square matmul: the old
ceiling, the step's own small matmuls timed alone, was passed 7x by a faster bf16 path), and the
bytes of the weights over the memory-read bandwidth; and prints each generator as a fraction of both.

Ours runs three times: eagerly with sample.py's CPU speed-up (core/cpu_speedups.py), eagerly on a
plain copy of the model (what the speed-up adds, side by side), and with its compiled decode step
(`sample.py --compile`), whose compile time is reported apart. A last row times a step's weight
products alone, as ours computes them: how far the products are from the bandwidth ceiling, and how
much the rest of the step costs.

The GPT-2 124M config with random weights (speed does not depend on their values), 5 samples of
128 new tokens from an 8-token prompt, top-k 50 sampling at temperature 1. The same weights run
in HF transformers' `GPT2LMHeadModel.generate` (its own KV cache, the same sampling settings), and
in a loop that recomputes the whole sequence at every step, as build-nanogpt's sampler does.
"""

from __future__ import annotations

import copy
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.hardware import describe_hardware
from core.cli import StageParser
from core.cpu_speedups import speed_up_generation
from core.devices import dtype_name, resolve_device, resolve_dtype, synchronize
from core.generation import Sampling, compile_decode_step, generate, sample_next
from core.hf import config_to_hf, state_dict_to_hf
from core.mfu import measured_peak
from model import GPT, GPTConfig

NUM_SAMPLES, NEW_TOKENS, TOP_K = 5, 128, 50
PROMPT = [15496, 11, 314, 1101, 257, 3303, 2746, 11]  # "Hello, I'm a language model,"


def ours(model: GPT, compiled: bool = False) -> list[list[int]]:
    return generate(model, PROMPT, NUM_SAMPLES, NEW_TOKENS, Sampling(top_k=TOP_K), torch.Generator().manual_seed(0),
                    compiled=compiled)


@torch.inference_mode()
def no_cache(model: GPT) -> list[list[int]]:
    device = model.device
    idx = torch.tensor(PROMPT, device=device).expand(NUM_SAMPLES, -1)
    for _ in range(NEW_TOKENS):
        logits, _ = model(idx)
        idx = torch.cat([idx, sample_next(logits[:, -1], Sampling(top_k=TOP_K)).unsqueeze(1)], dim=1)
    return idx[:, len(PROMPT):].tolist()


@torch.inference_mode()
def hf_generate(model: GPT2LMHeadModel) -> list[list[int]]:
    prompt = torch.tensor([PROMPT] * NUM_SAMPLES, device=model.device)
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=TOP_K,
                         temperature=1.0, top_p=1.0, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                         use_cache=True, pad_token_id=50256)
    return out[:, len(PROMPT):].tolist()


def decode_flops(model: GPT) -> int:
    """FLOPs of one new token's weight products: every linear layer and the output layer (all its padded
    rows, as model.logits multiplies them), 2 per weight; attention over the cache is left out, so the
    ceiling it gives is, if anything, too high."""
    products = [module.weight for module in model.modules() if isinstance(module, torch.nn.Linear)
                and module is not model.lm_head]
    return 2 * (sum(weight.numel() for weight in products) + model.lm_head.weight.numel())


def weight_bytes(model: GPT) -> int:
    """The bytes a decode step must read at least: every weight once (the tied head counted once)."""
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "wpe" not in name)


def read_bandwidth(device: torch.device, nbytes: int = 2**29) -> float:
    """Bytes/s of reading memory: the best of a few sums over a buffer far larger than any cache."""
    buffer = torch.ones(nbytes // 4, device=device)
    times = []
    for _ in range(6):
        start = time.perf_counter()
        buffer.sum()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return nbytes / min(times[1:])


@torch.inference_mode()
def products_alone(model: GPT, repeats: int = 10) -> float:
    """New tokens/s of a decode step that did its weight products and nothing else, as ours computes
    them (every linear layer, in the model's order, on NUM_SAMPLES rows): the rest of ours' step costs
    the gap between this and ours; this one's gap to the bandwidth ceiling is the products' own."""
    layers = [module for module in model.modules() if isinstance(module, torch.nn.Linear)]
    inputs = [torch.randn(NUM_SAMPLES, layer.in_features, device=model.device, dtype=model.dtype) for layer in layers]
    times = []
    for _ in range(repeats + 1):  # the first warms up
        start = time.perf_counter()
        for layer, x in zip(layers, inputs, strict=True):
            layer(x)
        synchronize(model.device)
        times.append(time.perf_counter() - start)
    return NUM_SAMPLES / statistics.median(times[1:])


def tokens_per_second(run: Callable[[], list[list[int]]], repeats: int) -> float:
    run()  # warm-up: allocator, kernels, lazy initialisation
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        rows = run()
        times.append(time.perf_counter() - start)
        assert sum(len(row) for row in rows) == NUM_SAMPLES * NEW_TOKENS
    return NUM_SAMPLES * NEW_TOKENS / statistics.median(times)


def main() -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.dtype, device, cpu_bfloat16=True)  # what sample.py runs in
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(device=device, dtype=dtype).eval()
    plain_model = copy.deepcopy(model)  # plain PyTorch: what sample.py's CPU speed-up adds, side by side
    speed_up_generation(model)  # as sample.py does
    reference = GPT2LMHeadModel(GPT2Config(**config_to_hf(model.config)))
    reference.load_state_dict(state_dict_to_hf(model), strict=False)  # strict=False: tied lm_head
    reference = reference.to(device=device, dtype=dtype).eval()

    print(describe_hardware())
    print(f"GPT-2 124M, {dtype}, {device}: {NUM_SAMPLES} samples x {NEW_TOKENS} new tokens from "
          f"{len(PROMPT)} prompt tokens, top-k {TOP_K}, median of {args.repeats}")
    ours_tps = tokens_per_second(lambda: ours(model), args.repeats)
    plain_tps = tokens_per_second(lambda: ours(plain_model), args.repeats)
    compile_seconds = compile_decode_step(model, NUM_SAMPLES, len(PROMPT), NEW_TOKENS)
    compiled_tps = tokens_per_second(lambda: ours(model, compiled=True), args.repeats)
    hf_tps = tokens_per_second(lambda: hf_generate(reference), args.repeats)
    no_cache_tps = tokens_per_second(lambda: no_cache(model), max(1, args.repeats // 2))
    products_tps = products_alone(model)
    peak = measured_peak(device, dtype)
    matmul_ceiling = peak / decode_flops(model)  # every sample's token at the dtype's measured matmul peak
    bandwidth = read_bandwidth(device)
    bandwidth_ceiling = NUM_SAMPLES * bandwidth / weight_bytes(model)  # every weight read once a step
    print(f"ceilings: {decode_flops(model) / 1e9:.2f} GFLOP a token at the {dtype_name(dtype)} matmul peak "
          f"({peak / 1e9:.0f} GFLOP/s) {matmul_ceiling:8.1f} new tokens/s; {weight_bytes(model) / 1e6:.0f} MB of "
          f"weights at {bandwidth / 1e9:.1f} GB/s read {bandwidth_ceiling:8.1f}")
    rows = (("ours, eager", ours_tps), ("ours, plain PyTorch", plain_tps), ("ours, compiled step", compiled_tps),
            ("HF generate", hf_tps),
            ("no cache (recompute)", no_cache_tps), ("ours' products alone", products_tps))
    for name, tps in rows:
        print(f"{name:21} {tps:8.1f} new tokens/s   {tps / matmul_ceiling:6.1%} of the matmul ceiling, "
              f"{tps / bandwidth_ceiling:6.1%} of the bandwidth ceiling")
    best = max(ours_tps, compiled_tps)
    print(f"the compiled step took {compile_seconds:.1f} s to compile and warm up, before its timing; the CPU "
          f"speed-up (core/cpu_speedups.py) {ours_tps / plain_tps:.2f}x plain PyTorch, eager")
    print(f"ours (best) / HF = {best / hf_tps:5.2f}x (goal 1.5x); ours / no cache = {best / no_cache_tps:5.2f}x "
          f"(goal 10x); ours / bandwidth ceiling {best / bandwidth_ceiling:.1%} (goal 60%)")


if __name__ == "__main__":
    main()
