"""core/devices.py: what --device and --dtype resolve to, in each stage and on each kind of CPU, and clear
errors for what this machine lacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import train_gpt2
from core import devices
from core.checkpoint import save_checkpoint
from core.config import TrainConfig
from core.devices import resolve_device, resolve_dtype
from core.errors import UserError
from core.shards import shard_path, write_shard
from model import GPT, GPTConfig
from tests.data_paths import HELLASWAG
from tests.stages import HANG_GUARD_SECONDS, run_stage


def test_auto_on_a_cpu_machine_is_cpu_and_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    device = resolve_device("auto")
    assert device == torch.device("cpu")
    assert resolve_dtype("auto", device) == torch.float32


def test_named_dtypes() -> None:
    cpu = torch.device("cpu")
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    with pytest.raises(UserError, match="unknown dtype 'fp8'"):
        resolve_dtype("fp8", cpu)


def test_auto_dtype_on_cuda_follows_native_bfloat16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))  # V100: emulated
    assert resolve_dtype("auto", cuda) == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100
    assert resolve_dtype("auto", cuda) == torch.bfloat16


def test_missing_devices_are_clear_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda")
    with pytest.raises(UserError, match="bad device 'gpu0'"):
        resolve_device("gpu0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match="has 1 GPU"):
        resolve_device("cuda:7")


@pytest.mark.parametrize(("flags", "native"), [
    ("fpu sse2 avx2 fma", False),  # an AVX2-only EPYC
    ("fpu avx512f avx512_bf16 amx_bf16 amx_tile", True),  # Sapphire Rapids
    ("fp asimd bf16 i8mm", True),  # an Arm server, whose field is "Features"
])
def test_auto_dtype_on_a_cpu_follows_its_bfloat16_units_where_asked(monkeypatch: pytest.MonkeyPatch, flags: str,
                                                                   native: bool) -> None:
    field = "Features" if "asimd" in flags else "flags"
    monkeypatch.setattr(devices, "_cpuinfo", lambda *fields: flags if field in fields else "")
    cpu = torch.device("cpu")
    assert devices.cpu_has_native_bfloat16() is native
    assert resolve_dtype("auto", cpu, cpu_bfloat16=True) == (torch.bfloat16 if native else torch.float32)
    assert resolve_dtype("auto", cpu) == torch.float32  # evaluation and training keep float32 on a CPU


def test_cpuinfo_fields_are_read_from_the_real_file() -> None:
    name = devices.cpu_name()
    assert name and "\n" not in name
    assert isinstance(devices.cpu_has_native_bfloat16(), bool)


@pytest.mark.parametrize("native", [False, True], ids=["float32-only-cpu", "native-bfloat16-cpu"])
def test_what_dtype_auto_picks_in_each_stage(native: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture) -> None:
    """Forced either way, whatever this machine's CPU has: sample.py and train_gpt2.py take bfloat16 on a
    CPU with bfloat16 units, hellaswag.py keeps float32 on every CPU."""
    monkeypatch.setattr(devices, "cpu_has_native_bfloat16", lambda: native)
    checkpoint = tmp_path / "model"
    save_checkpoint(checkpoint, GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)), "gpt2")
    on_cpu = ["--device", "cpu", "--dtype", "auto"]
    status, out, err = run_stage("sample", ["-m", str(checkpoint), *on_cpu, "--json", "--max-new-tokens", "2", "Hi"],
                                 monkeypatch, capsys)
    assert status == 0, err
    assert json.loads(out)["dtype"] == ("bfloat16" if native else "float32")
    status, out, err = run_stage("hellaswag", ["-m", str(checkpoint), *on_cpu, "--data", str(HELLASWAG), "--limit",
                                               "2", "--no-progress"], monkeypatch, capsys)
    assert status == 0, err
    assert json.loads(out)["dtype"] == "float32"
    data = tmp_path / "shards"
    data.mkdir()
    write_shard(shard_path(data, "random", "train", 0), np.random.default_rng(0).integers(0, 50257, 2000), "gpt2",
                50257)
    train_gpt2.main(["--data-dir", str(data), "--log-dir", str(tmp_path / "log"), *on_cpu, "--n-layer", "1",
                     "--n-head", "2", "--n-embd", "16", "--block-size", "32", "--seq-len", "32", "--micro-batch-size",
                     "2", "--total-batch-size", "64", "--max-steps", "1", "--val-tokens", "0", "--hellaswag-examples",
                     "0", "--num-samples", "0", "--progress", "false", "--peak-flops", "1e12"])
    assert TrainConfig.read_toml(tmp_path / "log" / "config.toml")["dtype"] == ("bfloat16" if native else "float32")


def test_gpu_check_explains_itself_without_a_gpu() -> None:
    script = str(Path(__file__).resolve().parents[1] / "bench" / "gpu_check.py")
    result = subprocess.run([sys.executable, script, "--help"], capture_output=True, text=True,
                            timeout=HANG_GUARD_SECONDS)
    assert result.returncode == 0 and "one line per check" in result.stdout
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine that has one
    result = subprocess.run([sys.executable, script], capture_output=True, text=True, env=env,
                            timeout=HANG_GUARD_SECONDS)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "gpu_check.py needs a CUDA GPU, and this machine has none (torch.cuda.is_available() is False)"]


