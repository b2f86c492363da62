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


def force_choice(monkeypatch: pytest.MonkeyPatch, formulation: str, cache: Path) -> list[tuple]:
    """Makes every measurement answer `formulation`, kept in `cache`; returns the operands of each
    measurement, as they come."""
    measured: list[tuple] = []
    monkeypatch.setenv("GPT2_TOOLKIT_CACHE", str(cache))
    monkeypatch.setattr(matmul, "forced_choice", lambda: None)  # measure, as outside the tests
    monkeypatch.setattr(matmul, "_decisions", {})
    monkeypatch.setattr(matmul, "fastest_formulation", lambda *operands: measured.append(operands) or formulation)
    return measured


@pytest.mark.parametrize("formulation", matmul.FORMULATIONS)
@pytest.mark.parametrize("rows, with_bias", [(1, True), (5, False), (300, True)])
def test_linear_is_f_linear_every_way(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, formulation: str,
                                     rows: int, with_bias: bool) -> None:
    measured = force_choice(monkeypatch, formulation, tmp_path)
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
    measured = force_choice(monkeypatch, "transposed", tmp_path)
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
    measured = force_choice(monkeypatch, "transposed", tmp_path)
    weight = torch.randn(64, 32)
    for rows in (3, 3, 40, 50, 64, 3000, 5000):  # size classes: 3, then 64 (three times), then 128 (twice)
        matmul.linear(torch.randn(rows, 32), weight)
    assert [operands[0].shape[0] for operands in measured] == [3, 40, 128]  # timed on at most 128 rows


@pytest.mark.parametrize("setting", matmul.FORMULATIONS)
def test_the_setting_takes_one_formulation_and_measures_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                setting: str) -> None:
    monkeypatch.setenv("GPT2_TOOLKIT_CACHE", str(tmp_path))
    monkeypatch.setenv("GPT2_TOOLKIT_MATMUL", setting)
    monkeypatch.setattr(matmul, "fastest_formulation", lambda *operands: pytest.fail("measured"))
    taken = []
    for name, product in list(matmul.PRODUCTS.items()):
        monkeypatch.setitem(matmul.PRODUCTS, name,
                            lambda *operands, name=name, product=product: taken.append(name) or product(*operands))
    matmul.forced_choice.cache_clear()
    try:
        x, weight = torch.randn(4, 32), torch.randn(64, 32)
        torch.testing.assert_close(matmul.linear(x, weight), F.linear(x, weight), rtol=0, atol=1e-5)
        assert taken == [setting]
        assert not (tmp_path / matmul.DECISIONS_FILE).exists()
        monkeypatch.setenv("GPT2_TOOLKIT_MATMUL", "fastest")
        matmul.forced_choice.cache_clear()
        with pytest.raises(UserError, match="GPT2_TOOLKIT_MATMUL='fastest': choose measure, linear, transposed, "
                                            "packed"):
            matmul.linear(x, weight)
    finally:
        monkeypatch.undo()
        matmul.forced_choice.cache_clear()


def test_the_real_measurement_leaves_the_result_alone() -> None:
    x, weight, bias = torch.randn(8, 64), torch.randn(256, 64), torch.randn(256)
    assert matmul.fastest_formulation(x, weight, bias, matmul.FORMULATIONS) in matmul.FORMULATIONS
    torch.testing.assert_close(matmul.linear(x, weight, bias), F.linear(x, weight, bias), rtol=0, atol=1e-5)


def test_a_onednn_without_the_packed_product_leaves_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(weight: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no such oneDNN primitive")

    monkeypatch.setattr(matmul, "_pack", unsupported)
    x, weight = torch.randn(8, 64), torch.randn(256, 64)
    assert matmul.fastest_formulation(x, weight, None, matmul.FORMULATIONS) in ("linear", "transposed")


def test_answers_are_kept_for_the_next_process(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A resumed run, or the other DDP rank, must take the same formulation as the first process."""
    measured = force_choice(monkeypatch, "transposed", tmp_path)
    x, weight = torch.randn(4, 32), torch.randn(64, 32)
    matmul.linear(x, weight)
    assert len(measured) == 1
    kept = json.loads((tmp_path / matmul.DECISIONS_FILE).read_text())
    assert list(kept.values()) == ["transposed"]
    monkeypatch.setattr(matmul, "_decisions", {})  # a new process: nothing in memory
    monkeypatch.setattr(matmul, "fastest_formulation", lambda *operands: pytest.fail("measured again"))
    torch.testing.assert_close(matmul.linear(x, weight), F.linear(x, weight), rtol=0, atol=1e-5)
    assert list(matmul._decisions.values()) == ["transposed"]


def test_a_damaged_decisions_file_is_measured_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / matmul.DECISIONS_FILE).write_text("{not json")
    measured = force_choice(monkeypatch, "linear", tmp_path)
    matmul.linear(torch.randn(4, 32), torch.randn(64, 32))
    kept = json.loads((tmp_path / matmul.DECISIONS_FILE).read_text())
    assert len(measured) == 1 and list(kept.values()) == ["linear"]


def test_a_decision_that_names_no_formulation_is_measured_again(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    x, weight = torch.randn(4, 32), torch.randn(64, 32)
    measured = force_choice(monkeypatch, "packed", tmp_path)
    matmul.linear(x, weight)
    key = next(iter(json.loads((tmp_path / matmul.DECISIONS_FILE).read_text())))
    (tmp_path / matmul.DECISIONS_FILE).write_text(json.dumps({key: True}))  # as an earlier version kept it
    monkeypatch.setattr(matmul, "_decisions", {})  # a new process
    matmul.linear(x, weight)
    assert len(measured) == 2 and json.loads((tmp_path / matmul.DECISIONS_FILE).read_text()) == {key: "packed"}


def test_the_opt_in_swaps_every_linear_layer_and_keeps_weights_and_results(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    from model import GPT, GPTConfig

    force_choice(monkeypatch, "transposed", tmp_path)
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


def test_the_packed_copy_follows_the_weight(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """oneDNN's copy is made once, and again after an in-place write (an optimizer step,
    load_state_dict) or a swapped storage: never a product of the old weight."""
    force_choice(monkeypatch, "packed", tmp_path)
    layer = torch.nn.Linear(32, 64)
    x = torch.randn(5, 32)
    with torch.no_grad():
        torch.testing.assert_close(matmul.linear(x, layer.weight, layer.bias), layer(x), rtol=0, atol=1e-5)
        first_copy = matmul.packed_weight(layer.weight)
        assert matmul.packed_weight(layer.weight) is first_copy  # kept while the weight stays as it is
        layer.weight.mul_(-2)
        torch.testing.assert_close(matmul.linear(x, layer.weight, layer.bias), layer(x), rtol=0, atol=1e-5)
        layer.load_state_dict({"weight": torch.randn(64, 32), "bias": layer.bias})
        torch.testing.assert_close(matmul.linear(x, layer.weight, layer.bias), layer(x), rtol=0, atol=1e-5)
        layer.weight.data = torch.randn(64, 32)
        torch.testing.assert_close(matmul.linear(x, layer.weight, layer.bias), layer(x), rtol=0, atol=1e-5)


def test_packed_is_not_taken_where_it_would_compute_otherwise(monkeypatch: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    """oneDNN's product ignores autocast, and an inference tensor has no version to follow."""
    force_choice(monkeypatch, "packed", tmp_path)
    x, weight = torch.randn(5, 32), torch.randn(64, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y, expected = matmul.linear(x, weight), F.linear(x, weight)
    assert y.dtype == expected.dtype == torch.bfloat16 and torch.equal(y, expected)
    with torch.inference_mode():
        frozen = torch.randn(64, 32)
        torch.testing.assert_close(matmul.linear(x, frozen), F.linear(x, frozen), rtol=0, atol=1e-5)
    assert frozen not in matmul._packed


def test_a_compiled_caller_runs_packed_products_as_f_linear(monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    """A graph cannot hold oneDNN's opaque copy: the product it traces is F.linear, in one graph."""
    force_choice(monkeypatch, "packed", tmp_path)
    x, weight = torch.randn(5, 32), torch.randn(64, 32)
    with torch.no_grad():
        eager = matmul.linear(x, weight)  # eagerly first, as compile_decode_step does: packed
        compiled = torch.compile(matmul.linear, fullgraph=True, backend="eager")(x, weight)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_the_race_keeps_the_default_unless_another_wins_by_the_margin(monkeypatch: pytest.MonkeyPatch) -> None:
    """core.cache.fastest, on a clock that each call moves on by its own cost: no real timing."""
    from core import cache

    clock = [0.0]
    monkeypatch.setattr(cache.time, "perf_counter", lambda: clock[0])

    def costing(*seconds: float) -> object:
        runs = iter(seconds)
        return lambda: clock.__setitem__(0, clock[0] + next(runs))

    # Warm-up runs are not counted (the 9 s), the best timed run is (1.0 and 0.85).
    race = {"default": costing(9, 1.2, 1.0), "other": costing(1, 0.95, 0.85)}
    assert cache.fastest(race, "default", margin=1.1, timed_calls=2) == "other"
    race = {"default": costing(1, 1.0, 1.0), "other": costing(0.1, 0.95, 0.95)}
    assert cache.fastest(race, "default", margin=1.1, timed_calls=2) == "default"  # a near tie
