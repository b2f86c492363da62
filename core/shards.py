"""Token shards: the files that carry a tokenized corpus from fineweb.py to training.

A shard is a fixed 64-byte header followed by the tokens, all little-endian:

    offset  size  field
         0     8  magic        b"GPT2TOKS"
         8     4  version      uint32, 1
        12     4  token_bytes  uint32, 2 (tokens are uint16) or 4 (uint32)
        16     8  num_tokens   uint64
        24     4  vocab_size   uint32, the tokenizer's vocabulary size
        28     4  reserved     0
        32    32  tokenizer    ASCII name ("gpt2", "cl100k_base"), NUL-padded
        64     -  tokens       num_tokens * token_bytes bytes

Tokens are uint16 when the vocabulary fits (gpt2), else uint32 (cl100k_base). Shards are named
`{prefix}_{split}_{index:06d}.bin` (e.g. edufineweb_train_000001.bin) and are written under a hidden
temporary name (`.{name}.tmp`), fsynced, then renamed, so a file with a shard's name is complete. Readers
check everything the header promises and refuse a shard that is truncated, is not a shard, or was
made with another tokenizer than the model's.

build-nanogpt's headerless shards (`np.save`d uint16 arrays, `edufineweb_train_000001.npy`) are read
too; they carry no tokenizer name, so they are taken to be gpt2, which is what build-nanogpt used.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.atomic import AtomicFile
from core.errors import UserError

MAGIC = b"GPT2TOKS"
VERSION = 1
HEADER = struct.Struct("<8sIIQII32s")  # magic, version, token_bytes, num_tokens, vocab_size, reserved, tokenizer
HEADER_SIZE = HEADER.size  # 64: a multiple of 4, so the tokens stay aligned in a memory map
SUFFIX = ".bin"
LEGACY_TOKENIZER = "gpt2"
_NUMPY_MAGIC = b"\x93NUMPY"
_SHARD_NAME = re.compile(r"^(?P<prefix>.+)_(?P<split>[A-Za-z0-9]+)_(?P<index>\d{6})(?P<suffix>\.bin|\.npy)$")


@dataclass(frozen=True)
class ShardInfo:
    """What a shard's header says, checked against the file's size."""

    path: Path
    tokenizer: str
    vocab_size: int
    num_tokens: int
    dtype: np.dtype
    legacy: bool = False  # a build-nanogpt .npy shard, tokenizer assumed gpt2


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every token id fits, else uint32."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def shard_path(folder: Path | str, prefix: str, split: str, index: int) -> Path:
    return Path(folder) / f"{prefix}_{split}_{index:06d}{SUFFIX}"


def list_shards(folder: Path | str, split: str) -> list[Path]:
    """The shards of `split` in `folder` (ours and build-nanogpt's), in index order.

    Raises UserError when there are none, when two files claim the same place in the order, or when
    the folder holds shards of several corpora (prefixes), whichever split they are of."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is not a folder of token shards")
    found: dict[tuple[str, int], Path] = {}
    prefixes = set()
    for path in folder.iterdir():
        match = _SHARD_NAME.match(path.name)
        if match is None:
            continue
        prefixes.add(match["prefix"])
        if match["split"] != split:
            continue
        key = (match["prefix"], int(match["index"]))
        if key in found:
            raise UserError(f"{found[key]} and {path} are both shard {key[1]} of {split!r}: remove one")
        found[key] = path
    if len(prefixes) > 1:
        raise UserError(f"{folder} mixes the shards of several corpora ({', '.join(sorted(prefixes))}): keep each "
                        "corpus in a folder of its own")
    if not found:
        raise UserError(f"no {split!r} shards in {folder} (expected names like "
                        f"{shard_path(folder, 'prefix', split, 0).name})")
    return [found[key] for key in sorted(found)]


def shard_prefix(path: Path) -> str | None:
    """The corpus (prefix) a file's name gives it as a shard; None when it is not named as one."""
    match = _SHARD_NAME.match(path.name)
    return match["prefix"] if match else None


class ShardWriter:
    """One shard, written as its tokens arrive, so memory does not grow with the shard size.

    The tokens go to a hidden temporary file that starts with zeros where the header belongs; `commit()`
    writes the header, fsyncs and renames the file into place. Until then the shard's name is not
    touched, and every reader refuses the temporary file; `abort()` deletes it."""

    def __init__(self, path: Path | str, tokenizer: str, vocab_size: int) -> None:
        self.path = Path(path)
        self.dtype = token_dtype(vocab_size)
        self.vocab_size = vocab_size
        self._name = tokenizer.encode("ascii")
        if len(self._name) > 32:
            raise ValueError(f"tokenizer name {tokenizer!r} is longer than 32 bytes")
        self.num_tokens = 0
        self._file = AtomicFile(self.path)
        self._file.write(bytes(HEADER_SIZE))

    def write(self, tokens: np.ndarray) -> None:
        """Append tokens (any integer dtype; each must be below the vocabulary size)."""
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise ValueError(f"token id {int(tokens.max())} is outside the vocabulary of {self.vocab_size}")
        self._file.write(np.ascontiguousarray(tokens, dtype=self.dtype))
        self.num_tokens += tokens.size

    def flush(self) -> None:
        """Hand what is written so far to the operating system (it reaches the file, not the disk)."""
        self._file.file.flush()

    def commit(self) -> Path:
        header = HEADER.pack(MAGIC, VERSION, self.dtype.itemsize, self.num_tokens, self.vocab_size, 0, self._name)
        self._file.write(header, offset=0)
        self._file.commit()
        return self.path

    def abort(self) -> None:
        self._file.abort()


class SplitWriter:
    """One split's token stream, cut into shards of `shard_size` tokens as it grows.

    `position` counts the split's tokens so far. On a resumed run the stream restarts before the end
    of the complete shards, so tokens that those shards already hold are dropped, not written twice."""

    def __init__(self, folder: Path, prefix: str, split: str, shard_size: int, tokenizer: str, vocab_size: int,
                 shards: list[str], tokens: int, position: int) -> None:
        self.folder, self.prefix, self.split, self.shard_size = folder, prefix, split, shard_size
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.shards = list(shards)  # names of the complete shards, in order
        self.tokens = tokens  # tokens in those shards
        self.position = position
        self.shard: ShardWriter | None = None  # the shard being written

    def append(self, tokens: np.ndarray) -> bool:
        """Add tokens to the stream; True when that completed a shard."""
        behind = self.tokens - self.position
        if behind > 0:
            skip = min(behind, len(tokens))
            tokens, self.position = tokens[skip:], self.position + skip
        completed = False
        while len(tokens):
            if self.shard is None:
                path = shard_path(self.folder, self.prefix, self.split, len(self.shards))
                self.shard = ShardWriter(path, self.tokenizer, self.vocab_size)
            take = tokens[: self.shard_size - self.shard.num_tokens]
            self.shard.write(take)
            self.position += len(take)
            tokens = tokens[len(take):]
            if self.shard.num_tokens == self.shard_size:
                self.flush()
                completed = True
        return completed

    def flush(self) -> None:
        """Complete the shard being written (the last shard of a split may be short)."""
        if self.shard is None:
            return
        self.shard.commit()
        self.shards.append(self.shard.path.name)
        self.tokens += self.shard.num_tokens
        self.shard = None

    def abort(self) -> None:
        """Drop the shard being written; the complete ones stay."""
        if self.shard is not None:
            self.shard.abort()
            self.shard = None


def write_shard(path: Path | str, tokens: np.ndarray, tokenizer: str, vocab_size: int) -> Path:
    """Write `tokens` as a shard at `path`, atomically: the file appears complete or not at all."""
    writer = ShardWriter(path, tokenizer, vocab_size)
    try:
        writer.write(tokens)
    except BaseException:
        writer.abort()
        raise
    return writer.commit()


def read_shard_info(path: Path | str) -> ShardInfo:
    """A shard's header, checked: right magic and version, and exactly as many bytes as it promises."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            start = f.read(HEADER_SIZE)
        size = path.stat().st_size
    except OSError as error:
        raise UserError(f"cannot read token shard {path}: {error.strerror or error}") from None
    if start.startswith(_NUMPY_MAGIC):
        return _legacy_shard_info(path)
    if len(start) < HEADER_SIZE:
        if MAGIC.startswith(start[: len(MAGIC)]):
            raise UserError(f"{path} is truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte shard header")
        raise UserError(f"{path} is not a token shard (it is {size} bytes, no {MAGIC.decode()} header)")
    magic, version, token_bytes, num_tokens, vocab_size, _, name = HEADER.unpack(start)
    if magic != MAGIC:
        raise UserError(f"{path} is not a token shard: its first bytes are {magic!r}, not {MAGIC!r}")
    if version > VERSION:
        raise UserError(f"{path} is a version {version} shard; this code reads up to version {VERSION}: update it")
    if token_bytes not in (2, 4) or token_dtype(vocab_size).itemsize > token_bytes:
        raise UserError(f"{path} has a corrupt header: {token_bytes}-byte tokens for a vocabulary of {vocab_size}")
    expected = HEADER_SIZE + num_tokens * token_bytes
    if size < expected:
        raise UserError(f"{path} is truncated: its header promises {num_tokens:,} tokens ({expected:,} bytes) "
                        f"but the file has {size:,} bytes")
    if size > expected:
        raise UserError(f"{path} is corrupt: {size - expected:,} bytes follow the {num_tokens:,} tokens "
                        "its header promises")
    tokenizer = name.rstrip(b"\0").decode("ascii", errors="replace")
    dtype = np.dtype("<u2") if token_bytes == 2 else np.dtype("<u4")
    return ShardInfo(path, tokenizer, vocab_size, num_tokens, dtype)


def open_shard(path: Path | str, tokenizer: str | None = None) -> np.ndarray:
    """A shard's tokens as a read-only memory map (uint16 or uint32), after checking its header.

    With `tokenizer` (the model's tokenizer name), a shard made with another tokenizer is refused."""
    info = read_shard_info(path)
    if tokenizer is not None and info.tokenizer != tokenizer:
        assumed = " (assumed: a headerless build-nanogpt shard)" if info.legacy else ""
        raise UserError(f"{info.path} was made with the {info.tokenizer!r} tokenizer{assumed}, "
                        f"but the model uses {tokenizer!r}")
    if info.num_tokens == 0:
        return np.empty(0, dtype=info.dtype)
    if info.legacy:
        return np.load(info.path, mmap_mode="r")
    return np.memmap(info.path, dtype=info.dtype, mode="r", offset=HEADER_SIZE, shape=(info.num_tokens,))


def _legacy_shard_info(path: Path) -> ShardInfo:
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as error:  # what numpy raises for a truncated or malformed .npy
        raise UserError(f"{path} is not a readable .npy token shard (truncated?): {error}") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(f"{path} holds a {tokens.dtype} array of shape {tokens.shape}; a headerless "
                        "build-nanogpt shard is a 1-D uint16 array")
    return ShardInfo(path, LEGACY_TOKENIZER, 50257, int(tokens.shape[0]), np.dtype("<u2"), legacy=True)
