"""core/cross_entropy.py's chunked loss against F.cross_entropy over materialized logits, and the
whole model's loss and gradients against HF transformers' GPT2LMHeadModel."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from core import cross_entropy
from core.cross_entropy import linear_cross_entropy
from core.hf import config_from_hf, state_dict_from_hf
from model import GPT


def operands(rows: int = 37, width: int = 16, vocab: int = 53, ignored: int = 5) -> tuple:
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, width, generator=generator).requires_grad_()
    weight = torch.randn(vocab, width, generator=generator).requires_grad_()
    targets = torch.randint(0, vocab, (rows,), generator=generator)
    targets[torch.randperm(rows, generator=generator)[:ignored]] = -1
    return hidden, weight, targets


def loss_and_grads(loss_fn, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                   scale: float = 1.0) -> tuple[torch.Tensor, ...]:
    hidden, weight = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = loss_fn(hidden, weight, targets)
    (loss * scale).backward()
    return loss.detach(), hidden.grad, weight.grad


def plain(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=-1)


def chunk_rows(monkeypatch: pytest.MonkeyPatch, rows: int, vocab_size: int = 53) -> None:
    """Chunks of at most `rows` rows of `vocab_size` float32 logits (twice as many in bfloat16)."""
    monkeypatch.setattr(cross_entropy, "CHUNK_BYTES", rows * 2 * 4 * vocab_size)


@pytest.mark.parametrize("rows", [1, 8, 10, 37, 128])  # one row, even split, ragged last chunk, one chunk
def test_chunked_loss_and_gradients_equal_the_plain_ones(rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    chunk_rows(monkeypatch, rows)
    hidden, weight, targets = operands()
    expected = loss_and_grads(plain, hidden, weight, targets, scale=0.25)  # 1/4: accumulation's scaling
    actual = loss_and_grads(linear_cross_entropy, hidden, weight, targets, scale=0.25)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_loss_without_gradients_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    chunk_rows(monkeypatch, 8)
    hidden, weight, targets = operands()
    with torch.no_grad():
        torch.testing.assert_close(linear_cross_entropy(hidden, weight, targets), plain(hidden, weight, targets))


def test_chunks_cover_every_row_once() -> None:
    for rows, vocab_size, itemsize in ((2048, 50257, 2), (2048, 50257, 4), (1, 50257, 4), (37, 3, 4), (1000, 10**9, 2)):
        chunks = cross_entropy._chunks(rows, vocab_size, itemsize)
        covered = [i for chunk in chunks for i in range(rows)[chunk]]
        assert covered == list(range(rows))
        row_bytes = 2 * itemsize * vocab_size  # the logits and the probabilities
        assert all(row_bytes * (c.stop - c.start) <= max(cross_entropy.CHUNK_BYTES, row_bytes) for c in chunks)
        assert len({c.stop - c.start for c in chunks[:-1]}) <= 1


def float64_loss_and_grads(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> list[torch.Tensor]:
    def loss(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(h @ w.T, t, ignore_index=-1)

    return [x.float() for x in loss_and_grads(loss, hidden.double(), weight.double(), targets)]


def test_large_logits_do_not_overflow_and_tiny_probabilities_keep_their_loss(monkeypatch: pytest.MonkeyPatch) -> None:
    """Logits in the thousands on every other row: exp() would overflow without the max shift, and their
    targets' probabilities underflow float32 (losses in the hundreds), which the loss recomputes from the
    logits of those rows alone, in chunks too."""
    chunk_rows(monkeypatch, 8)
    hidden, weight, targets = operands()
    hidden = hidden.detach().clone()
    hidden[::2] *= 100
    with torch.no_grad():
        row_losses = F.cross_entropy((hidden @ weight.T).double(), targets, ignore_index=-1, reduction="none")
    assert (row_losses > 100).sum() > 8 and (row_losses[1::2] < 30).all()  # far rows, in several chunks
    actual = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    assert torch.isfinite(actual[0])
    for a, e in zip(actual, float64_loss_and_grads(hidden, weight, targets), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_a_loss_near_zero_keeps_its_precision() -> None:
    """Where p(target) is near 1, the loss is taken from the other probabilities' sum: -log(p(target))
    of a float32 p within 1e-4 of 1 would be off by ~1e-3 of itself."""
    _, weight, targets = operands()
    targets = targets.clamp(min=0)
    hidden = weight.detach()[targets]  # each row most like its target's embedding
    with torch.no_grad():
        row_losses = F.cross_entropy((hidden @ weight.T).double(), targets, reduction="none")
    targets[row_losses > 1e-3] = -1  # the rows that are not near-certain
    expected = float64_loss_and_grads(hidden, weight, targets)
    assert (targets >= 0).sum() > 15 and 1e-7 < expected[0] < 1e-3
    actual = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-9)


def test_each_rows_loss_keeps_its_digits_down_to_the_smallest_probabilities() -> None:
    """Rows built to lose 0.01 to 500 nats, some with a padded id's logit above all others: each row's
    loss within 1e-6 of itself against float64, through the subnormal p(target) of losses near 90-103
    (there the loss comes from the row's logits again, and the padded ids must stay out of it)."""
    hidden, weight, targets = operands(vocab=53)
    hidden, weight, targets = hidden.detach().clone(), weight.detach(), targets.clamp(min=0)
    targets = targets.clamp(max=49)  # ids 50.. are padding
    hidden[::3] += 2 * weight[50]  # a padded id's logit the largest of these rows
    with torch.no_grad():
        logits = (hidden @ weight.T).double()[:, :50]
        gap = logits.logsumexp(1) - logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    wanted = torch.tensor([0.01, 1.0, 10.0, 75.0, 88.0, 92.0, 96.0, 100.0, 103.0, 120.0, 500.0]).repeat(4)[:37]
    hidden *= (wanted / gap).unsqueeze(1)  # roughly: a row's loss grows with its scale
    logits = (hidden @ weight.T).double()
    expected = F.cross_entropy(logits[:, :50], targets, reduction="none")
    assert ((expected > 87.4) & (expected < 103)).sum() >= 5  # p(target) subnormal in float32
    actual = torch.stack([linear_cross_entropy(hidden[i:i + 1], weight, targets[i:i + 1], vocab_size=50)
                          for i in range(37)]).double()
    float32_logits_error = 2**-23 * logits.abs().amax(1)  # what rounding the logits to float32 costs
    assert ((actual - expected).abs() <= 1e-6 * expected + 2 * float32_logits_error).all()


def test_bfloat16_gradients_of_near_certain_rows_keep_their_digits() -> None:
    """Under bfloat16 autocast, where p(target) is within ~1e-3 of 1 (bfloat16 rounds such a p to 1.0),
    the gradient still follows the float64 one over the same bfloat16 logits, as 1 - p(target) comes
    from the other probabilities."""
    _, weight, targets = operands()
    weight = weight.detach()
    targets = targets.clamp(min=0)
    hidden = weight[targets].clone()  # each row most like its target's embedding
    with torch.no_grad():
        logits = F.linear(hidden.bfloat16(), weight.bfloat16()).double()
        probs = logits.softmax(1)
        targets[probs.gather(1, targets.unsqueeze(1)).squeeze(1) < 0.99] = -1  # the near-certain rows
        keep = targets >= 0
        grad_logits = (probs - F.one_hot(targets.clamp(min=0), 53)) * (keep / keep.sum()).unsqueeze(1)
        expected = grad_logits @ weight.bfloat16().double()
    assert keep.sum() > 15 and grad_logits.abs().max() < 1e-3
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, grad_hidden, _ = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    assert ((grad_hidden.double() - expected).norm() / expected.norm()) < 2e-2


def test_each_chunks_gradient_matrix_is_freed_before_the_next_chunks_logits(monkeypatch: pytest.MonkeyPatch) -> None:
    """The memory bound holds: a chunk's (rows, vocab) matrices are gone when the next chunk starts."""
    chunk_rows(monkeypatch, 8)
    hidden, weight, targets = operands()
    softmax_gradient, made = cross_entropy._softmax_gradient, []

    def watched_softmax_gradient(*args: object) -> tuple:
        assert all(matrix() is None for matrix in made)
        result = softmax_gradient(*args)
        made.append(weakref.ref(result[0]))
        return result

    monkeypatch.setattr(cross_entropy, "_softmax_gradient", watched_softmax_gradient)
    loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    assert len(made) == 5


def test_float16_autocast_takes_the_float32_path() -> None:
    """float16's smallest normal is 2**-14: a softmax over 2000 ids in it would flush most of them to 0."""
    hidden, weight, targets = operands(width=16, vocab=2000)
    with torch.autocast("cpu", dtype=torch.float16):
        actual = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    for a, e in zip(actual, loss_and_grads(plain, hidden, weight, targets), strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_bfloat16_autocast_follows_the_plain_loss_under_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    chunk_rows(monkeypatch, 8)
    hidden, weight, targets = operands()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(lambda h, w, t: F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-1),
                                  hidden, weight, targets)
        actual = loss_and_grads(linear_cross_entropy, hidden, weight, targets)
    for a, e in zip(actual, expected, strict=True):
        assert a.dtype == e.dtype
        torch.testing.assert_close(a, e, rtol=2e-2, atol=2e-3)  # bf16 products rounded in other places


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_under_torch_compile_the_chunks_run_eagerly_with_the_same_loss_and_gradients(
        dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiled caller runs the chunk loop eagerly (traced, dynamo would unroll it into one graph of
    every chunk): the plain loss's value and gradients, padded ids included, in float32 and under
    bfloat16 autocast; and the loss alone without gradients."""
    chunk_rows(monkeypatch, 10)
    hidden, weight, targets = operands()
    targets = targets.clamp(max=49)  # ids 50.. are padding
    traced = []
    softmax_gradient = cross_entropy._softmax_gradient

    def watched_softmax_gradient(*args: object) -> tuple:
        traced.append(torch.compiler.is_compiling())  # False wherever a chunk runs eagerly
        return softmax_gradient(*args)

    monkeypatch.setattr(cross_entropy, "_softmax_gradient", watched_softmax_gradient)
    torch._dynamo.reset()  # each dtype's run its own compilations: dynamo allows 8 per function
    compiled = torch.compile(lambda h, w, t: linear_cross_entropy(h, w, t, vocab_size=50))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        actual = loss_and_grads(compiled, hidden, weight, targets, scale=0.25)
        expected = loss_and_grads(lambda h, w, t: F.cross_entropy(F.linear(h, w[:50]).float(), t, ignore_index=-1),
                                  hidden, weight, targets, scale=0.25)
        with torch.no_grad():
            loss_alone = compiled(hidden, weight, targets)
    tolerance = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, **tolerance)
    torch.testing.assert_close(loss_alone, expected[0], **tolerance)
    assert torch.count_nonzero(actual[2][50:]) == 0
    chunks = 4 if dtype == torch.float32 else 2  # of 10 rows, or of 20 in half the bytes an element
    assert len(traced) == 2 * chunks and not any(traced)  # with gradients and without, none traced


def test_model_loss_and_gradients_match_hf(monkeypatch: pytest.MonkeyPatch) -> None:
    chunk_rows(monkeypatch, 16, vocab_size=97)
    torch.manual_seed(0)
    hf_config = GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    reference = GPT2LMHeadModel(hf_config)
    ours = GPT.from_state_dict(config_from_hf(hf_config.to_dict()), state_dict_from_hf(reference.state_dict()))
    ours = GPT.with_settings(ours, vocab_multiple=64, dropout=0.0)  # padded rows must get no gradient
    tokens = torch.randint(0, 97, (3, 21))
    # HF shifts its labels itself; its extra last position counts for nothing
    hf_loss = reference(input_ids=tokens, labels=tokens).loss
    _, loss = ours(tokens[:, :-1], tokens[:, 1:])
    hf_loss.backward()
    loss.backward()
    torch.testing.assert_close(loss, hf_loss, rtol=1e-5, atol=1e-6)
    wte_grad = ours.transformer.wte.weight.grad
    torch.testing.assert_close(wte_grad[:97], reference.transformer.wte.weight.grad, rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(wte_grad[97:]) == 0
    torch.testing.assert_close(ours.transformer.h[1].mlp.c_fc.weight.grad,
                               reference.transformer.h[1].mlp.c_fc.weight.grad.T, rtol=1e-4, atol=1e-6)


def test_every_device_takes_the_chunked_path_and_allocates_on_the_inputs_device() -> None:
    """CUDA and MPS run the same chunked loss as the CPU (values and gradients are checked above, on the
    CPU); on the meta device, any buffer allocated elsewhere than on the inputs' device would fail here."""
    with torch.device("meta"):
        hidden = torch.randn(300, 16, requires_grad=True)
        weight = torch.randn(128, 16, requires_grad=True)
        targets = torch.randint(0, 100, (300,))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the device's own autocast, not the CPU's, is read
        loss = linear_cross_entropy(hidden, weight, targets, vocab_size=100)
    loss.backward()
    assert loss.device.type == "meta" and loss.shape == ()
    assert hidden.grad.device.type == "meta" and weight.grad.shape == (128, 16)
