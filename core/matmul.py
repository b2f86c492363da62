"""An opt-in speed-up for inference on the CPU: every linear layer's x @ W.T (+ b) in whichever of
its formulations runs fastest on this machine, measured once. sample.py, hellaswag.py and evaluate.py
apply it to their model on a CPU (`use_measured_matmuls`); the model itself, and training, never touch it.

The formulations:
- `linear`: F.linear, as the model computes.
- `transposed`: `(W @ x.T).T`. A CPU BLAS runs the same product at different speeds depending on
  which operand it sees as the long side.
- `packed`: oneDNN's product over a copy of the weight kept in its blocked layout (what inductor's
  freezing does). F.linear reorders the weight into that layout at every call, which reads and
  writes it once more: for a few rows (a decode step) the product is then bound by the weight's
  memory traffic, twice over. The copy is made at first use and again whenever the weight changes
  (its version counter or storage); it costs the weight's memory once more, for the layers that take it.
Which one wins depends on the processor, the dtype and the shape (the README's benchmark tables give
figures, with the machines named), so the first use of each shape times all of them and keeps the fastest.

They agree to rounding, not always bit for bit (the libraries may split the sums differently), and
two processes must compute the same (a run of sample.py with a seed gives the same samples, the
ranks of a torchrun'd hellaswag.py score alike). So each answer is measured once per machine and
kept in the cache folder (`matmul_formulations.json`), under a lock so that concurrent processes
measure each shape only once and all agree. Products that autograd differentiates go through
F.linear. Code being compiled cannot time anything, so it takes the choice the same product got when
it last ran eagerly (`packed` as F.linear: a graph cannot hold oneDNN's copy).

GPT2_TOOLKIT_MATMUL=linear (or =transposed, =packed) takes that formulation for every product and
measures nothing: numbers that do not depend on this machine's timings, which is what the tests run with.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from core.cache import fastest, forced_answer, measured_once
from core.devices import cpu_name

FORMULATIONS = ("linear", "transposed", "packed")
ONEDNN = torch.backends.mkldnn.is_available()  # whether this build of torch has oneDNN: `packed` needs it
# Another formulation must beat F.linear by this factor to be chosen: a near tie is not worth a
# product that may round differently from F.linear.
MARGIN = 1.1
TIMED_CALLS = 2
# Products of more rows are timed on this many: the winner was the same from 128 to 2048 rows for
# every GPT-2 shape where we measured, and timing a 2048-row output layer in full would cost seconds.
MEASURED_ROWS = 128
# Named apart from the file of earlier versions, which kept true or false (transposed or not) and
# would read this one's names as true.
DECISIONS_FILE = "matmul_formulations.json"

_decisions: dict[tuple, str] = {}  # this process's copy of the machine's answers
_last_choice: dict[tuple, str] = {}  # by shape alone: what code being compiled reads
_packed: WeakIdKeyDictionary = WeakIdKeyDictionary()  # weight -> (its version and storage, oneDNN's copy)


def use_measured_matmuls(model: nn.Module) -> None:
    """On a CPU, every nn.Linear of `model` computes through `linear` from now on (weights and names
    unchanged). Elsewhere nothing changes: cuBLAS chooses well on its own."""
    if next(model.parameters()).device.type != "cpu":
        return
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MeasuredLinear


class MeasuredLinear(nn.Linear):
    """nn.Linear through `linear`: the fastest formulation of its product on this machine."""

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
        # product got when it last ran eagerly (in the same thread count and autocast), else F.linear;
        # and a graph cannot hold oneDNN's opaque copy of a weight, so `packed` runs as F.linear there.
        formulation = _last_choice.get(shape, "linear")
        formulation = "linear" if formulation == "packed" else formulation
    else:
        formulation = _last_choice[shape] = _choose(shape, x2d, weight, bias)
    y = PRODUCTS[formulation](x2d, weight, bias)
    return y.reshape(*x.shape[:-1], y.size(-1))


@functools.cache
def forced_choice() -> str | None:
    """GPT2_TOOLKIT_MATMUL's formulation for every product, or None: measure each."""
    return forced_answer("GPT2_TOOLKIT_MATMUL", FORMULATIONS)


def _choose(shape: tuple, x2d: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> str:
    """This product's formulation: as GPT2_TOOLKIT_MATMUL says, else as measured here; `linear`
    where the chosen one cannot run on these operands."""
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    usable = usable_formulations(x2d, weight, autocast)
    forced = forced_choice()
    if forced is not None:
        return forced if forced in usable else "linear"
    key = (*shape, autocast, torch.get_num_threads())
    formulation = _decisions.get(key)  # a tuple: this runs at every product, so no string, no file
    if formulation is None:
        measure = functools.partial(fastest_formulation, x2d[:MEASURED_ROWS], weight, bias, usable)
        formulation = _decisions[key] = measured_once(DECISIONS_FILE, _file_key(*key), FORMULATIONS, measure)
    return formulation if formulation in usable else "linear"


def usable_formulations(x: torch.Tensor, weight: torch.Tensor, autocast: torch.dtype | None) -> tuple[str, ...]:
    """The formulations that compute F.linear(x, weight) here, under `autocast` (its dtype, or None).
    oneDNN's product knows nothing of autocast (it would multiply in the inputs' dtype, not
    autocast's) and runs float32 and bfloat16 only; an inference tensor has no version counter, so
    its copy could not be kept up to date."""
    packable = (ONEDNN and autocast is None and x.dtype == weight.dtype in (torch.float32, torch.bfloat16)
                and not weight.is_inference())
    return FORMULATIONS if packable else FORMULATIONS[:2]


def linear_transposed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a 2-D x, computed as (W @ x.T).T: the weight is the long side of the GEMM."""
    if bias is None:
        return (weight @ x.T).T
    return torch.addmm(bias.unsqueeze(1), weight, x.T).T


def linear_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear for a 2-D x, computed by oneDNN over its blocked copy of `weight`."""
    return _packed_product(x, packed_weight(weight), bias)


def packed_weight(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked copy of `weight`, made again whenever the weight has changed since: an
    optimizer step or load_state_dict writes in place (which bumps its version counter), and
    `.data =` swaps its storage."""
    state = (weight._version, weight.data_ptr())
    kept = _packed.get(weight)
    if kept is None or kept[0] != state:
        kept = _packed[weight] = (state, _pack(weight))
    return kept[1]


def _pack(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach())


def _packed_product(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


PRODUCTS = {"linear": F.linear, "transposed": linear_transposed, "packed": linear_packed}


@torch.no_grad()
def fastest_formulation(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        usable: tuple[str, ...]) -> str:
    """The fastest of the `usable` formulations on these operands (core.cache.fastest; oneDNN's copy
    made before, as it is made once); F.linear unless another wins by MARGIN."""
    packed = None
    if "packed" in usable:
        try:
            packed = _pack(weight)
            _packed_product(x, packed, bias)
        except RuntimeError:  # a oneDNN build without this product for these operands: the others compete
            usable = tuple(name for name in usable if name != "packed")
    products = {"linear": lambda: F.linear(x, weight, bias), "transposed": lambda: linear_transposed(x, weight, bias),
                "packed": lambda: _packed_product(x, packed, bias)}
    return fastest({name: products[name] for name in usable}, "linear", MARGIN, TIMED_CALLS)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _file_key(size_class: int, in_features: int, out_features: int, x_dtype: torch.dtype, weight_dtype: torch.dtype,
              bias: bool, autocast: torch.dtype | None, threads: int) -> str:
    """The decisions file's name for a product: what the answer depends on, the machine included."""
    return (f"{cpu_name()} | torch {torch.__version__}, {threads} threads | {size_class} x {in_features} -> "
            f"{out_features}, {x_dtype}, weight {weight_dtype}, bias {bias}, autocast {autocast}")
