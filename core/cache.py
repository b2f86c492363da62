"""Where the toolkit keeps what it fetched (evaluation data, HF models) between runs:
~/.cache/gpt2-toolkit, or the folder that GPT2_TOOLKIT_CACHE names, read at every use (the tests point
it at a temporary folder); and the download that fills it."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from core.errors import UserError


def cache_dir() -> Path:
    return Path(os.environ.get("GPT2_TOOLKIT_CACHE", Path.home() / ".cache" / "gpt2-toolkit"))


def download(url: str, destination: Path, advice: str, looks_right: Callable[[Path], bool] = lambda _: True,
             what: str = "the expected file") -> None:
    """Fetch `url` into `destination` through a temporary file, so that a failed download leaves nothing.
    A failure raises a UserError ending in `advice` (how to do without the network); so does a
    download that `looks_right` rejects, such as a proxy's HTML page served with status 200."""
    import requests
    from tqdm import tqdm

    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".partial")
    try:
        with requests.get(url, stream=True, timeout=30) as response:
            response.raise_for_status()
            total = int(response.headers.get("content-length", 0)) or None
            with open(partial, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                                 desc=f"downloading {destination.name}") as bar:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except requests.RequestException as error:
        partial.unlink(missing_ok=True)
        raise UserError(f"cannot download {url} ({type(error).__name__}). {advice}") from None
    if not looks_right(partial):
        with open(partial, "rb") as f:
            start = f.read(60).decode("utf-8", errors="replace")
        partial.unlink()
        raise UserError(f"{url} did not return {what} (it starts {start!r}). {advice}")
    partial.rename(destination)
