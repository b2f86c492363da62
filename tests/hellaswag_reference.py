"""The plainest HellaSwag scorer, build-nanogpt's method: one example per forward pass, its endings
as rows padded to the longest, losses masked to the ending tokens. The reference for
core/hellaswag.py, used by tests/test_hellaswag.py and bench/bench_hellaswag.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from core.hellaswag import Example
from model import GPT


@torch.inference_mode()
def reference_scores(model: GPT, example: Example) -> tuple[int, int, list[float], list[float]]:
    """pred (argmin summed loss), pred_norm (argmin mean loss), and the two losses per ending."""
    rows = [example.context + ending for ending in example.endings]
    tokens = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for i, row in enumerate(rows):
        tokens[i, : len(row)] = torch.tensor(row)
        mask[i, len(example.context) : len(row)] = 1
    device = model.device
    logits, _ = model(tokens.to(device))
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), tokens[:, 1:].to(device), reduction="none")
    shift_mask = mask[:, 1:].to(device)
    sum_losses = (losses * shift_mask).sum(dim=1)
    mean_losses = sum_losses / shift_mask.sum(dim=1)
    return int(sum_losses.argmin()), int(mean_losses.argmin()), sum_losses.tolist(), mean_losses.tolist()
