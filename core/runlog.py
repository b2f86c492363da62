"""What a training run reports, from rank 0 alone: the terminal, LOG_DIR/log.txt in build-nanogpt's
line format, LOG_DIR/metrics.jsonl (one JSON object per line, with "kind" and "step"), and TensorBoard
event files when asked for.

A resumed run first drops the records that the interrupted run wrote after its checkpoint, so that
the files read as one run: every step once, in order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from core.atomic import write_file_atomically
from core.errors import UserError

METRICS_FILE = "metrics.jsonl"
LOG_FILE = "log.txt"
# build-nanogpt's log.txt names; kinds without one ("sample") are left out of log.txt.
_LOG_NAMES = {"train": ("train", "loss", "{:.6f}"), "val": ("val", "val_loss", "{:.4f}"),
              "hellaswag": ("hella", "acc_norm", "{:.4f}"), "core": ("core", "core", "{:.4f}")}


class RunLog:
    def __init__(self, log_dir: Path, enabled: bool, tensorboard: bool = False) -> None:
        self.log_dir, self.enabled = log_dir, enabled
        self.writer = None
        self.bar: tqdm | None = None
        if not enabled:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.print("tensorboard is not installed (pip install tensorboard): no event files")
            else:
                self.writer = SummaryWriter(str(log_dir))

    def print(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)  # above the progress bar, not through it
        else:
            print(message, flush=True)

    def record(self, kind: str, step: int, **values: Any) -> None:
        """One record to metrics.jsonl, log.txt and TensorBoard."""
        if not self.enabled:
            return
        with open(self.log_dir / METRICS_FILE, "a") as f:
            f.write(json.dumps({"kind": kind, "step": step, **values}, ensure_ascii=False) + "\n")
        if kind in _LOG_NAMES:
            name, key, form = _LOG_NAMES[kind]
            with open(self.log_dir / LOG_FILE, "a") as f:
                f.write(f"{step} {name} {form.format(values[key])}\n")
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and value is not None:
                    self.writer.add_scalar(f"{kind}/{key}", value, step)
                elif isinstance(value, dict):  # e.g. CORE's centered accuracy per task
                    for name, number in value.items():
                        self.writer.add_scalar(f"{kind}/{key}/{name}", number, step)
                elif isinstance(value, list) and kind == "sample":
                    self.writer.add_text("sample", "\n\n".join(map(str, value)), step)

    def truncate_after(self, step: int) -> None:
        """Keep what a run resumed at `step` has already done: train records of steps before `step`
        and evaluations up to `step` (evaluations at `step` came before its checkpoint)."""
        if not self.enabled:
            return
        metrics, log = self.log_dir / METRICS_FILE, self.log_dir / LOG_FILE
        if metrics.exists():
            records, torn = read_records(metrics)
            if torn:
                self.print(f"note: dropped the torn last line of {metrics} ({torn[:40]!r}...), what a hard kill "
                           "mid-write leaves")
            kept = [json.dumps(record, ensure_ascii=False) + "\n" for record in records
                    if _kept(record["kind"], record["step"], step)]
            write_file_atomically(metrics, "".join(kept).encode())
        if log.exists():
            names = {name: kind for kind, (name, _, _) in _LOG_NAMES.items()}
            kept = [line for line in log.read_text().splitlines(keepends=True)
                    if len(line.split()) == 3 and _kept(names.get(line.split()[1], ""), int(line.split()[0]), step)]
            write_file_atomically(log, "".join(kept).encode())

    def progress(self, total: int, initial: int, enabled: bool | None) -> tqdm | None:
        """A progress bar over the steps with an ETA, for a person at a terminal (stderr a tty)."""
        show = sys.stderr.isatty() if enabled is None else enabled
        if self.enabled and show:
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr)
        return self.bar

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exception: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the progress bar and the event files; printing goes on, to the terminal."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.writer is not None:
            self.writer.close()


def read_records(path: Path) -> tuple[list[dict], str]:
    """The records of a metrics.jsonl, and its last line when that one is torn (cut off mid-write by a
    hard kill: not JSON, or not a record; "" when it is whole). A bad line elsewhere fails naming it."""
    lines = [(number, line) for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
             if line.strip()]
    records, torn = [], ""
    for number, line in lines:
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("kind"), str) or \
                    not isinstance(record.get("step"), int):
                raise ValueError("not a record")
        except ValueError:  # json.JSONDecodeError is one
            if number == lines[-1][0]:
                torn = line
                break
            raise UserError(f"{path}:{number}: not a metrics record") from None
        records.append(record)
    return records, torn


def _kept(kind: str, record_step: int, resume_step: int) -> bool:
    return record_step < resume_step if kind == "train" else record_step <= resume_step
