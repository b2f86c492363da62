"""Where the toolkit keeps what it fetched or measured once, between runs: ~/.cache/gpt2-toolkit,
or the folder that GPT2_TOOLKIT_CACHE names (the tests point it at a temporary folder); the download
that fills it; and the timing race that measures which of a few equivalent computations runs fastest."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

from core.atomic import write_file_atomically
from core.errors import UserError

try:
    import fcntl
except ImportError:  # Windows: no lock; concurrent first uses may then measure twice
    fcntl = None


def cache_dir() -> Path:
    return Path(os.environ.get("GPT2_TOOLKIT_CACHE", Path.home() / ".cache" / "gpt2-toolkit"))


def forced_answer(variable: str, answers: Collection[str]) -> str | None:
    """The answer that the environment variable `variable` forces (one of `answers`), or None where it
    is unset or says `measure`; a UserError for anything else."""
    setting = os.environ.get(variable, "measure")
    if setting != "measure" and setting not in answers:
        raise UserError(f"{variable}={setting!r}: choose measure, {', '.join(answers)}")
    return None if setting == "measure" else setting


def measured_once(file_name: str, key: str, answers: Collection[str], measure: Callable[[], str]) -> str:
    """The machine's answer for `key`, one of `answers`: from the cache folder's `file_name`, else
    `measure()`d now and added to it. Under a lock, so that concurrent processes (the ranks of a
    torchrun) measure once and all take the same answer; with no writable cache folder, measured for
    this process only."""
    path = cache_dir() / file_name
    try:
        with _locked(path):
            kept = _read_answers(path, answers)
            if key not in kept:
                kept[key] = measure()
                write_file_atomically(path, (json.dumps(kept, indent=1, sort_keys=True) + "\n").encode())
            return kept[key]
    except OSError:
        return measure()


def fastest(calls: dict[str, Callable[[], object]], default: str, margin: float, timed_calls: int) -> str:
    """The name of the fastest of `calls` (the best of `timed_calls` runs each, after one that warms up
    caches and the allocator, interleaved so that a burst of load from elsewhere hits all alike);
    `default` unless another beats it by `margin`: a near tie is not worth computing otherwise."""
    best = dict.fromkeys(calls, float("inf"))
    for run in range(timed_calls + 1):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            if run > 0:
                best[name] = min(best[name], time.perf_counter() - start)
    winner = min(best, key=best.get)
    return winner if best[winner] * margin < best[default] else default


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a") as lock:
        if fcntl is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _read_answers(path: Path, answers: Collection[str]) -> dict[str, str]:
    """The file's answers; a damaged file, or an entry that is not one of `answers` (an earlier
    version's), is measured again."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):  # none yet, or damaged
        return {}
    if not isinstance(kept, dict):
        return {}
    return {key: value for key, value in kept.items() if isinstance(value, str) and value in answers}


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
