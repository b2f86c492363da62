"""Muon + WSD against AdamW + cosine: the tokens each needs to reach AdamW's final val loss, CPU-sized.

    python bench/bench_recipe.py                     # the quickstart's model on tiny Shakespeare, ~15 min on 2 cores
    python bench/bench_recipe.py --steps 100 --seeds 2

The same model, the same tokens in the same order, through train_gpt2.py itself (its defaults but the
recipe's settings). First a short lr sweep at one seed: AdamW's max_lr for AdamW + cosine, then Muon's
muon_lr for Muon + WSD (its AdamW part, the embeddings, at AdamW's best max_lr), each over the whole
horizon. Then, at each recipe's best lr, every seed: AdamW + cosine over the whole horizon, and Muon + WSD
over shorter horizons too, since a schedule that decays at its end reaches its loss only there: the
tokens Muon needs are those of the shortest horizon whose mean final val loss is at most AdamW's
(interpolated between horizons). Val loss is over the same 16k val tokens throughout.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fineweb
import train_gpt2
from bench.hardware import describe_hardware
from core.cli import StageParser

ROOT = Path(__file__).resolve().parents[1]
MODEL = ["--n-layer", "4", "--n-head", "4", "--n-embd", "128", "--block-size", "128", "--seq-len", "128",
         "--micro-batch-size", "8", "--total-batch-size", "1024", "--val-tokens", "16384",
         "--hellaswag-examples", "0", "--num-samples", "0", "--plot", "false", "--progress", "false",
         "--keep-checkpoints", "1", "--checkpoint-minutes", "0", "--resume", "never"]
ADAMW_LRS = (1.5e-3, 3e-3, 6e-3)
MUON_LRS = (0.01, 0.02, 0.04)
HORIZONS = (0.4, 0.55, 0.7, 1.0)


def train(data: Path, work: Path, steps: int, seed: int, recipe: list[str]) -> list[tuple[int, float]]:
    """(tokens, val loss) at every evaluation of one run of train_gpt2.py."""
    log_dir = Path(tempfile.mkdtemp(dir=work))
    argv = ["--data-dir", str(data), "--log-dir", str(log_dir), *MODEL, "--max-steps", str(steps),
            "--warmup-steps", str(max(1, steps // 10)), "--eval-interval", str(max(1, steps // 10)),
            "--checkpoint-interval", str(steps), "--seed", str(seed), *recipe]
    with contextlib.redirect_stdout(io.StringIO()):
        train_gpt2.main(argv)
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    if max(r["step"] for r in records if r["kind"] == "train") < steps - 1:
        # train_gpt2.py turns Ctrl-C or SIGTERM into a checkpoint and a clean return: end the bench there
        sys.exit("bench_recipe.py: interrupted")
    return [(r["step"] * 1024, r["val_loss"]) for r in records if r["kind"] == "val"]


def adamw(lr: float) -> list[str]:
    return ["--optimizer", "adamw", "--schedule", "cosine", "--max-lr", str(lr)]


def muon(lr: float, adamw_lr: float) -> list[str]:
    return ["--optimizer", "muon", "--schedule", "wsd", "--muon-lr", str(lr), "--max-lr", str(adamw_lr)]


def tokens_to_reach(target: float, finals: dict[int, float]) -> float | None:
    """The horizon (in tokens) at which the final loss first reaches `target`, linear between horizons."""
    points = sorted(finals.items())
    for (t0, l0), (t1, l1) in itertools.pairwise(points):
        if l1 <= target < l0:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    if points and points[0][1] <= target:
        return float(points[0][0])  # already at the shortest horizon: an upper bound
    return None


def main() -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--steps", type=int, default=200, help="the whole horizon, 1024 tokens a step")
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    print(describe_hardware())
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        data = work / "shards"
        with contextlib.redirect_stdout(io.StringIO()):
            fineweb.main(["--input", str(ROOT / "data" / "tinyshakespeare.txt"), "--txt-paragraphs", "--out",
                          str(data), "--prefix", "shakespeare", "--val-tokens", "32768", "--workers", "1"])
        steps = args.steps
        print(f"4 x 128 GPT (block 128), tiny Shakespeare, {steps} steps of 1024 tokens, seeds 0..{args.seeds - 1}")

        print("sweep, seed 0, whole horizon: final val loss")
        adamw_sweep = {lr: train(data, work, steps, 0, adamw(lr))[-1][1] for lr in ADAMW_LRS}
        for lr, loss in adamw_sweep.items():
            print(f"  AdamW + cosine  max_lr {lr:<8g} {loss:.4f}")
        best_adamw = min(adamw_sweep, key=adamw_sweep.get)
        muon_sweep = {lr: train(data, work, steps, 0, muon(lr, best_adamw))[-1][1] for lr in MUON_LRS}
        for lr, loss in muon_sweep.items():
            print(f"  Muon + WSD      muon_lr {lr:<7g} {loss:.4f}   (AdamW part at max_lr {best_adamw:g})")
        best_muon = min(muon_sweep, key=muon_sweep.get)

        adamw_curves = [train(data, work, steps, seed, adamw(best_adamw)) for seed in range(args.seeds)]
        muon_finals: dict[int, list[float]] = {}
        muon_curves = []
        for horizon in HORIZONS:
            n = round(steps * horizon)
            for seed in range(args.seeds):
                curve = train(data, work, n, seed, muon(best_muon, best_adamw))
                muon_finals.setdefault(n * 1024, []).append(curve[-1][1])
                if horizon == 1.0:
                    muon_curves.append(curve)

    print(f"\nval loss against tokens, mean of {args.seeds} seeds (AdamW max_lr {best_adamw:g}; Muon muon_lr "
          f"{best_muon:g}, whole horizon)")
    print(f"  {'tokens':>8}  {'AdamW + cosine':>14}  {'Muon + WSD':>10}")
    for i, (tokens, _) in enumerate(adamw_curves[0]):
        a = statistics.mean(c[i][1] for c in adamw_curves)
        m = statistics.mean(c[i][1] for c in muon_curves)
        print(f"  {tokens:>8}  {a:>14.4f}  {m:>10.4f}")
    target = statistics.mean(c[-1][1] for c in adamw_curves)
    spread = statistics.pstdev(c[-1][1] for c in adamw_curves)
    print(f"\nAdamW + cosine final val loss {target:.4f} (+-{spread:.4f} over seeds) at {steps * 1024} tokens")
    means = {tokens: statistics.mean(losses) for tokens, losses in muon_finals.items()}
    for tokens, loss in sorted(means.items()):
        print(f"  Muon + WSD over {tokens:>7} tokens: final val loss {loss:.4f} "
              f"(+-{statistics.pstdev(muon_finals[tokens]):.4f})")
    needed = tokens_to_reach(target, means)
    if needed is None:
        print("Muon + WSD does not reach AdamW's final val loss within the horizon")
    else:
        print(f"Muon + WSD reaches it in {needed:.0f} tokens: {needed / (steps * 1024):.2f}x AdamW's (goal: <= 0.7x)")


if __name__ == "__main__":
    main()
