"""The CPU-only speed-ups, in one place, each a stage's one call, and the one setting that switches
them off (GPT2_TOOLKIT_CPU_SPEEDUPS=off: plain PyTorch, as on every other device). Neither times
anything nor writes a file, and the model never knows of them:

1. `keep_freed_memory(device)`: glibc's malloc keeps the memory a process frees. The trainers
   (train_gpt2.py, finetune_mc.py) call it before they build the model.
2. `speed_up_generation(model)`: every linear layer computes its product through oneDNN over a copy
   of its weight kept in oneDNN's blocked layout (`linear`). F.linear reorders the weight into that
   layout at every call, which reads and writes it once more: for the few rows of a decode step the
   product is bound by the weight's memory traffic, twice over. The copy is made at first use and
   again whenever the weight changes (its version counter or storage); it costs the weights' memory
   once more. sample.py calls it after loading the model.

Each stays only where it paid 10% or more in a whole process, side by side with plain PyTorch
(docs/benchmarks.md gives the figures, with the machines named). Left out after that test (#37):
the blockwise attention in training, a float32 KV cache for a bfloat16 model, the kept weight copy in
hellaswag.py and evaluate.py (1.06-1.08x in float32; a bfloat16 run scores under autocast, which
oneDNN's product ignores), and the per-machine timing that chose among these: its races flipped
between answers from run to run on the Intel Xeon with AMX.
"""

from __future__ import annotations

import ctypes
import os
import platform

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from core.errors import UserError

# glibc's own ways of setting malloc up: a caller who uses any of them is left to them.
MALLOC_VARIABLES = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_")
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4  # mallopt's parameters, from glibc's <malloc.h>


def enabled() -> bool:
    """Whether the speed-ups are on: GPT2_TOOLKIT_CPU_SPEEDUPS=off (or 0, false) switches them all off."""
    setting = os.environ.get("GPT2_TOOLKIT_CPU_SPEEDUPS", "on").lower()
    if setting not in ("on", "off", "1", "0", "true", "false"):
        raise UserError(f"GPT2_TOOLKIT_CPU_SPEEDUPS={setting!r}: choose on or off")
    return setting in ("on", "1", "true")


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
    copies of the weights, the gradients) paid a page fault per 4 KB, every step. The process then
    holds its peak memory, which it needs again every step anyway. A block mapped before the call is
    still returned when freed: call it before the model's first step. Nothing changes where the caller
    set malloc up (`caller_malloc_settings`), which this call would otherwise override, or where the
    speed-ups are off."""
    if (device.type != "cpu" or platform.libc_ver()[0] != "glibc" or caller_malloc_settings()
            or not enabled()):
        return False
    libc = ctypes.CDLL(None)  # the C library this process already runs on
    # No block gets a mapping of its own, and the heap's free top is never trimmed (glibc stores the
    # threshold as a size_t: -1 is the largest), so freed blocks stay in the heap for the next request.
    return bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, -1))


# -- 2. generation: oneDNN's product over a kept copy of each weight -------------------------------------

ONEDNN = torch.backends.mkldnn.is_available()  # whether this build of torch has oneDNN
_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> (its version and storage, oneDNN's copy)


def speed_up_generation(model: nn.Module) -> None:
    """On a CPU with the speed-ups on, every nn.Linear of `model` computes through `linear` from now on
    (weights and names unchanged); elsewhere nothing changes (cuBLAS needs no such copy)."""
    if next(model.parameters()).device.type != "cpu" or not enabled():
        return
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = PackedLinear


class PackedLinear(nn.Linear):
    """nn.Linear through `linear`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., in), weight (out, in): (..., out), as oneDNN's product over
    its kept copy of `weight` where that computes the same; F.linear elsewhere: where autograd needs the
    product, under autocast (oneDNN's product would multiply in the inputs' dtype), for dtypes other
    than float32 and bfloat16, for an inference tensor (no version counter to follow), and in code
    being compiled (a graph cannot hold the opaque copy)."""
    if not _packable(x, weight, bias):
        return F.linear(x, weight, bias)
    try:
        y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.size(-1)), packed_weight(weight), bias, "none", [],
                                               "")
    except RuntimeError:  # oneDNN without this product here (bfloat16 on some CPUs): F.linear
        return F.linear(x, weight, bias)
    return y.reshape(*x.shape[:-1], y.size(-1))


def _packable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    if torch.compiler.is_compiling():
        return False
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias))
    return (x.device.type == "cpu" and ONEDNN and not needs_grad and not torch.is_autocast_enabled("cpu")
            and x.dtype == weight.dtype in (torch.float32, torch.bfloat16) and not weight.is_inference())


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of `weight`, made again whenever the weight has changed since: an
    optimizer step or load_state_dict writes in place (which bumps its version counter), and
    `.data =` swaps its storage."""
    state = (weight._version, weight.data_ptr())
    kept = _packed.get(weight)
    if kept is None or kept[0] != state:
        kept = _packed[weight] = (state, torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
    return kept[1]
