"""Training checkpoints that resume exactly: where they live, which one to resume, what they hold
beyond the weights (the random number generators' states), and how many to keep.

A run's checkpoints are LOG_DIR/checkpoints/step_NNNNNN/, N optimizer steps done, each one of our
checkpoint folders (core/checkpoint.py: sample.py, hellaswag.py and export_hf.py read it as is) with
trainer_state.pt beside the weights.
"""

from __future__ import annotations

import random
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.checkpoint import read_checkpoint, read_trainer_state
from core.config import flag
from core.errors import UserError

_STEP_FOLDER = re.compile(r"^step_(\d{6,})$")


def checkpoint_folder(log_dir: Path, step: int) -> Path:
    return log_dir / "checkpoints" / f"step_{step:06d}"


def list_checkpoints(log_dir: Path) -> list[Path]:
    """The step_NNNNNN folders of a run, oldest first (half-written ones have hidden temporary names)."""
    root = log_dir / "checkpoints"
    if not root.is_dir():
        return []
    found = [path for path in root.iterdir() if path.is_dir() and _STEP_FOLDER.match(path.name)]
    return sorted(found, key=lambda path: int(_STEP_FOLDER.match(path.name)[1]))


def load_resumable(folder: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, torch.Tensor]]:
    """A checkpoint's meta, trainer state and weights, each checked; UserError names what is wrong."""
    _, weights, meta = read_checkpoint(folder)
    return meta, read_trainer_state(folder), weights


def checkpoint_step(folder: Path) -> int:
    return int(_STEP_FOLDER.match(folder.name)[1])


def newest_resumable(log_dir: Path, warn: Any = print) -> tuple[Path, tuple] | None:
    """The newest checkpoint of the run that loads whole, and what it holds; damaged ones (a crash
    mid-write, a disk that filled up) are skipped with a warning. None when the run has no checkpoint;
    a UserError when it has some and none loads, since starting over would throw the run away."""
    folders = list_checkpoints(log_dir)
    for folder in reversed(folders):
        try:
            return folder, load_resumable(folder)
        except UserError as error:
            warn(f"warning: skipping checkpoint {folder}: {error}")
    if folders:
        raise UserError(f"none of the {len(folders)} checkpoint(s) in {log_dir / 'checkpoints'} can be read (the "
                        "warnings above say why), so nothing was changed: repair them, move them away to start "
                        "over, or choose another --log-dir")
    return None


def changed_settings(saved: dict[str, Any], now: dict[str, Any], fixed: Iterable[str], folder: Path) -> list[str]:
    """What a resumed segment changes of the settings its checkpoint was trained with, as "name then ->
    now"; a UserError naming the first of `fixed` that changed, the settings that make another run (the
    model's shape, the data). A setting that is None now (auto) is resolved later, and not compared."""
    changes = []
    for name, value in now.items():
        if name == "resume" or name not in saved or value is None or saved[name] == value:
            continue
        if name in fixed:
            raise UserError(f"{flag(name)} {value!r} is not the {saved[name]!r} that {folder} was trained with: "
                            f"resume with the same {name} (the run's --config, or {flag(name)} {saved[name]}), or "
                            "start another run in another --log-dir")
        changes.append(f"{name} {saved[name]!r} -> {value!r}")
    return changes


def set_aside_later_checkpoints(log_dir: Path, step: int, note: Any = print) -> None:
    """Rename the checkpoints of steps after `step`, the one a run resumes from. The resumed run redoes
    those steps: they are damaged ones that resume skipped, or the future of a run resumed from an earlier
    checkpoint on purpose. Renamed, never deleted: resume and pruning no longer see them, nothing is lost."""
    for folder in list_checkpoints(log_dir):
        if checkpoint_step(folder) > step:
            target = folder.with_name(f"{folder.name}.set_aside")
            suffix = 1
            while target.exists():
                target, suffix = folder.with_name(f"{folder.name}.set_aside.{suffix}"), suffix + 1
            folder.rename(target)
            note(f"note: {folder} is after step {step}, which this run resumes from: set aside as {target.name}")


def prune_checkpoints(log_dir: Path, keep: int, written: Path) -> None:
    """Keep `written`, the checkpoint just saved, and the newest `keep` - 1 others; delete the rest
    (keep 0 keeps all)."""
    if keep > 0:
        others = [folder for folder in list_checkpoints(log_dir) if folder != written]
        for folder in others[: max(0, len(others) - (keep - 1))]:
            shutil.rmtree(folder, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    """Every generator a training step may draw from (dropout, shuffling), as plain bytes and ints: what
    weights_only pickles and torch.distributed's object collectives both carry."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, keys.astype("<u4").tobytes(), position, has_gauss, cached_gaussian],
        "torch": _bytes(torch.get_rng_state()),
        "cuda": [_bytes(state) for state in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> str | None:
    """Restore what `rng_state` saved; a note when it saved the states of another number of GPUs than
    this machine has (a resume on fewer GPUs restores those present, on more leaves the rest as they are)."""
    random.setstate(_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.frombuffer(keys, dtype="<u4").copy(), *rest))
    torch.set_rng_state(_tensor(state["torch"]))
    saved = state["cuda"]
    present = torch.cuda.device_count() if torch.cuda.is_available() else 0
    for index, item in enumerate(saved[:present]):
        torch.cuda.set_rng_state(_tensor(item), index)
    if saved and len(saved) != present:
        return (f"the checkpoint holds the CUDA random states of {len(saved)} GPU(s), this process sees {present}: "
                f"{min(len(saved), present)} restored")
    return None


def _bytes(state: torch.Tensor) -> bytes:
    return state.numpy().tobytes()


def _tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _tuples(value: Any) -> Any:
    """random.setstate wants the nested tuples that a round trip through a pickle may turn into lists."""
    return tuple(_tuples(item) for item in value) if isinstance(value, (list, tuple)) else value
