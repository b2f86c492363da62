"""Running stage scripts from tests: in the test's own process where possible (a subprocess spends
seconds importing torch), and in a subprocess under a hang guard where a test needs one."""

from __future__ import annotations

import importlib
import sys

import pytest

from core.errors import exit_on_user_error

# The timeout of every subprocess a test starts: it only ends a hang, so it is no speed limit (a busy
# machine, or a slow CPU kind, must not fail a test by being slow).
HANG_GUARD_SECONDS = 1800


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
