"""Building a corpus of token shards from a stream of documents, resumably: tokenizing in parallel
in the documents' order, routing documents to val and then train (shuffled in windows when asked),
and a manifest after every shard that says where a re-run picks up.

Every document becomes <|endoftext|> followed by its tokens. The first documents of the stream, as
many as fit whole in `val_tokens`, are the val split; all later documents are train. No document is
split between them. With `shuffle_val` the shuffle comes first, so val is a sample of the first
shuffle window. The shards' bytes depend on the settings alone, never on the number of workers, and
a re-run after an interruption skips the documents of the complete shards without tokenizing them.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
from tqdm import tqdm

from core.atomic import write_file_atomically
from core.errors import UserError
from core.shards import SplitWriter, read_shard_info, shard_prefix

SPLITS = ("val", "train")
# Text per tokenizer task: big enough that task overhead is lost in the noise, small enough that the
# two tasks per worker kept in flight stay a few MB even on a many-core machine.
BATCH_CHARS = 1 << 18
MANIFEST_FORMAT = "gpt2-toolkit-shards"
MANIFEST_VERSION = 2  # 2: the restart point holds every split's position


@dataclass(frozen=True)
class CorpusBuild:
    """What `build_corpus` did: the final manifest, and the tokens it wrote in how many seconds (none
    when the corpus was complete already)."""

    manifest: dict[str, Any]
    tokens: int
    seconds: float


def build_corpus(folder: Path, settings: dict[str, Any], documents: Callable[[], Iterable[str]],
                 encoding: tiktoken.Encoding, workers: int, report: Callable[[str], None] = print) -> CorpusBuild:
    """Tokenize `documents()` (opened only when there is work to do) into shards in `folder`, or carry
    on an interrupted build with the same `settings` (see `load_manifest`). `settings` holds
    "prefix", "shard_size", "val_tokens", "max_tokens", "max_docs", "shuffle_seed", "shuffle_window",
    "shuffle_val", and whatever else names the source."""
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file, not a folder")
    if folder.is_dir():
        check_holds_only(folder, settings["prefix"])
    manifest = load_manifest(folder, settings["prefix"], settings)
    if manifest and manifest["complete"]:
        report(f"{folder}: complete already, nothing to do")
        return CorpusBuild(manifest, 0, 0.0)
    stream = documents()
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    builder = ShardBuilder(folder, encoding, settings, manifest)
    first = builder.restart.document
    done = sum(len(writer.shards) for writer in builder.writers.values())
    if done:
        report(f"resuming: {done} shards complete; " + (f"skipping their {first:,} documents (read, not tokenized)"
               if first else "they come from the first shuffle window, which is tokenized again"))
    started, tokens_at_start = time.perf_counter(), builder.total_tokens
    try:
        manifest = build_shards(builder, islice(stream, first, settings["max_docs"]), encoding, workers)
    except UserError:
        if created and not any(writer.shards for writer in builder.writers.values()):
            shutil.rmtree(folder)  # bad input before the first shard: leave no folder that looks like a start
        raise
    return CorpusBuild(manifest, builder.total_tokens - tokens_at_start, time.perf_counter() - started)


# ------------------------------------------------------------------------------------------- tokenizing

def tokenize_in_order(documents: Iterable[str], encoding: tiktoken.Encoding, workers: int,
                      batch_chars: int = BATCH_CHARS) -> Iterator[list[np.ndarray]]:
    """Batches of tokenized documents (see `encode_document`), in the order of `documents`, about
    `batch_chars` characters each.

    `workers` threads tokenize batches at once (tiktoken releases the GIL while it encodes) while
    this thread reads ahead; results come back in submission order, so the output is the same for
    any number of workers. At most two batches per worker are in flight, which bounds memory."""
    pool = ThreadPoolExecutor(workers, thread_name_prefix="tokenize")
    pending: deque[Future[list[np.ndarray]]] = deque()
    try:
        for batch in _batches(documents, batch_chars):
            pending.append(pool.submit(_encode_batch, encoding, batch))
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


def _encode_batch(encoding: tiktoken.Encoding, texts: list[str]) -> list[np.ndarray]:
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


# -------------------------------------------------------------------------------------------- building

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
        self.writers = {split: SplitWriter(folder, settings["prefix"], split, settings["shard_size"], encoding.name,
                                           encoding.n_vocab, splits[split]["shards"], splits[split]["tokens"],
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


def build_shards(builder: ShardBuilder, documents: Iterable[str], encoding: tiktoken.Encoding,
                 workers: int) -> dict[str, Any]:
    """Tokenize `documents`, the source from the builder's restart point on, into shards, with a
    progress bar; the final manifest."""
    document = builder.restart.document
    try:
        with tqdm(total=builder.max_tokens, initial=builder.total_tokens, unit="tok", unit_scale=True,
                  desc="tokenizing", disable=None) as bar:  # None: a bar at a terminal only
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


# -------------------------------------------------------------------------------------------- manifest

def manifest_path(folder: Path, prefix: str) -> Path:
    return folder / f"{prefix}_manifest.json"


def check_holds_only(folder: Path, prefix: str) -> None:
    """A corpus folder holds one corpus: its shards and manifest, hidden files aside (half-written shards,
    a desktop's). Shards of another prefix beside them would be read as one corpus, or refused, later."""
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name == manifest_path(folder, prefix).name or \
                shard_prefix(path) == prefix:
            continue
        raise UserError(f"--out {folder} already holds {path.name}, which is not of the corpus {prefix!r} this "
                        "command makes: a folder holds one corpus, so choose another --out")


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
    if manifest.get("format") != MANIFEST_FORMAT or manifest.get("version") != MANIFEST_VERSION:
        raise UserError(f"{path} is not a version {MANIFEST_VERSION} {MANIFEST_FORMAT} manifest")
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


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."
