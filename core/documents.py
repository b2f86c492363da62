"""Where a corpus's documents come from, streamed as text: local files (.txt, .jsonl, .jsonl.gz,
.parquet, or folders of them) and Hugging Face datasets. A bad file is a UserError naming it (and
the line or row); nothing is held in memory beyond the document being read.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from core.errors import UserError, first_line
from core.hub import require_hub_reachable

LOCAL_SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
LOCAL_FILES_ADVICE = ("To tokenize local files instead, pass them with --input (.txt, .jsonl, .jsonl.gz or .parquet "
                      "files, or folders of them), e.g. `python fineweb.py --input corpus/ --out data/mine`.")


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
