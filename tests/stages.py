"""Running stage scripts from tests: in the test's own process where possible (a subprocess spends
seconds importing torch), and in a subprocess under a hang guard where a test needs one."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest

from core.errors import exit_on_user_error

# The timeout of every subprocess a test starts: it only ends a hang, so it is no speed limit (a busy
# machine, or a slow CPU kind, must not fail a test by being slow).
HANG_GUARD_SECONDS = 1800
# train_gpt2.py's flags for a model small enough for a step to take a fraction of a second on one core.
SMALL = ["--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--seq-len", "32",
         "--micro-batch-size", "4", "--warmup-steps", "2", "--max-lr", "1e-3", "--val-tokens", "0",
         "--hellaswag-examples", "0", "--num-samples", "0", "--device", "cpu", "--dtype", "float32",
         "--progress", "false"]


def run_stage(script: str, args: list[str], monkeypatch: pytest.MonkeyPatch,
              capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    """`script`.py's main with `args` as its command line, as `python script.py args` runs it: the exit
    status (2 for a UserError, with its one-line message on stderr), stdout and stderr."""
    module = importlib.import_module(script)
    monkeypatch.setattr(sys, "argv", [f"{script}.py", *args])
    try:
        exit_on_user_error(module.main)
        status = 0
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes, to show that a refusal changed nothing."""
    return {str(path.relative_to(folder)): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}
