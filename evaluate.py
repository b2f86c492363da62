"""The CORE benchmark (DCLM's in-context-learning tasks, scored as nanochat scores them) for any model spec.

    python evaluate.py -m gpt2                         # downloads nanochat's eval_bundle.zip on first use
    python evaluate.py -m log/checkpoints/step_019073 --max-per-task 100 --output log/core.jsonl
    python evaluate.py -m gpt2 --tasks arc_easy,copa --bundle ~/eval_bundle
    torchrun --standalone --nproc_per_node=8 evaluate.py -m gpt2-xl

Prints each task's accuracy and centered accuracy, (acc - baseline) / (1 - baseline), then CORE, their
mean. Published: GPT-2 124M 0.1139, GPT-2 1.5B 0.2565 (all 22 tasks). See core/core_benchmark.py.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from core.cli import StageParser, check_output_file
from core.core_benchmark import (
    TaskScore,
    bundle_folder_on_every_rank,
    core_metric,
    evaluate_core,
    prepare_this_ranks_share,
    read_tasks,
    write_item_results,
)
from core.devices import dtype_name, enable_tf32, resolve_dtype
from core.distributed import distributed_run
from core.errors import exit_on_user_error
from core.pretrained import add_model_arguments, load_model
from core.scoring import scoring_autocast, scoring_weights_dtype


def table(scores: list[TaskScore], core: float) -> str:
    lines = [f"{'task':<34} {'type':<17} {'shots':>5} {'examples':>8} {'accuracy':>8} {'centered':>8} {'seconds':>7}"]
    for s in scores:
        lines.append(f"{s.label:<34} {s.task_type:<17} {s.num_fewshot:>5} {s.examples:>8} {s.accuracy:>8.4f} "
                     f"{s.centered:>8.4f} {s.seconds:>7.1f}")
    lines.append(f"{f'CORE ({len(scores)} tasks)':<34} {'':<17} {'':>5} {sum(s.examples for s in scores):>8} "
                 f"{'':>8} {core:>8.4f} {sum(s.seconds for s in scores):>7.1f}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    parser = StageParser(__doc__)
    add_model_arguments(parser)
    parser.add_argument("--tasks", default="core", help="core (every task of the bundle's core.yaml, the default) "
                                                        "or a comma list of task labels")
    parser.add_argument("--bundle", type=Path, help="an unpacked eval_bundle folder (default: download nanochat's "
                                                    "into the cache, ~/.cache/gpt2-toolkit or $GPT2_TOOLKIT_CACHE)")
    parser.add_argument("--max-per-task", type=int, help="score only the first N examples of each task "
                                                         "(default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (default: 16)")
    parser.add_argument("--output", type=Path, help="write one JSON line per scored example to this file")
    parser.add_argument("--json", action="store_true", help="print the scores as one JSON object, not a table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.batch_size < 1 or (args.max_per_task is not None and args.max_per_task < 1):
        parser.error("--batch-size and --max-per-task must be >= 1")
    if args.output:
        check_output_file(args.output, "--output", [Path(args.model), *([args.bundle] if args.bundle else [])])
    return args


def main() -> None:
    args = parse_args()
    with distributed_run(args.device) as distributed:
        device = distributed.device
        tasks = read_tasks(bundle_folder_on_every_rank(args.bundle), args.tasks)  # before the model: fails at once
        enable_tf32(device)
        dtype = resolve_dtype(args.dtype, device)
        model, tokenizer = load_model(args.model, device, scoring_weights_dtype(dtype))
        prepared = prepare_this_ranks_share(tasks, tokenizer, model.config.block_size, args.max_per_task)
        start = time.perf_counter()
        with scoring_autocast(device, dtype):
            scores, results = evaluate_core(model, prepared, args.batch_size, progress=not args.no_progress)
        elapsed = time.perf_counter() - start
        if not distributed.is_main:
            return
        core = core_metric(scores)
        if args.output:
            write_item_results(results, args.output)
        if args.json:
            per_task = {s.label: {"accuracy": s.accuracy, "centered": s.centered, "examples": s.examples,
                                  "seconds": round(s.seconds, 2)} for s in scores}
            print(json.dumps({"model": args.model, "device": str(device), "dtype": dtype_name(dtype),
                              "tasks": per_task, "core": core, "seconds": round(elapsed, 2),
                              "examples_per_second": round(len(results) / elapsed, 2)}))
        else:
            print(f"{args.model} on {device} ({dtype_name(dtype)}), {len(results)} examples in {elapsed:.1f} s")
            print(table(scores, core))


if __name__ == "__main__":
    exit_on_user_error(main)
