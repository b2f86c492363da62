"""What resuming refuses, keeps and sets aside (core/resume.py, core/training.py): a run's identity (its
model, tokenizer, corpus, data) is checked, a refusal changes no file, the checkpoints after the one
resumed are set aside rather than resumed later or pruned over new ones, and what a segment changes is
said and recorded. The bitwise resume itself is tested in test_train.py."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import fineweb
from core.checkpoint import save_checkpoint
from core.config import TrainConfig
from core.resume import prune_checkpoints
from core.runlog import read_records
from core.shards import list_shards, read_shard_info, write_shard
from model import GPT, GPTConfig
from tests.stages import SMALL, run_stage, snapshot
from tests.story_cloze_files import story_cloze_args


@pytest.fixture
def trained(shakespeare_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture):
    """A function training the small model on tiny Shakespeare into tmp_path/log: (status, stdout, stderr)."""
    def train(*args: str, data: Path = shakespeare_shards) -> tuple[int, str, str]:
        argv = ["--data-dir", str(data), "--log-dir", str(tmp_path / "log"), *SMALL, "--total-batch-size", "128",
                *args]
        return run_stage("train_gpt2", argv, monkeypatch, capsys)
    return train


def checkpoints(log_dir: Path) -> list[str]:
    return sorted(path.name for path in (log_dir / "checkpoints").iterdir())


def train_steps(log_dir: Path) -> list[int]:
    return [r["step"] for r in read_records(log_dir / "metrics.jsonl")[0] if r["kind"] == "train"]


def test_when_no_checkpoint_can_be_read_resume_refuses_and_changes_nothing(trained, tmp_path: Path) -> None:
    """#21 case 1: a rerun restarted at step 0, cut metrics.jsonl, and pruning deleted its own new checkpoint."""
    log_dir = tmp_path / "log"
    assert trained("--max-steps", "3", "--checkpoint-interval", "1", "--keep-checkpoints", "2")[0] == 0
    for name in checkpoints(log_dir):
        weights = log_dir / "checkpoints" / name / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    before = snapshot(log_dir)
    status, _, err = trained("--max-steps", "2", "--checkpoint-interval", "1", "--keep-checkpoints", "2")
    assert status == 2
    assert len(err.splitlines()) == 1 and "none of the 2 checkpoint(s)" in err and "nothing was changed" in err
    assert snapshot(log_dir) == before


def test_pruning_never_deletes_the_checkpoint_just_written(tmp_path: Path) -> None:
    model = GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=1, n_embd=8))
    for step in (2, 12, 13):
        save_checkpoint(tmp_path / "checkpoints" / f"step_{step:06d}", model, "gpt2")
    prune_checkpoints(tmp_path, keep=2, written=tmp_path / "checkpoints" / "step_000002")
    assert checkpoints(tmp_path) == ["step_000002", "step_000013"]


def test_resuming_an_earlier_checkpoint_sets_the_later_ones_aside(trained, tmp_path: Path) -> None:
    """Checkpoints after the one resumed belong to steps the run redoes: left in place, `--resume auto`
    would later pick the stale newest one, and pruning would keep it over the new ones."""
    log_dir = tmp_path / "log"
    assert trained("--max-steps", "4", "--checkpoint-interval", "1", "--keep-checkpoints", "0")[0] == 0
    status, out, err = trained("--max-steps", "3", "--checkpoint-interval", "1", "--keep-checkpoints", "2",
                               "--resume", str(log_dir / "checkpoints" / "step_000002"))
    assert status == 0, err
    assert "step_000004 is after step 2, which this run resumes from: set aside as step_000004.set_aside" in out
    assert checkpoints(log_dir) == ["step_000002", "step_000003", "step_000003.set_aside", "step_000004.set_aside"]
    assert train_steps(log_dir) == [0, 1, 2]
    status, out, err = trained("--max-steps", "4", "--checkpoint-interval", "1", "--keep-checkpoints", "2")
    assert status == 0, err
    assert "at step 3" in out and train_steps(log_dir) == [0, 1, 2, 3]
    assert checkpoints(log_dir) == ["step_000003", "step_000003.set_aside", "step_000004", "step_000004.set_aside"]


def test_resuming_on_shards_of_another_tokenizer_is_refused(shakespeare_shards: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """#21 case 2: a cl100k_base run resumed on gpt2 shards trained on, and its checkpoint then said gpt2."""
    (tmp_path / "zh.txt").write_text("维基百科是一个自由的百科全书。" * 100)
    fineweb.main(["--input", str(tmp_path / "zh.txt"), "--out", str(tmp_path / "zh"), "--tokenizer", "cl100k_base",
                  "--val-tokens", "0", "--workers", "1"])
    argv = ["--log-dir", str(tmp_path / "log"), *SMALL, "--total-batch-size", "128", "--max-steps", "1"]
    assert run_stage("train_gpt2", ["--data-dir", str(tmp_path / "zh"), *argv], monkeypatch, capsys)[0] == 0
    before = snapshot(tmp_path / "log")
    status, _, err = run_stage("train_gpt2", ["--data-dir", str(shakespeare_shards), *argv, "--max-steps", "2"],
                               monkeypatch, capsys)
    assert status == 2 and len(err.splitlines()) == 1
    assert "was trained on cl100k_base tokens but the shards in" in err and "are gpt2" in err
    assert snapshot(tmp_path / "log") == before


@pytest.mark.parametrize("change, message", [
    (["--n-layer", "3"], "--n-layer 3 is not the 2 that"),
    (["--n-embd", "64"], "--n-embd 64 is not the 32 that"),
    (["--optimizer", "muon"], "--optimizer 'muon' is not the 'adamw' that"),
    (["--max-steps", "1"], "is at step 2, past --max-steps 1: raise --max-steps"),
    ("another corpus", "holds another corpus (1 train shard(s), 4,000 tokens) than the {shards} shard(s), {tokens:,} "
                       "tokens that"),
])
def test_resuming_with_another_model_or_corpus_is_refused_and_changes_nothing(trained, shakespeare_shards: Path,
                                                                                tmp_path: Path, change: list[str] | str,
                                                                                message: str) -> None:
    """#21 case 3: a 12 x 768 command line trained the 2 x 32 checkpoint and recorded 12 and 768; another
    corpus and a max_steps behind the checkpoint went unremarked."""
    log_dir = tmp_path / "log"
    assert trained("--max-steps", "2")[0] == 0
    before = snapshot(log_dir)
    if change == "another corpus":
        other = tmp_path / "other"
        other.mkdir()
        write_shard(other / "other_train_000000.bin", np.arange(4000) % 50257, "gpt2", 50257)
        status, _, err = trained("--max-steps", "3", data=other)
    else:
        status, _, err = trained("--max-steps", "3", *change)
    assert status == 2 and len(err.splitlines()) == 1, err
    shards = [read_shard_info(path) for path in list_shards(shakespeare_shards, "train")]
    assert message.format(shards=len(shards), tokens=sum(info.num_tokens for info in shards)) in err
    assert snapshot(log_dir) == before


def test_what_a_resumed_segment_changes_is_said_and_recorded(trained, shakespeare_shards: Path,
                                                             tmp_path: Path) -> None:
    """Settings that may change between segments (lr, steps, the data's folder if it holds the same
    shards) are taken, named in one line, and config.toml records what the new segment uses."""
    log_dir = tmp_path / "log"
    assert trained("--max-steps", "2")[0] == 0
    moved = tmp_path / "moved"
    shutil.copytree(shakespeare_shards, moved)
    status, out, err = trained("--max-steps", "3", "--max-lr", "2e-3", data=moved)
    assert status == 0, err
    [line] = [line for line in out.splitlines() if line.startswith("resuming with changed settings")]
    assert f"data_dir '{shakespeare_shards}' -> '{moved}'" in line
    assert "max_steps 2 -> 3" in line and "max_lr 0.001 -> 0.002" in line
    recorded = TrainConfig.read_toml(log_dir / "config.toml")
    assert recorded["max_lr"] == 2e-3 and recorded["data_dir"] == str(moved) and recorded["n_layer"] == 2
    assert train_steps(log_dir) == [0, 1, 2]


def test_finetune_mc_never_overwrites_another_runs_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    """#21 case 6: a second experiment in the same log_dir replaced the first one's best/ with a worse one."""
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "pretrained", GPT(GPTConfig(block_size=128, vocab_size=50257, n_layer=1, n_head=2,
                                                           n_embd=16)), "gpt2")

    def finetune(**changes: object) -> tuple[int, str, str]:
        settings = {"max_train_examples": 24, "val_examples": 8, "max_test_examples": 8, "epochs": 1,
                    "batch_size": 8, "micro_batch_size": 8, "zero_shot": "false", **changes}
        args = story_cloze_args(tmp_path, tmp_path / "log", tmp_path / "pretrained", 30, 8, **settings)
        return run_stage("finetune_mc", args, monkeypatch, capsys)

    assert finetune()[0] == 0
    best = snapshot(tmp_path / "log" / "best")
    status, _, err = finetune(split_seed=7, epochs=2)  # another val split: its accuracy is not comparable
    assert status == 2 and len(err.splitlines()) == 1
    assert "--split-seed 7 is not the 42 that" in err
    shutil.rmtree(tmp_path / "log" / "checkpoints")
    status, _, err = finetune(epochs=2)
    assert status == 2 and "holds the result of an earlier run (best/) and no checkpoint to resume" in err
    assert snapshot(tmp_path / "log" / "best") == best
