"""Files that appear complete or not at all: written under a hidden temporary name beside their
destination, fsynced, then renamed into place (a rename within a folder is atomic on POSIX)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np


def write_file_atomically(path: Path | str, data: bytes) -> None:
    """Write `data` to `path` through a temporary file, fsync, rename: a crash never leaves half a file."""
    file = AtomicFile(Path(path))
    file.write(data)
    file.commit()


class AtomicFile:
    """A file written under a hidden temporary name beside `path`, which `commit()` fsyncs and renames
    to `path`, and `abort()` (or any failure on the way) deletes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.temporary = path.with_name(f".{path.name}.tmp")
        # Open across calls, until commit or abort; a large buffer, as shards arrive a document at a time.
        self.file = open(self.temporary, "wb", buffering=1 << 20)  # noqa: SIM115

    def write(self, data: bytes | np.ndarray, offset: int | None = None) -> None:
        try:
            if offset is not None:
                self.file.seek(offset)
            self.file.write(memoryview(data).cast("B"))
        except BaseException:
            self.abort()
            raise

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.temporary, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_folder(self.path.parent)

    def abort(self) -> None:
        self.file.close()
        self.temporary.unlink(missing_ok=True)


def fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable, where the platform allows opening a folder."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
