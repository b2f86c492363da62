"""The plainest CORE scorer: nanochat's procedure step by step, one sequence per forward pass, with the
prompts rendered by Jinja templates as nanochat renders them. Written apart from core/core_benchmark.py
(no code of it is used), it is that module's reference in tests/test_core_benchmark.py and its
baseline in bench/bench_evaluate.py."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from jinja2 import Template

SHOTS = "{%- for shot in shots -%}"
TEMPLATES = {
    "multiple_choice": Template(SHOTS + "{{ shot.query }}{{ d }}{{ shot.choices[shot.gold] }}\n\n{% endfor -%}"
                                "{{ item.query }}{{ d }}{{ option }}"),
    "schema": Template(SHOTS + "{{ shot.context_options[shot.gold] }}{{ d }}{{ shot.continuation }}\n\n{% endfor -%}"
                       "{{ option }}{{ d }}{{ item.continuation }}"),
    "language_modeling": Template(SHOTS + "{{ shot.context | trim }}{{ d }}{{ shot.continuation }}\n\n{% endfor -%}"
                                  "{{ item.context | trim }}{{ d }}{% if answer %}{{ item.continuation }}{% endif %}"),
}


def first_lines(path: Path, limit: int) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line, _ in zip(f, range(limit), strict=False)]


def shared_length(rows: list[list[int]], from_the_end: bool = False) -> int:
    rows = [row[::-1] for row in rows] if from_the_end else rows
    n = 0
    while n < min(map(len, rows)) and len({row[n] for row in rows}) == 1:
        n += 1
    return n


def reference_item(logits_of: Callable[[list[int]], torch.Tensor], encode: Callable[[str], list[int]], bos: int,
                   max_len: int, items: list[dict], i: int, task_type: str, shots: int, delimiter: str
                   ) -> tuple[bool, int | None, list[float]]:
    """(correct, the chosen option or None, the mean loss of each option) for item i, each sequence
    through `logits_of` (T tokens -> (T, V) logits) on its own."""
    item = items[i]
    chosen = random.Random(1234 + i).sample([j for j in range(len(items)) if j != i], shots) if shots else []
    context = {"shots": [items[j] for j in chosen], "d": delimiter, "item": item}
    template = TEMPLATES[task_type]
    if task_type == "language_modeling":
        without = [bos, *encode(template.render(answer=False, **context).strip())]
        rows = [[bos, *encode(template.render(answer=True, **context))]]
        spans = [(len(without), len(rows[0]))]
    else:
        options = item["choices"] if task_type == "multiple_choice" else item["context_options"]
        rows = [[bos, *encode(template.render(option=option, **context))] for option in options]
        if task_type == "multiple_choice":
            start = shared_length(rows)
            spans = [(start, len(row)) for row in rows]
        else:
            suffix = shared_length(rows, from_the_end=True)
            spans = [(len(row) - suffix, len(row)) for row in rows]
    means, hits = [], []
    for row, (start, end) in zip(rows, spans, strict=True):
        if len(row) > max_len:
            cut = len(row) - max_len
            row, start, end = row[cut:], max(start - cut, 1), end - cut
        logits = logits_of(row).float()
        target = torch.tensor(row[start:end])
        means.append(F.cross_entropy(logits[start - 1 : end - 1], target).item())
        hits.append(bool((logits[start - 1 : end - 1].argmax(dim=-1) == target).all()))
    if task_type == "language_modeling":
        return hits[0], None, means
    pred = means.index(min(means))
    return pred == item["gold"], pred, means
