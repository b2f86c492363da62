"""Peak memory of one training step of GPT-2 124M at T=1024: the plain loss (full float32 logits, then
F.cross_entropy) against the memory-bounded one (core/cross_entropy.py), for a few micro-batch sizes.

    python bench/bench_memory.py                 # micro-batches 1, 2 and 4, in float32 on the CPU
    python bench/bench_memory.py --sizes 1,2

Each measurement runs in a fresh process: the model and AdamW are built, one step is taken to create
the optimizer's state, then the peak resident memory (VmHWM, reset through /proc/self/clear_refs) of a
second step, forward, backward and update, above what was resident before it. Linux only. With
glibc's malloc as it comes: the trainers keep freed memory on a CPU (core.cpu_speedups.keep_freed_memory),
which holds this peak, and some blocks glibc does not reuse at once, for the rest of a run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from core.cli import StageParser  # noqa: E402

GIB = 2**30


def resident(field: str) -> int:
    """VmRSS or VmHWM of this process, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def one_step(size: int, loss: str) -> dict:
    """In the child: the peak memory of one training step above the resident memory before it."""
    import torch
    import torch.nn.functional as F

    from core.optim import make_optimizer
    from model import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_multiple=64)).train()
    optimizer = make_optimizer(model, 6e-4, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"))
    tokens = torch.randint(0, 50257, (size, 1025))

    def step() -> None:
        x, y = tokens[:, :-1], tokens[:, 1:]
        if loss == "plain":
            logits = model.logits(model.hidden_states(x)).float()  # (B, T, V): what the plain path holds
            value = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        else:
            value = model(x, y)[1]
        value.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # AdamW's state exists from here on
    before = resident("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    step()
    return {"size": size, "loss": loss, "peak_gib": (resident("VmHWM") - before) / GIB,
            "model_and_adam_gib": before / GIB}


def main() -> None:
    parser = StageParser(__doc__)
    parser.add_argument("--sizes", default="1,2,4", help="micro-batch sizes (default: %(default)s)")
    parser.add_argument("--child", nargs=2, metavar=("SIZE", "LOSS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one_step(int(args.child[0]), args.child[1])))
        return
    from bench.hardware import describe_hardware

    print(describe_hardware())
    print("GPT-2 124M, T = 1024, float32 on the CPU; peak memory of one training step above the model, its "
          "gradients' absence and AdamW's state")
    print(f"{'micro-batch':>11} {'plain loss':>12} {'bounded loss':>13}")
    for size in map(int, args.sizes.split(",")):
        peaks = {}
        for loss in ("plain", "bounded"):
            child = subprocess.run([sys.executable, __file__, "--child", str(size), loss], capture_output=True,
                                   text=True, check=True)
            peaks[loss] = json.loads(child.stdout)["peak_gib"]
        print(f"{size:>11} {peaks['plain']:>9.2f} GiB {peaks['bounded']:>10.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
