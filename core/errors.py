"""The one exception type a user sees as a short message instead of a traceback.

Core modules raise `UserError` for problems with what the user handed us (a file, a model name,
an option); every stage script runs its `main` through `exit_on_user_error`, which prints the
message and exits with status 2. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem with the user's input that deserves a one-line message."""


def json_object(line: str, where: str) -> dict:
    """One line of a user's JSONL file as a dict, or a UserError naming `where` (its file and line)."""
    import json

    try:
        row = json.loads(line)
    except json.JSONDecodeError as error:
        raise UserError(f"{where}: invalid JSON ({error.msg})") from None
    if not isinstance(row, dict):
        raise UserError(f"{where}: expected a JSON object")
    return row


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type's name), for a one-line report."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def exit_on_user_error(main: Callable[[], object]) -> None:
    """Run a script's `main`, turning a `UserError` (or Ctrl-C) into a clean exit."""
    prog = sys.argv[0].rsplit("/", 1)[-1] if sys.argv and sys.argv[0] else "gpt2"
    try:
        main()
    except UserError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
