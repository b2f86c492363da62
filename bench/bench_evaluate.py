"""CORE examples per second of core/core_benchmark.py against scoring one sequence per forward pass.

    python bench/bench_evaluate.py [--bundle ../shared/data/core_eval] [--max-per-task 11] [--device cpu]

The GPT-2 124M config with random weights, on the first examples of every task of the bundle (by
default the developers' 18-task slice beside the checkout): ours (each example's candidates packed
over their shared prefix, similar lengths batched, the head only on the scored positions) in float32
and bfloat16, and the plain reference (tests/core_reference.py: every candidate through its own
forward pass, the head over every position) in float32 on the same weights, in the same run.
Float32 decisions must be identical.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.hardware import describe_hardware
from core.cli import StageParser
from core.core_benchmark import evaluate_core, prepare_this_ranks_share, read_tasks
from core.devices import resolve_device
from core.tokenizer import get_tokenizer
from model import GPT, GPTConfig
from tests.core_reference import first_lines, reference_item

CORE_SLICE = Path(__file__).resolve().parents[2] / "shared" / "data" / "core_eval"


def main() -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--bundle", type=Path, default=CORE_SLICE)
    parser.add_argument("--max-per-task", type=int, default=11)  # the fewest a 10-shot task takes
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    if not (args.bundle / "core.yaml").is_file():
        parser.error(f"no core.yaml in {args.bundle}: pass --bundle DIR")
    device = resolve_device(args.device)
    tokenizer = get_tokenizer("gpt2")
    tasks = read_tasks(args.bundle)
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(device).eval()
    context = model.config.block_size

    print(describe_hardware())
    prepared = prepare_this_ranks_share(tasks, tokenizer, context, args.max_per_task)
    n = sum(len(p.questions) for p in prepared)
    print(f"GPT-2 124M (random weights) on {device}, {n} examples of {len(tasks)} tasks from {args.bundle}, "
          f"batch size {args.batch_size}")
    evaluate_core(model, prepared[:1], args.batch_size, progress=False)  # warm-up

    @torch.inference_mode()
    def logits_of(tokens: list[int]) -> torch.Tensor:
        return model(torch.tensor([tokens], device=device))[0][0, :, : model.config.vocab_size]

    start = time.perf_counter()
    reference = []
    for task in tasks:
        items = first_lines(task.path, args.max_per_task)
        reference += [reference_item(logits_of, tokenizer.encode_ordinary, tokenizer.eot_token, context, items, i,
                                     task.task_type, task.num_fewshot, task.delimiter)[:2] for i in range(len(items))]
    reference_seconds = time.perf_counter() - start
    print(f"reference, float32  {n / reference_seconds:7.2f} examples/s")
    for dtype in (torch.float32, torch.bfloat16):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            _, results = evaluate_core(model, prepared, args.batch_size, progress=False)
        seconds = time.perf_counter() - start
        differ = sum((r.correct, r.pred) != ref for r, ref in zip(results, reference, strict=True))
        note = "" if dtype == torch.float32 else " (bfloat16 rounding: need not be 0)"
        print(f"ours, {str(dtype).removeprefix('torch.'):<13} {n / seconds:7.2f} examples/s   "
              f"{reference_seconds / seconds:5.2f}x the reference, {differ} of {n} decisions differ{note}")
    print("goal: at least 4x the reference, with identical float32 decisions")


if __name__ == "__main__":
    main()
