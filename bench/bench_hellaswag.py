"""HellaSwag examples per second of core/hellaswag.py against the one-example-per-forward reference.

    python bench/bench_hellaswag.py [--limit 1000] [--batch-size 16] [--device cpu]

The GPT-2 124M config with random weights, on the 1000 HellaSwag examples that ship with the
repository (tests/data/hellaswag/hellaswag_val_1000.jsonl): our scorer in float32 and in bfloat16,
and the plain reference (tests/hellaswag_reference.py: one example per forward pass, build-nanogpt's
method) in float32 on the same weights, in the same run. Float32 predictions must be identical.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.hardware import describe_hardware
from core.cli import StageParser
from core.devices import resolve_device
from core.hellaswag import read_hellaswag, score_examples
from core.tokenizer import get_tokenizer
from model import GPT, GPTConfig
from tests.data_paths import HELLASWAG
from tests.hellaswag_reference import reference_scores


def timed(run: Callable[[], object]) -> tuple[object, float]:
    start = time.perf_counter()
    result = run()
    return result, time.perf_counter() - start


def main() -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--data", type=Path, default=HELLASWAG)
    parser.add_argument("--limit", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    examples = read_hellaswag(args.data, get_tokenizer("gpt2"), limit=args.limit)
    torch.manual_seed(0)
    model = GPT(GPTConfig()).to(device).eval()

    print(describe_hardware())
    print(f"GPT-2 124M (random weights) on {device}, {len(examples)} HellaSwag examples, batch size {args.batch_size}")
    score_examples(model, examples[: args.batch_size], args.batch_size, progress=False)  # warm-up
    ours, ours_seconds = timed(lambda: score_examples(model, examples, args.batch_size, progress=False))
    reference, reference_seconds = timed(lambda: [reference_scores(model, example) for example in examples])
    model_bf16 = model.to(torch.bfloat16)
    ours_bf16, bf16_seconds = timed(lambda: score_examples(model_bf16, examples, args.batch_size, progress=False))

    n = len(examples)
    fp32_mismatches = sum((r.pred, r.pred_norm) != ref[:2] for r, ref in zip(ours, reference, strict=True))
    bf16_mismatches = sum((r.pred, r.pred_norm) != ref[:2] for r, ref in zip(ours_bf16, reference, strict=True))
    print(f"reference, float32  {n / reference_seconds:7.2f} examples/s")
    print(f"ours, float32       {n / ours_seconds:7.2f} examples/s   {reference_seconds / ours_seconds:5.2f}x "
          f"the reference, {fp32_mismatches} of {n} predictions differ")
    print(f"ours, bfloat16      {n / bf16_seconds:7.2f} examples/s   {reference_seconds / bf16_seconds:5.2f}x "
          f"the reference, {bf16_mismatches} of {n} predictions differ (bfloat16 rounding: need not be 0)")
    print("goal: at least 4x the reference in the best mode, with identical float32 predictions")


if __name__ == "__main__":
    main()
