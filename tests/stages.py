"""Stage scripts run in the test's own process: a subprocess would spend seconds importing torch."""

from __future__ import annotations

import importlib
import sys

import pytest

from core.errors import exit_on_user_error


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
