"""AdamW with weight decay on the 2-D weights only, and the learning-rate schedules: warmup + cosine
(pre-training, GPT-2/GPT-3), warmup + linear decay to zero (GPT-1's fine-tuning)."""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups: matmul weights and embeddings (dim >= 2) decay, biases and LayerNorm gains
    (dim < 2) do not. Tied weights appear once (named_parameters drops duplicates)."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def fused_adamw_available(device: torch.device) -> bool:
    """Fused AdamW (one kernel for all parameters) exists for CUDA and, since torch 2.4, the CPU."""
    return "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                   device: torch.device) -> torch.optim.AdamW:
    groups = decay_groups(model, weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused_adamw_available(device) or None)


def learning_rate(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to max_lr over warmup_steps (step 0 already gets max_lr / warmup_steps), then a
    cosine from max_lr down to min_lr at max_steps; min_lr after that. It depends on the step alone,
    so a resumed run picks the schedule up where it stopped."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def linear_learning_rate(step: int, max_lr: float, warmup_steps: int, max_steps: int) -> float:
    """GPT-1's fine-tuning schedule: linear warmup to max_lr over warmup_steps (step 0 already gets
    max_lr / warmup_steps), then a straight line down to 0 at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    return max_lr * max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))
