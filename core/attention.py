"""An opt-in speed-up for training on a CPU: causal self-attention in whichever of two formulations
runs faster on this machine, measured once per shape. The trainers apply it on a CPU
(`TrainingRun.wrap`); the model itself computes F.scaled_dot_product_attention, and nothing else
changes. (Scoring, which packs candidates under a mask of its own, would take `flash` anyway.)

The formulations of softmax(q k^T / sqrt(hs) + causal mask) v:
- `flash`: F.scaled_dot_product_attention, as the model computes it: on a CPU, ATen's flash kernel.
- `blocks`: the scores written out for each block of BLOCK queries against the keys up to the
  block's last position, a masked softmax, and the product with the values, differentiated by
  autograd. Its products are GEMMs large enough for the CPU BLAS, and the blocks skip most of the
  masked half of the scores. It keeps each block's probabilities for the backward pass (batch x heads
  x about T^2 / 2 entries a layer, in the products' dtype), which the flash kernel does not, and it
  rounds them to that dtype (bfloat16 under autocast) before the product with the values, as HF's
  eager attention does.
Which one wins depends on the processor, the dtype and the shape (the README's benchmark tables give
figures, with the machines named).

The two round differently, and a resumed run or the other ranks of a torchrun must compute what the
first process did: each answer is measured once per machine and kept in the cache folder
(`attention_formulations.json`), as core/matmul.py keeps its own. Code being compiled takes the same
answer: the measurement runs, eagerly, while torch.compile traces the first step, and the graph keeps
its answer as a constant. Attention under a mask of its own or with dropout takes `flash`.
GPT2_TOOLKIT_ATTENTION=flash (or =blocks) takes that formulation everywhere and measures nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.cache import fastest, forced_answer, measured_once
from core.devices import cpu_name
from model import CausalSelfAttention

FORMULATIONS = ("flash", "blocks")
BLOCK = 256  # queries a block: larger blocks make larger products, and skip less of the masked half
# `blocks` must beat `flash` by this factor to be chosen: a near tie is not worth the memory it keeps.
MARGIN = 1.1
TIMED_CALLS = 2
DECISIONS_FILE = "attention_formulations.json"

_decisions: dict[tuple, str] = {}  # this process's copy of the machine's answers


def use_measured_attention(model: nn.Module) -> None:
    """On a CPU, every attention layer of `model` attends through `causal_attention` from now on
    (weights and names unchanged). Elsewhere nothing changes."""
    if next(model.parameters()).device.type != "cpu":
        return
    for module in model.modules():
        if type(module) is CausalSelfAttention:
            module.__class__ = MeasuredAttention


class MeasuredAttention(CausalSelfAttention):
    """CausalSelfAttention whose causal attention without dropout takes the faster formulation here."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
               is_causal: bool) -> torch.Tensor:
        if mask is not None or not is_causal or (self.training and self.dropout > 0) or q.size(2) != k.size(2):
            return super().attend(q, k, v, mask, is_causal)
        return causal_attention(q, k, v)


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs), causal) v for (B, nh, T, hs) q, k, v, in the faster formulation."""
    if q.device.type == "cpu":
        B, nh, T, hs = q.shape  # symbolic in a graph compiled with dynamic shapes: it breaks here, at the choice
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        # Positions rounded up to a power of two: the prompts of a training run's samples, of every
        # length, share a handful of measurements.
        if chosen_formulation(B, nh, 1 << (T - 1).bit_length(), hs, q.dtype, training) == "blocks":
            return blockwise_causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def blockwise_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The `blocks` formulation: each block of BLOCK queries against the keys up to its last one."""
    T = q.size(2)
    q = q * q.size(-1) ** -0.5  # the (B, nh, T, hs) queries scaled, not each block's (B, nh, block, end) scores
    outputs = []
    for start in range(0, T, BLOCK):
        end = min(T, start + BLOCK)
        scores = q[:, :, start:end] @ k[:, :, :end].transpose(-1, -2)  # (B, nh, block, end)
        # Only the last (block, block) square holds future positions. Masked where autograd does not
        # look: their probabilities are 0, so softmax's backward already gives them no gradient, and a
        # masked_fill it saw would copy the whole block's scores forward and its gradient backward.
        future = torch.ones(end - start, end - start, dtype=torch.bool, device=q.device).triu(1)
        scores.detach()[..., start:].masked_fill_(future, float("-inf"))
        outputs.append(torch.softmax(scores, dim=-1) @ v[:, :, :end])
    return torch.cat(outputs, dim=2)


def forced_choice() -> str | None:
    """GPT2_TOOLKIT_ATTENTION's formulation for every causal attention, or None: measure each shape."""
    return forced_answer("GPT2_TOOLKIT_ATTENTION", FORMULATIONS)


@torch.compiler.assume_constant_result  # torch.compile runs it for real while tracing, and keeps its answer
def chosen_formulation(batch: int, heads: int, length: int, head_dim: int, dtype: torch.dtype, training: bool) -> str:
    """The formulation of causal attention over (batch, heads, up to `length`, head_dim) operands of
    `dtype`, and of their backward pass when `training`: as GPT2_TOOLKIT_ATTENTION says, else as
    measured here."""
    forced = forced_choice()
    if forced is not None:
        return forced
    key = (batch, heads, length, head_dim, dtype, training, torch.get_num_threads())
    answer = _decisions.get(key)
    if answer is None:
        name = (f"{cpu_name()} | torch {torch.__version__}, {torch.get_num_threads()} threads | {batch} x {heads} heads"
                f" x {length} positions x {head_dim}, {dtype}, {'forward and backward' if training else 'forward'}")
        shape = (batch, heads, length, head_dim)
        answer = _decisions[key] = measured_once(DECISIONS_FILE, name, FORMULATIONS,
                                                 lambda: faster_formulation(shape, dtype, training))
    return answer


def faster_formulation(shape: tuple[int, ...], dtype: torch.dtype, training: bool) -> str:
    """The faster formulation on random CPU operands of this shape and dtype, forward and backward
    when `training` (core.cache.fastest): `flash` unless `blocks` wins by MARGIN."""
    operands = [torch.randn(shape, dtype=dtype, requires_grad=training) for _ in range(3)]
    formulations = {"flash": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                    "blocks": blockwise_causal_attention}

    def run(attention: Callable[..., torch.Tensor]) -> None:
        y = attention(*operands)
        if training:
            torch.autograd.grad(y, operands, torch.ones_like(y))

    with torch.set_grad_enabled(training):
        return fastest({name: functools.partial(run, f) for name, f in formulations.items()}, "flash", MARGIN,
                       TIMED_CALLS)
