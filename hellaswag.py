"""Zero-shot HellaSwag accuracy of any model spec, as build-nanogpt measures it.

    python hellaswag.py -m gpt2                       # downloads hellaswag_val.jsonl on first use
    python hellaswag.py -m log/checkpoints/step_019073 --dtype bfloat16 --output log/hellaswag.jsonl
    torchrun --standalone --nproc_per_node=8 hellaswag.py -m gpt2-xl

acc scores an ending by its summed token loss, acc_norm by its mean token loss; see core/hellaswag.py.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from core.cli import StageParser, check_output_file
from core.devices import dtype_name, enable_tf32, resolve_dtype
from core.distributed import distributed_run
from core.errors import UserError, exit_on_user_error
from core.hellaswag import (
    gather_results,
    hellaswag_file_on_every_rank,
    read_examples_that_fit,
    score_examples,
    summarize,
    write_results,
)
from core.pretrained import add_model_arguments, load_model
from core.scoring import scoring_autocast, scoring_weights_dtype


def parse_args() -> argparse.Namespace:
    parser = StageParser(__doc__)
    add_model_arguments(parser)
    parser.add_argument("--data", type=Path, help="a local hellaswag_val.jsonl (default: download it into the "
                                                  "cache, ~/.cache/gpt2-toolkit or $GPT2_TOOLKIT_CACHE)")
    parser.add_argument("--limit", type=int, help="score only the first N examples")
    parser.add_argument("--batch-size", type=int, default=16, help="examples per forward pass (default: 16)")
    parser.add_argument("--output", type=Path, help="write per-example results to this JSONL file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args()
    if args.batch_size < 1 or (args.limit is not None and args.limit < 1):
        parser.error("--batch-size and --limit must be >= 1")
    if args.output:
        check_output_file(args.output, "--output", [args.data, Path(args.model)] if args.data else [Path(args.model)])
    return args


def main() -> None:
    args = parse_args()
    with distributed_run(args.device) as distributed:
        device = distributed.device
        path = hellaswag_file_on_every_rank(args.data)  # before the model: a missing file fails at once
        enable_tf32(device)
        dtype = resolve_dtype(args.dtype, device)
        model, tokenizer = load_model(args.model, device, scoring_weights_dtype(dtype))
        examples, left_out = read_examples_that_fit(path, tokenizer, model.config.block_size, limit=args.limit)
        if not examples:
            raise UserError(f"none of the {left_out} examples fits in this model's block_size of "
                            f"{model.config.block_size}")
        if left_out and distributed.is_main:
            print(f"note: {left_out} of {left_out + len(examples)} examples are longer than block_size "
                  f"{model.config.block_size} and are left out (n counts the others)", file=sys.stderr)
        start = time.perf_counter()
        with scoring_autocast(device, dtype):
            results = gather_results(score_examples(model, examples, args.batch_size, progress=not args.no_progress))
        elapsed = time.perf_counter() - start
        if distributed.is_main:
            summary = summarize(results)
            if args.output:
                write_results(results, args.output)
            print(json.dumps({"model": args.model, "device": str(device), "dtype": dtype_name(dtype),
                              **summary, "seconds": round(elapsed, 2),
                              "examples_per_second": round(summary["n"] / elapsed, 2)}))


if __name__ == "__main__":
    exit_on_user_error(main)
