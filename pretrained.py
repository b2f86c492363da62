"""One entry point for every way of naming a model: `load_model(spec)`.

A spec is, in the order we try it:
  1. a folder (or a file inside it) holding one of our checkpoints (`meta.json`, see checkpoint.py);
  2. a folder holding an HF GPT-2 model (`config.json` + weights, see hf.py);
  3. an HF hub name: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, or any `owner/name` GPT-2 repo.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

import hf
from checkpoint import is_checkpoint, load_checkpoint
from errors import UserError
from model import GPT

_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def load_model(spec: str, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[GPT, str]:
    """The model named by `spec`, in eval mode on `device`, and the name of its tokenizer."""
    path = Path(spec)
    if path.exists():
        folder = path if path.is_dir() else path.parent
        if is_checkpoint(folder):
            model, meta = load_checkpoint(folder)
            tokenizer = meta["tokenizer"]
        elif (folder / "config.json").is_file():
            model, tokenizer = hf.load_hf_folder(folder), hf.TOKENIZER
        else:
            raise UserError(f"{spec} is neither one of our checkpoints (no meta.json) "
                            "nor a Hugging Face model folder (no config.json)")
    elif _HUB_NAME.match(spec) and not spec.startswith("."):
        model, tokenizer = hf.load_hf_folder(hf.download_hf_model(spec)), hf.TOKENIZER
    else:
        raise UserError(f"{spec!r}: no such file or folder, and not a Hugging Face hub name")
    return model.to(device=device, dtype=dtype).eval(), tokenizer
