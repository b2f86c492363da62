"""Weights from files: the one safe way this project reads tensor files, and the key layouts met in
the wild mapped onto ours (the keys of `GPT(config).state_dict()`, nn.Linear layout).

Loading reads straight down: a model spec names files (core/pretrained.py), the files give a state
dict (a checkpoint's, core/checkpoint.py; an HF folder's, core/hf.py, which also transposes HF's
Conv1D weights), `our_layout` maps its keys, and `GPT.from_state_dict` builds the model.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.errors import UserError, first_line

# Prefixes that wrappers put before every key: torch.compile's, and DDP's (outside it, when DDP wraps a
# compiled model, as nanoGPT and build-nanogpt do).
WRAPPER_PREFIXES = ("_orig_mod.", "module.")
# The hub's original gpt2 files name the transformer's modules without `transformer.`.
TOP_LEVEL_NAMES = ("wte.", "wpe.", "h.", "ln_f.")
# Buffers that HF GPT-2 files carried (the causal mask), and GPT-1's arange of positions in files of
# older transformers: we compute both instead.
BUFFER_SUFFIXES = (".attn.bias", ".attn.masked_bias", "position_ids")


def write_tensor_file(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """A safetensors file, its mode what the user's umask gives every other output (0644 under umask
    022): safetensors' save_file leaves 0600, which other users of a shared run folder cannot read."""
    save_file(tensors, path, metadata=metadata)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def read_tensor_file(path: Path | str) -> dict[str, Any]:
    """Tensors from a safetensors file, or from a pickle that may hold nothing but tensors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(path)
        except Exception as error:  # safetensors raises its own SafetensorError, not an OSError
            raise UserError(f"cannot read {path}: {error}") from None
    try:
        # weights_only=True refuses any pickle that would build more than tensors and plain
        # containers, i.e. one that would run code. mmap saves a second copy of large files, but
        # only torch's zip format (torch >= 1.6) supports it; older files are read whole.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:
        raise UserError(f"refusing to load {path}: not a plain tensor pickle ({first_line(error)}). "
                        "Only safetensors and weights-only pickles are accepted.") from None


def our_layout(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same tensors under our keys: wrapper prefixes removed, `transformer.` added where the hub's
    files lack it, HF's buffers dropped. Values are untouched."""
    ours = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.removeprefix("_orig_mod.").removeprefix("module.")
        if key.endswith(BUFFER_SUFFIXES):
            continue
        if key.startswith(TOP_LEVEL_NAMES):
            key = "transformer." + key
        if key in ours:
            raise UserError(f"state dict holds {key} twice (under different prefixes)")
        ours[key] = value
    return ours
