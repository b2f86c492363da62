"""core/muon.py and the Muon + AdamW optimizer of core/optim.py: the orthogonalization's promise, who gets
which optimizer, one step against a hand-written one, the WSD schedule, and a Muon-trained checkpoint
that transformers loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import train_gpt2
from core.config import TrainConfig
from core.errors import UserError
from core.hf import export_hf
from core.muon import Muon, orthogonalize
from core.optim import MuonWithAdamW, build_optimizer
from core.pretrained import load_model
from model import GPT, GPTConfig
from tests.stages import SMALL, run_stage

# Keller Jordan's quintic pushes every singular value of a matrix whose spectrum spans two decades into
# about [0.67, 1.2] in 5 steps (measured over random spectra, float32 and bfloat16): not exactly 1.
BAND = (0.6, 1.25)


def with_spectrum(rows: int, cols: int, smallest: float, generator: torch.Generator) -> torch.Tensor:
    k = min(rows, cols)
    u, _ = torch.linalg.qr(torch.randn(rows, k, generator=generator))
    v, _ = torch.linalg.qr(torch.randn(cols, k, generator=generator))
    return u @ torch.diag(torch.logspace(0, torch.log10(torch.tensor(smallest)).item(), k)) @ v.T


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 32), (32, 96), (48, 48)])
def test_the_orthogonalized_update_has_its_singular_values_in_the_band(shape: tuple[int, int],
                                                                       dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        matrix = with_spectrum(*shape, smallest=1e-2, generator=generator) * 7.0  # any scale: it is normalized
        singular = torch.linalg.svdvals(orthogonalize(matrix, dtype=dtype).float())
        assert BAND[0] < singular.min() and singular.max() < BAND[1], singular
        # and it is U V^T up to that band: the singular vectors are the matrix's own
        u, _, vh = torch.linalg.svd(matrix, full_matrices=False)
        cosine = (orthogonalize(matrix, dtype=dtype).float() * (u @ vh)).sum() / (u @ vh).norm() ** 2
        assert 0.8 < cosine < 1.1


def test_a_stacked_matrix_is_orthogonalized_block_by_block() -> None:
    generator = torch.Generator().manual_seed(1)
    blocks = [with_spectrum(16, 16, 1e-1, generator) * scale for scale in (1.0, 100.0, 0.01)]
    gradient = torch.cat(blocks)  # (48, 16), like c_attn's (3 C, C)
    muon = Muon([{"params": [torch.nn.Parameter(torch.zeros(48, 16))], "blocks": 3}], lr=1.0, momentum=0.0,
                nesterov=False)
    param = muon.param_groups[0]["params"][0]
    param.grad = gradient.clone()
    muon.step()
    for i, block in enumerate(blocks):  # each block alone, scale 1 (square): so the scales do not mix
        torch.testing.assert_close(-param[16 * i : 16 * (i + 1)], orthogonalize(block), atol=1e-5, rtol=0)


def test_one_muon_step_is_the_written_out_update() -> None:
    """Nesterov momentum, then the orthogonalized direction scaled by sqrt(rows / cols), decoupled decay."""
    generator = torch.Generator().manual_seed(2)
    weight = torch.randn(64, 16, generator=generator)
    grads = [torch.randn(64, 16, generator=generator) for _ in range(2)]
    param = torch.nn.Parameter(weight.clone())
    muon = Muon([param], lr=0.05, momentum=0.9, weight_decay=0.1)
    expected, buffer = weight.clone(), torch.zeros_like(weight)
    for grad in grads:
        param.grad = grad.clone()
        muon.step()
        buffer = 0.9 * buffer + 0.1 * grad
        direction = grad + 0.9 * (buffer - grad)  # Nesterov: the gradient pulled toward the momentum
        expected = expected * (1 - 0.05 * 0.1) - 0.05 * (64 / 16) ** 0.5 * orthogonalize(direction)
    torch.testing.assert_close(param.detach(), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(muon.state[param]["momentum_buffer"], buffer, atol=1e-6, rtol=0)


def small_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=32))


def test_muon_gets_exactly_the_blocks_matrices_and_adamw_the_rest() -> None:
    model = small_gpt()
    optimizer = build_optimizer("muon", model, 1e-3, 0.1, (0.9, 0.95), 1e-8, torch.device("cpu"), muon_lr=0.02)
    assert isinstance(optimizer, MuonWithAdamW)
    names = {id(p): name for name, p in model.named_parameters()}
    by_optimizer = {kind: sorted(names[id(p)] for group in opt.param_groups for p in group["params"])
                    for kind, opt in (("muon", optimizer.muon), ("adamw", optimizer.adamw))}
    matrices = [f"transformer.h.{i}.{m}.weight" for i in range(2)
                for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert by_optimizer["muon"] == sorted(matrices)
    assert by_optimizer["adamw"] == sorted(set(names.values()) - set(matrices))  # wte (the tied head), wpe, ...
    assert "transformer.wte.weight" in by_optimizer["adamw"] and "transformer.wpe.weight" in by_optimizer["adamw"]
    blocks = {names[id(p)]: group["blocks"] for group in optimizer.muon.param_groups for p in group["params"]}
    assert {name for name, n in blocks.items() if n == 3} == {f"transformer.h.{i}.attn.c_attn.weight" for i in range(2)}
    decayed = {names[id(p)] for g in optimizer.adamw.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert decayed == {"transformer.wte.weight", "transformer.wpe.weight"}
    # One schedule drives both: train_gpt2.py sets each group's lr to the schedule's times its lr_scale.
    assert all("lr_scale" not in g for g in optimizer.adamw.param_groups)
    assert [g["lr_scale"] for g in optimizer.muon.param_groups] == pytest.approx([20, 20])  # 0.02 / 1e-3
    optimizer.muon.param_groups[0]["lr_scale"] = 1.0  # as a checkpoint of another muon_lr would hold it
    optimizer.load_state_dict(optimizer.state_dict())
    assert [g["lr_scale"] for g in optimizer.muon.param_groups] == pytest.approx([20, 20])  # this run's


def test_wsd_at_the_boundaries_of_its_phases() -> None:
    lr = lambda step: train_gpt2.wsd_learning_rate(step, 1.0, 0.1, warmup_steps=10, max_steps=100, decay_fraction=0.2)  # noqa: E731
    assert lr(0) == pytest.approx(0.1) and lr(9) == pytest.approx(1.0)  # warmup: (step + 1) / 10
    assert lr(10) == lr(50) == lr(80) == 1.0  # stable until the last 20 steps
    assert lr(81) == pytest.approx(0.1 + 0.9 * 19 / 20) and lr(90) == pytest.approx(0.1 + 0.9 * 10 / 20)
    assert lr(99) == pytest.approx(0.1 + 0.9 / 20) and lr(100) == lr(150) == 0.1
    config = TrainConfig(max_lr=1.0, min_lr_ratio=0.1, warmup_steps=10, max_steps=100, decay_fraction=0.2)
    assert train_gpt2.learning_rate("wsd", 85, config) == lr(85)
    assert train_gpt2.learning_rate("cosine", 85, config) != lr(85)


def test_a_muon_run_in_bfloat16_and_compiled_exports_to_transformers(
        tmp_path: Path, shakespeare_shards: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    from transformers import GPT2LMHeadModel

    log_dir = tmp_path / "log"
    base = ["--data-dir", str(shakespeare_shards), "--log-dir", str(log_dir), *SMALL, "--total-batch-size", "128"]
    args = [*base, "--max-steps", "3", "--optimizer", "muon", "--dtype", "bfloat16", "--compile",
            "--peak-flops", "1e12"]
    status, _, err = run_stage("train_gpt2", args, monkeypatch, capsys)
    assert status == 0, err
    assert 'optimizer = "muon"' in (log_dir / "config.toml").read_text()
    checkpoint = log_dir / "checkpoints" / "step_000003"
    ours, _ = load_model(str(checkpoint))
    folder = export_hf(ours, tmp_path / "hf")
    theirs = GPT2LMHeadModel.from_pretrained(folder).eval()
    tokens = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(tokens).logits, ours.eval()(tokens)[0][..., :50257], atol=1e-4, rtol=1e-4)
    capsys.readouterr()  # transformers' loading bars
    status, _, err = run_stage("train_gpt2", [*base, "--max-steps", "4"], monkeypatch, capsys)  # adamw: refused
    assert status == 2 and "--optimizer 'adamw' is not the 'muon' that" in err and len(err.splitlines()) == 1, err
    with pytest.raises(UserError, match="optimizer 'sgd'"):
        train_gpt2.parse_config(["--optimizer", "sgd"])


def test_the_trainers_step_runs_muon_at_its_multiple_of_the_schedule(shakespeare_shards: Path, tmp_path: Path) -> None:
    config = train_gpt2.parse_config(["--data-dir", str(shakespeare_shards), "--log-dir", str(tmp_path / "log"),
                                      *SMALL, "--total-batch-size", "128", "--max-steps", "4", "--optimizer", "muon",
                                      "--max-lr", "1e-3", "--muon-lr", "0.02"])
    trainer = train_gpt2.Trainer(config, train_gpt2.Distributed(0, 0, 1, torch.device("cpu")))
    _, _, lr = trainer.train_step()
    assert {group["lr"] for group in trainer.optimizer.adamw.param_groups} == {lr}
    assert [group["lr"] for group in trainer.optimizer.muon.param_groups] == pytest.approx([20 * lr] * 2)
