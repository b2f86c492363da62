"""One entry point for every way of naming a model: `load_model(spec)`, and the command-line
options that every stage uses to name one (`add_model_arguments`).

A spec is, in the order we try it:
  1. a folder (or a file inside it) holding one of our checkpoints (`meta.json`, see checkpoint.py);
  2. a folder holding an HF GPT-2 or GPT-1 model (`config.json` + weights, see hf.py);
  3. an HF hub name: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `openai-gpt` (GPT-1), or any
     `owner/name` GPT-2 or GPT-1 repo.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch

from core import hf
from core.checkpoint import is_checkpoint, read_checkpoint, recover_interrupted_save
from core.errors import UserError
from core.tokenizer import Tokenizer, load_tokenizer
from model import GPT

_HUB_NAME = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def load_model(spec: str, device: torch.device | str = "cpu",
               dtype: torch.dtype = torch.float32) -> tuple[GPT, Tokenizer]:
    """The model named by `spec`, in eval mode on `device` in `dtype`, and its tokenizer, added tokens
    included (GPT-1's is read from the files in the model's folder). The one way every stage loads a
    model; anything machine-specific (TF32, core/cpu_speedups.py) is the stage's own call."""
    model, name, folder, added = _load(spec)
    tokenizer = load_tokenizer(name, folder, added)
    if model.config.vocab_size > tokenizer.n_vocab:
        raise UserError(f"{spec} has {model.config.vocab_size} tokens, more than its tokenizer {name} "
                        f"({tokenizer.n_vocab}): they do not belong together")
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def _load(spec: str) -> tuple[GPT, str, Path, list[str]]:
    """The model (fp32, CPU), its tokenizer's name, the folder it came from, and its added tokens."""
    folder = _model_folder(spec)
    if is_checkpoint(folder):
        config, weights, meta = read_checkpoint(folder)
        tokenizer, added = meta["tokenizer"], meta.get("added_tokens", [])
    else:
        config, weights, tokenizer, added = hf.read_hf_folder(folder)
    try:
        model = GPT.from_state_dict(config, weights)
    except UserError as error:
        raise UserError(f"{folder}: {error}") from None
    return model.float(), tokenizer, folder, added


def _model_folder(spec: str) -> Path:
    """The local folder that `spec` names: ours or an HF one, downloaded first for a hub name."""
    path = Path(spec)
    recover_interrupted_save(path)  # a checkpoint whose replacement a crash cut short
    if path.exists():
        folder = path if path.is_dir() else path.parent
        if not is_checkpoint(folder) and not (folder / "config.json").is_file():
            raise UserError(f"{spec} is neither one of our checkpoints (no meta.json) "
                            "nor a Hugging Face model folder (no config.json)")
        return folder
    if _HUB_NAME.match(spec) and not spec.startswith(".") and not Path(path.parts[0]).is_dir():
        return hf.download_hf_model(spec)
    # e.g. log/model_19072 mistyped: log/ exists here, so this was never meant for the hub
    raise UserError(f"{spec!r}: no such checkpoint file or folder")


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str = "gpt2",
                        cpu_bfloat16: bool = False) -> None:
    """-m/--model, --device and --dtype, the same for every stage; `cpu_bfloat16` as in
    `core.devices.resolve_dtype`, which the stage must pass on."""
    parser.add_argument("-m", "--model", default=default_model,
                        help="our checkpoint folder, an HF model folder, or an HF hub name such as gpt2, "
                             f"gpt2-medium, gpt2-large, gpt2-xl, openai-gpt (default: {default_model})")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, mps, or auto: the first of "
                                                         "cuda, mps, cpu that is available (default)")
    native = "GPUs and CPUs" if cpu_bfloat16 else "GPUs"
    parser.add_argument("--dtype", default="auto", help=f"float32, bfloat16, float16, or auto: bfloat16 on {native} "
                                                        "with native support, else float32 (default)")
