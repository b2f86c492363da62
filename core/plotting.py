"""Pictures of a training run, from its LOG_DIR/metrics.jsonl: losses on the left, HellaSwag on the right,
and CORE beside them when the run scored it. Used by plot.py and, with `plot` on, by the training loop
at every evaluation."""

from __future__ import annotations

import os
from pathlib import Path

from core.errors import UserError
from core.runlog import read_records

GPT2_124M_HELLASWAG = 0.2955  # build-nanogpt's figure for OpenAI GPT-2 124M
GPT3_SMALL_HELLASWAG = 0.337  # GPT-3 paper, table 3.6 (GPT-3 Small, zero-shot)
# CORE over DCLM's 22 tasks, from the CSVs of nanochat's eval bundle (its dev/estimate_gpt3_core.ipynb).
GPT2_124M_CORE = 0.1139
GPT2_XL_CORE = 0.2565


def read_metrics(log_dir: Path) -> dict[str, list[dict]]:
    """metrics.jsonl's records by kind (a torn last line left out); another malformed line fails naming it."""
    path = log_dir / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} does not exist: is {log_dir} the LOG_DIR of a training run?")
    by_kind: dict[str, list[dict]] = {}
    for record in read_records(path)[0]:
        by_kind.setdefault(record["kind"], []).append(record)
    return by_kind


def plot_core(panel: object, core: list[dict]) -> None:
    last = core[-1]
    panel.plot([r["step"] for r in core], [r["core"] for r in core], "o-", color="tab:green", markersize=3,
               label=f"this run (last {last['core']:.4f}, {last['tasks']} tasks, {last['examples']} examples)")
    panel.axhline(GPT2_124M_CORE, color="tab:red", linestyle="--", label=f"OpenAI GPT-2 124M ({GPT2_124M_CORE})")
    panel.axhline(GPT2_XL_CORE, color="tab:purple", linestyle=":", label=f"OpenAI GPT-2 1.5B ({GPT2_XL_CORE})")
    panel.set(xlabel="step", ylabel="CORE (mean centered accuracy)", title="CORE (GPT-2's: all 22 tasks)")
    panel.legend(loc="lower right")
    panel.grid(alpha=0.3)


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """An exponential moving average with bias correction, as TensorBoard smooths."""
    smoothed, average = [], 0.0
    for i, value in enumerate(values, 1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**i))
    return smoothed


def plot_run(log_dir: Path, out: Path) -> Path:
    """Write the two-panel PNG for the run in `log_dir`; headless (matplotlib's Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed: runs on servers and inside the training loop
    import matplotlib.pyplot as plt

    metrics = read_metrics(log_dir)
    train, val, hellaswag = metrics.get("train", []), metrics.get("val", []), metrics.get("hellaswag", [])
    core = metrics.get("core", [])
    if not train and not val:
        raise UserError(f"{log_dir / 'metrics.jsonl'} holds no train or val records yet")
    figure, panels = plt.subplots(1, 3 if core else 2, figsize=(18 if core else 12, 4.5))
    losses, accuracy = panels[:2]
    if train:
        steps, values = [r["step"] for r in train], [r["loss"] for r in train]
        losses.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
        losses.plot(steps, smooth(values), color="tab:blue", label="train loss (smoothed)")
    if val:
        losses.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:orange",
                    markersize=3, label=f"val loss (last {val[-1]['val_loss']:.3f})")
    losses.set(xlabel="step", ylabel="loss", title="loss")
    losses.legend()
    losses.grid(alpha=0.3)
    if hellaswag:
        accuracy.plot([r["step"] for r in hellaswag], [r["acc_norm"] for r in hellaswag], "o-", color="tab:green",
                      markersize=3, label=f"this run (last {hellaswag[-1]['acc_norm']:.4f}, n={hellaswag[-1]['n']})")
    else:
        accuracy.text(0.5, 0.6, "no HellaSwag records in this run", ha="center", transform=accuracy.transAxes)
    accuracy.axhline(GPT2_124M_HELLASWAG, color="tab:red", linestyle="--", label="OpenAI GPT-2 124M (0.2955)")
    accuracy.axhline(GPT3_SMALL_HELLASWAG, color="tab:purple", linestyle=":", label="GPT-3 Small (0.337)")
    accuracy.set(xlabel="step", ylabel="acc_norm", title="HellaSwag (build-nanogpt's method)")
    accuracy.legend(loc="lower right")
    accuracy.grid(alpha=0.3)
    if core:
        plot_core(panels[2], core)
    figure.suptitle(str(log_dir))
    figure.tight_layout()
    staging = out.with_name(f".{out.name}.tmp")
    figure.savefig(staging, dpi=100, format="png")
    plt.close(figure)
    os.replace(staging, out)  # a reader (an image viewer refreshing it) never sees half a picture
    return out
