"""The CORE benchmark (DCLM, arXiv 2406.11794), scored as nanochat's core_eval.py scores it: the mean,
over in-context-learning tasks, of each task's accuracy centered on its random baseline.

A bundle is a folder in the layout of nanochat's eval_bundle.zip:
- core.yaml: `icl_tasks`, each with label, dataset_uri (under eval_data/), num_fewshot (a one-element
  list), icl_task_type and continuation_delimiter (default " ");
- eval_meta_data.csv: the columns "Eval Task" and "Random baseline" (in percent);
- eval_data/<category>/<task>.jsonl: one example a line; its 0-based line number is its index.

Three task types, every sequence starting with <|endoftext|> (nanochat's BOS):
- multiple_choice (query, choices, gold): the choice whose tokens have the lowest mean loss, after the
  query and the delimiter; the scored tokens are those after the choices' common prefix.
- schema (context_options, continuation, gold): the context option after which the continuation has
  the lowest mean loss; the scored tokens are the options' common suffix.
- language_modeling (context, continuation): correct when the greedy argmax is every continuation token.
Few-shot examples come from the other items of the set being scored, drawn with
random.Random(1234 + index), each followed by a blank line. A sequence longer than the model's context
loses tokens from the left, <|endoftext|> the first. Ties go to the first option with the lowest loss.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import shutil
import time
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from core.cache import cache_dir, download
from core.distributed import fetch_once_per_node
from core.errors import UserError, json_object
from core.scoring import (
    Candidate,
    common_prefix_length,
    common_suffix_length,
    gather_from_ranks,
    scored_batches,
    share_of_this_rank,
)
from core.tokenizer import Tokenizer
from model import GPT

CORE_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")
FEWSHOT_SEED = 1234  # DCLM's and nanochat's: item i draws its examples with random.Random(1234 + i)


@dataclass(frozen=True)
class Task:
    label: str
    task_type: str  # one of TASK_TYPES
    num_fewshot: int
    delimiter: str  # between a context and its answer
    baseline: float  # the accuracy of random guessing, a fraction
    path: Path  # its JSONL file


@dataclass(frozen=True)
class PreparedTask:
    """A task's items tokenized for one model: the candidates of each of `indices`."""
    task: Task
    indices: list[int]
    questions: list[list[Candidate]]
    golds: list[int | None]  # None for language_modeling


@dataclass(frozen=True)
class ItemResult:
    task: str
    index: int  # the 0-based line of the task's file
    correct: bool
    pred: int | None  # the option chosen (multiple_choice, schema)
    gold: int | None
    mean_losses: list[float]  # per option; language_modeling: of the continuation


@dataclass(frozen=True)
class TaskScore:
    label: str
    task_type: str
    num_fewshot: int
    examples: int
    accuracy: float
    centered: float
    seconds: float


def centered_accuracy(accuracy: float, baseline: float) -> float:
    """0 at random guessing, 1 at perfect, as DCLM centers it."""
    return (accuracy - baseline) / (1.0 - baseline)


def core_metric(scores: list[TaskScore]) -> float:
    return sum(score.centered for score in scores) / len(scores)


# --- the bundle -----------------------------------------------------------------------------------

def bundle_folder(path: Path | None = None, flag: str = "--bundle") -> Path:
    """`path` when given, else nanochat's bundle in the cache, downloaded and unpacked on first use."""
    if path is not None:
        if not (path / "core.yaml").is_file():
            raise UserError(f"{flag} {path}: no core.yaml there (expected the layout of nanochat's eval_bundle)")
        return path
    folder = cache_dir() / "core_eval" / "eval_bundle"
    if not (folder / "core.yaml").is_file():
        _download_bundle(folder, advice=f"Offline, pass an unpacked eval_bundle with {flag} DIR, or unpack it at "
                                        f"{folder}")
    return folder


def bundle_folder_on_every_rank(path: Path | None = None, flag: str = "--bundle") -> Path:
    return fetch_once_per_node(lambda: bundle_folder(path, flag))


def _download_bundle(folder: Path, advice: str) -> None:
    # GPT2_TOOLKIT_CORE_BUNDLE_URL points the download at a mirror (or, in the tests, at a local server).
    url = os.environ.get("GPT2_TOOLKIT_CORE_BUNDLE_URL", CORE_BUNDLE_URL)
    archive = folder.with_name("eval_bundle.zip")
    download(url, archive, advice, looks_right=zipfile.is_zipfile, what="a zip archive")
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with zipfile.ZipFile(archive) as bundle:
        for name in bundle.namelist():  # no member may land outside the staging folder
            if name.startswith(("/", "\\")) or ".." in Path(name).parts:
                raise UserError(f"{url}: refusing the archive member {name!r}")
        bundle.extractall(staging)
    unpacked = next((candidate for candidate in (staging, staging / "eval_bundle")
                     if (candidate / "core.yaml").is_file()), None)
    if unpacked is None or not (unpacked / "eval_meta_data.csv").is_file() or not (unpacked / "eval_data").is_dir():
        shutil.rmtree(staging, ignore_errors=True)
        raise UserError(f"{url} holds no core.yaml, eval_meta_data.csv and eval_data/. {advice}")
    unpacked.rename(folder)
    shutil.rmtree(staging, ignore_errors=True)
    archive.unlink()


def read_tasks(bundle: Path, selection: str = "core") -> list[Task]:
    """The tasks of the bundle's core.yaml, in its order: all of them for "core", else those of a comma
    list of labels, in the list's order."""
    import yaml

    config_path = bundle / "core.yaml"
    try:
        config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path}: not valid YAML ({str(error).splitlines()[0]})") from None
    entries = config.get("icl_tasks") if isinstance(config, dict) else None
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{config_path}: expected a non-empty list under icl_tasks")
    baselines = _read_baselines(bundle / "eval_meta_data.csv")
    tasks = [_task(entry, n, config_path, bundle, baselines) for n, entry in enumerate(entries, start=1)]
    if selection == "core":
        return tasks
    by_label = {task.label: task for task in tasks}
    labels = list(dict.fromkeys(label.strip() for label in selection.split(",") if label.strip()))
    unknown = [label for label in labels if label not in by_label]
    if unknown or not labels:
        raise UserError(f"--tasks: unknown task {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"{config_path} has: core, {', '.join(by_label)}")
    return [by_label[label] for label in labels]


def _task(entry: object, n: int, config_path: Path, bundle: Path, baselines: dict[str, float]) -> Task:
    where = f"{config_path}: icl_tasks entry {n}"
    if not isinstance(entry, dict):
        raise UserError(f"{where}: expected a mapping")
    for key in ("label", "dataset_uri", "num_fewshot", "icl_task_type"):
        if key not in entry:
            raise UserError(f"{where}: missing {key!r}")
    label, uri, shots, task_type = entry["label"], entry["dataset_uri"], entry["num_fewshot"], entry["icl_task_type"]
    if isinstance(shots, list) and len(shots) == 1:
        shots = shots[0]
    if not isinstance(shots, int) or isinstance(shots, bool) or shots < 0:
        raise UserError(f"{where}: num_fewshot must be a one-element list of a count, got {entry['num_fewshot']!r}")
    if task_type not in TASK_TYPES:
        raise UserError(f"{where}: icl_task_type {task_type!r} is not one of {', '.join(TASK_TYPES)}")
    delimiter = entry.get("continuation_delimiter", " ")
    if not isinstance(label, str) or not isinstance(uri, str) or not isinstance(delimiter, str):
        raise UserError(f"{where}: label, dataset_uri and continuation_delimiter must be strings")
    if Path(uri).is_absolute() or ".." in Path(uri).parts:
        raise UserError(f"{where}: dataset_uri {uri!r} must lie inside eval_data/")
    if label not in baselines:
        raise UserError(f"{bundle / 'eval_meta_data.csv'}: no row for the task {label!r}")
    return Task(label, task_type, shots, delimiter, baselines[label], bundle / "eval_data" / uri)


def _read_baselines(path: Path) -> dict[str, float]:
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not {"Eval Task", "Random baseline"} <= set(reader.fieldnames or []):
            raise UserError(f"{path}: expected the columns 'Eval Task' and 'Random baseline'")
        baselines = {}
        for line_number, row in enumerate(reader, start=2):
            try:
                percent = float(row["Random baseline"])
            except (TypeError, ValueError):
                raise UserError(f"{path}:{line_number}: 'Random baseline' must be a number (in percent), "
                                f"got {row['Random baseline']!r}") from None
            if not 0 <= percent < 100:
                raise UserError(f"{path}:{line_number}: 'Random baseline' must be in [0, 100), got {percent}")
            baselines[row["Eval Task"]] = percent / 100
    return baselines


# --- the items ------------------------------------------------------------------------------------

_FIELDS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
           "language_modeling": ("context", "continuation")}
_TEXT_FIELDS = {"multiple_choice": ("query",), "schema": ("continuation",),
                "language_modeling": ("context", "continuation")}


def read_items(task: Task, limit: int | None = None) -> list[dict]:
    """The first `limit` items of the task's file (all without a limit), each checked for its type's fields;
    a malformed line fails naming file:line."""
    if not task.path.is_file():
        raise UserError(f"task {task.label}: {task.path} does not exist")
    items = []
    with open(task.path, encoding="utf-8", errors="strict") as f:
        try:
            lines = f.read().splitlines()
        except UnicodeDecodeError as error:
            raise UserError(f"{task.path}: not UTF-8 ({error.reason} at byte {error.start})") from None
    while lines and not lines[-1].strip():  # blank lines at the end only: inside, they would shift the indices
        lines.pop()
    for line_number, line in enumerate(lines[:limit] if limit else lines, start=1):
        items.append(_parse_item(line, task.task_type, f"{task.path}:{line_number}"))
    if not items:
        raise UserError(f"{task.path} holds no examples")
    if task.num_fewshot >= len(items):
        raise UserError(f"task {task.label} draws {task.num_fewshot} examples from the others of {len(items)}: "
                        f"it needs at least {task.num_fewshot + 1} (raise --max-per-task)")
    return items


def _parse_item(line: str, task_type: str, where: str) -> dict:
    item = json_object(line, where)
    for field in _FIELDS[task_type]:
        if field not in item:
            raise UserError(f"{where}: missing field {field!r} (a {task_type} item has "
                            f"{', '.join(_FIELDS[task_type])})")
    options = item.get("choices", item.get("context_options"))
    if task_type != "language_modeling":
        name = "choices" if task_type == "multiple_choice" else "context_options"
        if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) for o in options):
            raise UserError(f"{where}: {name!r} must be a list of at least 2 strings")
        gold = item["gold"]
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
            raise UserError(f"{where}: 'gold' must be an index into {name!r} (0 to {len(options) - 1}), got {gold!r}")
    for field in _TEXT_FIELDS[task_type]:
        if not isinstance(item[field], str):
            raise UserError(f"{where}: {field!r} must be a string")
    return item


# --- prompts --------------------------------------------------------------------------------------

def fewshot_indices(index: int, n_items: int, num_fewshot: int) -> list[int]:
    """The items shown before item `index`, drawn from the other items as DCLM and nanochat draw them."""
    if num_fewshot == 0:
        return []
    others = [i for i in range(n_items) if i != index]
    return random.Random(FEWSHOT_SEED + index).sample(others, num_fewshot)


def render_prompts(task: Task, items: list[dict], index: int) -> list[str]:
    """The texts of item `index`: one per choice (multiple_choice), one per context option (schema),
    or the prompt without and with the continuation (language_modeling)."""
    item, d = items[index], task.delimiter
    shots = [items[i] for i in fewshot_indices(index, len(items), task.num_fewshot)]
    if task.task_type == "multiple_choice":
        prefix = "".join(f"{s['query']}{d}{s['choices'][s['gold']]}\n\n" for s in shots)
        return [f"{prefix}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task.task_type == "schema":
        prefix = "".join(f"{s['context_options'][s['gold']]}{d}{s['continuation']}\n\n" for s in shots)
        return [f"{prefix}{option}{d}{item['continuation']}" for option in item["context_options"]]
    prefix = "".join(f"{s['context'].strip()}{d}{s['continuation']}\n\n" for s in shots)
    # Stripped, unlike the prompt with the answer, so that no trailing space of the context becomes a
    # token of its own: its tokens are then a prefix of the other's (nanochat's note).
    without = f"{prefix}{item['context'].strip()}{d}".strip()
    return [without, f"{prefix}{item['context'].strip()}{d}{item['continuation']}"]


def candidates(task: Task, items: list[dict], index: int, tokenizer: Tokenizer, context_length: int
               ) -> list[Candidate]:
    """The token sequences of item `index` with their scored spans, cropped to `context_length`."""
    start_token = [] if tokenizer.eot_token is None else [tokenizer.eot_token]  # GPT-1 has none
    sequences = [start_token + tokenizer.encode_ordinary(text) for text in render_prompts(task, items, index)]
    if task.task_type == "multiple_choice":
        start = common_prefix_length(sequences)
        spans = [(start, len(sequence)) for sequence in sequences]
    elif task.task_type == "schema":
        suffix = common_suffix_length(sequences)
        spans = [(len(sequence) - suffix, len(sequence)) for sequence in sequences]
    else:
        without, sequences = sequences[0], sequences[1:]
        spans = [(common_prefix_length([without, sequences[0]]), len(sequences[0]))]
    return [crop(Candidate(sequence, max(start, 1), end), context_length)
            for sequence, (start, end) in zip(sequences, spans, strict=True)]


def crop(candidate: Candidate, context_length: int) -> Candidate:
    """The last `context_length` tokens, the span shifted with them. A span longer than the context
    keeps what fits: every scored token needs the one before it."""
    drop = len(candidate.tokens) - context_length
    if drop <= 0:
        return candidate
    return Candidate(candidate.tokens[drop:], max(candidate.start - drop, 1), candidate.end - drop)


def prepare(task: Task, items: list[dict], tokenizer: Tokenizer, context_length: int,
            indices: list[int] | None = None) -> PreparedTask:
    """`indices` of the items (all by default) as candidates, ready to score."""
    indices = list(range(len(items))) if indices is None else indices
    return PreparedTask(task, indices, [candidates(task, items, i, tokenizer, context_length) for i in indices],
                        [items[i].get("gold") for i in indices])


def prepare_this_ranks_share(tasks: list[Task], tokenizer: Tokenizer, context_length: int,
                             max_per_task: int | None = None) -> list[PreparedTask]:
    """Every task's first `max_per_task` items, every world_size-th of them from this rank's place."""
    prepared = []
    for task in tasks:
        items = read_items(task, max_per_task)
        prepared.append(prepare(task, items, tokenizer, context_length, share_of_this_rank(list(range(len(items))))))
    return prepared


# --- scoring --------------------------------------------------------------------------------------

def score_task(model: GPT, prepared: PreparedTask, batch_size: int) -> Iterator[list[ItemResult]]:
    """The results of the prepared items, batch by batch (in eval mode is the caller's business)."""
    task = prepared.task
    for batch, scores in scored_batches(model, prepared.questions, batch_size):
        results = []
        for q, item_scores in zip(batch, scores, strict=True):
            means = [score.mean_loss for score in item_scores]
            gold = prepared.golds[q]
            if task.task_type == "language_modeling":
                pred, correct = None, item_scores[0].n_tokens > 0 and item_scores[0].greedy
            else:
                pred = means.index(min(means))  # the first of the lowest, as nanochat picks
                correct = pred == gold
            results.append(ItemResult(task.label, prepared.indices[q], bool(correct), pred, gold,
                                      [m if math.isfinite(m) else None for m in means]))
        yield results


def evaluate_core(model: GPT, prepared: list[PreparedTask], batch_size: int = 16, progress: bool = True
                  ) -> tuple[list[TaskScore], list[ItemResult]]:
    """Score every prepared task (this rank's share of each), gather all ranks' results, and return each
    task's score with every item's result, on every rank."""
    is_main = not dist.is_initialized() or dist.get_rank() == 0
    scores, everything = [], []
    total = sum(len(p.questions) for p in prepared)
    with (tqdm(total=total, desc="CORE", unit="ex", disable=not progress or not is_main, leave=False) as bar,
          model.evaluating()):
        for task in prepared:
            bar.set_description(f"CORE {task.task.label}")
            started = time.perf_counter()
            mine = []
            for results in score_task(model, task, batch_size):
                mine += results
                bar.update(len(results))
            results = gather_from_ranks(mine, key=lambda r: r.index)
            seconds = time.perf_counter() - started
            accuracy = sum(r.correct for r in results) / len(results)
            scores.append(TaskScore(task.task.label, task.task.task_type, task.task.num_fewshot, len(results),
                                    accuracy, centered_accuracy(accuracy, task.task.baseline), seconds))
            everything += results
    return scores, everything


def write_item_results(results: list[ItemResult], path: Path) -> None:
    """One JSON line per scored item: task, index, correct, and what the choice was made of."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for result in results:
            f.write(json.dumps(asdict(result)) + "\n")
