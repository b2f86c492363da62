"""Zero-shot multiple-choice evaluation (HellaSwag), shared by hellaswag.py and the training loop.

An example is a context and a few candidate endings; the model's answer is the ending it finds
most likely. As in build-nanogpt: context tokens = encode(ctx), ending tokens = encode(" " + ending),
and only the ending tokens are scored. `acc` picks the smallest summed loss, `acc_norm` the smallest
mean loss per token.

Speed: the context is computed once for all its endings, in one packed row per example, and rows
of similar length are batched together (core/scoring.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch.distributed as dist
from tqdm import tqdm

from core.cache import cache_dir, download
from core.distributed import fetch_once_per_node
from core.errors import UserError, json_object
from core.scoring import (
    Candidate,
    Score,
    gather_from_ranks,
    scored_batches,
    share_of_this_rank,
)
from core.tokenizer import Tokenizer
from model import GPT

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"


@dataclass(frozen=True)
class Example:
    index: int  # position in the source file, so that runs can be compared example by example
    context: list[int]
    endings: list[list[int]]
    label: int


@dataclass(frozen=True)
class Result:
    index: int
    label: int
    pred: int  # argmin of the summed ending losses (acc)
    pred_norm: int  # argmin of the mean ending losses (acc_norm)
    sum_losses: list[float]
    mean_losses: list[float]


# --- HellaSwag data -----------------------------------------------------------------------------

def hellaswag_file(path: Path | None = None, flag: str = "--data") -> Path:
    """`path` when given, else the validation set in the cache, downloaded on first use; `flag` is the
    stage's setting for a local copy, which an offline failure names."""
    if path is not None:
        if not path.is_file():
            raise UserError(f"HellaSwag file {path} does not exist")
        return path
    cached = cache_dir() / "hellaswag" / "hellaswag_val.jsonl"
    if not cached.is_file():
        # GPT2_TOOLKIT_HELLASWAG_URL points the download at a mirror (or, in the tests, at a local server).
        url = os.environ.get("GPT2_TOOLKIT_HELLASWAG_URL", HELLASWAG_URL)
        download(url, cached, looks_right=_is_hellaswag, what="HellaSwag JSONL",
                 advice=f"Offline, pass a local copy of hellaswag_val.jsonl with {flag} PATH, or put it at {cached}")
    return cached


def hellaswag_file_on_every_rank(path: Path | None = None, flag: str = "--data") -> Path:
    """`hellaswag_file` under torch.distributed, downloaded once per node (see `fetch_once_per_node`)."""
    return fetch_once_per_node(lambda: hellaswag_file(path, flag))


def _is_hellaswag(path: Path) -> bool:
    with open(path, encoding="utf-8", errors="replace") as f:
        first = f.readline()
    try:
        json.loads(first)["endings"]
    except (json.JSONDecodeError, KeyError, TypeError):  # e.g. a proxy's HTML page, served with status 200
        return False
    return True


def read_hellaswag(path: Path, encoding: Tokenizer, limit: int | None = None) -> list[Example]:
    """Tokenized examples of a HellaSwag JSONL file; a malformed line fails naming its number."""
    return [tokenize_example(index, ctx, endings, label, encoding)
            for index, (ctx, endings, label) in enumerate(read_hellaswag_rows(path, limit))]


def read_hellaswag_rows(path: Path, limit: int | None = None) -> list[tuple[str, list[str], int]]:
    """The (context, 4 endings, label) of each example of a HellaSwag JSONL file, as text."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(_parse_hellaswag_line(line, f"{path}, line {line_number}"))
    if not rows:
        raise UserError(f"{path} holds no examples")
    return rows


def tokenize_example(index: int, context: str, endings: list[str], label: int, encoding: Tokenizer) -> Example:
    return Example(index=index, context=encoding.encode_ordinary(context),
                   endings=[encoding.encode_ordinary(" " + ending) for ending in endings], label=label)


def _parse_hellaswag_line(line: str, where: str) -> tuple[str, list[str], int]:
    row = json_object(line, where)
    for field in ("ctx", "endings", "label"):
        if field not in row:
            raise UserError(f"{where}: missing field {field!r}")
    ctx, endings, label = row["ctx"], row["endings"], row["label"]
    if not isinstance(ctx, str) or not ctx:
        raise UserError(f"{where}: 'ctx' must be a non-empty string")
    if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) and e for e in endings):
        raise UserError(f"{where}: 'endings' must be a list of 4 non-empty strings")
    if isinstance(label, str) and label.isdigit():
        label = int(label)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < 4:
        raise UserError(f"{where}: 'label' must be 0, 1, 2 or 3, got {row['label']!r}")
    return ctx, endings, label


# --- scoring ------------------------------------------------------------------------------------

def candidates(example: Example) -> list[Candidate]:
    """The example's endings, each read after the context and scored on its own tokens."""
    n = len(example.context)
    return [Candidate(example.context + ending, n, n + len(ending)) for ending in example.endings]


def result(example: Example, scores: list[Score]) -> Result:
    sums, means = [score.loss_sum for score in scores], [score.mean_loss for score in scores]
    return Result(example.index, example.label, pred=sums.index(min(sums)), pred_norm=means.index(min(means)),
                  sum_losses=sums, mean_losses=means)


def read_examples_that_fit(path: Path, encoding: Tokenizer, block_size: int,
                           limit: int | None = None) -> tuple[list[Example], int]:
    """`read_hellaswag`'s examples that fit in `block_size` positions, and how many of them did not."""
    examples = read_hellaswag(path, encoding, limit)
    fitting = examples_that_fit(examples, block_size)
    return fitting, len(examples) - len(fitting)


def examples_that_fit(examples: list[Example], block_size: int) -> list[Example]:
    """The examples whose context and longest ending fit in `block_size` positions: a longer one cannot
    be scored whole, and cropping it would change what is measured."""
    return [e for e in examples if len(e.context) + max(map(len, e.endings)) <= block_size]


def check_fits(model: GPT, examples: list[Example]) -> None:
    """Fail clearly, before any compute, on an example the model cannot score."""
    for example in examples:
        longest = len(example.context) + max(len(ending) for ending in example.endings)
        if longest > model.config.block_size:
            raise UserError(f"example {example.index} needs {longest} positions; the model's block_size is "
                            f"{model.config.block_size}")
        largest_id = max(example.context + [token for ending in example.endings for token in ending])
        if largest_id >= model.config.vocab_size:
            raise UserError(f"example {example.index} has token id {largest_id}, beyond the model's vocabulary "
                            f"of {model.config.vocab_size}: is it the model's tokenizer?")


def score_examples(model: GPT, examples: list[Example], batch_size: int = 16, progress: bool = True,
                   desc: str = "hellaswag") -> list[Result]:
    """Score this process's share of `examples` (in eval mode): all of them alone, every world_size-th
    one under torch.distributed. Results come back in example order; `gather_results` collects all ranks'."""
    check_fits(model, examples)
    mine = share_of_this_rank(examples)
    results: list[Result] = []
    correct = correct_norm = 0
    show = progress and (not dist.is_initialized() or dist.get_rank() == 0)
    with (tqdm(total=len(mine), desc=desc, unit="ex", disable=not show, leave=False) as bar, model.evaluating()):
        for indices, scores in scored_batches(model, [candidates(example) for example in mine], batch_size):
            batch_results = [result(mine[i], example_scores) for i, example_scores in zip(indices, scores, strict=True)]
            results += batch_results
            correct += sum(r.pred == r.label for r in batch_results)
            correct_norm += sum(r.pred_norm == r.label for r in batch_results)
            bar.update(len(batch_results))
            bar.set_postfix(acc=f"{correct / len(results):.4f}", acc_norm=f"{correct_norm / len(results):.4f}")
    return sorted(results, key=lambda r: r.index)


def gather_results(results: list[Result]) -> list[Result]:
    """Every rank's results, in example order, on every rank (a no-op without torch.distributed)."""
    return gather_from_ranks(results, key=lambda r: r.index)


def summarize(results: list[Result]) -> dict[str, float | int]:
    n = len(results)
    return {
        "acc": sum(r.pred == r.label for r in results) / n,
        "acc_norm": sum(r.pred_norm == r.label for r in results) / n,
        "n": n,
    }


def write_results(results: list[Result], path: Path) -> None:
    """Per-example results as JSONL, one object per line, for comparing runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for result in results:
            f.write(json.dumps(asdict(result)) + "\n")
