"""An opt-in speed-up for inference on the CPU: every linear layer's x @ W.T (+ b) in whichever of
its two formulations runs faster on this machine, measured once. sample.py and hellaswag.py apply it
to their model on a CPU (`use_measured_matmuls`); the model itself, and training, never touch it.

A CPU BLAS runs the same product at different speeds depending on which operand it sees as the
long side: `(W @ x.T).T` or `x @ W.T`. Which one wins depends on the processor, the dtype and the
shape (the README's benchmark tables give figures, with the machines named), so the first use of
each shape times both formulations and keeps the faster.

The two agree to rounding, not always bit for bit (the BLAS may split the sums differently), and
two processes must compute the same (a run of sample.py with a seed gives the same samples, the
ranks of a torchrun'd hellaswag.py score alike). So each answer is measured once per machine and
kept in the cache folder (`matmul.json`), under a lock so that concurrent processes measure each
shape only once and all agree. Products that autograd differentiates go through F.linear. Code being
compiled cannot time anything, so it takes the choice the same product got when it last ran eagerly.

GPT2_TOOLKIT_MATMUL=linear (or =transposed) takes that formulation for every product and measures
nothing: numbers that do not depend on this machine's timings, which is what the tests run with.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from core.atomic import write_file_atomically
from core.cache import cache_dir
from core.devices import cpu_name
from core.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no lock; concurrent first uses may then measure twice
    fcntl = None

# The transposed form must win by this factor to be chosen: a near tie is not worth a product that
# may round differently from F.linear.
MARGIN = 1.1
TIMED_CALLS = 2
# Products of more rows are timed on this many: the winner was the same from 128 to 2048 rows for
# every GPT-2 shape where we measured, and timing a 2048-row output layer in full would cost seconds.
MEASURED_ROWS = 128
DECISIONS_FILE = "matmul.json"

_decisions: dict[tuple, bool] = {}  # this process's copy of the machine's answers
_last_choice: dict[tuple, bool] = {}  # by shape alone: what code being compiled reads


def use_measured_matmuls(model: nn.Module) -> None:
    """On a CPU, every nn.Linear of `model` computes through `linear` from now on (weights and names
    unchanged). Elsewhere nothing changes: cuBLAS chooses well on its own."""
    if next(model.parameters()).device.type != "cpu":
        return
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MeasuredLinear


class MeasuredLinear(nn.Linear):
    """nn.Linear through `linear`: the faster formulation of its product on this machine."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) for x (..., in), weight (out, in): (..., out)."""
    if x.device.type != "cpu" or _needs_grad(x, weight, bias):
        return F.linear(x, weight, bias)
    rows = x.numel() // x.size(-1)
    x2d = x.reshape(rows, x.size(-1))
    # Rows as they matter to a GEMM: exact for a few (decode batches), else rounded up to a power of
    # two up to MEASURED_ROWS (prompts of every length share one measurement per size class).
    size_class = rows if rows <= 16 else min(1 << (rows - 1).bit_length(), MEASURED_ROWS)
    shape = (size_class, weight.size(1), weight.size(0), x.dtype, weight.dtype, bias is not None)
    if torch.compiler.is_compiling():
        # Nothing can be timed while tracing: the graph takes, as a constant, the choice the same
        # product got when it last ran eagerly (in the same thread count and autocast), else F.linear.
        transposed = _last_choice.get(shape, False)
    else:
        transposed = _last_choice[shape] = _choose(shape, x2d, weight, bias)
    y = linear_transposed(x2d, weight, bias) if transposed else F.linear(x2d, weight, bias)
    return y.reshape(*x.shape[:-1], y.size(-1))


@functools.cache
def forced_choice() -> bool | None:
    """GPT2_TOOLKIT_MATMUL's answer for every product (True: transposed), or None: measure each."""
    setting = os.environ.get("GPT2_TOOLKIT_MATMUL", "measure")
    choices = {"measure": None, "linear": False, "transposed": True}
    if setting not in choices:
        raise UserError(f"GPT2_TOOLKIT_MATMUL={setting!r}: choose measure, linear or transposed")
    return choices[setting]


def _choose(shape: tuple, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether this product runs transposed: as GPT2_TOOLKIT_MATMUL says, else as measured here."""
    forced = forced_choice()
    if forced is not None:
        return forced
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    key = (*shape, autocast, torch.get_num_threads())
    transposed = _decisions.get(key)  # a tuple: this runs at every product, so no string, no file
    if transposed is None:
        transposed = _decisions[key] = _decide(_file_key(*key), x2d[:MEASURED_ROWS], weight, bias)
    return transposed


def linear_transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a 2-D x, computed as (W @ x.T).T: the weight is the long side of the GEMM."""
    if bias is None:
        return (weight @ x.T).T
    return torch.addmm(bias.unsqueeze(1), weight, x.T).T


@torch.no_grad()
def transposed_is_faster(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Times both formulations on these operands (the best of a few calls each, interleaved so that
    a burst of load from elsewhere hits both alike)."""
    candidates = (lambda: F.linear(x, weight, bias), lambda: linear_transposed(x, weight, bias))
    best = [float("inf"), float("inf")]
    for call in range(TIMED_CALLS + 1):  # call 0 warms up caches and the allocator
        for i, product in enumerate(candidates):
            start = time.perf_counter()
            product()
            if call > 0:
                best[i] = min(best[i], time.perf_counter() - start)
    return best[1] * MARGIN < best[0]


def _decide(key: str, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """The machine's answer for `key`: from the decisions file, else measured now and added to it."""
    path = cache_dir() / DECISIONS_FILE
    try:
        with _locked(path):
            decisions = _read(path)
            if key not in decisions:
                decisions[key] = transposed_is_faster(x, weight, bias)
                write_file_atomically(path, (json.dumps(decisions, indent=1, sort_keys=True) + "\n").encode())
            return decisions[key]
    except OSError:  # no writable cache folder: measured for this process only
        return transposed_is_faster(x, weight, bias)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _read(path: Path) -> dict[str, bool]:
    try:
        decisions = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged: measure again
        return {}
    return decisions if isinstance(decisions, dict) else {}


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _file_key(size_class: int, in_features: int, out_features: int, x_dtype: torch.dtype, weight_dtype: torch.dtype,
              bias: bool, autocast: torch.dtype | None, threads: int) -> str:
    """The decisions file's name for a product: what the answer depends on, the machine included."""
    return (f"{cpu_name()} | torch {torch.__version__}, {threads} threads | {size_class} x {in_features} -> "
            f"{out_features}, {x_dtype}, weight {weight_dtype}, bias {bias}, autocast {autocast}")
