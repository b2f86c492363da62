"""Choosing where and in which precision to run: `--device` and `--dtype` for every stage."""

from __future__ import annotations

import functools
import platform

import torch

from core.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple's MPS, then the CPU; anything else must exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserError(f"bad device {name!r}: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} requested, but CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"device {name!r} requested, but this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device {name!r} requested, but MPS is not available on this machine")
    return device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device`: a GPU runs asynchronously, so a timer must wait for it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resolve_dtype(name: str, device: torch.device, cpu_bfloat16: bool = False) -> torch.dtype:
    """`auto` is bfloat16 on GPUs with native support and float32 everywhere else (CPU kernels for
    bfloat16 are slow on most processors, and float16 needs loss scaling to train). With
    `cpu_bfloat16`, `auto` is also bfloat16 on CPUs with native bfloat16 units (AVX512-BF16 or AMX on
    x86, BF16 on Arm): sampling and training ask for it (their steps ran faster so, measured on the
    machines docs/benchmarks.md names), while evaluation keeps float32 on the CPU so that its
    numbers stay comparable with the published ones."""
    if name == "auto":
        # Native bfloat16 arrived with Ampere (compute capability 8); older GPUs only emulate it, slowly.
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
            return torch.bfloat16
        if device.type == "cpu" and cpu_bfloat16 and cpu_has_native_bfloat16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r} (choose auto, {', '.join(DTYPES)})")
    return DTYPES[name]


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype of sums over many batches (val loss, accuracy counts): float64, except on MPS, which
    has no float64 (pytorch#122602)."""
    return torch.float32 if device.type == "mps" else torch.float64


def enable_tf32(device: torch.device) -> None:
    """float32 matmuls and convolutions as TF32 on CUDA: every stage's setting, as build-nanogpt's
    (`torch.set_float32_matmul_precision("high")`); nothing elsewhere."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def settle_cpu_threads(device: torch.device) -> None:
    """Run one multithreaded CPU op before any that counts. The first parallel region of a process may
    split its work between the threads otherwise than every later one, and where vectorized and scalar
    code round differently (exp, tanh) the results then differ in the last bit: on the 2-core Xeon of
    docs/benchmarks.md, the first large exp_ of 2 in 30 fresh processes did, never after such a warm-up
    nor with one thread. A resumed run's first step is its process's first, so without this, bitwise
    resume failed now and then."""
    if device.type == "cpu":
        torch.ones(1 << 20).exp_()


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the spelling of --dtype, for reports and config.toml."""
    return str(dtype).removeprefix("torch.")


# /proc/cpuinfo flags of bfloat16 arithmetic in hardware: a bfloat16 matmul runs at several times the
# float32 rate with them, at ~1% of it without (docs/benchmarks.md gives figures).
NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_has_native_bfloat16() -> bool:
    return any(flag in NATIVE_BFLOAT16_FLAGS for flag in _cpuinfo("flags", "Features").split())


@functools.cache  # read once: the processor does not change while a process runs
def cpu_name() -> str:
    """The processor's model name ("AMD EPYC 9R14", ...), for benchmarks and per-machine answers."""
    return _cpuinfo("model name") or platform.processor() or platform.machine()


def _cpuinfo(*fields: str) -> str:
    """The first of these fields in /proc/cpuinfo ("" where there is none, or no Linux)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() in fields:
                    return value.strip()
    except OSError:
        pass
    return ""
