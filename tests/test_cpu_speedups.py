"""core/cpu_speedups.py: glibc's malloc keeping freed memory in the trainers, oneDNN's product over a kept
weight copy in generation (always F.linear's result), and the one setting that switches them off."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core import cpu_speedups
from core.devices import cpu_has_native_bfloat16
from core.errors import UserError
from tests.stages import HANG_GUARD_SECONDS


@pytest.mark.parametrize("setting", ["off", "0", "false"])
def test_one_setting_switches_the_speed_ups_off(monkeypatch: pytest.MonkeyPatch, setting: str) -> None:
    for name in (*cpu_speedups.MALLOC_VARIABLES, "GLIBC_TUNABLES"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GPT2_TOOLKIT_CPU_SPEEDUPS", setting)
    monkeypatch.setattr(cpu_speedups.ctypes, "CDLL", lambda *_: pytest.fail("mallopt was reached"))
    assert cpu_speedups.keep_freed_memory(torch.device("cpu")) is False
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    cpu_speedups.speed_up_generation(model)
    assert type(model[0]) is torch.nn.Linear
    monkeypatch.setenv("GPT2_TOOLKIT_CPU_SPEEDUPS", "sometimes")
    with pytest.raises(UserError, match="GPT2_TOOLKIT_CPU_SPEEDUPS='sometimes': choose on or off"):
        cpu_speedups.keep_freed_memory(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, with_bias", [(1, True), (5, False), (300, True)])
def test_linear_is_f_linear(dtype: torch.dtype, rows: int, with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 3, 96, generator=generator).to(dtype)  # 3-D, as the model passes it
    weight = torch.randn(200, 96, generator=generator).to(dtype)
    bias = torch.randn(200, generator=generator).to(dtype) if with_bias else None
    with torch.no_grad():
        y = cpu_speedups.linear(x, weight, bias)
    expected = F.linear(x, weight, bias)
    assert y.shape == expected.shape == (rows, 3, 200) and y.dtype == dtype
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5 if dtype == torch.float32 else 0.05)
    if dtype == torch.float32 or cpu_has_native_bfloat16():  # elsewhere oneDNN may lack bfloat16 products
        assert weight in cpu_speedups._packed  # oneDNN's copy served it


def test_a_onednn_without_the_product_falls_back_to_f_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(weight: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no such oneDNN primitive")

    monkeypatch.setattr(cpu_speedups, "packed_weight", unsupported)
    x, weight = torch.randn(5, 32), torch.randn(64, 32)
    with torch.no_grad():
        assert torch.equal(cpu_speedups.linear(x, weight), F.linear(x, weight))


def test_the_packed_copy_follows_the_weight() -> None:
    """oneDNN's copy is made once, and again after an in-place write (an optimizer step,
    load_state_dict) or a swapped storage: never a product of the old weight."""
    layer = torch.nn.Linear(32, 64)
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(cpu_speedups.linear(x, layer.weight, layer.bias), layer(x), rtol=0, atol=1e-5)
        first_copy = cpu_speedups.packed_weight(layer.weight)
        assert cpu_speedups.packed_weight(layer.weight) is first_copy  # kept while the weight stays as it is
        layer.weight.mul_(-2)
        torch.testing.assert_close(cpu_speedups.linear(x, layer.weight, layer.bias), layer(x), rtol=0, atol=1e-5)
        layer.load_state_dict({"weight": torch.randn(64, 32), "bias": layer.bias})
        torch.testing.assert_close(cpu_speedups.linear(x, layer.weight, layer.bias), layer(x), rtol=0, atol=1e-5)
        layer.weight.data = torch.randn(64, 32)
        torch.testing.assert_close(cpu_speedups.linear(x, layer.weight, layer.bias), layer(x), rtol=0, atol=1e-5)


def test_f_linear_where_the_copy_would_compute_otherwise() -> None:
    """Autograd, autocast (which oneDNN's product ignores), an inference tensor (no version to follow)
    and code being compiled (a graph cannot hold the copy) all get F.linear, bit for bit."""
    x, weight = torch.randn(5, 32), torch.randn(64, 32, requires_grad=True)
    assert torch.equal(cpu_speedups.linear(x, weight), F.linear(x, weight))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = cpu_speedups.linear(x, weight), F.linear(x, weight)
    assert y.dtype == expected.dtype == torch.bfloat16 and torch.equal(y, expected)
    with torch.inference_mode():
        frozen = torch.randn(64, 32)
        assert torch.equal(cpu_speedups.linear(x, frozen), F.linear(x, frozen))
    with torch.no_grad():
        compiled = torch.compile(cpu_speedups.linear, fullgraph=True, backend="eager")(x, weight.detach())
    assert torch.equal(compiled, F.linear(x, weight.detach()))
    assert weight not in cpu_speedups._packed and frozen not in cpu_speedups._packed


def test_the_opt_in_swaps_every_linear_layer_and_keeps_weights_and_results() -> None:
    from model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16, vocab_multiple=64)).eval()
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        expected = model(idx)[0]
    names = list(model.state_dict())
    cpu_speedups.speed_up_generation(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 5  # 4 in the block, the head
    assert all(type(m) is cpu_speedups.PackedLinear for m in linears)
    assert list(model.state_dict()) == names and model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=1e-5)


# A process frees a 64 MB tensor and prints by how many bytes its resident memory shrank; then, after 15
# rounds of taking and freeing 64 MB, how much 5 more rounds added. glibc does not reuse every kept block
# at once (aligned requests can miss a hole of their own size: the heap grew by 7 blocks here before it
# settled), but a repeated pattern, such as a training step's, must settle rather than grow for ever.
FREE_A_LARGE_TENSOR = """
import os, sys
import torch
from core.cpu_speedups import keep_freed_memory

kept = keep_freed_memory(torch.device(sys.argv[1]))
def resident() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
tensor = torch.ones(64 << 20, dtype=torch.uint8)
before = resident()
del tensor
shrunk = before - resident()
for repeat in range(20):
    if repeat == 15:
        settled = resident()
    tensor = torch.ones(64 << 20, dtype=torch.uint8)
    del tensor
print(kept, shrunk, resident() - settled)
"""


def _run_free_a_large_tensor(device: str, **environment: str) -> tuple[bool, int, int]:
    env = {name: value for name, value in os.environ.items()
           if name not in (*cpu_speedups.MALLOC_VARIABLES, "GLIBC_TUNABLES")}
    result = subprocess.run([sys.executable, "-c", FREE_A_LARGE_TENSOR, device], capture_output=True, text=True,
                            timeout=HANG_GUARD_SECONDS, cwd=Path(__file__).resolve().parents[1],
                            env={**env, **environment})
    assert result.returncode == 0, result.stderr
    kept, shrunk, grown = result.stdout.split()
    return kept == "True", int(shrunk), int(grown)


@pytest.mark.skipif(not Path("/proc/self/statm").is_file() or platform.libc_ver()[0] != "glibc",
                    reason="glibc's malloc on Linux")
def test_training_on_the_cpu_keeps_freed_memory_unless_the_caller_says_otherwise() -> None:
    """Without keep_freed_memory glibc returns a freed 64 MB block to the system at once (the next
    step's tensor then page-faults in afresh); with it, the block stays and repeated requests settle
    into reusing what is kept. A caller's MALLOC_* variable or glibc.malloc tunable wins, and nothing
    changes off the CPU or with the speed-ups off."""
    mb = 1 << 20
    kept, shrunk, _ = _run_free_a_large_tensor("meta")  # not the CPU: glibc's defaults stand
    assert not kept and shrunk > 48 * mb
    kept, shrunk, grown = _run_free_a_large_tensor("cpu")
    assert kept and shrunk < 16 * mb and grown < 16 * mb
    for setting in ({"MALLOC_TRIM_THRESHOLD_": "0"}, {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"},
                    {"GPT2_TOOLKIT_CPU_SPEEDUPS": "off"}):
        kept, shrunk, _ = _run_free_a_large_tensor("cpu", **setting)
        assert not kept and shrunk > 48 * mb, setting
