"""Bad input to every stage, as a table: each one ends the stage with status 2, exactly one line on
stderr that names the file or the setting, no traceback, and no file of the workspace changed (the
outputs of earlier runs included). Each stage runs in this process (tests/stages.py), so the table is
cheap; the stages' own tests cover their refusals in depth."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import train_gpt2
from core.checkpoint import save_checkpoint
from core.shards import list_shards
from model import GPT, GPTConfig
from tests.core_files import make_bundle
from tests.stages import SMALL, run_stage, snapshot


@pytest.fixture(scope="module")
def workspace(shakespeare_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Outputs of earlier runs and bad files: a trained run, a model, an HF export, shards, a bundle."""
    root = tmp_path_factory.mktemp("workspace")
    shutil.copytree(shakespeare_shards, root / "shards")
    (root / "val_only").mkdir()
    for path in list_shards(shakespeare_shards, "val"):
        shutil.copy(path, root / "val_only" / path.name)
    train_gpt2.main(["--data-dir", str(root / "shards"), "--log-dir", str(root / "run"), *SMALL,
                     "--total-batch-size", "128", "--max-steps", "2"])
    torch.manual_seed(0)
    save_checkpoint(root / "model", GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)),
                    "gpt2")
    (root / "exported").mkdir()
    (root / "exported" / "notes.txt").write_text("someone's notes\n")
    make_bundle(root / "bundle")
    (root / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    (root / "notes.md").write_text("# notes\n")
    (root / "bad.toml").write_text("max_lr = = 3\n")
    (root / "typo.toml").write_text("max_lrr = 3e-4\n")
    (root / "bad.jsonl").write_text('{"ctx": "fine"}\nnot json\n')
    (root / "stories.csv").write_text("InputStoryid,InputSentence1\nid1,only one sentence\n")
    (root / "plots").mkdir()
    (root / "plots" / "metrics.jsonl").write_text('{"kind": "train", "step": 0, "loss": 1.0}\nnot a record\n'
                                                  '{"kind": "train", "step": 1, "loss": 0.9}\n')
    return root


def cases() -> list[tuple[str, str, list[str], str]]:
    """(id, stage, arguments with {w} for the workspace, a part of the one stderr line)."""
    model, run = "{w}/model", ["--data-dir", "{w}/shards", "--log-dir", "{w}/run", *SMALL, "--total-batch-size", "128"]
    return [
        # fineweb.py
        ("fineweb-prefix-path", "fineweb", ["--input", "{w}/latin1.txt", "--out", "{w}/new", "--prefix", "a/b"],
         "'a/b' is not a shard name prefix"),
        ("fineweb-missing-input", "fineweb", ["--input", "{w}/missing.jsonl", "--out", "{w}/new"],
         "missing.jsonl: no such file or folder"),
        ("fineweb-unsupported-file", "fineweb", ["--input", "{w}/notes.md", "--out", "{w}/new"],
         "notes.md: unsupported file type"),
        ("fineweb-not-utf8", "fineweb", ["--input", "{w}/latin1.txt", "--out", "{w}/new"], "is not UTF-8 text"),
        ("fineweb-out-is-a-file", "fineweb", ["--input", "{w}/bad.jsonl", "--out", "{w}/bad.toml"],
         "bad.toml is a file, not a folder"),
        ("fineweb-out-holds-another-corpus", "fineweb", ["--input", "{w}/bad.jsonl", "--out", "{w}/shards"],
         "shards already holds"),
        ("fineweb-zero-shard-size", "fineweb", ["--input", "{w}/bad.jsonl", "--shard-size", "0"],
         "--shard-size: must be at least 1"),
        ("fineweb-bad-number", "fineweb", ["--input", "{w}/bad.jsonl", "--val-tokens", "lots"],
         "--val-tokens: not a number: 'lots'"),
        ("fineweb-unknown-tokenizer", "fineweb", ["--input", "{w}/bad.jsonl", "--tokenizer", "llama"],
         "--tokenizer: invalid choice: 'llama'"),
        ("fineweb-abbreviated-flag", "fineweb", ["--inp", "{w}/bad.jsonl"], "unrecognized arguments: --inp"),
        # train_gpt2.py
        ("train-no-data", "train_gpt2", ["--data-dir", "{w}/nowhere", "--log-dir", "{w}/new"],
         "data_dir {w}/nowhere does not exist"),
        ("train-only-val-shards", "train_gpt2", ["--data-dir", "{w}/val_only", "--log-dir", "{w}/new"],
         "only val shards: the whole corpus went to val"),
        ("train-negative-lr", "train_gpt2", [*run, "--max-lr", "-1"], "max_lr must be positive"),
        ("train-missing-config", "train_gpt2", [*run, "--config", "{w}/missing.toml"], "cannot read config"),
        ("train-invalid-toml", "train_gpt2", [*run, "--config", "{w}/bad.toml"], "bad.toml is not valid TOML"),
        ("train-unknown-key", "train_gpt2", [*run, "--config", "{w}/typo.toml"],
         "unknown key 'max_lrr'; did you mean 'max_lr'?"),
        ("train-not-a-number", "train_gpt2", [*run, "--n-layer", "two"], "--n-layer: n_layer must be an int"),
        ("train-abbreviated-flag", "train_gpt2", [*run, "--data", "{w}/shards"], "unknown key 'data'"),
        ("train-resume-another-shape", "train_gpt2", [*run, "--n-layer", "3", "--max-steps", "3"],
         "--n-layer 3 is not the 2 that"),
        ("train-resume-behind", "train_gpt2", [*run, "--max-steps", "1"], "past --max-steps 1"),
        ("train-resume-missing", "train_gpt2", [*run, "--resume", "{w}/nowhere"], "no such checkpoint folder"),
        ("train-float16", "train_gpt2", [*run, "--dtype", "float16"], "float16 would need loss scaling"),
        ("train-unknown-optimizer", "train_gpt2", [*run, "--optimizer", "sgd"], "optimizer 'sgd': choose one of"),
        # sample.py
        ("sample-no-model", "sample", ["-m", "{w}/nowhere", "Hello"], "no such checkpoint file or folder"),
        ("sample-not-utf8-prompt", "sample", ["-m", model, "--prompt-file", "{w}/latin1.txt"], "is not UTF-8 text"),
        ("sample-missing-prompt-file", "sample", ["-m", model, "--prompt-file", "{w}/missing.txt"],
         "cannot read --prompt-file"),
        ("sample-two-prompts", "sample", ["-m", model, "--prompt-file", "{w}/notes.md", "Hello"],
         "not both"),
        # hellaswag.py
        ("hellaswag-missing-data", "hellaswag", ["-m", model, "--data", "{w}/missing.jsonl"], "missing.jsonl"),
        ("hellaswag-bad-record", "hellaswag", ["-m", model, "--data", "{w}/bad.jsonl"], "bad.jsonl, line 1"),
        ("hellaswag-output-over-its-data", "hellaswag", ["-m", model, "--data", "{w}/bad.jsonl", "--output",
                                                         "{w}/bad.jsonl"], "would write over this command's input"),
        ("hellaswag-not-a-checkpoint", "hellaswag", ["-m", "{w}/shards", "--data", "{w}/bad.jsonl"],
         "is neither one of our checkpoints"),
        # evaluate.py
        ("evaluate-missing-bundle", "evaluate", ["-m", model, "--bundle", "{w}/nowhere"], "--bundle"),
        ("evaluate-unknown-task", "evaluate", ["-m", model, "--bundle", "{w}/bundle", "--tasks", "nope"], "nope"),
        ("evaluate-output-into-the-bundle", "evaluate", ["-m", model, "--bundle", "{w}/bundle", "--output",
                                                          "{w}/bundle/core.yaml"], "would write over"),
        ("evaluate-abbreviated-flag", "evaluate", ["-m", model, "--bund", "{w}/bundle"],
         "unrecognized arguments: --bund"),
        # finetune_mc.py
        ("finetune-no-train-data", "finetune_mc", ["--init-from", model], "train_data is not set"),
        ("finetune-missing-train-data", "finetune_mc", ["--train-data", "{w}/missing.csv", "--init-from", model],
         "missing.csv"),
        ("finetune-bad-csv", "finetune_mc", ["--train-data", "{w}/stories.csv", "--init-from", model],
         "stories.csv"),
        ("finetune-bad-markers", "finetune_mc", ["--train-data", "{w}/stories.csv", "--markers", "start"],
         "markers must be 'new'"),
        # export_hf.py
        ("export-no-model", "export_hf", ["{w}/nowhere", "{w}/new"], "no such checkpoint file or folder"),
        ("export-into-its-source", "export_hf", [model, model, "--force"], "holds the model being exported"),
        ("export-into-a-used-folder", "export_hf", [model, "{w}/exported"], "is not empty; pass --force"),
        # plot.py
        ("plot-no-run", "plot", ["{w}/nowhere"], "nowhere"),
        ("plot-over-its-metrics", "plot", ["{w}/plots", "--out", "{w}/plots/metrics.jsonl"], "would write over"),
        ("plot-bad-record", "plot", ["{w}/plots"], "metrics.jsonl:2: not a metrics record"),
    ]


@pytest.mark.parametrize("stage, args, message", [case[1:] for case in cases()], ids=[case[0] for case in cases()])
def test_bad_input_is_one_line_and_changes_nothing(workspace: Path, stage: str, args: list[str], message: str,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(workspace)  # outputs with default paths land in the workspace, and would be seen
    before = snapshot(workspace)
    status, _, err = run_stage(stage, [arg.format(w=workspace) for arg in args], monkeypatch, capsys)
    assert status == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert err.startswith(f"{stage}.py: error: ") and message.format(w=workspace) in err, err
    assert snapshot(workspace) == before


def test_the_table_covers_every_stage_thirty_times_over() -> None:
    stages = [case[1] for case in cases()]
    assert len(stages) >= 30 and len({case[0] for case in cases()}) == len(stages)
    scripts = {"fineweb", "train_gpt2", "sample", "hellaswag", "evaluate", "finetune_mc", "export_hf", "plot"}
    assert set(stages) == scripts
