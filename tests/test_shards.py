"""core/shards.py: the shard format round-trips, and every kind of bad file is refused naming the file."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from core import atomic
from core.errors import UserError
from core.shards import HEADER_SIZE, ShardWriter, list_shards, open_shard, read_shard_info, shard_path, write_shard


def gpt2_shard(folder: Path, index: int = 0, split: str = "train", tokens: np.ndarray | None = None) -> Path:
    tokens = np.arange(1000, dtype=np.uint16) * 50 if tokens is None else tokens
    return write_shard(shard_path(folder, "corpus", split, index), tokens, "gpt2", 50257)


def test_gpt2_shard_round_trips_as_uint16_with_its_header(tmp_path: Path) -> None:
    tokens = np.array([50256, 15496, 11, 0, 50255], dtype=np.uint32)
    path = write_shard(tmp_path / "corpus_train_000000.bin", tokens, "gpt2", 50257)
    assert path.stat().st_size == HEADER_SIZE + 2 * len(tokens)
    assert path.read_bytes()[:8] == b"GPT2TOKS"
    info = read_shard_info(path)
    assert (info.tokenizer, info.vocab_size, info.num_tokens, info.dtype, info.legacy) == (
        "gpt2", 50257, 5, np.dtype("<u2"), False)
    read = open_shard(path, tokenizer="gpt2")
    assert read.dtype == np.uint16 and read.tolist() == tokens.tolist()
    with pytest.raises(ValueError):
        read[0] = 1  # a read-only map: training can never scribble on its data


def test_header_fields_sit_at_the_documented_offsets(tmp_path: Path) -> None:
    # The table in core/shards.py's docstring, read field by field with struct, not with the module's HEADER.
    tokens = np.array([50256, 15496, 11, 0, 50255, 7, 7], dtype=np.uint32)
    data = write_shard(tmp_path / "corpus_train_000000.bin", tokens, "gpt2", 50257).read_bytes()
    assert data[0:8] == b"GPT2TOKS"
    assert struct.unpack_from("<I", data, 8) == (1,)  # version
    assert struct.unpack_from("<I", data, 12) == (2,)  # token_bytes
    assert struct.unpack_from("<Q", data, 16) == (7,)  # num_tokens
    assert struct.unpack_from("<I", data, 24) == (50257,)  # vocab_size
    assert struct.unpack_from("<I", data, 28) == (0,)  # reserved
    assert data[32:64] == b"gpt2" + bytes(28)  # tokenizer, NUL-padded
    assert list(struct.unpack_from("<7H", data, 64)) == tokens.tolist() and len(data) == 64 + 2 * 7

    data = write_shard(tmp_path / "zh_train_000000.bin", np.array([100257, 3], dtype=np.uint32), "cl100k_base",
                       100277).read_bytes()
    assert struct.unpack_from("<IQI", data, 12) == (4, 2, 100277)
    assert data[32:64] == b"cl100k_base" + bytes(21)
    assert struct.unpack_from("<2I", data, 64) == (100257, 3) and len(data) == 64 + 4 * 2


def test_cl100k_shard_is_uint32_and_keeps_large_ids(tmp_path: Path) -> None:
    tokens = np.array([100257, 65535, 65536, 100276, 7], dtype=np.uint32)
    path = write_shard(tmp_path / "zh_train_000000.bin", tokens, "cl100k_base", 100277)
    assert path.stat().st_size == HEADER_SIZE + 4 * len(tokens)
    read = open_shard(path, tokenizer="cl100k_base")
    assert read.dtype == np.uint32 and read.tolist() == tokens.tolist()


def test_empty_shard_reads_as_no_tokens(tmp_path: Path) -> None:
    path = write_shard(tmp_path / "x_val_000000.bin", np.empty(0, dtype=np.uint32), "gpt2", 50257)
    assert open_shard(path).shape == (0,)


def test_truncated_shard_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = gpt2_shard(tmp_path)
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(UserError, match=rf"{path.name} is truncated: its header promises 1,000 tokens"):
        open_shard(path)
    path.write_bytes(path.read_bytes()[:HEADER_SIZE - 10])
    with pytest.raises(UserError, match=rf"{path.name} is truncated: 54 bytes"):
        open_shard(path)


def test_extra_bytes_are_refused(tmp_path: Path) -> None:
    path = gpt2_shard(tmp_path)
    path.write_bytes(path.read_bytes() + b"\0\0")
    with pytest.raises(UserError, match=r"2 bytes follow the 1,000 tokens"):
        open_shard(path)


def test_bad_magic_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = gpt2_shard(tmp_path)
    path.write_bytes(b"NOTASHRD" + path.read_bytes()[8:])
    with pytest.raises(UserError, match=rf"{path.name} is not a token shard: its first bytes are b'NOTASHRD'"):
        open_shard(path)
    text = tmp_path / "notes_train_000000.bin"
    text.write_text("hello")
    with pytest.raises(UserError, match=r"notes_train_000000.bin is not a token shard"):
        open_shard(text)


def test_newer_version_is_refused(tmp_path: Path) -> None:
    path = gpt2_shard(tmp_path)
    data = bytearray(path.read_bytes())
    data[8:12] = (2).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    with pytest.raises(UserError, match=r"version 2 shard; this code reads up to version 1"):
        open_shard(path)


def test_gpt2_shard_is_refused_for_a_cl100k_model(tmp_path: Path) -> None:
    path = gpt2_shard(tmp_path)
    with pytest.raises(UserError, match=rf"{path.name} was made with the 'gpt2' tokenizer, but the model uses "
                                        r"'cl100k_base'"):
        open_shard(path, tokenizer="cl100k_base")


def test_build_nanogpt_npy_shards_read_as_gpt2(tmp_path: Path) -> None:
    tokens = np.array([50256, 464, 3290, 50256], dtype=np.uint16)
    path = tmp_path / "edufineweb_val_000000.npy"
    np.save(path, tokens)  # exactly how build-nanogpt's fineweb.py writes a shard
    info = read_shard_info(path)
    assert (info.tokenizer, info.num_tokens, info.legacy) == ("gpt2", 4, True)
    assert open_shard(path, tokenizer="gpt2").tolist() == tokens.tolist()
    with pytest.raises(UserError, match=r"made with the 'gpt2' tokenizer \(assumed: a headerless build-nanogpt"):
        open_shard(path, tokenizer="cl100k_base")
    assert list_shards(tmp_path, "val") == [path]


def test_bad_npy_shards_are_refused(tmp_path: Path) -> None:
    wrong_dtype = tmp_path / "a_train_000000.npy"
    np.save(wrong_dtype, np.arange(10, dtype=np.int64))
    with pytest.raises(UserError, match=r"a_train_000000.npy holds a int64 array"):
        open_shard(wrong_dtype)
    truncated = tmp_path / "b_train_000000.npy"
    np.save(truncated, np.arange(1000, dtype=np.uint16))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(UserError, match=r"b_train_000000.npy is not a readable .npy token shard"):
        open_shard(truncated)


def test_list_shards_orders_by_index_and_ignores_the_rest(tmp_path: Path) -> None:
    expected = [gpt2_shard(tmp_path, index) for index in (0, 1, 2, 10)]
    gpt2_shard(tmp_path, 0, split="val")
    (tmp_path / ".corpus_train_000003.bin.tmp").write_bytes(b"half a shard")
    (tmp_path / "corpus_manifest.json").write_text("{}")
    assert list_shards(tmp_path, "train") == expected
    with pytest.raises(UserError, match=r"no 'test' shards in"):
        list_shards(tmp_path, "test")


def test_list_shards_refuses_two_corpora_in_one_folder(tmp_path: Path) -> None:
    gpt2_shard(tmp_path)
    write_shard(shard_path(tmp_path, "other", "train", 0), np.zeros(3, dtype=np.uint16), "gpt2", 50257)
    with pytest.raises(UserError, match=r"mixes the shards of several corpora \(corpus, other\)"):
        list_shards(tmp_path, "train")


def test_shard_writer_streams_tokens_and_nothing_is_readable_before_commit(tmp_path: Path) -> None:
    path = tmp_path / "corpus_train_000000.bin"
    writer = ShardWriter(path, "gpt2", 50257)
    for start in range(0, 1000, 300):
        writer.write(np.arange(start, min(start + 300, 1000), dtype=np.uint32))
    temporary = tmp_path / ".corpus_train_000000.bin.tmp"
    assert not path.exists() and temporary.exists()
    with pytest.raises(UserError, match=r"corpus_train_000000.bin.tmp is (truncated|not a token shard)"):
        open_shard(temporary)
    assert writer.commit() == path and not temporary.exists()
    assert open_shard(path).tolist() == list(range(1000))
    assert path.read_bytes() == write_shard(tmp_path / "copy.bin", np.arange(1000), "gpt2", 50257).read_bytes()

    aborted = ShardWriter(tmp_path / "corpus_train_000001.bin", "gpt2", 50257)
    aborted.write(np.arange(10, dtype=np.uint32))
    aborted.abort()
    assert sorted(file.name for file in tmp_path.iterdir()) == ["copy.bin", "corpus_train_000000.bin"]


def test_a_failed_write_leaves_neither_shard_nor_temporary_file(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(descriptor: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        gpt2_shard(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_out_of_vocabulary_tokens_are_refused_before_writing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"token id 50257 is outside the vocabulary of 50257"):
        write_shard(tmp_path / "x_train_000000.bin", np.array([1, 50257], dtype=np.uint32), "gpt2", 50257)
    assert list(tmp_path.iterdir()) == []
