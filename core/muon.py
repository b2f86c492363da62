"""Muon: SGD with Nesterov momentum whose update is orthogonalized before it is applied (Keller Jordan,
"Muon: An optimizer for hidden layers in neural networks", kellerjordan.github.io/posts/muon, 2024, and
modded-nanogpt, which it took from 31.4 to 24.9 minutes on 8 x H100).

For a weight matrix W with momentum-averaged gradient G = U S V^T, the update is U V^T: every direction
of the gradient moves the weights by the same amount. Newton-Schulz iterations approximate U V^T with
matmuls alone; the quintic below (Keller Jordan's coefficients) is tuned to push every singular value
into a band around 1 in 5 steps, not to converge to exactly 1. Muon is for the 2-D weights of the hidden
layers; embeddings, the head, biases and gains stay with AdamW (core/optim.py puts them there).

Following modded-nanogpt, the scale of each update is sqrt(max(1, rows / cols)), and a fused attention
matrix (GPT-2's c_attn, queries, keys and values stacked) is orthogonalized as its three square blocks.
Under torch.distributed every rank holds the same gradients (DDP averaged them) and the same momentum;
each rank orthogonalizes every world_size-th matrix and broadcasts it, so the Newton-Schulz work is
split over the ranks and every rank applies the same update (modded-nanogpt splits it the same way).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

NEWTON_SCHULZ_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An approximation of U V^T for matrix = U S V^T, by Newton-Schulz iterations in `dtype` (bfloat16 on
    GPUs, as modded-nanogpt runs them; float32 where bfloat16 matmuls are slow). Singular values end up
    roughly in [0.7, 1.2] rather than at 1: that is what the coefficients trade for speed."""
    a, b, c = NEWTON_SCHULZ_COEFFICIENTS
    x = matrix.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the transpose: x @ x.T is then the smaller square
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)  # every singular value <= 1, where the iteration works
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    if tall:
        x = x.mT
    return x.to(matrix.dtype)


def muon_update(gradient: torch.Tensor, blocks: int, dtype: torch.dtype) -> torch.Tensor:
    """The orthogonalized, scaled update of one weight matrix, its `blocks` row blocks each on its own."""
    parts = gradient.view(blocks, gradient.size(0) // blocks, gradient.size(1))
    rows, cols = parts.shape[-2:]
    return (orthogonalize(parts, dtype=dtype) * max(1.0, rows / cols) ** 0.5).view_as(gradient)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights. A parameter group may set `blocks` (how many stacked square matrices a
    weight is, 3 for c_attn); lr, momentum, nesterov and weight_decay (decoupled, as AdamW's) as usual."""

    def __init__(self, params: list, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, newton_schulz_dtype: torch.dtype = torch.float32) -> None:
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, blocks=1)
        super().__init__(params, defaults)
        self.newton_schulz_dtype = newton_schulz_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2 or p.size(0) % group["blocks"]:
                    raise ValueError(f"Muon takes 2-D weights whose rows split into {group['blocks']} blocks, "
                                     f"got shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure: None = None) -> None:
        rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for i, p in enumerate(params):
                momentum = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                momentum.lerp_(p.grad, 1 - group["momentum"])
                direction = p.grad.lerp_(momentum, group["momentum"]) if group["nesterov"] else momentum
                mine = i % world_size == rank
                updates.append(muon_update(direction, group["blocks"], self.newton_schulz_dtype) if mine
                               else torch.empty_like(p))
            if world_size > 1:
                handles = [dist.broadcast(update, src=i % world_size, async_op=True)
                           for i, update in enumerate(updates)]
                for handle in handles:
                    handle.wait()
            for p, update in zip(params, updates, strict=True):
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
