"""Our checkpoint format: writing it atomically, and reading it back.

A checkpoint is a folder:
    model.safetensors   the weights in our layout (the tied lm_head.weight is not stored twice)
    meta.json           {"format", "version", "config": GPTConfig as a dict, "tokenizer", ...extra}, and
                        "added_tokens" when the model has tokens after its tokenizer's vocabulary
    vocab.json, merges.txt   GPT-1's tokenizer, whose files cannot be found by its name
    *.safetensors       optional: more weights that belong to the model, such as a classifier head
    trainer_state.pt    optional: what train_gpt2.py needs to resume (optimizer, step, data position,
                        RNG states), a pickle of tensors and plain containers read with weights_only=True
A folder is written under a hidden temporary name and renamed into place, so a crash never leaves a
half-written checkpoint under the real name. Replacing a folder takes two renames (old away, new in);
a crash between them leaves the old one as `.NAME.old`, which every reader and writer renames back.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from core.atomic import fsync_folder
from core.errors import UserError
from core.tokenizer import Tokenizer, added_tokens, tokenizer_files, tokenizer_name
from core.weights import our_layout, read_tensor_file, write_tensor_file
from model import GPT, GPTConfig

FORMAT = "gpt2-toolkit-checkpoint"
VERSION = 1
WEIGHTS_FILE = "model.safetensors"
META_FILE = "meta.json"
TRAINER_STATE_FILE = "trainer_state.pt"


def is_checkpoint(folder: Path | str) -> bool:
    """Whether `folder` holds one of our checkpoints (after `recover_interrupted_save`, if a crash may
    have left it half replaced)."""
    return (Path(folder) / META_FILE).is_file()


def save_checkpoint(folder: Path | str, model: GPT, tokenizer: str | Tokenizer,
                    trainer_state: dict[str, Any] | None = None,
                    extra_weights: dict[str, dict[str, torch.Tensor]] | None = None, **extra: Any) -> Path:
    """Write `model` (the raw module, not a DDP or compiled wrapper) and its metadata to `folder`.

    `tokenizer` is a tiktoken encoding's name, or a tokenizer, whose files (GPT-1's) and added tokens
    are kept too. `extra` lands in meta.json as is (step, val_loss, ...), so it must be
    JSON-serialisable; `trainer_state` (tensors and plain containers only) goes to trainer_state.pt
    in the same folder, and `extra_weights` to safetensors files of the given names.
    """
    folder = Path(folder)
    recover_interrupted_save(folder)
    weights = {key: value for key, value in model.state_dict().items() if key != "lm_head.weight"}
    meta = {"format": FORMAT, "version": VERSION, "config": model.config.to_dict(),
            "tokenizer": tokenizer_name(tokenizer), **extra}
    if not isinstance(tokenizer, str) and added_tokens(tokenizer):
        meta["added_tokens"] = added_tokens(tokenizer)
    staging = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for file_name, tensors in {WEIGHTS_FILE: weights, **(extra_weights or {})}.items():
        write_tensor_file({key: value.detach().contiguous().cpu() for key, value in tensors.items()},
                          staging / file_name, metadata={"format": "pt"})
    if not isinstance(tokenizer, str):
        for file_name, data in tokenizer_files(tokenizer).items():
            (staging / file_name).write_bytes(data)
    if trainer_state is not None:
        torch.save(trainer_state, staging / TRAINER_STATE_FILE)
    (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")  # last: its presence marks a checkpoint
    _fsync_tree(staging)
    retired = _retired_name(folder)
    if folder.exists():
        shutil.rmtree(retired, ignore_errors=True)
        folder.rename(retired)
    staging.rename(folder)  # a crash before this line leaves `retired`, which recover_interrupted_save restores
    shutil.rmtree(retired, ignore_errors=True)
    fsync_folder(folder.parent)
    return folder


def recover_interrupted_save(folder: Path | str) -> None:
    """Undo the half of a replacement that a crash left: `folder` gone, its previous version retired."""
    folder = Path(folder)
    retired = _retired_name(folder)
    if not folder.exists() and (retired / META_FILE).is_file():
        retired.rename(folder)


def _retired_name(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def read_checkpoint(folder: Path) -> tuple[GPTConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """A checkpoint's model config, its weights in our layout (a file written from a DDP or compiled
    wrapper's state dict included), and its metadata."""
    meta = read_meta(folder)
    try:
        weights = our_layout(read_tensor_file(folder / WEIGHTS_FILE))
    except UserError as error:
        raise UserError(f"{folder}: {error}") from None
    return GPTConfig.from_dict(meta["config"]), weights, meta


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
    added = meta.get("added_tokens", [])
    if not isinstance(added, list) or not all(isinstance(name, str) for name in added):
        raise UserError(f"{path}: added_tokens must be a list of token names")
    return meta


def read_trainer_state(folder: Path | str) -> dict[str, Any]:
    """The trainer state saved beside a checkpoint's weights (see core/training.py)."""
    path = Path(folder) / TRAINER_STATE_FILE
    if not path.is_file():
        raise UserError(f"{folder} holds model weights but no {TRAINER_STATE_FILE}: it cannot be resumed "
                        "(use it with --init-from to start a new run from its weights)")
    return read_tensor_file(path)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fsync_folder(folder)
