"""Training tokens/s and MFU of model.py against HF transformers' GPT2LMHeadModel, in the same run.

    python bench/bench_train.py                                  # both configs, fp32 and bf16, eager and compiled
    python bench/bench_train.py --configs small --modes eager --steps 5
    python bench/bench_train.py --dtypes bfloat16 --rounds 3                # each row's median of 3 runs

One training step is what train_gpt2.py does per micro-batch and optimizer step: forward with the
loss, backward, gradient clipping at 1.0, fused AdamW. bf16 means autocast over float32 weights, as
in training. Both models hold the same weights and see the same batches; HF runs with sdpa attention.
Both run with glibc's malloc keeping freed memory, as the trainers set it on a CPU.
MFU is against the matmul peak of the same dtype, measured in each row's process right after its
steps (core/mfu.py).
Configs: GPT-2 124M at T=1024, and a small one (4 layers, 256 wide, T=256, B=8). Last, per config, what
train_gpt2.py itself reaches with its defaults on the same shape (its metrics' tokens_per_second).
Each of these runs in a process of its own: in one process, a run's speed depended on what ran before
it (our 124M bf16 eager step lost 25% after the small config's runs). On a shared machine whose speed
drifts, rows run minutes apart also see different machines: `--rounds` runs every row again, the order
reversed every other round, and reports each row's median (our 124M compiled step ran 10% below eager
in sequential rows, and level with it when the two alternated in one process).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.hardware import describe_hardware
from core.cli import StageParser
from core.cpu_speedups import keep_freed_memory
from core.hf import config_to_hf, state_dict_to_hf
from core.mfu import flops_per_token, measured_peak
from core.optim import make_optimizer
from model import GPT, GPTConfig

CONFIGS = {
    "small": (dict(n_layer=4, n_head=4, n_embd=256, block_size=256), 8, 256),  # (model, batch, seq_len)
    "124m": (dict(n_layer=12, n_head=12, n_embd=768, block_size=1024), 1, 1024),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def our_config(shape: dict) -> GPTConfig:
    return GPTConfig(**shape, vocab_multiple=64)  # the padded head, as train_gpt2.py makes it


def model_flops_per_token(shape: dict, seq_len: int) -> float:
    with torch.device("meta"):  # the shape alone
        return flops_per_token(GPT(our_config(shape)), seq_len)


def make_models(shape: dict) -> tuple[GPT, GPT2LMHeadModel]:
    torch.manual_seed(0)
    ours = GPT(our_config(shape))
    hf_config = GPT2Config(**config_to_hf(ours.config), attn_implementation="sdpa")
    for name in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(hf_config, name, 0.0)
    reference = GPT2LMHeadModel(hf_config)
    reference.load_state_dict(state_dict_to_hf(ours), strict=False)  # strict=False: tied lm_head
    return ours.train(), reference.train()


def train_step(model: torch.nn.Module, is_hf: bool, dtype: torch.dtype,
               compiled: bool) -> Callable[[torch.Tensor], float]:
    optimizer = make_optimizer(model, 6e-4, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    forward = torch.compile(model) if compiled else model

    def step(tokens: torch.Tensor) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            inputs = tokens[:, :-1]  # HF shifts its labels itself: the same T positions for both
            loss = forward(input_ids=inputs, labels=inputs).loss if is_hf else forward(inputs, tokens[:, 1:])[1]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def measure(step: Callable[[torch.Tensor], float], batches: list[torch.Tensor], warmup: int) -> tuple[float, float]:
    """(seconds of the warm-up steps, which include any compilation; median seconds of the timed steps)."""
    start = time.perf_counter()
    for tokens in batches[:warmup]:
        step(tokens)
    warmup_seconds = time.perf_counter() - start
    times = []
    for tokens in batches[warmup:]:
        start = time.perf_counter()
        step(tokens)
        times.append(time.perf_counter() - start)
    return warmup_seconds, statistics.median(times)


def train_gpt2_tokens_per_second(shape: dict, batch: int, seq_len: int, steps: int, warmup: int) -> float:
    """What `python train_gpt2.py` itself reaches on this shape with its defaults (device, dtype, compile
    as `auto` resolves them here): the median `tokens_per_second` of its metrics, after `warmup` steps
    as for the other rows (its first steps ran 5% slower than later ones, as glibc's kept memory grew)."""
    import train_gpt2  # here: its import is only needed for this row
    from core.runlog import read_records
    from core.shards import write_shard

    with tempfile.TemporaryDirectory() as folder:
        data, log_dir = Path(folder) / "data", Path(folder) / "log"
        data.mkdir()
        count = (warmup + steps + 1) * batch * (seq_len + 1)
        tokens = torch.randint(0, 50257, (count,), generator=torch.Generator().manual_seed(0))
        write_shard(data / "random_train_000000.bin", tokens.numpy(), "gpt2", 50257)
        model = [f"--{key.replace('_', '-')}={value}" for key, value in shape.items()]
        with contextlib.redirect_stdout(io.StringIO()):
            train_gpt2.main(["--data-dir", str(data), "--log-dir", str(log_dir), *model, "--seq-len", str(seq_len),
                             "--micro-batch-size", str(batch), "--total-batch-size", str(batch * seq_len),
                             "--max-steps", str(warmup + steps), "--val-tokens", "0", "--hellaswag-examples", "0",
                             "--num-samples", "0", "--plot", "false", "--progress", "false",
                             "--checkpoint-interval", str(10 * steps)])
        records = [r for r in read_records(log_dir / "metrics.jsonl")[0] if r["kind"] == "train"]
        return statistics.median(r["tokens_per_second"] for r in records[warmup:])


def fast_enough(dtype_name: str, peak: float, shape: dict, batch: int, seq_len: int, max_seconds: float) -> bool:
    """Whether a training step in this dtype could finish within `max_seconds`, judged at the dtype's
    measured matmul peak: a lower bound on the step's time. It rules out, say, bfloat16 on a CPU without
    bfloat16 units, whose matmuls run at ~1% of float32's rate; it says so when it does."""
    step_flops = model_flops_per_token(shape, seq_len) * batch * seq_len
    if step_flops / peak <= max_seconds:
        return True
    print(f"  {dtype_name} skipped: at its matmul peak here ({peak / 1e9:.1f} GFLOP/s) a training step would take "
          f"{step_flops / peak:.1f} s at least, over --max-step-seconds {max_seconds:g}")
    return False


def run_one(config_name: str, impl: str, dtype_name: str, mode: str, steps: int, warmup: int) -> dict:
    """One row, in this process: `impl` ours, HF, or train_gpt2 (its defaults, dtype and mode its own;
    with `dtype_name` "plain", its CPU speed-ups off: what they add, side by side)."""
    if impl == "train_gpt2" and dtype_name == "plain":
        os.environ["GPT2_TOOLKIT_CPU_SPEEDUPS"] = "off"
    keep_freed_memory(torch.device("cpu"))  # as the trainers do, for both models
    shape, batch, seq_len = CONFIGS[config_name]
    if impl == "train_gpt2":
        return {"tokens_per_second": train_gpt2_tokens_per_second(shape, batch, seq_len, steps, warmup)}
    generator = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, 50257, (batch, seq_len + 1), generator=generator) for _ in range(warmup + steps)]
    ours, reference = make_models(shape)
    model = ours if impl == "ours" else reference
    step = train_step(model, impl == "HF", DTYPES[dtype_name], compiled=mode == "compiled")
    warmup_seconds, seconds = measure(step, batches, warmup)
    # The peak again, right after the steps: a shared machine's speed drifts, and a peak measured once
    # at the start gave MFUs over 100% to rows that ran in a faster minute.
    peak = measured_peak(torch.device("cpu"), DTYPES[dtype_name], seconds=1.0)
    return {"tokens_per_second": batch * seq_len / seconds, "warmup_seconds": warmup_seconds, "peak": peak}


def run_apart(*row: object) -> dict:
    """`run_one(*row)` in a fresh Python process: what ran before cannot change its speed."""
    result = subprocess.run([sys.executable, __file__, "--run-one", json.dumps(row)], capture_output=True, text=True)
    lines = result.stdout.splitlines()
    if result.returncode != 0 or not lines:
        raise SystemExit(f"bench_train.py: the run {row} failed (exit {result.returncode}):\n{result.stderr}")
    return json.loads(lines[-1])


def main() -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--configs", default="small,124m")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (default: 5)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first, compilation included (default: 3)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every row this many times, the order reversed every other round, and take each "
                             "row's median: on a shared machine whose speed drifts, rows run minutes apart see "
                             "different machines (default: 1)")
    parser.add_argument("--max-step-seconds", type=float, default=60.0,
                        help="skip a dtype whose step would take longer than this at its measured matmul peak "
                             "(default: 60)")
    parser.add_argument("--run-one", help=argparse.SUPPRESS)  # a row's child process: its JSON arguments
    args = parser.parse_args()
    if args.run_one:
        print(json.dumps(run_one(*json.loads(args.run_one))))
        return
    print(describe_hardware())
    keeps = keep_freed_memory(torch.device("cpu"))  # what each row's process does, as the trainers do
    print("each row in a process of its own; glibc malloc " + ("keeps freed memory, as in train_gpt2.py" if keeps
          else "as the caller set it up, or not glibc's") + " (core.cpu_speedups.keep_freed_memory)")
    peaks = {name: measured_peak(torch.device("cpu"), DTYPES[name], seconds=2.0) for name in args.dtypes.split(",")}
    print("matmul peak measured here: " + ", ".join(f"{name} {peak / 1e9:.1f} GFLOP/s" for name, peak in peaks.items())
          + "; each row's MFU is against the peak its process measured after its steps")
    for config_name in args.configs.split(","):
        bench_config(config_name, peaks, args)


def bench_config(config_name: str, peaks: dict[str, float], args: argparse.Namespace) -> None:
    """Every row of one config, `args.rounds` times over, the order reversed every other round; each
    row's median over the rounds, then the best-vs-best ratio."""
    shape, batch, seq_len = CONFIGS[config_name]
    rounds = f", median of {args.rounds} rounds" if args.rounds > 1 else ""
    print(f"\n{config_name}: {shape}, batch {batch} x {seq_len}; median of {args.steps} steps after {args.warmup}"
          + rounds)
    dtypes = [name for name, peak in peaks.items()
              if fast_enough(name, peak, shape, batch, seq_len, args.max_step_seconds)]
    if not dtypes:
        return
    rows = [(impl, dtype_name, mode)
            for dtype_name in dtypes for mode in args.modes.split(",") for impl in ("ours", "HF")]
    rows += [("train_gpt2", "", ""), ("train_gpt2", "plain", "")]
    step_flops_per_token = model_flops_per_token(shape, seq_len)
    results: dict[tuple, list[dict]] = {row: [] for row in rows}
    for round_index in range(args.rounds):
        for row in rows if round_index % 2 == 0 else rows[::-1]:
            result = run_apart(config_name, *row, args.steps, args.warmup)
            results[row].append(result)
            if args.rounds == 1 and row[0] != "train_gpt2":  # those are reported with the ratios
                report_row(row, [result], step_flops_per_token)
    if args.rounds > 1:
        for row in rows[:-2]:
            report_row(row, results[row], step_flops_per_token)
    speed = {row: statistics.median(r["tokens_per_second"] for r in results[row]) for row in rows}
    best = {impl: max((row for row in rows[:-2] if row[0] == impl), key=speed.get) for impl in ("ours", "HF")}
    own, plain = speed[rows[-2]], speed[rows[-1]]
    print(f"  train_gpt2.py with its defaults: {own:9.1f} tokens/s, {own / speed[best['ours']]:.2f} of best ours "
          f"(goal: within 10%); with GPT2_TOOLKIT_CPU_SPEEDUPS=off {plain:9.1f} ({own / plain:.2f}x)")
    goal = 1.5 if config_name == "small" else 1.2
    print(f"  best ours ({' '.join(best['ours'][1:])}) / best HF ({' '.join(best['HF'][1:])}) = "
          f"{speed[best['ours']] / speed[best['HF']]:.2f}x (goal {goal}x)")


def report_row(row: tuple, results: list[dict], step_flops_per_token: float) -> None:
    """One line for a row of ours or HF: its median tokens/s (and their range over rounds), MFU against
    the peak its own process measured after its steps, warm-up."""
    impl, dtype_name, mode = row
    speeds = sorted(r["tokens_per_second"] for r in results)
    tps = statistics.median(speeds)
    spread = f" ({speeds[0]:.0f}-{speeds[-1]:.0f})" if len(speeds) > 1 else ""
    mfu = statistics.median(step_flops_per_token * r["tokens_per_second"] / r["peak"] for r in results)
    warmup = statistics.median(r["warmup_seconds"] for r in results)
    print(f"  {impl:4} {dtype_name + ' ' + mode:18} {tps:9.1f} tokens/s{spread}  MFU {100 * mfu:5.1f}%  "
          f"(warm-up incl. compile {warmup:6.1f} s)", flush=True)

if __name__ == "__main__":
    main()
