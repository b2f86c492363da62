"""GPT-1's tokenizer: lowercased BPE with `</w>` word ends, from an `openai-gpt` folder's vocab.json
and merges.txt.

It gives the ids of HF's `OpenAIGPTTokenizer` without ftfy and spaCy, i.e. BERT's basic tokenizer
before the BPE, which is what transformers runs (its tokenizers backend: BertNormalizer,
BertPreTokenizer, then BPE with the `</w>` suffix):
  1. drop NUL, U+FFFD and control characters, and turn every whitespace character into a space;
  2. put spaces around CJK ideographs, so that each is a word;
  3. strip accents (NFD, then drop nonspacing marks) and lowercase, one character at a time;
  4. split on whitespace, with every punctuation character a word of its own;
  5. BPE each word, its last character carrying `</w>`; a character missing from vocab.json is `<unk>`.
OpenAI's own GPT-1 code cleaned text with ftfy and split it with spaCy, so its ids differ from these
on some text (mostly around punctuation and contractions: "don't" is `don ' t` here).

GPT-1 has no end-of-text token, so `eot_token` is None: generation needs a prompt.
"""

from __future__ import annotations

import itertools
import json
import re
import unicodedata
from pathlib import Path

from core.errors import UserError

NAME = "openai-gpt"
VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
WORD_END = "</w>"
UNKNOWN = "<unk>"
# ASCII text, most text, takes a shortcut through the same five steps: tabs and line breaks become
# spaces, other control characters go, nothing has accents, and a word is a run of letters and digits.
_ASCII_CLEAN = {**{code: None for code in [*range(32), 127]}, **{ord(c): " " for c in "\t\n\r"}}
_ASCII_WORDS = re.compile(r"[a-z0-9]+|[^a-z0-9 ]")
# The CJK ideograph blocks of BERT's basic tokenizer.
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


class GPT1Tokenizer:
    """The subset of tiktoken.Encoding's interface that the stages use, for GPT-1's BPE."""

    name = NAME
    eot_token = None

    def __init__(self, vocab_json: bytes, merges_txt: bytes, source: str = "GPT-1 tokenizer") -> None:
        self.files = {VOCAB_FILE: vocab_json, MERGES_FILE: merges_txt}  # written as they came, beside a model
        self.encoder = _read_vocab(vocab_json, source)
        self.decoder = {i: token for token, i in self.encoder.items()}
        self.ranks = _read_merges(merges_txt, source)
        self.n_vocab = len(self.encoder)
        self.unknown = self.encoder.get(UNKNOWN)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def from_folder(cls, folder: Path | str) -> GPT1Tokenizer:
        folder = Path(folder)
        try:
            files = [(folder / name).read_bytes() for name in (VOCAB_FILE, MERGES_FILE)]
        except OSError as error:
            raise UserError(f"the GPT-1 tokenizer needs {VOCAB_FILE} and {MERGES_FILE} in {folder}: "
                            f"{error.strerror or error}") from None
        return cls(*files, source=str(folder))

    def encode_ordinary(self, text: str) -> list[int]:
        ids = []
        if text.isascii():
            words = _ASCII_WORDS.findall(text.translate(_ASCII_CLEAN).lower())
        else:
            words = split_words(normalize(text))
        for word in words:
            if word not in self._cache:
                self._cache[word] = self._bpe(word)
            ids += self._cache[word]
        return ids

    def _bpe(self, word: str) -> list[int]:
        """Merge the word's characters by rank, lowest first, as HF's BPE model does: a character
        missing from the vocabulary becomes <unk> (None here) and takes part in no merge."""
        symbols: list[str | None] = [c if c in self.encoder else None for c in word[:-1]]
        last = word[-1] + WORD_END
        symbols.append(last if last in self.encoder else None)
        while len(symbols) > 1:
            candidates = [(self.ranks[pair], pair) for pair in itertools.pairwise(symbols) if pair in self.ranks]
            if not candidates:
                break
            _, (first, second) = min(candidates)
            merged: list[str | None] = []
            i = 0
            while i < len(symbols):  # every occurrence, left to right
                if i + 1 < len(symbols) and symbols[i] == first and symbols[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        return [self._id(symbol, word) for symbol in symbols]

    def _id(self, symbol: str | None, word: str) -> int:
        token = self.encoder.get(symbol) if symbol is not None else None
        if token is not None:
            return token
        if self.unknown is None:
            raise UserError(f"the word {word!r} has a character that is not in GPT-1's vocabulary, and its "
                            f"{VOCAB_FILE} has no {UNKNOWN} token")
        return self.unknown

    def decode(self, ids: list[int]) -> str:
        """Words joined by spaces where a token ends a word: lowercased, and punctuation stands apart."""
        return "".join(self.decoder[i] for i in ids).replace(WORD_END, " ").removesuffix(" ") if ids else ""

    def decode_single_token_bytes(self, token: int) -> bytes:
        return self.decoder[token].replace(WORD_END, " ").encode("utf-8")


def normalize(text: str) -> str:
    """Steps 1 to 3: clean, space out CJK ideographs, strip accents, lowercase."""
    kept = []
    for char in text:
        if char in "\t\n\r":
            kept.append(" ")
        elif char in "\x00\ufffd" or unicodedata.category(char).startswith("C"):
            continue
        elif char.isspace():
            kept.append(" ")
        elif any(low <= ord(char) <= high for low, high in _CJK_RANGES):
            kept.append(f" {char} ")
        else:
            kept.append(char)
    decomposed = unicodedata.normalize("NFD", "".join(kept))
    # One character at a time, as HF does: str.lower() on the whole text would give a final sigma.
    return "".join(char.lower() for char in decomposed if unicodedata.category(char) != "Mn")


def split_words(text: str) -> list[str]:
    """Step 4: words split on whitespace, each punctuation character a word of its own."""
    words, current = [], []
    for char in text:
        if char.isspace() or _is_punctuation(char):
            if current:
                words.append("".join(current))
                current = []
            if not char.isspace():
                words.append(char)
        else:
            current.append(char)
    if current:
        words.append("".join(current))
    return words


def _is_punctuation(char: str) -> bool:
    # BERT counts all non-alphanumeric ASCII as punctuation ($, +, ^, `...), Unicode's P* categories too.
    code = ord(char)
    return 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126 or \
        unicodedata.category(char).startswith("P")


def _read_vocab(data: bytes, source: str) -> dict[str, int]:
    try:
        vocab = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{source}: {VOCAB_FILE} is not JSON ({error})") from None
    if not isinstance(vocab, dict) or not all(isinstance(v, int) and not isinstance(v, bool) for v in vocab.values()):
        raise UserError(f"{source}: {VOCAB_FILE} must map tokens to integer ids")
    if sorted(vocab.values()) != list(range(len(vocab))):
        raise UserError(f"{source}: the ids of {VOCAB_FILE} must be 0 to {len(vocab) - 1}, each once")
    return vocab


def _read_merges(data: bytes, source: str) -> dict[tuple[str, str], int]:
    ranks = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip() or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split()
        if len(parts) != 2:
            raise UserError(f"{source}: {MERGES_FILE}, line {number}: expected two symbols, got {line!r}")
        ranks.setdefault((parts[0], parts[1]), len(ranks))
    return ranks
