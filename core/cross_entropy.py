"""The training loss: the output layer and cross-entropy in one pass over chunks of rows.

The output layer of a small GPT makes its largest activation: 2048 positions x 50,257 logits is
412 MB in float32, and the plain loss writes it, its log-softmax, and both their gradients, four
passes over memory the CPU's caches never hold (and each fresh allocation of that size costs page
faults on top). Computing the loss chunk by chunk, with each chunk's
gradient taken while its logits are still in cache, keeps a few MB live instead (the idea of
Liger-Kernel's FusedLinearCrossEntropy, and of Wijmans et al. 2024, "Cut Your Losses").

Every device uses the chunked form. On a GPU the plain form's float32 logits are what runs out of
memory first: 64 x 1024 positions of GPT-2's head are 12.3 GiB, and its log-softmax as much again.
Under torch.compile the chunked loop runs eagerly, between the compiled parts of the model, and each
chunk through one compiled function (`_compiled_chunk_loss`), whose elementwise passes fuse.

A pure function of its inputs, like the model that calls it: no files, no timing; its one state is that
compiled function, made at the first use under torch.compile.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1  # targets equal to this contribute nothing (padding, the ends of packed rows)
# The float32 logits of one chunk take at most this much memory, so the loss's memory is bounded
# for any batch. Within it, chunks are as large as they can be: a chunk's three GEMMs run faster
# with more rows.
CHUNK_BYTES = 256 * 2**20


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` against `targets`, skipping IGNORE_INDEX.

    hidden (N, C), weight (V, C), targets (N,). With `vocab_size` < V, the rows of `weight` past it
    (a padded vocabulary) take part in the products but not in the softmax: their logits are -inf.
    The same value as F.cross_entropy over float32 logits.
    """
    vocab_size = weight.size(0) if vocab_size is None else vocab_size
    if torch.compiler.is_compiling():
        # Traced whole, the loop would be unrolled into one graph holding every chunk, whose compile
        # time and memory grow with the batch (at 25 chunks on a CPU: 50 s more compiling, 1.5 GB more).
        # So a compiled model runs the loop eagerly and each chunk through one compiled function.
        # Disabled here rather than with a decorator, which would import torch._dynamo (3 s) into
        # every script that never compiles.
        return torch.compiler.disable(ChunkedLinearCrossEntropy.apply)(hidden, weight, targets, vocab_size, True)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, vocab_size, False)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, when gradients are wanted, the gradients too, chunk by chunk;
    backward only scales them by the incoming gradient (1 / accumulation steps in training)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor,
                targets: torch.Tensor, vocab_size: int, compiled: bool) -> torch.Tensor:
        # Under autocast the products run in its dtype, as F.linear's would; the softmax always
        # runs in float32 (a log-sum-exp over 50k logits needs it), and so does the weight gradient's sum.
        device = hidden.device.type
        if not torch.amp.is_autocast_available(device):  # the meta device, say
            return _forward(ctx, hidden, weight, targets, vocab_size, hidden.dtype, compiled)
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            return _forward(ctx, hidden, weight, targets, vocab_size, dtype, compiled)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad_weight * grad_loss.to(grad_weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None


def _forward(ctx: torch.autograd.function.FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor,
             targets: torch.Tensor, vocab_size: int, dtype: torch.dtype, compiled: bool) -> torch.Tensor:
    wants_grad_hidden, wants_grad_weight = ctx.needs_input_grad[:2]
    wants_grad = wants_grad_hidden or wants_grad_weight
    hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
    count = (targets != IGNORE_INDEX).sum()
    grad_hidden = torch.empty_like(hidden) if wants_grad_hidden else None
    device = hidden.device
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if wants_grad_weight else None
    # A low-precision product cannot accumulate into float32 in place: it lands here first. Reused,
    # as a fresh (V, C) tensor per chunk would cost its page faults every time.
    partial = (torch.empty(weight.shape, dtype=dtype, device=device) if wants_grad_weight and dtype != torch.float32
               else None)
    total = torch.zeros((), dtype=torch.float32, device=device)
    chunk_loss = _compiled_chunk_loss() if compiled else _chunk_loss
    for rows in _chunks(hidden.size(0), weight.size(0)):
        h = hidden_c[rows]
        loss_sum, grad_logits = chunk_loss(h, weight_c, targets[rows], count, vocab_size, wants_grad)
        total += loss_sum
        if wants_grad_hidden:
            grad_hidden[rows] = grad_logits @ weight_c
        if wants_grad_weight and partial is None:
            grad_weight.addmm_(grad_logits.T, h)  # (V, C)
        elif wants_grad_weight:
            grad_weight += torch.mm(grad_logits.T, h, out=partial)
    ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None)
    return total / count


def _chunk_loss(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, count: torch.Tensor, vocab_size: int,
                wants_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One chunk of rows: the sum of their losses, and d(mean loss)/d(logits) in the products' dtype
    when `wants_grad`. h (r, C), weight (V, C) in that dtype; `count` is the whole batch's."""
    keep = targets != IGNORE_INDEX
    target = targets.clamp(min=0).unsqueeze(1)  # ignored rows point at token 0, then count 0
    logits = F.linear(h, weight).float()  # (r, V)
    logits[:, vocab_size:] = float("-inf")  # padded ids: probability 0, so no gradient either
    target_logit = logits.gather(1, target).squeeze(1)
    peak = logits.amax(1, keepdim=True)
    probs = logits.sub_(peak).exp_()  # in place: the chunk's one (r, V) buffer from here on
    sum_exp = probs.sum(1, keepdim=True)
    log_sum_exp = (peak + sum_exp.log()).squeeze(1)
    loss_sum = torch.where(keep, log_sum_exp - target_logit, 0.0).sum()
    if not wants_grad:
        return loss_sum, None
    # d(mean loss)/d(logits) = (softmax - one_hot(target)) / count, zero on ignored rows
    weight_of_row = keep.float().unsqueeze(1) / count
    grad_logits = probs.mul_(weight_of_row / sum_exp)
    grad_logits.scatter_add_(1, target, -weight_of_row)
    return loss_sum, grad_logits.to(h.dtype)


@functools.cache
def _compiled_chunk_loss() -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """`_chunk_loss` compiled, made at the first use of a compiled model: its passes over the chunk's
    logits (the float32 copy, max, exp, sum, scale, cast) fuse into a few, where eagerly each reads and
    writes all of them."""
    return torch.compile(_chunk_loss)


def _chunks(rows: int, vocab_size: int) -> list[slice]:
    """Equal slices of `rows` whose float32 logits fit in CHUNK_BYTES (at least one row each)."""
    most_rows = max(1, CHUNK_BYTES // (4 * vocab_size))
    count = -(-rows // most_rows)
    size = -(-rows // count)
    return [slice(start, start + size) for start in range(0, rows, size)]
