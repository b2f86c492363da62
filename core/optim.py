"""The optimizers: AdamW with weight decay on the 2-D weights only (GPT-2, build-nanogpt), or Muon
(core/muon.py) for the 2-D weights inside the blocks with AdamW for the rest. The learning-rate
schedules live in the trainers that follow them (train_gpt2.py, finetune_mc.py), beside their step.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from core.errors import UserError
from core.muon import Muon


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Parameter groups: matmul weights and embeddings (dim >= 2) decay, biases and LayerNorm gains
    (dim < 2) do not. Tied weights appear once (named_parameters drops duplicates)."""
    return _split_by_decay([p for p in model.parameters() if p.requires_grad], weight_decay)


def _split_by_decay(params: list[nn.Parameter], weight_decay: float) -> list[dict]:
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def _adamw(groups: list[dict], lr: float, betas: tuple[float, float], eps: float,
           device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused_adamw_available(device) or None)


def fused_adamw_available(device: torch.device) -> bool:
    """Fused AdamW (one kernel for all parameters) exists for CUDA and, since torch 2.4, the CPU."""
    return "fused" in inspect.signature(torch.optim.AdamW).parameters and device.type in ("cuda", "cpu")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float], eps: float,
                   device: torch.device) -> torch.optim.AdamW:
    return _adamw(decay_groups(model, weight_decay), lr, betas, eps, device)


def muon_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The 2-D weights inside the transformer blocks, by name: what Muon takes. The embeddings (and the
    head tied to them), biases and LayerNorm gains are left to AdamW."""
    return [(name, p) for name, p in model.named_parameters()
            if p.requires_grad and name.startswith("transformer.h.") and p.dim() == 2]


class MuonWithAdamW:
    """Muon for the blocks' matrices and AdamW for every other parameter, stepped, zeroed, saved and
    loaded as one optimizer. One schedule drives both: Muon's groups carry `lr_scale`, `muon_lr /
    adamw_lr`, and a trainer sets each group's lr to the schedule's times its `lr_scale` (1 when absent)."""

    def __init__(self, model: nn.Module, adamw_lr: float, muon_lr: float, weight_decay: float,
                 betas: tuple[float, float], eps: float, muon_momentum: float, muon_weight_decay: float,
                 device: torch.device) -> None:
        hidden = muon_parameters(model)
        taken = {id(p) for _, p in hidden}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in taken]
        # c_attn stacks the query, key and value matrices: orthogonalized as three, as modded-nanogpt does
        self.muon_lr_scale = muon_lr / adamw_lr
        groups = [{"params": [p for name, p in hidden if name.endswith("attn.c_attn.weight")], "blocks": 3},
                  {"params": [p for name, p in hidden if not name.endswith("attn.c_attn.weight")], "blocks": 1}]
        for group in groups:
            group["lr_scale"] = self.muon_lr_scale
        # bfloat16 Newton-Schulz on GPUs, as modded-nanogpt; float32 where bfloat16 matmuls may be slow
        self.muon = Muon([g for g in groups if g["params"]], lr=muon_lr, momentum=muon_momentum,
                         weight_decay=muon_weight_decay,
                         newton_schulz_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        self.adamw = _adamw(_split_by_decay(rest, weight_decay), adamw_lr, betas, eps, device)

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
        for group in self.muon.param_groups:  # this run's muon_lr, not the saved one's
            group["lr_scale"] = self.muon_lr_scale


Optimizer = torch.optim.AdamW | MuonWithAdamW


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float, device: torch.device, muon_lr: float = 0.02, muon_momentum: float = 0.95,
                    muon_weight_decay: float = 0.0) -> Optimizer:
    """`name` "adamw" (AdamW for everything, `make_optimizer`) or "muon" (`MuonWithAdamW`)."""
    if name == "adamw":
        return make_optimizer(model, lr, weight_decay, betas, eps, device)
    return MuonWithAdamW(model, lr, muon_lr, weight_decay, betas, eps, muon_momentum, muon_weight_decay, device)


def load_optimizer_state(optimizer: Optimizer, state: dict, name: str, where: str) -> None:
    """`state` into `optimizer`, refusing in one line a checkpoint of the other optimizer."""
    saved = "muon" if set(state) == {"muon", "adamw"} else "adamw"
    if saved != name:
        raise UserError(f"{where} was trained with optimizer {saved!r}, not {name!r}: pass --optimizer {saved}")
    optimizer.load_state_dict(state)
