"""Random weights for test models, larger than GPT-2's init.

GPT-2's std-0.02 init gives logits of about 0.1 and near-uniform predictions: a wrong GELU, epsilon or
mask then hides under a 1e-5 tolerance, and argmax decisions become near ties. Redrawing every
parameter (biases and LayerNorm gains included) with std 0.3-0.5 makes activations O(1).
"""

from __future__ import annotations

import torch
from torch import nn


def redraw_weights(model: nn.Module, std: float = 0.3) -> nn.Module:
    """Every parameter of `model` drawn anew from N(0, std); returns the model in eval mode."""
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, std)
    return model.eval()
