"""quickstart.sh end to end (offline, a short run, the interpreter running the tests) and plot.py."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import matplotlib.image
import pytest

from core.errors import UserError
from core.plotting import plot_run
from tests.stages import HANG_GUARD_SECONDS

ROOT = Path(__file__).resolve().parents[1]


def decoded_png(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return matplotlib.image.imread(path).shape  # decodes every pixel: a truncated file fails here


def quickstart_checkout(tmp_path: Path, steps: int) -> tuple[Path, dict[str, str]]:
    """A copy of the checkout without runs or environments, and the environment that runs quickstart.sh
    there offline, with the interpreter running the tests, for `steps` steps."""
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=shutil.ignore_patterns(".git", ".venv", "log", "shakespeare",
                                                                  "__pycache__", ".*_cache"))
    return checkout, {**os.environ, "QUICKSTART_PYTHON": sys.executable, "QUICKSTART_STEPS": str(steps),
                      "GPT2_TOOLKIT_CACHE": str(tmp_path / "cache"),
                      "GPT2_TOOLKIT_HELLASWAG_URL": "http://127.0.0.1:9/hellaswag_val.jsonl"}


def test_quickstart_runs_end_to_end_offline(tmp_path: Path) -> None:
    checkout, env = quickstart_checkout(tmp_path, steps=20)
    result = subprocess.run(["bash", "quickstart.sh"], cwd=checkout, env=env, capture_output=True, text=True,
                            timeout=HANG_GUARD_SECONDS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log_dir = checkout / "log" / "quickstart"
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in records if r["kind"] == "val"]
    assert len(val) == 2 and val[-1] < val[0] - 1.0  # steps 0 and 20
    assert "HellaSwag is off for this run: cannot download" in result.stdout
    assert (log_dir / "checkpoints" / "step_000020" / "model.safetensors").is_file()
    assert "== sampling from log/quickstart/checkpoints/step_000020" in result.stdout
    assert result.stdout.count("> ROMEO:") == 2  # sample.py read the checkpoint: both samples printed
    height, width, _ = decoded_png(log_dir / "plot.png")
    assert width > height > 100


def test_ctrl_c_during_training_stops_the_quickstart(tmp_path: Path) -> None:
    """Ctrl-C reaches every process of the terminal's group: training saves and exits 130, and the script
    stops there instead of sampling from a half-trained model and saying "done"."""
    checkout, env = quickstart_checkout(tmp_path, steps=100000)
    process = subprocess.Popen(["bash", "quickstart.sh"], cwd=checkout, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = checkout / "log" / "quickstart" / "metrics.jsonl"
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    while not (metrics.exists() and '"train"' in metrics.read_text()) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C at the terminal does
    stdout, stderr = process.communicate(timeout=HANG_GUARD_SECONDS)
    assert process.returncode != 0, stdout[-2000:] + stderr[-2000:]
    assert "stopped at step" in stdout and "train_gpt2.py: interrupted" in stderr  # its exit status: 130
    assert "== sampling" not in stdout and "== done" not in stdout
    assert list((checkout / "log" / "quickstart" / "checkpoints").iterdir())  # the run is saved


def test_plot_of_a_run_with_train_records_only(tmp_path: Path) -> None:
    lines = [{"kind": "train", "step": step, "loss": 10 - step / 10, "lr": 1e-3, "grad_norm": 1.0,
              "tokens_per_second": 1.0, "mfu": None} for step in range(30)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = subprocess.run([sys.executable, str(ROOT / "plot.py"), str(tmp_path), "--out", str(tmp_path / "p.png")],
                            capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert result.returncode == 0, result.stderr
    assert len(decoded_png(tmp_path / "p.png")) == 3


def test_plot_refuses_what_is_not_a_run(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        plot_run(tmp_path, tmp_path / "p.png")
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 0, "loss": 1.0}\nnot json\n'
                                            '{"kind": "train", "step": 1, "loss": 0.9}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a metrics record"):
        plot_run(tmp_path, tmp_path / "p.png")
    # a torn last line, what a run killed mid-write leaves, is left out: the run still plots
    (tmp_path / "metrics.jsonl").write_text('{"kind": "train", "step": 0, "loss": 1.0}\n{"kind": "tr')
    assert decoded_png(plot_run(tmp_path, tmp_path / "p.png"))
