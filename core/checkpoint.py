"""Our checkpoint format, and the one safe way this project reads tensor files.

A checkpoint is a folder:
    model.safetensors   the weights in our layout (the tied lm_head.weight is not stored twice)
    meta.json           {"format", "version", "config": GPTConfig as a dict, "tokenizer", ...extra}
Trainer state (optimizer, RNG) may sit beside them as pickles that hold only tensors and plain
containers, read back with `read_tensor_file`. A folder is written under a temporary name and
renamed into place, so a crash never leaves a half-written checkpoint under the real name.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from core.errors import UserError, first_line
from model import GPT, GPTConfig

FORMAT = "gpt2-toolkit-checkpoint"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"


def is_checkpoint(folder: Path | str) -> bool:
    return (Path(folder) / META_FILE).is_file()


def save_checkpoint(folder: Path | str, model: GPT, tokenizer: str, **extra: Any) -> Path:
    """Write `model` (the raw module, not a DDP or compiled wrapper) and its metadata to `folder`.

    `extra` lands in meta.json as is (step, val_loss, ...), so it must be JSON-serialisable.
    """
    folder = Path(folder)
    weights = {key: value.detach().contiguous().cpu()
               for key, value in model.state_dict().items() if key != "lm_head.weight"}
    meta = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(), "tokenizer": tokenizer, **extra}
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_file(weights, staging / WEIGHTS_FILE, metadata={"format": "pt"})
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    _fsync_tree(staging)
    retired = folder.with_name(f".{folder.name}.old")
    if folder.exists():
        shutil.rmtree(retired, ignore_errors=True)
        folder.rename(retired)
    staging.rename(folder)
    shutil.rmtree(retired, ignore_errors=True)
    return folder


def load_checkpoint(folder: Path | str) -> tuple[GPT, dict[str, Any]]:
    """Our model (fp32, CPU) and the checkpoint's metadata."""
    folder = Path(folder)
    meta = read_meta(folder)
    config = GPTConfig.from_dict(meta["config"])
    try:
        model = GPT.from_state_dict(config, read_tensor_file(folder / WEIGHTS_FILE))
    except UserError as error:
        raise UserError(f"{folder}: {error}") from None
    return model.float(), meta


def read_meta(folder: Path) -> dict[str, Any]:
    path = folder / META_FILE
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
        raise UserError(f"{path} is not a checkpoint's meta.json: expected an object with a 'config' object")
    if meta.get("format") != FORMAT:
        raise UserError(f"{path} is not a {FORMAT} file (format: {meta.get('format')!r})")
    if meta.get("version", 0) > VERSION:
        raise UserError(f"{path} has version {meta['version']}; this code reads up to {VERSION}: update it")
    if not isinstance(meta.get("tokenizer"), str):
        raise UserError(f"{path} lacks the name of its tokenizer")
    return meta


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


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
