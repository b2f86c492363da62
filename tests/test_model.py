"""model.py and core/hf.py, checkpoint.py, pretrained.py against Hugging Face transformers as the reference."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import GPT2Config, GPT2LMHeadModel

from core import hf
from core.checkpoint import read_meta, save_checkpoint
from core.errors import UserError
from core.pretrained import load_model
from core.weights import our_layout
from model import GPT, GPTConfig, KVCache
from tests.data_paths import HF_TINY_GPT2
from tests.stages import HANG_GUARD_SECONDS
from tests.weights import redraw_weights

ROOT = Path(__file__).resolve().parents[1]
TOLERANCE = 1e-5
ODD_CONFIG = dict(vocab_size=101, n_positions=48, n_embd=60, n_layer=3, n_head=5, n_inner=72,
                  layer_norm_epsilon=1e-6)


def make_hf_model(**config: object) -> GPT2LMHeadModel:
    """A random HF model. Small ones get every parameter (biases and LayerNorm gains included)
    drawn with std 0.3 instead of GPT-2's 0.02, so that activations are O(1) and a wrong GELU,
    epsilon or scale shows in the logits well above the tolerance."""
    torch.manual_seed(1234)
    hf_config = GPT2Config(**config, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf_model = GPT2LMHeadModel(hf_config).eval()
    return redraw_weights(hf_model) if hf_config.n_embd < 768 else hf_model


def random_tokens(model_config: GPTConfig, batch: int, length: int | None = None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(7)
    return torch.randint(0, model_config.vocab_size, (batch, length or model_config.block_size), generator=generator)


def save_hf_layouts(hf_model: GPT2LMHeadModel, root: Path) -> list[Path]:
    """The same weights as save_pretrained's safetensors folder, as a pytorch_model.bin folder
    (tied lm_head included, as transformers 4 wrote it) and as the hub's old gpt2 file (no
    `transformer.` prefix, causal-mask buffers present)."""
    safetensors_dir = root / "safetensors"
    hf_model.save_pretrained(safetensors_dir)
    config_json = (safetensors_dir / "config.json").read_text()
    state_dict = {k: v.clone() for k, v in hf_model.state_dict().items()}
    bin_dir, hub_dir = root / "bin", root / "hub_layout"
    for folder in (bin_dir, hub_dir):
        folder.mkdir()
        (folder / "config.json").write_text(config_json)
    torch.save(state_dict, bin_dir / "pytorch_model.bin")
    n_positions = hf_model.config.n_positions
    hub_layout = {k.removeprefix("transformer."): v for k, v in state_dict.items() if k != "lm_head.weight"}
    for i in range(hf_model.config.n_layer):
        hub_layout[f"h.{i}.attn.bias"] = torch.tril(torch.ones(n_positions, n_positions)).view(1, 1, n_positions, -1)
        hub_layout[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    save_file(hub_layout, hub_dir / "model.safetensors")
    return [safetensors_dir, bin_dir, hub_dir]


# The shared model keeps GPT-2's small init, so its logits are small (|x| < 0.6) and GELU's inputs are near
# zero, where the exact-erf GELU and GPT-2's tanh approximation differ little: erf moves the logits by
# 2e-6 and the final hidden states by 1.7e-5, against 1e-7 and 6e-7 for our tanh GELU. Hence these
# tolerances, well between the two.
GOLDEN_LOGITS_TOLERANCE = 5e-7
GOLDEN_HIDDEN_TOLERANCE = 4e-6


def test_golden_logits_and_hidden_states_of_shared_tiny_model() -> None:
    folder = HF_TINY_GPT2
    golden = json.loads((folder / "golden.json").read_text())
    model, tokenizer = load_model(str(folder))
    assert model.config.n_inner == 64 and model.config.mlp_width == 64
    seen = {}
    model.transformer.h[0].register_forward_pre_hook(lambda module, args: seen.update(embed=args[0]))
    model.transformer.h[0].register_forward_hook(lambda module, args, output: seen.update(block0=output))
    idx = torch.tensor([golden["input_ids"]])
    with torch.no_grad():
        logits, _ = model(idx)
        hidden = model.hidden_states(idx)  # after ln_f
    expected = torch.tensor(golden["logits"]).view(golden["logits_shape"])
    assert logits.shape[1:] == expected.shape
    torch.testing.assert_close(logits[0], expected, atol=GOLDEN_LOGITS_TOLERANCE, rtol=0)
    for name, ours in (("embed", seen["embed"]), ("block0", seen["block0"]), ("lnf", hidden)):
        reference = torch.tensor(golden[f"hidden_after_{name}"]).view(golden["hidden_shape"])
        torch.testing.assert_close(ours[0], reference, atol=GOLDEN_HIDDEN_TOLERANCE, rtol=0, msg=name)
    assert tokenizer.name == "gpt2"


def test_from_pretrained_gives_the_golden_logits() -> None:
    golden = json.loads((HF_TINY_GPT2 / "golden.json").read_text())
    model = GPT.from_pretrained(str(HF_TINY_GPT2))
    assert not model.training
    logits, _ = model(torch.tensor([golden["input_ids"]]))
    expected = torch.tensor(golden["logits"]).view(golden["logits_shape"])
    torch.testing.assert_close(logits[0], expected, atol=GOLDEN_LOGITS_TOLERANCE, rtol=0)


def test_from_pretrained_with_a_mistyped_path_fails_in_one_line(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "log").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no such checkpoint file or folder") as raised:
        GPT.from_pretrained("log/modle_19072")
    assert "\n" not in str(raised.value)
    result = subprocess.run([sys.executable, str(ROOT / "sample.py"), "-m", "log/modle_19072", "--device", "cpu"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert result.returncode == 2
    expected = "sample.py: error: 'log/modle_19072': no such checkpoint file or folder"
    assert result.stderr.strip().splitlines() == [expected]


@pytest.mark.parametrize("hf_config", [dict(), ODD_CONFIG], ids=["gpt2-124M", "odd"])
def test_logits_match_hf_in_every_saved_layout(hf_config: dict, tmp_path: Path) -> None:
    hf_model = make_hf_model(**hf_config)
    folders = save_hf_layouts(hf_model, tmp_path)
    idx = random_tokens(hf.config_from_hf(hf_model.config.to_dict()), batch=2)
    with torch.no_grad():
        expected = hf_model(idx).logits
    del hf_model
    for folder in folders:
        model, _ = load_model(str(folder))
        with torch.no_grad():
            logits, _ = model(idx)
        torch.testing.assert_close(logits, expected, atol=TOLERANCE, rtol=0, msg=f"layout {folder.name}")


def test_export_round_trip(tmp_path: Path) -> None:
    hf_model = make_hf_model(**ODD_CONFIG)
    hf_model.save_pretrained(tmp_path / "original")
    ours, _ = load_model(str(tmp_path / "original"))
    hf.export_hf(ours, tmp_path / "exported")
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path / "exported").eval()
    idx = random_tokens(ours.config, batch=3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, ours(idx)[0], atol=TOLERANCE, rtol=0)
    original = load_file(tmp_path / "original" / "model.safetensors")
    exported = load_file(tmp_path / "exported" / "model.safetensors")
    assert exported.keys() == original.keys()
    for key in original:
        assert torch.equal(exported[key], original[key]), key


def test_export_of_padded_vocab_model_drops_padding(tmp_path: Path) -> None:
    config = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=32, vocab_multiple=64)
    model = GPT(config).eval()
    assert model.transformer.wte.weight.shape[0] == 128
    idx = random_tokens(config, batch=2)
    logits, _ = model(idx)
    assert logits.shape == (2, 32, 128) and bool((logits[..., 100:] == float("-inf")).all())
    hf.export_hf(model, tmp_path)
    reloaded = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(idx).logits, logits[..., :100], atol=TOLERANCE, rtol=0)


def test_checkpoint_round_trip_keeps_logits_and_metadata(tmp_path: Path) -> None:
    config = GPTConfig(block_size=16, vocab_size=300, n_layer=2, n_head=4, n_embd=32, n_inner=40, vocab_multiple=64)
    model = GPT(config).eval()
    save_checkpoint(tmp_path / "ckpt", model, tokenizer="cl100k_base", step=17)
    save_checkpoint(tmp_path / "ckpt", model, tokenizer="cl100k_base", step=18)  # overwrite in place
    loaded, tokenizer = load_model(str(tmp_path / "ckpt"))
    meta = read_meta(tmp_path / "ckpt")
    assert meta["step"] == 18 and meta["tokenizer"] == tokenizer.name == "cl100k_base"
    assert loaded.config == config
    assert loaded.lm_head.weight is loaded.transformer.wte.weight
    idx = random_tokens(config, batch=2)
    assert torch.equal(loaded(idx)[0], model(idx)[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no staging folders left


def test_kv_cache_decoding_matches_full_forward() -> None:
    config = GPTConfig(block_size=64, vocab_size=97, n_layer=3, n_head=4, n_embd=48)
    model = redraw_weights(GPT(config))
    idx = random_tokens(config, batch=3, length=28)
    prompt_len = 8
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(config, batch_size=3, max_len=28)
        steps = [model(idx[:, :prompt_len], kv_cache=cache)[0]]
        for t in range(prompt_len, 28):  # 20 tokens, one at a time
            steps.append(model(idx[:, t : t + 1], kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=TOLERANCE, rtol=0)
    assert cache.pos == 28


def test_kv_cache_chunked_prefill_matches_full_forward() -> None:
    config = GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=16)
    model = redraw_weights(GPT(config))
    idx = random_tokens(config, batch=2, length=20)
    with torch.no_grad():
        full, _ = model(idx)
        cache = KVCache(config, batch_size=2, max_len=20)
        chunks = [model(idx[:, a:b], kv_cache=cache)[0] for a, b in ((0, 7), (7, 15), (15, 20))]
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=TOLERANCE, rtol=0)


def test_loss_is_cross_entropy_over_real_vocab_ignoring_minus_one() -> None:
    config = GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=8, vocab_multiple=64)
    model = GPT(config)
    idx = torch.tensor([[1, 2, 3, 4]])
    targets = torch.tensor([[2, 3, -1, 5]])
    logits, no_loss = model(idx)
    no_logits, loss = model(idx, targets)
    assert logits.shape == (1, 4, 64) and no_loss is None and no_logits is None
    assert bool((logits[..., 10:] == float("-inf")).all())  # the padded ids
    log_probs = logits[0, :, :10].log_softmax(-1)  # over the 10 real tokens only
    by_hand = -(log_probs[0, 2] + log_probs[1, 3] + log_probs[3, 5]) / 3
    torch.testing.assert_close(loss, by_hand)


def test_init_follows_gpt2() -> None:
    config = GPTConfig(n_layer=8, n_head=4, n_embd=256, vocab_size=5000, block_size=128)
    model = GPT(config)
    residual_std = 0.02 / (2 * config.n_layer) ** 0.5
    assert model.transformer.h[0].attn.c_proj.weight.std().item() == pytest.approx(residual_std, rel=0.05)
    assert model.transformer.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.transformer.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.count_nonzero(model.transformer.h[0].attn.c_attn.bias) == 0


@pytest.fixture
def tiny_state_dict() -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    config = GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=8)
    return config, dict(GPT(config).state_dict())


def test_wrapper_prefixes_map_onto_our_layout(tiny_state_dict: tuple) -> None:
    config, state_dict = tiny_state_dict
    compiled = {f"_orig_mod.{k}": v for k, v in state_dict.items()}
    with pytest.raises(UserError, match=r"unexpected keys: _orig_mod\."):  # the model takes our layout alone
        GPT.from_state_dict(config, compiled)
    model = GPT.from_state_dict(config, our_layout(compiled))
    assert torch.equal(model.transformer.h[1].mlp.c_fc.weight, state_dict["transformer.h.1.mlp.c_fc.weight"])


@pytest.mark.parametrize("change, named", [
    (lambda sd: sd.pop("transformer.h.1.ln_2.bias"), "missing keys: transformer.h.1.ln_2.bias"),
    (lambda sd: sd.update({"transformer.h.0.attn.rotary": torch.zeros(2)}),
     "unexpected keys: transformer.h.0.attn.rotary"),
    (lambda sd: sd.update({"transformer.wpe.weight": torch.zeros(9, 8)}),
     "transformer.wpe.weight: expected [8, 8], got [9, 8]"),
    (lambda sd: sd.update({"lm_head.weight": torch.ones(20, 8)}), "untied output heads are not supported"),
], ids=["missing", "unexpected", "misshaped", "untied"])
def test_mismatched_state_dict_names_the_key(tiny_state_dict: tuple, change, named: str) -> None:
    config, state_dict = tiny_state_dict
    change(state_dict)
    with pytest.raises(UserError, match=re.escape(named)):
        GPT.from_state_dict(config, state_dict)


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (print, ("this pickle runs code",))


def save_as_pytorch_model_bin(hf_model: GPT2LMHeadModel, folder: Path, legacy_format: bool,
                              extra: dict | None = None) -> None:
    hf_model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    state_dict = {**hf_model.state_dict(), **(extra or {})}
    # torch's zip format (the default since torch 1.6), or the plain pickle of older files.
    torch.save(state_dict, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy_format)


@pytest.mark.parametrize("legacy_format", [False, True], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused(legacy_format: bool, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    save_as_pytorch_model_bin(make_hf_model(**ODD_CONFIG), tmp_path, legacy_format, extra={"evil": _RunsCode()})
    with pytest.raises(UserError, match=r"refusing to load .*pytorch_model\.bin"):
        load_model(str(tmp_path))
    assert "this pickle runs code" not in capsys.readouterr().out


def test_legacy_format_pickle_of_plain_tensors_loads(tmp_path: Path) -> None:
    hf_model = make_hf_model(**ODD_CONFIG)
    save_as_pytorch_model_bin(hf_model, tmp_path, legacy_format=True)
    idx = random_tokens(hf.config_from_hf(hf_model.config.to_dict()), batch=2)
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path))[0](idx)[0], hf_model(idx).logits, atol=TOLERANCE, rtol=0)


def test_sharded_safetensors_folder_loads(tmp_path: Path) -> None:
    hf_model = make_hf_model(**ODD_CONFIG)
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    idx = random_tokens(hf.config_from_hf(hf_model.config.to_dict()), batch=2)
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path))[0](idx)[0], hf_model(idx).logits, atol=TOLERANCE, rtol=0)


def test_export_keeps_the_tokenizer_name(tmp_path: Path) -> None:
    model = GPT(GPTConfig(block_size=8, vocab_size=100277, n_layer=1, n_head=1, n_embd=8))
    hf.export_hf(model, tmp_path, tokenizer="cl100k_base")
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == 100257
    assert load_model(str(tmp_path))[1].name == "cl100k_base"


def test_export_cli_writes_a_folder_hf_loads(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt", GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2,
                                                     n_embd=16)), tokenizer="gpt2")
    command = [sys.executable, str(ROOT / "export_hf.py"), str(tmp_path / "ckpt"), str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert result.returncode == 0, result.stderr
    assert GPT2LMHeadModel.from_pretrained(tmp_path / "out").config.n_positions == 16
    again = subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert again.returncode == 2 and "not empty; pass --force" in again.stderr
    (tmp_path / "out" / "notes.txt").write_text("mine")
    forced = subprocess.run([*command, "--force"], capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert forced.returncode == 0 and "wrote" in forced.stdout and "notes.txt" not in forced.stdout  # only its own


@pytest.mark.parametrize("into", ["itself", "inside"])
def test_export_never_writes_into_its_own_model(tmp_path: Path, into: str) -> None:
    checkpoint = tmp_path / "ckpt"
    save_checkpoint(checkpoint, GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)),
                    tokenizer="gpt2")
    before = {path.name: path.read_bytes() for path in checkpoint.iterdir()}
    out = checkpoint if into == "itself" else checkpoint / "hf"
    out.mkdir(exist_ok=True)
    command = [sys.executable, str(ROOT / "export_hf.py"), str(checkpoint), str(out), "--force"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS)
    assert result.returncode == 2 and len(result.stderr.splitlines()) == 1, result.stderr
    assert "holds the model being exported" in result.stderr
    assert {path.name: path.read_bytes() for path in checkpoint.iterdir() if path.is_file()} == before


def test_malformed_meta_json_is_a_clear_error(tmp_path: Path) -> None:
    save_checkpoint(tmp_path / "ckpt", GPT(GPTConfig(block_size=8, vocab_size=20, n_layer=1, n_head=1, n_embd=8)),
                    tokenizer="gpt2")
    (tmp_path / "ckpt" / "meta.json").write_text("[1, 2]")
    with pytest.raises(UserError, match=r"not a checkpoint's meta\.json"):
        load_model(str(tmp_path / "ckpt"))


@pytest.mark.parametrize("setting, message", [
    ({"activation_function": "relu"}, "activation_function 'relu' is not supported"),
    ({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse_layer_idx=True is not supported"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings=False is not supported"),
    ({"resid_pdrop": 0.1, "attn_pdrop": 0.0}, "differ"),
])
def test_hf_configs_that_change_the_math_are_refused(setting: dict, message: str) -> None:
    hf_config = GPT2Config(**{**ODD_CONFIG, **setting}).to_dict()
    with pytest.raises(UserError, match=message):
        hf.config_from_hf(hf_config)


def test_hub_name_offline_is_a_clear_error(no_network: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache: nothing to fall back on
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(UserError, match=r"Hugging Face hub at .* is unreachable.*pass a local folder"):
        load_model("gpt2")


def test_hub_cache_without_weights_is_not_taken_for_a_model(no_network: None, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    (tmp_path / "config.json").write_text("{}")  # what fetching only a tokenizer or config leaves behind
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *args, **kwargs: str(tmp_path))
    with pytest.raises(UserError, match="is unreachable"):  # it went on to download, not to load
        load_model("gpt2")


def test_unknown_spec_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="neither one of our checkpoints"):
        load_model(str(tmp_path))
    with pytest.raises(UserError, match="no such checkpoint file or folder"):
        load_model("./does/not/exist")
    (tmp_path / "log").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="no such checkpoint file or folder"):  # a typo, not a hub name
        load_model("log/model_19072")


# --- model.py as plain PyTorch -----------------------------------------------------------------------

PURE_CORE_MODULES = ["core", "core.cross_entropy", "core.errors"]  # a loss function and an exception type


def test_importing_the_model_loads_only_pure_core_modules() -> None:
    script = "import json, sys, model; print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'core')))"
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                            timeout=HANG_GUARD_SECONDS)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == PURE_CORE_MODULES


def test_a_forward_and_backward_pass_writes_no_file(tmp_path: Path) -> None:
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    cache.mkdir()
    script = """
import torch
from model import GPT, GPTConfig
model = GPT(GPTConfig(block_size=32, vocab_size=300, n_layer=2, n_head=2, n_embd=32, vocab_multiple=64))
idx = torch.randint(0, 300, (3, 32))
model(idx, idx)[1].backward()
with torch.no_grad():
    model(idx[:, :5])
    model(idx[:1, :1])
"""
    env = {**os.environ, "HOME": str(home), "GPT2_TOOLKIT_CACHE": str(cache), "XDG_CACHE_HOME": str(cache)}
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=HANG_GUARD_SECONDS)
    assert result.returncode == 0, result.stderr
    assert list(home.rglob("*")) == [] and list(cache.rglob("*")) == []


class MatmulShapes(TorchDispatchMode):
    """Records the output shape of every matrix product run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func: object, types: object, args: tuple = (), kwargs: dict | None = None) -> object:
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
            self.shapes.append(tuple(out.shape))
        return out


@pytest.mark.parametrize("device", ["meta", "cpu"])
def test_the_head_multiplies_by_the_whole_padded_width(device: str) -> None:
    """50,304 wide, as build-nanogpt's GPU recipe wants, in the logits and in the loss (on the meta device as
    CUDA runs it; on the CPU, in the chunked loss), forward and backward."""
    with torch.device(device):
        model = GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16, vocab_multiple=64))
        idx = torch.randint(0, 50257, (2, 64))
    recorder = MatmulShapes()
    with recorder:
        logits, _ = model(idx)
        _, loss = model(idx, idx)
        loss.backward()
    assert logits.shape == (2, 64, 50304)
    widths = {shape[-1] for shape in recorder.shapes}
    assert 50304 in widths and 50257 not in widths
    assert not any(shape[0] == 50257 for shape in recorder.shapes)  # nor the weight gradient's rows


@pytest.mark.parametrize("vocab_multiple", [1, 64])
def test_logits_and_loss_equal_hf_with_and_without_padding(vocab_multiple: int) -> None:
    hf_model = make_hf_model(vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=2)
    ours = GPT.from_state_dict(hf.config_from_hf(hf_model.config.to_dict()), hf.state_dict_from_hf(
        hf_model.state_dict())).with_settings(vocab_multiple, dropout=0.0).eval()
    assert ours.config.padded_vocab_size == (101 if vocab_multiple == 1 else 128)
    idx = random_tokens(ours.config, batch=2, length=20)
    with torch.no_grad():
        expected = hf_model(idx, labels=idx)
        logits, _ = ours(idx)
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(logits[..., :101], expected.logits, atol=TOLERANCE, rtol=0)
    assert bool((logits[..., 101:] == float("-inf")).all())
    torch.testing.assert_close(loss, expected.loss, atol=TOLERANCE, rtol=0)
