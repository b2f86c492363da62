"""Tokenize FineWeb-Edu, another Hugging Face text dataset, or local files into token shards.

    python fineweb.py              # as build-nanogpt: FineWeb-Edu sample-10BT, GPT-2 BPE -> edu_fineweb10B/
    python fineweb.py --input corpus/ notes.txt --out data/mine --val-tokens 1e6
    python fineweb.py --dataset pleisto/wikipedia-cn-20230720-filtered --text-column completion \\
        --tokenizer cl100k_base --out data/wiki_cn --prefix wikicn

Every document becomes <|endoftext|> followed by its tokens. The first documents of the stream, as
many as fit whole in --val-tokens (default: one shard, as build-nanogpt's first shard), are the val
split; all later documents are train, optionally shuffled (--shuffle-seed). With --shuffle-val the
shuffle comes first, so val is a sample of the first shuffle window (of the whole corpus, when the
window covers it), not its opening: for a corpus whose documents are not alike from start to end,
such as one play after another. No document is split between val and train. Each split is cut into
shards of --shard-size tokens (format: core/shards.py).

The shards are the same whatever --workers is. Each shard is written atomically, and after each one
OUT/PREFIX_manifest.json records where to resume: re-running the same command after an interruption
skips the documents of the complete shards without tokenizing them, then carries on.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
from tqdm import tqdm

from core.atomic import write_file_atomically
from core.errors import UserError, exit_on_user_error, first_line
from core.hub import require_hub_reachable
from core.shards import ShardWriter, read_shard_info, shard_path, token_dtype
from core.tokenizer import TOKENIZERS, get_tokenizer

DEFAULT_DATASET = "HuggingFaceFW/fineweb-edu"
DEFAULT_DATASET_CONFIG = "sample-10BT"  # only for the default dataset
SPLITS = ("val", "train")
LOCAL_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
# Text per tokenizer task: big enough that task overhead is lost in the noise, small enough that the
# two tasks per worker kept in flight stay a few MB even on a many-core machine.
BATCH_CHARS = 1 << 18
MANIFEST_FORMAT = "gpt2-toolkit-shards"
MANIFEST_VERSION = 2  # 2: the restart point holds every split's position
LOCAL_FILES_ADVICE = ("To tokenize local files instead, pass them with --input (.txt, .jsonl, .jsonl.gz or .parquet "
                      "files, or folders of them), e.g. `python fineweb.py --input corpus/ --out data/mine`.")


# ---------------------------------------------------------------------------------------------- sources

def find_input_files(paths: list[Path]) -> list[Path]:
    """The files to read, in order: each given file, and each folder's supported files sorted by path."""
    files = []
    for path in paths:
        if path.is_dir():
            found = sorted(file for file in path.rglob("*") if file.is_file() and _is_supported(file)
                           and not any(part.startswith(".") for part in file.relative_to(path).parts))
            if not found:
                raise UserError(f"{path} holds no {', '.join(LOCAL_SUFFIXES)} files")
            files.extend(found)
        elif path.is_file():
            if not _is_supported(path):
                raise UserError(f"{path}: unsupported file type (supported: {', '.join(LOCAL_SUFFIXES)})")
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or folder")
    return files


def _is_supported(path: Path) -> bool:
    return path.name.endswith(LOCAL_SUFFIXES)


def local_documents(files: list[Path], text_column: str, txt_paragraphs: bool) -> Iterator[str]:
    """The documents of local files, streamed: a .txt file is one document (or one per paragraph with
    `txt_paragraphs`), a .jsonl(.gz) line or a .parquet row is one document (its `text_column`)."""
    for path in files:
        if path.name.endswith(".txt"):
            reader = text_file_documents(path, txt_paragraphs)
        elif path.name.endswith(".parquet"):
            reader = parquet_documents(path, text_column)
        else:
            reader = jsonl_documents(path, text_column)
        try:
            yield from reader
        except UnicodeDecodeError as error:
            raise UserError(f"{path} is not UTF-8 text ({error.reason})") from None
        except (OSError, EOFError) as error:  # includes gzip.BadGzipFile; EOFError: a truncated .gz
            raise UserError(f"cannot read {path}: {error}") from None


def text_file_documents(path: Path, paragraphs: bool) -> Iterator[str]:
    """The whole file, or with `paragraphs` each run of non-blank lines without its final line break.
    Line breaks are kept as they are in the file (newline=""), so the text round-trips exactly."""
    with open(path, encoding="utf-8", newline="") as f:
        if not paragraphs:
            yield f.read()
            return
        lines: list[str] = []
        for line in f:
            if line.strip():
                lines.append(line)
            elif lines:
                yield "".join(lines).rstrip("\r\n")
                lines = []
        if lines:
            yield "".join(lines).rstrip("\r\n")


def jsonl_documents(path: Path, text_column: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise UserError(f"{path}:{number}: not a JSON line ({error.msg})") from None
            if not isinstance(record, dict):
                raise UserError(f"{path}:{number}: a JSON {type(record).__name__}, not an object with a "
                                f"{text_column!r} field")
            yield text_of(record, text_column, f"{path}:{number}")


def parquet_documents(path: Path, text_column: str) -> Iterator[str]:
    import pyarrow
    import pyarrow.parquet as pq

    try:
        table = pq.ParquetFile(path)
        if text_column not in table.schema_arrow.names:
            raise UserError(f"{path} has no column {text_column!r} (columns: {', '.join(table.schema_arrow.names)}); "
                            "choose one with --text-column")
        row = 0
        for batch in table.iter_batches(batch_size=1024, columns=[text_column]):
            for text in batch.column(0).to_pylist():
                row += 1
                yield text_of({text_column: text}, text_column, f"{path} row {row}")
    except pyarrow.ArrowException as error:
        raise UserError(f"cannot read {path} as Parquet: {error}") from None


def text_of(record: dict[str, Any], text_column: str, where: str) -> str:
    if text_column not in record:
        raise UserError(f"{where} has no {text_column!r} field (fields: {', '.join(map(str, record))}); "
                        "choose one with --text-column")
    text = record[text_column]
    if not isinstance(text, str):
        raise UserError(f"{where}: {text_column!r} holds a {type(text).__name__}, not text")
    return text


def hub_documents(dataset: str, config: str | None, split: str, text_column: str) -> Iterator[str]:
    """The documents of a Hugging Face dataset, streamed: rows arrive as they are read, none is stored."""
    if os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise UserError(f"cannot stream {dataset}: HF_DATASETS_OFFLINE is set. {LOCAL_FILES_ADVICE}")
    require_hub_reachable(f"the dataset {dataset}", LOCAL_FILES_ADVICE)
    import datasets

    try:
        stream = datasets.load_dataset(dataset, name=config, split=split, streaming=True)
    except Exception as error:  # datasets raises many types: not found, bad config or split, HTTP errors
        raise UserError(f"cannot stream {dataset!r} (config {config}, split {split}): {first_line(error)}") from None
    return _hub_texts(stream, dataset, text_column)


def _hub_texts(stream: Iterable[dict[str, Any]], dataset: str, text_column: str) -> Iterator[str]:
    row = 0
    try:
        for row, record in enumerate(stream, 1):
            yield text_of(record, text_column, f"{dataset} row {row}")
    except OSError as error:  # requests' and huggingface_hub's network errors are OSErrors
        raise UserError(f"lost the connection to the hub after {row:,} rows of {dataset} ({first_line(error)}); "
                        "run the same command again to resume after the last complete shard") from None


# ------------------------------------------------------------------------------------------- tokenizing

def tokenize_in_order(documents: Iterable[str], encoding: tiktoken.Encoding,
                      workers: int) -> Iterator[list[np.ndarray]]:
    """Batches of tokenized documents (see `encode_document`), in the order of `documents`.

    `workers` threads tokenize batches at once (tiktoken releases the GIL while it encodes) while
    this thread reads ahead; results come back in submission order, so the output is the same for
    any number of workers. At most two batches per worker are in flight, which bounds memory."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="tokenize")
    pending: deque[Future[list[np.ndarray]]] = deque()
    try:
        for batch in _batches(documents, BATCH_CHARS):
            pending.append(pool.submit(encode_batch, encoding, batch))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(cancel_futures=True)


def _batches(documents: Iterable[str], max_chars: int) -> Iterator[list[str]]:
    batch: list[str] = []
    chars = 0
    for text in documents:
        batch.append(text)
        chars += len(text)
        if chars >= max_chars:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def encode_batch(encoding: tiktoken.Encoding, texts: list[str]) -> list[np.ndarray]:
    return [encode_document(encoding, text) for text in texts]


def encode_document(encoding: tiktoken.Encoding, text: str) -> np.ndarray:
    """<|endoftext|> then the tokens of `text`, as uint32; special-token strings in `text` are plain
    text, exactly as `encoding.encode_ordinary` treats them."""
    if any(special in text for special in encoding.special_tokens_set):
        # Some tiktoken versions' encode_to_numpy encode these strings as the special tokens.
        tokens = np.asarray(encoding.encode_ordinary(text), dtype=np.uint32)
    else:
        try:
            # No Python list of ints: this is what keeps the pipeline at tiktoken's own speed.
            tokens = encoding.encode_to_numpy(text, disallowed_special=())
        except UnicodeEncodeError:  # lone surrogates: encode_ordinary applies tiktoken's own repair
            tokens = np.asarray(encoding.encode_ordinary(text), dtype=np.uint32)
    document = np.empty(len(tokens) + 1, dtype=np.uint32)
    document[0] = encoding.eot_token
    document[1:] = tokens
    return document


# --------------------------------------------------------------------------------------------- writing

class SplitWriter:
    """One split's token stream, cut into shards of `shard_size` tokens as it grows.

    `position` counts the split's tokens so far. On a resumed run the stream restarts before the end
    of the complete shards, so tokens that those shards already hold are dropped, not written twice."""

    def __init__(self, folder: Path, prefix: str, split: str, shard_size: int, encoding: tiktoken.Encoding,
                 shards: list[str], tokens: int, position: int) -> None:
        self.folder, self.prefix, self.split, self.shard_size = folder, prefix, split, shard_size
        self.tokenizer, self.vocab_size = encoding.name, encoding.n_vocab
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


@dataclass
class RestartPoint:
    """Where a re-run picks up: source document `document` is the first of a unit (one document, or a
    shuffle window), read while `split` was being filled; `positions` and `documents` are each split's
    tokens and documents before it. At most one split has a shard in progress at any time (val is
    finished before train starts), so the unit that completes a shard is a safe place to restart."""

    document: int
    split: str
    positions: dict[str, int]
    documents: dict[str, int]


class ShardBuilder:
    """Routes tokenized documents to val and then train, shuffles in windows of documents (train's,
    or val's and train's with --shuffle-val), stops at --max-tokens, and saves the manifest after
    every shard."""

    def __init__(self, folder: Path, encoding: tiktoken.Encoding, settings: dict[str, Any],
                 manifest: dict[str, Any] | None) -> None:
        self.settings = settings
        self.val_tokens, self.max_tokens = settings["val_tokens"], settings["max_tokens"]
        self.shuffle_seed, self.shuffle_window = settings["shuffle_seed"], settings["shuffle_window"]
        self.shuffle_val = settings["shuffle_val"]
        self.manifest_path = manifest_path(folder, settings["prefix"])
        splits = manifest["splits"] if manifest else {split: {"shards": [], "tokens": 0} for split in SPLITS}
        fresh = RestartPoint(document=0, split="val", positions=dict.fromkeys(SPLITS, 0),
                             documents=dict.fromkeys(SPLITS, 0))
        self.restart = RestartPoint(**manifest["resume"]) if manifest else fresh
        self.split = self.restart.split
        self.documents = dict(self.restart.documents)
        self.writers = {split: SplitWriter(folder, settings["prefix"], split, settings["shard_size"], encoding,
                                           splits[split]["shards"], splits[split]["tokens"],
                                           position=self.restart.positions[split])
                        for split in SPLITS}
        self.window: list[np.ndarray] = []
        self.window_start = self.restart
        self.stopped = False
        if manifest is None:  # before the first shard, so that a crash at any point leaves a manifest to resume
            self._save_manifest(complete=False)

    @property
    def total_tokens(self) -> int:
        return sum(writer.position for writer in self.writers.values())

    def add(self, document: int, tokens: np.ndarray) -> bool:
        """Route source document number `document`; False once --max-tokens is reached."""
        if self.shuffle_seed is not None and (self.split == "train" or self.shuffle_val):
            if not self.window:
                self.window_start = self._restart_at(document)
            self.window.append(tokens)
            return len(self.window) < self.shuffle_window or self._append_window()
        self.restart = self._restart_at(document)
        if self.split == "val" and not self._val_takes(tokens):
            self._end_val()
            if self.shuffle_seed is not None:
                return self.add(document, tokens)  # the first train document opens the first shuffle window
        return self._append(self.split, tokens)

    def finish(self, documents_read: int) -> dict[str, Any]:
        """Write what is left, mark the manifest complete, and return it."""
        if self.window and not self.stopped:
            self._append_window()
        if self.split == "val":
            self._end_val()
        self.writers["train"].flush()
        self.restart = self._restart_at(documents_read)
        return self._save_manifest(complete=True)

    def abort(self) -> None:
        """Drop the shards being written, after a failure: the manifest already says where to resume."""
        for writer in self.writers.values():
            writer.abort()

    def _restart_at(self, document: int) -> RestartPoint:
        positions = {split: writer.position for split, writer in self.writers.items()}
        return RestartPoint(document, self.split, positions, dict(self.documents))

    def _val_takes(self, tokens: np.ndarray) -> bool:
        first = self.documents["val"] == 0 and self.val_tokens > 0  # val is never empty when asked for
        return first or self.writers["val"].position + len(tokens) <= self.val_tokens

    def _append_window(self) -> bool:
        """Append the shuffle window's documents in an order drawn from the seed and the window's first
        document's number, so that a resumed run draws the same order."""
        order = np.random.default_rng([self.shuffle_seed, self.window_start.document]).permutation(len(self.window))
        self.restart = self.window_start
        window, self.window = self.window, []
        for index in order:
            if self.split == "val" and not self._val_takes(window[index]):
                self._end_val()
            if not self._append(self.split, window[index]):
                return False
        return True

    def _append(self, split: str, tokens: np.ndarray) -> bool:
        if self.max_tokens is not None:
            tokens = tokens[: self.max_tokens - self.total_tokens]
        self.documents[split] += 1
        if self.writers[split].append(tokens):
            self._save_manifest(complete=False)
        self.stopped = self.max_tokens is not None and self.total_tokens >= self.max_tokens
        return not self.stopped

    def _end_val(self) -> None:
        self.writers["val"].flush()
        self.split = "train"
        self._save_manifest(complete=False)

    def _save_manifest(self, complete: bool) -> dict[str, Any]:
        manifest = {
            "format": MANIFEST_FORMAT,
            "version": MANIFEST_VERSION,
            "settings": self.settings,
            "complete": complete,
            "resume": asdict(self.restart),
            "splits": {split: {"shards": writer.shards, "tokens": writer.tokens}
                       for split, writer in self.writers.items()},
        }
        write_file_atomically(self.manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
        return manifest


# -------------------------------------------------------------------------------------------- manifest

def manifest_path(folder: Path, prefix: str) -> Path:
    return folder / f"{prefix}_manifest.json"


def load_manifest(folder: Path, prefix: str, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of an earlier run into `folder` with these settings, its shards checked; None to
    start afresh. Refuses to mix this run's shards with shards of other settings or of unknown origin."""
    path = manifest_path(folder, prefix)
    shards_on_disk = sorted(file.name for file in folder.glob(f"{prefix}_*_[0-9][0-9][0-9][0-9][0-9][0-9].*"))
    if not path.exists():
        if shards_on_disk:
            raise UserError(f"{folder} already holds shards ({shards_on_disk[0]}, ...) but no {path.name} to "
                            "resume from: use another --out, or delete them")
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}") from None
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version", 0) not in (1, MANIFEST_VERSION):
        raise UserError(f"{path} is not a version {MANIFEST_VERSION} {MANIFEST_FORMAT} manifest")
    if manifest["version"] == 1:
        _upgrade_from_version_1(manifest)
    changed = [f"{key} ({_short(manifest['settings'].get(key))} then, {_short(settings.get(key))} now)"
               for key in sorted(settings.keys() | manifest["settings"].keys())
               if manifest["settings"].get(key) != settings.get(key)]
    if changed and not shards_on_disk:
        return None  # an earlier run that failed before its first shard: nothing to keep
    if changed:
        raise UserError(f"{folder} holds shards made with other settings: {'; '.join(changed)}. "
                        "Use another --out, or delete it to start over")
    for split in SPLITS:
        for name in manifest["splits"][split]["shards"]:
            try:
                read_shard_info(folder / name)
            except UserError as error:
                raise UserError(f"{path.name} lists {name} as complete, but: {error}. "
                                f"Delete {folder} to start over") from None
    return manifest


def _upgrade_from_version_1(manifest: dict[str, Any]) -> None:
    """Version 1 (before --shuffle-val) kept one position, the split being written's; the other split
    was complete or empty, so its position is its tokens."""
    resume = manifest["resume"]
    position = resume.pop("position")
    resume["positions"] = {split: position if split == resume["split"] else manifest["splits"][split]["tokens"]
                           for split in SPLITS}
    manifest["settings"].setdefault("shuffle_val", False)
    manifest["version"] = MANIFEST_VERSION


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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
    output.add_argument("--prefix", default="edufineweb",
                        help="shard names are PREFIX_{val,train}_NNNNNN.bin (default: %(default)s)")
    output.add_argument("--tokenizer", choices=TOKENIZERS, default="gpt2", help="(default: %(default)s)")
    output.add_argument("--shard-size", type=_positive_count, default=100_000_000, metavar="TOKENS",
                        help="tokens per shard; 1e8 and 100_000_000 both work (default: 1e8)")
    output.add_argument("--val-tokens", type=_count, metavar="TOKENS",
                        help="val holds the first documents that fit whole in TOKENS (at least one); 0 for "
                             "no val (default: the shard size)")
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
    if args.val_tokens is None:
        args.val_tokens = args.shard_size
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
    encoding = get_tokenizer(args.tokenizer)
    settings = settings_of(args, files)
    if args.out.exists() and not args.out.is_dir():
        raise UserError(f"--out {args.out} is a file, not a folder")
    manifest = load_manifest(args.out, args.prefix, settings)
    if manifest and manifest["complete"]:
        print(f"{args.out}: complete already, nothing to do")
        print_summary(args.out, manifest, encoding)
        return manifest
    if files:
        documents = local_documents(files, args.text_column, args.txt_paragraphs)
    else:
        documents = hub_documents(args.dataset, args.dataset_config, args.split, args.text_column)
    args.out.mkdir(parents=True, exist_ok=True)
    builder = ShardBuilder(args.out, encoding, settings, manifest)
    first = builder.restart.document
    done = sum(len(writer.shards) for writer in builder.writers.values())
    if done:
        print(f"resuming: {done} shards complete; " + (f"skipping their {first:,} documents (read, not tokenized)"
              if first else "they come from the first shuffle window, which is tokenized again"))
    started, tokens_at_start = time.perf_counter(), builder.total_tokens
    manifest = build_shards(builder, islice(documents, first, args.max_docs), encoding, args.workers)
    seconds = time.perf_counter() - started
    print_summary(args.out, manifest, encoding)
    tokens = builder.total_tokens - tokens_at_start
    print(f"{tokens:,} tokens in {seconds:.1f} s ({tokens / max(seconds, 1e-9) / 1e6:.2f}M tokens/s) "
          f"with {args.workers} workers")
    return manifest


def build_shards(builder: ShardBuilder, documents: Iterable[str], encoding: tiktoken.Encoding,
                 workers: int) -> dict[str, Any]:
    """Tokenize `documents`, the source from the builder's restart point on, into shards, with a
    progress bar; the final manifest."""
    document = builder.restart.document
    try:
        with tqdm(total=builder.max_tokens, initial=builder.total_tokens, unit="tok", unit_scale=True,
                  desc="tokenizing") as bar:
            for batch in tokenize_in_order(documents, encoding, workers):
                for tokens in batch:
                    keep_going = builder.add(document, tokens)
                    document += 1
                    if not keep_going:
                        break
                bar.update(builder.total_tokens - bar.n)
                bar.set_postfix_str(f"{document:,} docs", refresh=False)
                if builder.stopped:
                    break
        return builder.finish(document)
    except BaseException:
        builder.abort()
        raise


def print_summary(folder: Path, manifest: dict[str, Any], encoding: tiktoken.Encoding) -> None:
    settings = manifest["settings"]
    print(f"{folder}/: {encoding.name} tokens as {token_dtype(encoding.n_vocab).name}, "
          f"shards of {settings['shard_size']:,} tokens")
    for split in SPLITS:
        shards, tokens = manifest["splits"][split]["shards"], manifest["splits"][split]["tokens"]
        documents = manifest["resume"]["documents"][split]
        print(f"  {split + ':':6} {len(shards):6,} shards {tokens:16,} tokens {documents:14,} documents")
    if not manifest["splits"]["train"]["shards"]:
        print(f"warning: train is empty: every document went to val (--val-tokens {settings['val_tokens']:,})")


if __name__ == "__main__":
    exit_on_user_error(main)
