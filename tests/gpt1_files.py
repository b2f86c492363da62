"""Small GPT-1 tokenizer files and model folders for tests, made on the spot (the hub is out of reach).

The vocabulary is GPT-1's kind: every character of an alphabet alone and with `</w>`, `<unk>`, and the
merges that a plain BPE learner finds in a paragraph of English, in the order it finds them.
"""

from __future__ import annotations

import itertools
import json
import re
import string
from collections import Counter
from pathlib import Path

import torch
from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

from tests.weights import redraw_weights

PARAGRAPH = """
The Story Cloze Test gives a story of four sentences and two endings, and the reader picks the ending that
makes sense. Tom went to the store to buy milk for his mother. He found that the store was closed for the
holiday. He walked to another store down the street. The other store had the milk he wanted, and Tom was
happy. She decided that she would bake a cake for her friend's birthday; it wasn't easy, but she tried!
They played in the park until the sun went down. We've waited 42 minutes (and 3.5 seconds) for the bus.
"""
# Characters beyond the paragraph's, so that varied text mostly has a token; the rest is <unk>.
ALPHABET = (string.ascii_lowercase + string.digits + string.punctuation +
            "αβγδεζηθικλμνξοπρστυφχψως日本中文語“”‘’—–…¿¡€£")


def learn_merges(text: str, count: int) -> list[tuple[str, str]]:
    """BPE merges over the lowercased words of `text`, the most frequent pair first."""
    words = Counter(re.findall(r"[a-z0-9]+|[^a-z0-9\s]", text.lower()))
    corpus = {(*word[:-1], word[-1] + "</w>"): n for word, n in words.items()}
    merges = []
    for _ in range(count):
        pairs: Counter = Counter()
        for symbols, n in corpus.items():
            for pair in itertools.pairwise(symbols):
                pairs[pair] += n
        if not pairs:
            break
        best = max(pairs, key=lambda pair: (pairs[pair], pair))
        merges.append(best)
        corpus = {_merge(symbols, best): n for symbols, n in corpus.items()}
    return merges


def _merge(symbols: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged, i = [], 0
    while i < len(symbols):
        if symbols[i : i + 2] == pair:
            merged.append(pair[0] + pair[1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return tuple(merged)


def write_tokenizer_files(folder: Path, merges_count: int = 120, text: str = PARAGRAPH) -> int:
    """vocab.json and merges.txt in `folder`, as HF's openai-gpt folder has them; the vocabulary size."""
    merges = learn_merges(text, merges_count)
    vocab = {"<unk>": 0}
    for suffix in ("", "</w>"):
        for char in ALPHABET:
            vocab.setdefault(char + suffix, len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    return len(vocab)


def make_hf_gpt1(vocab_size: int, n_positions: int = 40, n_embd: int = 48, n_layer: int = 3,
                 n_head: int = 4, std: float = 0.3) -> OpenAIGPTLMHeadModel:
    """A random HF GPT-1, every parameter drawn with `std` (see tests/weights.py), no dropout."""
    torch.manual_seed(1234)
    config = OpenAIGPTConfig(vocab_size=vocab_size, n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                             n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return redraw_weights(OpenAIGPTLMHeadModel(config), std)


def write_hf_gpt1_folder(folder: Path, **config: int) -> OpenAIGPTLMHeadModel:
    """An openai-gpt folder as the hub has it: config.json, model.safetensors, vocab.json, merges.txt."""
    vocab_size = write_tokenizer_files(folder)
    hf_model = make_hf_gpt1(vocab_size, **config)
    hf_model.save_pretrained(folder)
    return hf_model
