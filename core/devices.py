"""Choosing where and in which precision to run: `--device` and `--dtype` for every stage."""

from __future__ import annotations

import ctypes
import functools
import os
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
    machines the README's benchmark tables name), while evaluation keeps float32 on the CPU so that its
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


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`. On CUDA through pinned memory, so that the copy runs asynchronously;
    elsewhere a plain copy: `non_blocking` from pageable memory is a known silent-corruption pattern
    on MPS (pytorch#139550)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


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
    the README's tables, the first large exp_ of 2 in 30 fresh processes did, never after such a warm-up
    nor with one thread. A resumed run's first step is its process's first, so without this, bitwise
    resume failed now and then."""
    if device.type == "cpu":
        torch.ones(1 << 20).exp_()


# glibc's own ways of setting malloc up: a caller who uses any of them is left to them.
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameters, from glibc's <malloc.h>


def caller_malloc_settings() -> dict[str, str]:
    """The environment's settings of glibc's malloc: its variables, and GLIBC_TUNABLES if it tunes malloc."""
    settings = {name: os.environ[name] for name in MALLOC_VARIABLES if name in os.environ}
    if "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", ""):
        settings["GLIBC_TUNABLES"] = os.environ["GLIBC_TUNABLES"]
    return settings


def keep_freed_memory(device: torch.device) -> bool:
    """On the CPU under glibc, tell malloc to keep the memory a process frees for its next requests;
    whether it did. glibc hands every freed block over 32 MB back to the system and maps a fresh one at
    the next request, so each large tensor of a training step (a chunk of logits, autocast's bfloat16
    copies of the weights, the gradients) paid a page fault per 4 KB, every step: 1.5x slower steps on
    the README's Xeon. The process then holds its peak memory, which it needs again every step anyway.
    Called before the model is built: a block mapped before the call is still returned when freed.
    Nothing changes where the caller set malloc up (`caller_malloc_settings`), which this call would
    otherwise override."""
    if device.type != "cpu" or platform.libc_ver()[0] != "glibc" or caller_malloc_settings():
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    # No block gets a mapping of its own, and the heap's free top is never trimmed (glibc stores the
    # threshold as a size_t: -1 is the largest), so freed blocks stay in the heap for the next request.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


def dtype_name(dtype: torch.dtype) -> str:
    """"bfloat16" for torch.bfloat16: the spelling of --dtype, for reports and config.toml."""
    return str(dtype).removeprefix("torch.")


# /proc/cpuinfo flags of bfloat16 arithmetic in hardware: a bfloat16 matmul runs at several times the
# float32 rate with them, at ~1% of it without (the README's benchmark tables give figures).
NATIVE_BFLOAT16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")


def cpu_has_native_bfloat16() -> bool:
    return any(flag in NATIVE_BFLOAT16_FLAGS for flag in _cpuinfo("flags", "Features").split())


@functools.cache  # read once: core/matmul.py names its per-machine answers with it
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
