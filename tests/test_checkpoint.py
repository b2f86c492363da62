"""core/checkpoint.py: what a checkpoint's meta.json must hold, the wrapped layouts its weights may come
in, and a crash half-way through replacing one."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from core.checkpoint import is_checkpoint, read_meta, save_checkpoint
from core.errors import UserError
from core.pretrained import load_model
from core.weights import our_layout
from model import GPT, GPTConfig
from tests.weights import redraw_weights

CONFIG = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=16)


def small_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return redraw_weights(GPT(CONFIG))


def assert_same_weights(model: GPT, reference: GPT) -> None:
    ours, theirs = model.state_dict(), reference.state_dict()
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert torch.equal(ours[key], theirs[key]), key


@pytest.fixture
def checkpoint(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "ckpt", small_model(), "gpt2", step=1)


def edit_meta(folder: Path, **changes: object) -> None:
    meta = json.loads((folder / "meta.json").read_text())
    for key, value in changes.items():
        if value is None:
            meta.pop(key)
        else:
            meta[key] = value
    (folder / "meta.json").write_text(json.dumps(meta))


def test_meta_json_holds_the_format_config_and_tokenizer(checkpoint: Path) -> None:
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta == {"format": "gpt2-toolkit-checkpoint", "version": 1, "config": CONFIG.to_dict(),
                    "tokenizer": "gpt2", "step": 1}
    assert read_meta(checkpoint) == meta


@pytest.mark.parametrize(("change", "message"), [
    (dict(format="nanogpt"), r"meta\.json is not a gpt2-toolkit-checkpoint file \(format: 'nanogpt'\)"),
    (dict(format=None), r"meta\.json is not a gpt2-toolkit-checkpoint file \(format: None\)"),
    (dict(version=2), r"meta\.json has version 2; this code reads up to 1: update it"),
    (dict(tokenizer=None), r"meta\.json lacks the name of its tokenizer"),
    (dict(tokenizer=50257), r"meta\.json lacks the name of its tokenizer"),
    (dict(config=None), r"meta\.json is not a checkpoint's meta\.json: expected an object with a 'config' object"),
    (dict(config=[1, 2]), r"expected an object with a 'config' object"),
], ids=["other-format", "no-format", "newer-version", "no-tokenizer", "tokenizer-not-a-name", "no-config",
        "config-not-an-object"])
def test_read_meta_refuses_what_is_not_our_meta(checkpoint: Path, change: dict, message: str) -> None:
    edit_meta(checkpoint, **change)
    with pytest.raises(UserError, match=message):
        read_meta(checkpoint)
    with pytest.raises(UserError, match=message):
        load_model(str(checkpoint))


@pytest.mark.parametrize(("text", "message"), [
    ("{not json", r"cannot read .*meta\.json: Expecting property name"),
    ("[1, 2]", r"is not a checkpoint's meta\.json"),
])
def test_read_meta_refuses_files_that_are_not_json_objects(checkpoint: Path, text: str, message: str) -> None:
    (checkpoint / "meta.json").write_text(text)
    with pytest.raises(UserError, match=message):
        load_model(str(checkpoint))


def test_unknown_config_keys_are_refused_by_name(checkpoint: Path) -> None:
    edit_meta(checkpoint, config={**CONFIG.to_dict(), "rotary": True, "n_kv_head": 1})
    with pytest.raises(UserError, match=re.escape("model config: unknown keys ['n_kv_head', 'rotary']")):
        load_model(str(checkpoint))


def test_a_ddp_module_prefix_on_every_tensor_is_accepted(checkpoint: Path) -> None:
    # What saving a DistributedDataParallel wrapper's state_dict gives: `module.` before every key.
    weights = load_file(checkpoint / "model.safetensors")
    save_file({f"module.{key}": value for key, value in weights.items()}, checkpoint / "model.safetensors")
    assert all(key.startswith("module.transformer.") for key in load_file(checkpoint / "model.safetensors"))
    loaded, _ = load_model(str(checkpoint))
    assert_same_weights(loaded, small_model())
    state_dict = {f"module.{key}": value for key, value in small_model(seed=5).state_dict().items()}
    assert_same_weights(GPT.from_state_dict(CONFIG, our_layout(state_dict)), small_model(seed=5))
    # DDP around a compiled model, as nanoGPT and build-nanogpt wrap it: both prefixes, DDP's outside.
    state_dict = {f"module._orig_mod.{key}": value for key, value in small_model(seed=5).state_dict().items()}
    assert_same_weights(GPT.from_state_dict(CONFIG, our_layout(state_dict)), small_model(seed=5))


def crash_on_the_second_rename(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replacing a checkpoint renames the old folder away, then the staged one in: make the process
    die, as far as the files can tell, between the two."""
    real_rename = Path.rename

    def rename(self: Path, target: Path) -> Path:
        if self.name == ".ckpt.tmp":
            raise OSError("simulated crash: the process died before the new folder took the name")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)


def test_a_crash_between_the_two_renames_keeps_the_old_checkpoint(checkpoint: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    crash_on_the_second_rename(monkeypatch)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(checkpoint, small_model(seed=1), "gpt2", step=2)
    monkeypatch.undo()
    assert not checkpoint.exists()  # as the crash left it: the old folder retired, the new one staged
    assert sorted(path.name for path in checkpoint.parent.iterdir()) == [".ckpt.old", ".ckpt.tmp"]
    assert not is_checkpoint(checkpoint)  # a question, which renames nothing
    assert sorted(path.name for path in checkpoint.parent.iterdir()) == [".ckpt.old", ".ckpt.tmp"]

    model, tokenizer = load_model(str(checkpoint))  # the old checkpoint, back under its name
    assert tokenizer.name == "gpt2" and read_meta(checkpoint)["step"] == 1
    assert_same_weights(model, small_model(seed=0))

    save_checkpoint(checkpoint, small_model(seed=1), "gpt2", step=2)  # the next save goes through
    loaded, _ = load_model(str(checkpoint))
    assert read_meta(checkpoint)["step"] == 2
    assert_same_weights(loaded, small_model(seed=1))
    assert sorted(path.name for path in checkpoint.parent.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_weight_files_get_the_mode_of_every_other_output(umask: int, tmp_path: Path) -> None:
    """safetensors writes 0600 whatever the umask; ours follow the umask, as the JSON and the .pt beside them."""
    from core.hf import export_hf

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
    previous = os.umask(umask)
    try:
        folder = save_checkpoint(tmp_path / "checkpoint", model, "gpt2", trainer_state={"step": 1},
                                 extra_weights={"classifier.safetensors": {"w": torch.zeros(2)}})
        exported = export_hf(model, tmp_path / "hf")
    finally:
        os.umask(previous)
    files = [folder / "model.safetensors", folder / "classifier.safetensors", folder / "meta.json",
             folder / "trainer_state.pt", exported / "model.safetensors", exported / "config.json"]
    assert {path.name: oct(path.stat().st_mode & 0o777) for path in files} == {
        path.name: oct(0o666 & ~umask) for path in files}
