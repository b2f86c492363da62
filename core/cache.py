"""Where the toolkit keeps what it fetched or measured once, between runs: ~/.cache/gpt2-toolkit,
or the folder that GPT2_TOOLKIT_CACHE names (the tests point it at a temporary folder)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    return Path(os.environ.get("GPT2_TOOLKIT_CACHE", Path.home() / ".cache" / "gpt2-toolkit"))
