"""CORE task files written from scratch, for the tests that must run from a bare clone: the CORE slice
beside the checkout is not in the repository."""

from __future__ import annotations

import json
import random
from pathlib import Path


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def make_bundle(folder: Path, n_items: int = 12) -> Path:
    """A bundle in nanochat's layout with one task of each type, 2-shot, written from scratch."""
    rng = random.Random(0)
    words = ["the", "cat", "dog", "sat", "ran", "on", "in", "a", "big", "red", "small", "mat", "hat", "sun", "day"]
    phrase = lambda n: " ".join(rng.choice(words) for _ in range(n))  # noqa: E731
    write_jsonl(folder / "eval_data" / "kind" / "mc.jsonl",
                [{"query": f"Question: {phrase(6)}?", "choices": [phrase(2), phrase(3), phrase(1)], "gold": i % 3}
                 for i in range(n_items)])
    write_jsonl(folder / "eval_data" / "kind" / "schema.jsonl",
                [{"context_options": [phrase(5), phrase(4)], "continuation": phrase(3), "gold": i % 2}
                 for i in range(n_items)])
    write_jsonl(folder / "eval_data" / "other" / "lm.jsonl",
                [{"context": phrase(8) + " ", "continuation": phrase(2)} for _ in range(n_items)])
    (folder / "core.yaml").write_text(
        "icl_tasks:\n"
        "- label: my_mc\n  dataset_uri: kind/mc.jsonl\n  num_fewshot: [2]\n  icl_task_type: multiple_choice\n"
        "  continuation_delimiter: \"\\nAnswer: \"\n"
        "- label: my_schema\n  dataset_uri: kind/schema.jsonl\n  num_fewshot: [2]\n  icl_task_type: schema\n"
        "- label: my_lm\n  dataset_uri: other/lm.jsonl\n  num_fewshot: [2]\n  icl_task_type: language_modeling\n")
    (folder / "eval_meta_data.csv").write_text(
        "Eval Task,Task Category,Random baseline,Description\n"
        "my_mc,kind,33.3333,three choices\nmy_schema,kind,50,two options\nmy_lm,other,0,\"exact, greedy\"\n")
    return folder
