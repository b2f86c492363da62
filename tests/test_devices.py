"""core/devices.py: what --device and --dtype resolve to, and clear errors for what this machine lacks."""

from __future__ import annotations

import pytest
import torch

from core.devices import resolve_device, resolve_dtype
from core.errors import UserError


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
