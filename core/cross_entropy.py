"""The training loss: the output layer and cross-entropy in one pass over chunks of rows.

The output layer of a small GPT makes its largest activation: 2048 positions x 50,257 logits is
412 MB in float32, and the plain loss writes it, its log-softmax, and both their gradients, four
passes over memory the CPU's caches never hold (and each fresh allocation of that size costs page
faults on top). Computing the loss chunk by chunk, with each chunk's gradient taken in the forward
pass, keeps a few hundred MB live instead (the idea of Liger-Kernel's FusedLinearCrossEntropy, and of
Wijmans et al. 2024, "Cut Your Losses").

A chunk makes two passes over its (rows, vocab) matrix besides the three products: one softmax, in
the products' dtype (bfloat16 under autocast), and one sum. The softmax becomes the gradient of the
logits, softmax - one_hot(target), in place: its target entries are replaced by -(1 - p(target)), the
sum of the row's other probabilities. So no pass converts the matrix to float32 and back or scales it
(the rows' weights scale the (rows, C) side of the products instead), and where p(target) is near 1,
1 - p(target) keeps its digits, as it would not if taken from a p(target) rounded near 1.

Every device uses the chunked form. On a GPU the plain form's float32 logits are what runs out of
memory first: 64 x 1024 positions of GPT-2's head are 12.3 GiB, and its log-softmax as much again.
Under torch.compile the loop runs eagerly, between the compiled parts of the model.

A pure function of its inputs, like the model that calls it: no files, no timing, no state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -1  # targets equal to this contribute nothing (padding, the ends of packed rows)
# A chunk's logits and probabilities take at most this much memory together, so the loss's memory is
# bounded for any batch. Within it, chunks are as large as they can be: a chunk's three GEMMs run
# faster with more rows.
CHUNK_BYTES = 256 * 2**20
# The softmax computes exp(logit - max), then divides by a sum of up to 50k such terms: a p(target)
# below this may have passed through float32's subnormals (under 2**-126), where it keeps few digits
# or none, so its row (a loss above 69) gets its loss from the row's logits again, in float32.
SMALLEST_EXACT_PROBABILITY = 2.0**-100


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         vocab_size: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of the logits `hidden @ weight.T` against `targets`, skipping IGNORE_INDEX.

    hidden (N, C), weight (V, C), targets (N,). With `vocab_size` < V, the rows of `weight` past it
    (a padded vocabulary) take part in the products but not in the softmax: their logits are -inf.
    In float32, the value of F.cross_entropy over float32 logits; under bfloat16 autocast the
    softmax is rounded to bfloat16 as the logits are, each row's loss within 2**-8 of p(target).
    """
    vocab_size = weight.size(0) if vocab_size is None else vocab_size
    if torch.compiler.is_compiling():
        # Traced, the loop would be unrolled into one graph holding every chunk, whose compile time and
        # memory grow with the batch (at 25 chunks on a CPU: 50 s more compiling, 1.5 GB more); and
        # inductor's softmax was slower than ATen's on a CPU. Disabled here rather than with a
        # decorator, which would import torch._dynamo (3 s) into every script that never compiles.
        return torch.compiler.disable(ChunkedLinearCrossEntropy.apply)(hidden, weight, targets, vocab_size)
    return ChunkedLinearCrossEntropy.apply(hidden, weight, targets, vocab_size)


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, when gradients are wanted, the gradients too, chunk by chunk;
    backward only scales them by the incoming gradient (1 / accumulation steps in training)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor,
                targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
        # Under autocast the products and the softmax run in its dtype, as F.linear's would; the loss
        # and the weight gradient's sum run in float32.
        device = hidden.device.type
        if not torch.amp.is_autocast_available(device):  # the meta device, say
            return _forward(ctx, hidden, weight, targets, vocab_size, hidden.dtype)
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        if dtype == torch.float16:  # (CUDA's default autocast) its range flushes a 50k-way softmax's small p to 0
            dtype = torch.float32
        with torch.autocast(device, enabled=False):
            return _forward(ctx, hidden, weight, targets, vocab_size, dtype)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx,
                 grad_loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:
        grad_hidden, grad_weight = ctx.saved_tensors
        grad_hidden = grad_hidden * grad_loss.to(grad_hidden.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = grad_weight * grad_loss.to(grad_weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None


def _forward(ctx: torch.autograd.function.FunctionCtx, hidden: torch.Tensor, weight: torch.Tensor,
             targets: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    wants_grad_hidden, wants_grad_weight = ctx.needs_input_grad[:2]
    hidden_c, weight_c = hidden.to(dtype), weight.to(dtype)
    device = hidden.device
    keep = targets != IGNORE_INDEX
    target = targets.clamp(min=0)  # ignored rows point at token 0, then weigh 0
    count = keep.sum()
    row_weight = (keep.float() / count).unsqueeze(1)  # d(mean loss) / d(a row's loss), (N, 1)
    target_prob = torch.empty(targets.shape, dtype=torch.float32, device=device)
    others_prob = torch.empty(targets.shape, dtype=torch.float32, device=device)  # 1 - p(target)
    grad_hidden = torch.empty_like(hidden) if wants_grad_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=device) if wants_grad_weight else None
    # A low-precision product cannot accumulate into float32 in place: it lands here first. Reused,
    # as a fresh (V, C) tensor per chunk would cost its page faults every time.
    partial = (torch.empty(weight.shape, dtype=dtype, device=device) if wants_grad_weight and dtype != torch.float32
               else None)
    for chunk in _chunks(hidden.size(0), weight.size(0), dtype.itemsize):
        h = hidden_c[chunk]
        grad_logits, target_prob[chunk], others_prob[chunk] = _softmax_gradient(h, weight_c, target[chunk],
                                                                                vocab_size)
        if wants_grad_hidden:
            grad_hidden[chunk] = (grad_logits @ weight_c).float().mul_(row_weight[chunk])
        if wants_grad_weight and partial is None:
            grad_weight.addmm_(grad_logits.T, h * row_weight[chunk])
        elif wants_grad_weight:
            grad_weight += torch.mm(grad_logits.T, (h.float() * row_weight[chunk]).to(dtype), out=partial)
        del grad_logits  # before the next chunk's logits: two (r, V) buffers live at most, not three
    ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype) if grad_weight is not None else None)
    row_loss = _row_loss(hidden_c, weight_c, target, vocab_size, keep, target_prob, others_prob)
    return torch.where(keep, row_loss, 0.0).sum() / count


def _softmax_gradient(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor,
                      vocab_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(h @ weight.T) - one_hot(target) over the first `vocab_size` ids, in the products' dtype
    (the gradient of each row's loss by its logits); and, in float32, p(target) and 1 - p(target).
    h (r, C), weight (V, C), target (r,)."""
    logits = _logits(h, weight, vocab_size)
    probs = torch.softmax(logits, 1)  # a pass of its own: each row's max, exp and sum stay in cache
    del logits
    rows = torch.arange(h.size(0), device=h.device)
    target_prob = probs[rows, target].float()
    probs[rows, target] = 0
    others_prob = probs.sum(1)  # 1 - p(target) from the other probabilities: its digits kept where p is near 1
    probs[rows, target] = -others_prob
    return probs, target_prob, others_prob.float()


def _logits(h: torch.Tensor, weight: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """h (r, C) @ weight.T -> (r, V), -inf at the padded ids: probability 0, so no gradient either."""
    logits = F.linear(h, weight)
    logits[:, vocab_size:] = float("-inf")
    return logits


def _row_loss(hidden: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, vocab_size: int,
              keep: torch.Tensor, target_prob: torch.Tensor, others_prob: torch.Tensor) -> torch.Tensor:
    """Each row's -log p(target), float32 (N,): from 1 - p(target) where p is near 1 (log1p keeps the
    small loss exact), from p(target) elsewhere, and where p(target) is too small for that, from the
    row's logits again, recomputed for those rows alone. Ignored rows (not `keep`) may hold inf."""
    loss = torch.where(others_prob < 0.5, -torch.log1p(-others_prob), -target_prob.log())
    far = keep & (target_prob < SMALLEST_EXACT_PROBABILITY) & (others_prob >= 0.5)
    if far.is_meta:  # no values to look at
        return loss
    far_rows = far.nonzero().squeeze(1)  # one device sync per call, not per chunk
    if far_rows.numel() == 0:  # the common case
        return loss
    for chunk in _chunks(far_rows.numel(), weight.size(0), 4):
        rows = far_rows[chunk]
        logits = _logits(hidden[rows], weight, vocab_size).float()
        target_logit = logits.gather(1, target[rows].unsqueeze(1)).squeeze(1)
        loss[rows] = torch.logsumexp(logits, 1) - target_logit
    return loss


def _chunks(rows: int, vocab_size: int, itemsize: int) -> list[slice]:
    """Equal slices of `rows` whose logits and probabilities (two buffers of `itemsize` bytes an
    element) fit in CHUNK_BYTES, at least one row each."""
    most_rows = max(1, CHUNK_BYTES // (2 * itemsize * vocab_size))
    count = -(-rows // most_rows)
    size = -(-rows // count)
    return [slice(start, start + size) for start in range(0, rows, size)]
