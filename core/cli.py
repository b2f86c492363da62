"""The command line of every stage and benchmark: its script's docstring as the help, no abbreviated
flags (argparse would take `--data` for `--data-dir`, so advice naming one flag could silently set
another), and a bad flag reported in one line, as every other bad input is (core/errors.py)."""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import NoReturn

from core.errors import UserError


class StageParser(argparse.ArgumentParser):
    def __init__(self, description: str | None, **options: object) -> None:
        super().__init__(description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                         allow_abbrev=False, **options)

    def error(self, message: str) -> NoReturn:
        """One line, `prog: error: message`, and status 2: the usage block is what --help is for."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def check_output_file(output: Path, flag: str, inputs: Iterable[Path]) -> None:
    """A stage never writes over what it reads: `output` is not a folder, not one of `inputs`, and not
    inside an input folder (a task bundle, say)."""
    if output.is_dir():
        raise UserError(f"{flag} {output} is a folder: give the name of a file to write")
    for path in inputs:
        if output.resolve() == path.resolve() or (path.is_dir() and output.resolve().is_relative_to(path.resolve())):
            raise UserError(f"{flag} {output} would write over this command's input {path}: write it elsewhere")
