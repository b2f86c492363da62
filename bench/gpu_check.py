"""Check the GPU path on real GPUs, in a few minutes: one line per check, then a summary.

    python bench/gpu_check.py                 # every check, on all visible GPUs
    python bench/gpu_check.py --keep tmp/gpu  # keep the runs' folders for a look

No machine of the team's CI has a GPU, so this is the one place where the CUDA code runs: compile, bf16
autocast, fused AdamW, Muon's bf16 Newton-Schulz, NCCL, CUDA graphs, the memory-bounded loss,
micro_batch_size = "auto". Each check
runs the stage scripts as a user does (on tiny Shakespeare, shipped in data/) or the core functions
directly, and says what it compared when it fails. Exit status 1 when any check failed.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.cli import StageParser  # noqa: E402

# A 124M-shaped model on short runs: what the recipe trains, small enough batches to be quick.
MODEL_124M = ["--n-layer", "12", "--n-head", "12", "--n-embd", "768", "--block-size", "1024", "--seq-len", "1024"]
QUIET = ["--val-tokens", "0", "--hellaswag-examples", "0", "--num-samples", "0", "--progress", "false",
         "--plot", "false"]


def run(*command: str) -> subprocess.CompletedProcess:
    result = subprocess.run([str(part) for part in command], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        raise CheckError(f"`{' '.join(map(str, command))}` exited {result.returncode}: "
                          f"{result.stderr.strip().splitlines()[-1] if result.stderr.strip() else 'no stderr'}")
    return result


class CheckError(Exception):
    """A check's own explanation of what went wrong."""


def records(log_dir: Path, kind: str) -> list[dict]:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


def train(shards: Path, log_dir: Path, *args: str, processes: int = 1) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
                if processes > 1 else [sys.executable])
    return run(*launcher, "train_gpt2.py", "--data-dir", shards, "--log-dir", log_dir, *MODEL_124M, *QUIET, *args)


def check_training(shards: Path, folder: Path) -> str:
    """30 compiled bf16 steps of the 124M shape, micro_batch_size auto: the loss falls."""
    log_dir = folder / "train"
    train(shards, log_dir, "--compile", "true", "--dtype", "bfloat16", "--micro-batch-size", "auto",
          "--total-batch-size", "65536", "--max-steps", "30", "--warmup-steps", "5", "--max-lr", "1e-3",
          "--checkpoint-interval", "1000")
    steps = records(log_dir, "train")
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-5:]) / 5
    if not last < first - 1.0:
        raise CheckError(f"the loss went from {first:.3f} to {last:.3f} (mean of the last 5): expected a fall of > 1")
    settings = (log_dir / "config.toml").read_text()
    micro = next(line for line in settings.splitlines() if line.startswith("micro_batch_size"))
    mfu = steps[-1]["mfu"]
    mfu_text = f"MFU {100 * mfu:.1f}%" if mfu else "MFU unknown (this GPU is not in core/mfu.py's table)"
    return (f"loss {first:.2f} -> {last:.2f}; {steps[-1]['tokens_per_second']:,.0f} tokens/s, {mfu_text}, peak "
            f"memory {steps[-1]['peak_memory_gib']:.1f} GiB; {micro}")


def check_muon(shards: Path, folder: Path, gpus: int) -> str:
    """30 compiled bf16 steps of the 124M shape with Muon (bf16 Newton-Schulz on CUDA) and WSD, on every GPU
    (the orthogonalization split over the ranks): the loss falls by more than AdamW's check asks."""
    log_dir = folder / "muon"
    train(shards, log_dir, "--compile", "true", "--dtype", "bfloat16", "--micro-batch-size", "4",
          "--total-batch-size", str(4 * 1024 * gpus * 4), "--max-steps", "30", "--warmup-steps", "5",
          "--max-lr", "1e-3", "--optimizer", "muon", "--checkpoint-interval", "1000", processes=gpus)
    steps = records(log_dir, "train")
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-5:]) / 5
    if not last < first - 1.0:
        raise CheckError(f"the loss went from {first:.3f} to {last:.3f} (mean of the last 5): expected a fall of > 1")
    return f"loss {first:.2f} -> {last:.2f} on {gpus} GPU(s); {steps[-1]['tokens_per_second']:,.0f} tokens/s"


def check_ddp(shards: Path, folder: Path, gpus: int) -> str:
    """DDP over every GPU equals one GPU on the same global batch (3 steps), within bf16's rounding."""
    if gpus < 2:
        return "skipped: one GPU"
    common = ["--dtype", "bfloat16", "--micro-batch-size", "4", "--total-batch-size", str(4 * 1024 * gpus * 2),
              "--max-steps", "3", "--dropout", "0"]
    train(shards, folder / "one", *common)
    train(shards, folder / "ddp", *common, processes=gpus)
    one, ddp = ([r["loss"] for r in records(folder / name, "train")] for name in ("one", "ddp"))
    worst = max(abs(a - b) for a, b in zip(one, ddp, strict=True))
    if worst > 2e-2:
        raise CheckError(f"losses differ by up to {worst:.4f}: 1 GPU {one}, {gpus} GPUs {ddp}")
    return f"{gpus} GPUs vs 1: losses within {worst:.1e}"


def check_resume(shards: Path, folder: Path) -> str:
    """6 steps straight equal 3 steps, a new process, then 3 more (--resume auto)."""
    common = ["--dtype", "bfloat16", "--micro-batch-size", "4", "--total-batch-size", "8192", "--shuffle", "true",
              "--dropout", "0.1", "--checkpoint-interval", "3"]
    train(shards, folder / "straight", *common, "--max-steps", "6")
    train(shards, folder / "resumed", *common, "--max-steps", "3")
    train(shards, folder / "resumed", *common, "--max-steps", "6")
    straight, resumed = ([r["loss"] for r in records(folder / name, "train")] for name in ("straight", "resumed"))
    worst = max(abs(a - b) for a, b in zip(straight, resumed, strict=True))
    if len(straight) != 6 or len(resumed) != 6 or worst > 1e-5:  # GPU kernels may add in another order
        raise CheckError(f"straight {straight} != resumed {resumed}")
    return "the same 6 losses, " + ("bit for bit" if worst == 0 else f"within {worst:.1e}")


def small_checkpoint(folder: Path) -> Path:
    """A 4-layer GPT with O(1) activations (greedy tokens and predictions far from ties), saved once."""
    path = folder / "small"
    if not path.exists():
        import torch

        from core.checkpoint import save_checkpoint
        from model import GPT, GPTConfig

        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=512, n_layer=4, n_head=4, n_embd=256))
        with torch.no_grad():
            for param in model.parameters():
                param.normal_(0.0, 0.3)
        save_checkpoint(path, model, "gpt2")
    return path


def check_sampling(folder: Path) -> str:
    """sample.py --compile (a CUDA graph) gives the eager greedy tokens."""
    args = [sys.executable, "sample.py", "-m", small_checkpoint(folder), "--device", "cuda", "--greedy", "--json",
            "--max-new-tokens", "64", "Once upon a time"]
    eager, compiled = run(*args, "--no-compile"), run(*args, "--compile")
    eager_tokens, compiled_tokens = (json.loads(r.stdout)["samples"][0]["tokens"] for r in (eager, compiled))
    if eager_tokens != compiled_tokens:
        first = next(i for i, (a, b) in enumerate(zip(eager_tokens, compiled_tokens, strict=True)) if a != b)
        raise CheckError(f"the compiled step's tokens differ from the eager ones from new token {first} on")
    return "64 greedy tokens alike"


def check_hellaswag(folder: Path) -> str:
    """hellaswag.py in float32 on the GPU (TF32 matmuls) gives the CPU's predictions on 100 examples."""
    data = ROOT / "tests" / "data" / "hellaswag" / "hellaswag_val_1000.jsonl"
    predictions = {}
    for device in ("cpu", "cuda"):
        out = folder / f"hellaswag_{device}.jsonl"
        run(sys.executable, "hellaswag.py", "-m", small_checkpoint(folder), "--data", data, "--limit", "100",
            "--device", device, "--dtype", "float32", "--no-progress", "--output", out)
        predictions[device] = [(r["pred"], r["pred_norm"]) for r in map(json.loads, out.read_text().splitlines())]
    differ = sum(a != b for a, b in zip(predictions["cpu"], predictions["cuda"], strict=True))
    if differ > 2:  # TF32 rounds the products to 10 mantissa bits: a near tie may go the other way, rarely
        raise CheckError(f"{differ} of 100 predictions differ between the CPU and the GPU")
    return f"{100 - differ} of 100 predictions alike"


def check_loss_memory() -> str:
    """The memory-bounded loss equals F.cross_entropy over float32 logits, and peaks lower; so does it
    when called from torch.compile, which runs its chunk loop eagerly (core/cross_entropy.py)."""
    import torch
    import torch.nn.functional as F

    from core.cross_entropy import linear_cross_entropy

    torch.manual_seed(0)
    hidden = torch.randn(16 * 1024, 768, device="cuda", requires_grad=True)
    weight = (0.02 * torch.randn(50304, 768, device="cuda")).requires_grad_()
    targets = torch.randint(0, 50257, (16 * 1024,), device="cuda")
    compiled = torch.compile(linear_cross_entropy)
    results = {}
    for name, loss_function in (("plain", lambda: F.cross_entropy(F.linear(hidden, weight).float(), targets)),
                                ("bounded", lambda: linear_cross_entropy(hidden, weight, targets)),
                                ("compiled", lambda: compiled(hidden, weight, targets))):
        if name == "compiled":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                torch.autograd.grad(loss_function(), (hidden, weight))  # compiles, outside the measurement
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_function()
        grads = torch.autograd.grad(loss, (hidden, weight))
        torch.cuda.synchronize()
        results[name] = (loss.detach(), grads, (torch.cuda.max_memory_allocated() - base) / 2**30)
    plain, plain_grads, plain_gib = results["plain"]
    for name in ("bounded", "compiled"):
        loss, grads, gib = results[name]
        if not torch.allclose(plain, loss, rtol=1e-3, atol=1e-3):
            raise CheckError(f"the losses differ: plain {plain.item():.5f}, {name} {loss.item():.5f}")
        for a, b, tensor in zip(plain_grads, grads, ("hidden", "weight"), strict=True):
            relative = ((a.float() - b.float()).norm() / a.float().norm()).item()
            if not relative < 2e-2:  # bf16 products, rounded in other places
                raise CheckError(f"the {tensor} gradients differ: |plain - {name}| / |plain| = {relative:.2e}")
        if not gib < plain_gib:
            raise CheckError(f"the {name} loss peaked at {gib:.2f} GiB, the plain one at {plain_gib:.2f} GiB")
    return (f"equal; peak {results['bounded'][2]:.2f} GiB eager, {results['compiled'][2]:.2f} GiB compiled, against "
            f"the plain loss's {plain_gib:.2f} GiB (16k positions)")


def main() -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--keep", type=Path, help="write the runs here and keep them (default: a temporary folder)")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU, and this machine has none (torch.cuda.is_available() is False)")
    gpus = torch.cuda.device_count()
    print(f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as temporary:
        folder = args.keep or Path(temporary)
        folder.mkdir(parents=True, exist_ok=True)
        shards = folder / "shakespeare"
        run(sys.executable, "fineweb.py", "--input", "data/tinyshakespeare.txt", "--txt-paragraphs", "--out", shards,
            "--prefix", "shakespeare", "--val-tokens", "32768", "--shard-size", "100000")
        checks: list[tuple[str, Callable[[], str]]] = [
            ("train 124M, compiled, bf16, auto micro-batch", lambda: check_training(shards, folder)),
            ("DDP equals one GPU", lambda: check_ddp(shards, folder, gpus)),
            ("Muon + WSD, compiled, bf16, every GPU", lambda: check_muon(shards, folder, gpus)),
            ("resume", lambda: check_resume(shards, folder)),
            ("sample.py --compile", lambda: check_sampling(folder)),
            ("hellaswag.py GPU vs CPU", lambda: check_hellaswag(folder)),
            ("memory-bounded loss", check_loss_memory),
        ]
        failed = 0
        for name, check in checks:
            started = time.perf_counter()
            try:
                outcome = f"ok    {check()}"
            except CheckError as failure:
                outcome, failed = f"FAIL  {failure}", failed + 1
            except Exception as error:  # a crash is a failure of the check, with what it said
                outcome, failed = f"FAIL  {type(error).__name__}: {error}", failed + 1
            print(f"{name:45} {outcome} ({time.perf_counter() - started:.0f} s)", flush=True)
    print(f"{len(checks) - failed} of {len(checks)} checks passed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
