"""core/matmul.py: whichever formulation the measurement (or GPT2_TOOLKIT_MATMUL) picks, `linear` is
F.linear. The rest of the suite runs with GPT2_TOOLKIT_MATMUL=linear (tests/conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core import matmul
from core.errors import UserError


def force_choice(monkeypatch: pytest.MonkeyPatch, transposed: bool, cache: Path) -> list[tuple]:
    """Makes every measurement answer `transposed`, kept in `cache`; returns the operands of each
    measurement, as they come."""
    measured: list[tuple] = []
    monkeypatch.setenv("GPT2_TOOLKIT_CACHE", str(cache))
    monkeypatch.setattr(matmul, "forced_choice", lambda: None)  # measure, as outside the tests
    monkeypatch.setattr(matmul, "_decisions", {})
    monkeypatch.setattr(matmul, "transposed_is_faster", lambda *operands: measured.append(operands) or transposed)
    return measured


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("rows, with_bias", [(1, True), (5, False), (300, True)])
def test_linear_is_f_linear_either_way(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, transposed: bool,
                                      rows: int, with_bias: bool) -> None:
    measured = force_choice(monkeypatch, transposed, tmp_path)
    generator = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 3, 96, generator=generator)  # 3-D, as the model passes it
    weight = torch.randn(200, 96, generator=generator)
    bias = torch.randn(200, generator=generator) if with_bias else None
    y = matmul.linear(x, weight, bias)
    expected = F.linear(x, weight, bias)
    assert y.shape == expected.shape == (rows, 3, 200)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-5)
    assert len(measured) == 1  # measured once for this shape


def test_products_that_need_gradients_are_f_linears_bit_for_bit(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    measured = force_choice(monkeypatch, True, tmp_path)
    x = torch.randn(40, 96, requires_grad=True)
    weight, bias = torch.randn(200, 96, requires_grad=True), torch.randn(200, requires_grad=True)
    y = matmul.linear(x, weight, bias)
    expected = F.linear(x, weight, bias)
    assert torch.equal(y, expected) and measured == []
    grads = torch.autograd.grad(y.square().sum(), (x, weight, bias))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, weight, bias))
    assert all(torch.equal(a, b) for a, b in zip(grads, expected_grads, strict=True))
    with torch.no_grad():
        matmul.linear(x, weight, bias)
    assert len(measured) == 1  # without gradients, the same operands take the measured path


def test_each_shape_is_measured_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    measured = force_choice(monkeypatch, True, tmp_path)
    weight = torch.randn(64, 32)
    for rows in (3, 3, 40, 50, 64, 3000, 5000):  # size classes: 3, then 64 (three times), then 128 (twice)
        matmul.linear(torch.randn(rows, 32), weight)
    assert [operands[0].shape[0] for operands in measured] == [3, 40, 128]  # timed on at most 128 rows


@pytest.mark.parametrize("setting, transposed", [("linear", False), ("transposed", True)])
def test_the_setting_takes_one_formulation_and_measures_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                setting: str, transposed: bool) -> None:
    monkeypatch.setenv("GPT2_TOOLKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("GPT2_TOOLKIT_MATMUL", setting)
    monkeypatch.setattr(matmul, "transposed_is_faster", lambda *operands: pytest.fail("measured"))
    taken = []
    monkeypatch.setattr(matmul, "linear_transposed", lambda *operands: taken.append(1) or F.linear(*operands))
    matmul.forced_choice.cache_clear()
    try:
        x, weight = torch.randn(4, 32), torch.randn(64, 32)
        torch.testing.assert_close(matmul.linear(x, weight), F.linear(x, weight), rtol=0, atol=1e-5)
        assert bool(taken) is transposed
        assert not (tmp_path / matmul.DECISIONS_FILE).exists()
        monkeypatch.setenv("GPT2_TOOLKIT_MATMUL", "fastest")
        matmul.forced_choice.cache_clear()
        with pytest.raises(UserError, match="GPT2_TOOLKIT_MATMUL='fastest': choose measure, linear or transposed"):
            matmul.linear(x, weight)
    finally:
        monkeypatch.undo()
        matmul.forced_choice.cache_clear()


def test_the_real_measurement_leaves_the_result_alone() -> None:
    x, weight, bias = torch.randn(8, 64), torch.randn(256, 64), torch.randn(256)
    assert matmul.transposed_is_faster(x, weight, bias) in (True, False)
    torch.testing.assert_close(matmul.linear(x, weight, bias), F.linear(x, weight, bias), rtol=0, atol=1e-5)


def test_answers_are_kept_for_the_next_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A resumed run, or the other DDP rank, must take the same formulation as the first process."""
    measured = force_choice(monkeypatch, True, tmp_path)
    x, weight = torch.randn(4, 32), torch.randn(64, 32)
    matmul.linear(x, weight)
    assert len(measured) == 1
    kept = json.loads((tmp_path / matmul.DECISIONS_FILE).read_text())
    assert list(kept.values()) == [True]
    monkeypatch.setattr(matmul, "_decisions", {})  # a new process: nothing in memory
    monkeypatch.setattr(matmul, "transposed_is_faster", lambda *operands: pytest.fail("measured again"))
    torch.testing.assert_close(matmul.linear(x, weight), F.linear(x, weight), rtol=0, atol=1e-5)
    assert list(matmul._decisions.values()) == [True]


def test_a_damaged_decisions_file_is_measured_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / matmul.DECISIONS_FILE).write_text("{not json")
    measured = force_choice(monkeypatch, False, tmp_path)
    matmul.linear(torch.randn(4, 32), torch.randn(64, 32))
    assert len(measured) == 1 and list(json.loads((tmp_path / matmul.DECISIONS_FILE).read_text()).values()) == [False]


def test_the_opt_in_swaps_every_linear_layer_and_keeps_weights_and_results(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    from model import GPT, GPTConfig

    force_choice(monkeypatch, True, tmp_path)
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=16, vocab_multiple=64)).eval()
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        expected = model(idx)[0]
    names = list(model.state_dict())
    matmul.use_measured_matmuls(model)
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 5 and all(type(m) is matmul.MeasuredLinear for m in linears)  # 4 in the block, the head
    assert list(model.state_dict()) == names and model.lm_head.weight is model.transformer.wte.weight
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], expected, rtol=0, atol=1e-5)
