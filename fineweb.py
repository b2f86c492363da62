"""Tokenize FineWeb-Edu, another Hugging Face text dataset, or local files into token shards.

    python fineweb.py              # as build-nanogpt: FineWeb-Edu sample-10BT, GPT-2 BPE -> edu_fineweb10B/
    python fineweb.py --input corpus/ notes.txt --out data/mine --val-tokens 1e6
    python fineweb.py --dataset pleisto/wikipedia-cn-20230720-filtered --text-column completion \\
        --tokenizer cl100k_base --out data/wiki_cn --prefix wikicn

Every document becomes <|endoftext|> followed by its tokens. The first documents of the stream, as
many as fit whole in --val-tokens (default: one shard, as build-nanogpt's first shard; for local files
at most a tenth of them, so that a small corpus trains with the defaults), are the val split; all
later documents are train, optionally shuffled (--shuffle-seed). With --shuffle-val the shuffle comes
first, so val is a sample of the first shuffle window (of the whole corpus, when the window covers
it), not its opening: for a corpus whose documents are not alike from start to end, such as one play
after another. No document is split between val and train. Each split is cut into shards of
--shard-size tokens (format: core/shards.py). --out holds one corpus: files of another are refused.

The shards are the same whatever --workers is. Each shard is written atomically, and after each one
OUT/PREFIX_manifest.json records where to resume: re-running the same command after an interruption
skips the documents of the complete shards without tokenizing them, then carries on. The pipeline
lives in core/: the sources in documents.py, tokenizing and resumable building in corpus.py.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import tiktoken

from core.cli import StageParser
from core.corpus import SPLITS, build_corpus
from core.documents import find_input_files, hub_documents, local_documents
from core.errors import exit_on_user_error
from core.shards import token_dtype
from core.tokenizer import TOKENIZERS, get_tokenizer

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_DATASET_CONFIG = "sample-10BT"  # only for the default dataset


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = StageParser(__doc__)
    source = parser.add_argument_group("source (default: FineWeb-Edu sample-10BT, streamed from the HF hub)")
    source.add_argument("--input", nargs="+", type=Path, metavar="PATH",
                        help="local files or folders instead of a dataset: .txt (one document per file), "
                             ".jsonl / .jsonl.gz (one per line), .parquet (one per row); folders are read "
                             "recursively in sorted order")
    source.add_argument("--txt-paragraphs", action="store_true",
                        help="split .txt files into a document per blank-line-separated paragraph")
    source.add_argument("--dataset", default=DEFAULT_DATASET, help="HF dataset name (default: %(default)s)")
    source.add_argument("--dataset-config", metavar="NAME",
                        help=f"HF dataset config (default: {DEFAULT_DATASET_CONFIG} for {DEFAULT_DATASET}, else none)")
    source.add_argument("--split", default="train", help="HF dataset split to read (default: %(default)s)")
    source.add_argument("--text-column", default="text", metavar="NAME",
                        help="field holding the text, in HF datasets, .jsonl and .parquet (default: %(default)s)")
    source.add_argument("--max-docs", type=_count, metavar="N", help="read only the first N documents")
    output = parser.add_argument_group("output")
    output.add_argument("--out", type=Path, default=Path("edu_fineweb10B"), help="folder (default: %(default)s)")
    output.add_argument("--prefix", default="edufineweb", type=_prefix,
                        help="shard names are PREFIX_{val,train}_NNNNNN.bin: letters, digits, '.', '_', '-' "
                             "(default: %(default)s)")
    output.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2",
                        help="gpt2 (GPT-2's BPE, uint16 shards) or cl100k_base (GPT-4's, uint32) "
                             "(default: %(default)s)")
    output.add_argument("--shard-size", type=_positive_count, default=100_000_000, metavar="TOKENS",
                        help="tokens per shard; 1e8 and 100_000_000 both work (default: 1e8)")
    output.add_argument("--val-tokens", type=_count, metavar="TOKENS",
                        help="val holds the first documents that fit whole in TOKENS (at least one); 0 for "
                             "no val (default: one shard; for --input, at most a tenth of the files' estimated "
                             "tokens)")
    output.add_argument("--max-tokens", type=_positive_count, metavar="TOKENS",
                        help="stop after TOKENS tokens in all (the last document is cut)")
    output.add_argument("--shuffle-seed", type=_count, metavar="SEED",
                        help="shuffle the train documents, within windows of --shuffle-window documents")
    output.add_argument("--shuffle-val", action="store_true",
                        help="shuffle before the val/train split, so that val is a sample of the first shuffle "
                             "window rather than its first documents (needs --shuffle-seed)")
    output.add_argument("--shuffle-window", type=_positive_count, default=10_000, metavar="DOCS",
                        help="documents per shuffle window; memory grows with it (default: %(default)s)")
    output.add_argument("--workers", type=_positive_count, default=_available_cores(), metavar="N",
                        help="tokenizer threads (default: all %(default)s cores)")
    args = parser.parse_args(argv)
    if args.input is None and args.dataset_config is None and args.dataset == DEFAULT_DATASET:
        args.dataset_config = DEFAULT_DATASET_CONFIG
    if args.shuffle_val and args.shuffle_seed is None:
        parser.error("--shuffle-val needs --shuffle-seed")
    return args


def _count(text: str) -> int:
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a whole number >= 0: {text!r}")
    return int(value)


def _prefix(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a shard name prefix: use letters, digits, '.', '_' and "
                                         "'-' (no '/': the folder is --out)")
    return text


def default_val_tokens(files: list[Path], shard_size: int) -> int:
    """--val-tokens left out: one shard, as build-nanogpt's FineWeb-Edu val, and for local files at most a
    tenth of their tokens, estimated from their bytes (about 4 a token in English BPE), so that a small
    corpus keeps most of itself for train. A dataset's size is unknown before it is read."""
    if not files:
        return shard_size
    estimated_tokens = sum(file.stat().st_size for file in files) // 4
    return max(1, min(shard_size, estimated_tokens // 10))


def _positive_count(text: str) -> int:
    value = _count(text)
    if value == 0:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def settings_of(args: argparse.Namespace, files: list[Path]) -> dict[str, Any]:
    """Everything that decides the shards' bytes, so a resumed run can check it matches (not --workers)."""
    if files:
        source = {"inputs": [[str(file.resolve()), file.stat().st_size] for file in files],
                  "txt_paragraphs": args.txt_paragraphs}
    else:
        source = {"dataset": args.dataset, "dataset_config": args.dataset_config, "dataset_split": args.split}
    return {**source, "text_column": args.text_column, "max_docs": args.max_docs, "tokenizer": args.tokenizer,
            "prefix": args.prefix, "shard_size": args.shard_size, "val_tokens": args.val_tokens,
            "max_tokens": args.max_tokens, "shuffle_seed": args.shuffle_seed, "shuffle_val": args.shuffle_val,
            "shuffle_window": args.shuffle_window if args.shuffle_seed is not None else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    files = find_input_files(args.input) if args.input else []
    if args.val_tokens is None:
        args.val_tokens = default_val_tokens(files, args.shard_size)
    encoding = get_tokenizer(args.tokenizer)

    def documents() -> Iterator[str]:
        if files:
            return local_documents(files, args.text_column, args.txt_paragraphs)
        return hub_documents(args.dataset, args.dataset_config, args.split, args.text_column)

    build = build_corpus(args.out, settings_of(args, files), documents, encoding, args.workers)
    print_summary(args.out, build.manifest, encoding)
    if build.tokens:
        print(f"{build.tokens:,} tokens in {build.seconds:.1f} s ({build.tokens / max(build.seconds, 1e-9) / 1e6:.2f}M "
              f"tokens/s) with {args.workers} workers")
    return build.manifest


def print_summary(folder: Path, manifest: dict[str, Any], encoding: tiktoken.Encoding) -> None:
    settings = manifest["settings"]
    print(f"{folder}/: {encoding.name} tokens as {token_dtype(encoding.n_vocab).name}, "
          f"shards of {settings['shard_size']:,} tokens")
    for split in SPLITS:
        shards, tokens = manifest["splits"][split]["shards"], manifest["splits"][split]["tokens"]
        documents = manifest["resume"]["documents"][split]
        print(f"  {split + ':':6} {len(shards):6,} shards {tokens:16,} tokens {documents:14,} documents")
    if not manifest["splits"]["train"]["shards"]:
        print(f"warning: train is empty: every document went to val (--val-tokens {settings['val_tokens']:,}); "
              f"to train on this corpus, delete {folder} and make it again with a smaller --val-tokens")


if __name__ == "__main__":
    exit_on_user_error(main)
