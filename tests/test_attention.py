"""core/attention.py: the blockwise formulation is causal attention, forward and backward, and the
choice between it and SDPA is measured once per shape and kept. The rest of the suite runs with
GPT2_TOOLKIT_ATTENTION=flash (tests/conftest.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from core import attention
from core.errors import UserError
from model import GPT, CausalSelfAttention, GPTConfig


def measure_as(monkeypatch: pytest.MonkeyPatch, formulation: str, cache: Path) -> list[tuple]:
    """Makes every measurement answer `formulation`, kept in `cache`; returns each measurement's
    (shape, dtype, training)."""
    measured: list[tuple] = []
    monkeypatch.setenv("GPT2_TOOLKIT_CACHE", str(cache))
    monkeypatch.setenv("GPT2_TOOLKIT_ATTENTION", "measure")
    monkeypatch.setattr(attention, "_decisions", {})
    def measure(shape: tuple[int, ...], dtype: torch.dtype, training: bool) -> str:
        measured.append((shape, dtype, training))
        return formulation

    monkeypatch.setattr(attention, "faster_formulation", measure)
    return measured


def assert_is_causal_attention(attend: Callable[..., torch.Tensor], positions: int) -> None:
    """`attend` gives SDPA's causal attention and its gradients, in float64, on random operands."""
    generator = torch.Generator().manual_seed(positions)
    q, k, v = (torch.randn(2, 3, positions, 16, generator=generator, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    grad_y = torch.randn(2, 3, positions, 16, generator=generator, dtype=torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    y = attend(q, k, v)
    torch.testing.assert_close(y, expected, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(y, (q, k, v), grad_y)
    for grad, expected_grad in zip(grads, torch.autograd.grad(expected, (q, k, v), grad_y), strict=True):
        torch.testing.assert_close(grad, expected_grad, rtol=0, atol=1e-10)


@pytest.mark.parametrize("positions", [1, 7, 256, 300, 600])  # one block, several, a last block cut short
def test_blocks_are_causal_attention_forward_and_backward(positions: int) -> None:
    assert_is_causal_attention(attention.blockwise_causal_attention, positions)


def test_compiled_blocks_are_causal_attention_forward_and_backward() -> None:
    """The mask is written where autograd does not look; traced, it must still reach the graph."""
    torch._dynamo.reset()
    assert_is_causal_attention(torch.compile(attention.blockwise_causal_attention, backend="aot_eager",
                                             fullgraph=True), 300)


def test_blocks_in_bfloat16_are_as_near_as_sdpa_in_bfloat16() -> None:
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, 300, 64, generator=generator) for _ in range(3))
    expected = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    bf16 = [t.bfloat16() for t in (q, k, v)]
    sdpa_error = (F.scaled_dot_product_attention(*bf16, is_causal=True).double() - expected).abs().max()
    blocks_error = (attention.blockwise_causal_attention(*bf16).double() - expected).abs().max()
    assert blocks_error <= 2 * sdpa_error  # its probabilities are rounded to bf16, SDPA's are not


def test_the_opt_in_swaps_every_attention_layer_and_keeps_weights_and_results(monkeypatch: pytest.MonkeyPatch,
                                                                             tmp_path: Path) -> None:
    measured = measure_as(monkeypatch, "blocks", tmp_path)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16, vocab_multiple=64))
    idx, targets = torch.randint(0, 50, (2, 32)), torch.randint(0, 50, (2, 32))
    _, loss = model(idx, targets)
    expected_grads = torch.autograd.grad(loss, list(model.parameters()))
    names = list(model.state_dict())
    attention.use_measured_attention(model)
    assert [type(m) for m in model.modules() if isinstance(m, CausalSelfAttention)] == [attention.MeasuredAttention] * 2
    assert list(model.state_dict()) == names
    _, measured_loss = model(idx, targets)
    torch.testing.assert_close(measured_loss, loss, rtol=0, atol=1e-6)
    for grad, expected in zip(torch.autograd.grad(measured_loss, list(model.parameters())), expected_grads,
                              strict=True):
        torch.testing.assert_close(grad, expected, rtol=0, atol=1e-6)
    assert measured == [((2, 2, 32, 8), torch.float32, True)]  # both layers, one shape: measured once


def test_each_shape_is_measured_once_and_kept_for_the_next_process(monkeypatch: pytest.MonkeyPatch,
                                                                   tmp_path: Path) -> None:
    """A resumed run, or the other DDP rank, must take the same formulation as the first process."""
    measured = measure_as(monkeypatch, "blocks", tmp_path)
    q = torch.randn(1, 2, 32, 8, requires_grad=True)
    for positions in (20, 30, 32):  # one length class: 32 positions
        attention.causal_attention(*[q[:, :, :positions]] * 3)
    with torch.no_grad():
        attention.causal_attention(q, q, q)  # a forward alone is another measurement
    attention.causal_attention(q[:, :, :10], q[:, :, :10], q[:, :, :10])
    assert measured == [((1, 2, 32, 8), torch.float32, True), ((1, 2, 32, 8), torch.float32, False),
                        ((1, 2, 16, 8), torch.float32, True)]
    assert set(json.loads((tmp_path / attention.DECISIONS_FILE).read_text()).values()) == {"blocks"}
    monkeypatch.setattr(attention, "_decisions", {})  # a new process: nothing in memory
    monkeypatch.setattr(attention, "faster_formulation", lambda *args: pytest.fail("measured again"))
    monkeypatch.setattr(attention, "blockwise_causal_attention", lambda *args: "blocks ran")
    assert attention.causal_attention(q, q, q) == "blocks ran"


def test_the_measurement_times_both_on_operands_of_the_shape() -> None:
    assert attention.faster_formulation((1, 2, 64, 16), torch.float32, training=True) in attention.FORMULATIONS
    assert attention.faster_formulation((1, 2, 64, 16), torch.bfloat16, training=False) in attention.FORMULATIONS


@pytest.mark.parametrize("setting", attention.FORMULATIONS)
def test_the_setting_takes_one_formulation_and_measures_nothing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                setting: str) -> None:
    measure_as(monkeypatch, "blocks", tmp_path)
    monkeypatch.setenv("GPT2_TOOLKIT_ATTENTION", setting)
    ran: list[str] = []
    monkeypatch.setattr(attention, "blockwise_causal_attention", lambda *args: ran.append("blocks"))
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *args, **kwargs: ran.append("flash"))
    q = torch.randn(1, 2, 8, 4)
    attention.causal_attention(q, q, q)
    assert ran == [setting] and not (tmp_path / attention.DECISIONS_FILE).exists()
    monkeypatch.setenv("GPT2_TOOLKIT_ATTENTION", "fastest")
    with pytest.raises(UserError, match="GPT2_TOOLKIT_ATTENTION='fastest': choose measure, flash, blocks"):
        attention.causal_attention(q, q, q)


def test_masks_dropout_and_a_cache_take_sdpa(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    measured = measure_as(monkeypatch, "blocks", tmp_path)
    monkeypatch.setattr(attention, "blockwise_causal_attention", lambda *args: pytest.fail("blocks ran"))
    layer = CausalSelfAttention(GPTConfig(block_size=16, n_head=2, n_embd=8, dropout=0.1), 0).train()
    layer.__class__ = attention.MeasuredAttention
    q = torch.randn(1, 2, 6, 4)
    layer.attend(q, q, q, None, True)  # dropout in training
    layer.eval()
    layer.attend(q, q, q, torch.ones(6, 6, dtype=torch.bool).tril(), False)  # a mask of its own
    layer.attend(q[:, :, :2], q, q, None, False)  # queries after a cache
    assert measured == []


@pytest.mark.parametrize("answer", attention.FORMULATIONS)
def test_compiled_code_takes_the_measured_formulation(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      answer: str) -> None:
    """Measured once, eagerly, while torch.compile traces: the graph computes what eager code would."""
    measured = measure_as(monkeypatch, answer, tmp_path)
    traced: list[str] = []
    blocks = attention.blockwise_causal_attention
    monkeypatch.setattr(attention, "blockwise_causal_attention", lambda *args: traced.append("blocks") or blocks(*args))
    q = torch.randn(1, 2, 300, 4, requires_grad=True)
    torch._dynamo.reset()  # no graph of an earlier test's answer
    compiled = torch.compile(attention.causal_attention, backend="eager", fullgraph=True)
    y = compiled(q, q, q)
    y_again = compiled(q, q, q)  # the same graph: no measurement again
    assert measured == [((1, 2, 512, 4), torch.float32, True)]
    assert traced == (["blocks"] * 2 if answer == "blocks" else [])  # once a call: dynamo replays the append
    expected = blocks(q, q, q) if answer == "blocks" else F.scaled_dot_product_attention(q, q, q, is_causal=True)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(y_again, expected, rtol=0, atol=0)


def test_training_takes_the_opt_in(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import train_gpt2
    from core.config import TrainConfig
    from core.runlog import RunLog
    from core.training import TrainingRun

    run = TrainingRun(TrainConfig(device="cpu"), train_gpt2.Distributed(0, 0, 1, torch.device("cpu")),
                      RunLog(tmp_path, enabled=False))
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=1, n_head=2, n_embd=8))
    run.wrap(model)
    assert type(model.transformer.h[0].attn) is attention.MeasuredAttention
