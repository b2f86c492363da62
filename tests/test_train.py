"""train_gpt2.py and its core pieces (config, optimizer, schedule, loader, checkpoints), each against an
independent reference: the formula by hand, a single-process run for DDP, an uninterrupted run for resume."""

from __future__ import annotations

import ast
import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import finetune_mc
import fineweb
import train_gpt2
from core.checkpoint import save_checkpoint
from core.config import FinetuneConfig, TrainConfig
from core.data import TokenLoader, ValSet
from core.errors import UserError
from core.optim import decay_groups
from core.runlog import read_records
from core.shards import list_shards, open_shard, write_shard
from model import GPT, GPTConfig
from tests.core_files import make_bundle
from tests.data_paths import HELLASWAG
from tests.stages import HANG_GUARD_SECONDS, SMALL, snapshot

ROOT = Path(__file__).resolve().parents[1]


def run_script(script: Path, *args: str, cwd: Path, env: dict | None = None,
               torchrun: int = 0) -> subprocess.CompletedProcess:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
    command = [*(launcher if torchrun else [sys.executable]), str(script), *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=HANG_GUARD_SECONDS,
                          env={**os.environ, **(env or {}), "PYTHONPATH": with_root_on_path()})


def with_root_on_path() -> str:
    """PYTHONPATH with the checkout first (for the launcher script), keeping conftest's network guard."""
    return os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])


def train(data: Path, log_dir: Path, *args: str, torchrun: int = 0, script: Path | None = None,
          cwd: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    result = run_script(script or ROOT / "train_gpt2.py", "--data-dir", str(data), "--log-dir", str(log_dir),
                        *SMALL, *args, cwd=cwd or log_dir.parent, torchrun=torchrun, env=env)
    return result


def records(log_dir: Path, kind: str) -> list[dict]:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if record["kind"] == kind]


def final_weights(log_dir: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(log_dir / "checkpoints" / f"step_{step:06d}" / "model.safetensors")


# -- schedule, optimizer groups, config ----------------------------------------------------------------

def test_learning_rate_follows_warmup_then_cosine() -> None:
    max_lr, min_lr, warmup, steps = 6e-4, 6e-5, 10, 110
    learning_rate = train_gpt2.cosine_learning_rate
    assert learning_rate(0, max_lr, min_lr, warmup, steps) == pytest.approx(6e-5)  # (0 + 1) / 10 of max
    assert learning_rate(9, max_lr, min_lr, warmup, steps) == pytest.approx(6e-4)  # end of warmup
    assert learning_rate(10, max_lr, min_lr, warmup, steps) == pytest.approx(6e-4)  # cos(0) = 1
    assert learning_rate(60, max_lr, min_lr, warmup, steps) == pytest.approx(3.3e-4)  # halfway: (max + min) / 2
    assert learning_rate(35, max_lr, min_lr, warmup, steps) == pytest.approx(
        6e-5 + 0.5 * (1 + math.cos(math.pi / 4)) * 5.4e-4)  # a quarter of the way
    assert learning_rate(110, max_lr, min_lr, warmup, steps) == pytest.approx(6e-5)
    assert learning_rate(500, max_lr, min_lr, warmup, steps) == pytest.approx(6e-5)


def test_weight_decay_applies_to_exactly_the_2d_parameters() -> None:
    model = GPT(GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=8))
    decay, no_decay = decay_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(param): name for name, param in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    expected = {"transformer.wte.weight", "transformer.wpe.weight"} | {
        f"transformer.h.{i}.{name}.weight" for i in range(2)
        for name in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert decayed == expected  # the tied head is the same tensor as wte: listed once
    assert {names[id(p)] for p in no_decay["params"]} == set(names.values()) - expected
    assert all(name.endswith(".bias") or ".ln_" in name for name in (names[id(p)] for p in no_decay["params"]))


def test_toml_and_flags_make_the_config(tmp_path: Path) -> None:
    config_file = tmp_path / "run.toml"
    config_file.write_text('max_lr = 1e-3\nn_layer = 6\nshuffle = true\ndata_dir = "somewhere"\n')
    config = train_gpt2.parse_config(["--config", str(config_file), "--n-layer", "8", "--compile", "false",
                                      "--total-batch-size", "1e6", "--micro-batch-size", "8", "--tensorboard"])
    assert (config.max_lr, config.n_layer, config.shuffle, config.data_dir) == (1e-3, 8, True, "somewhere")
    assert config.compile is False and config.tensorboard is True and config.total_batch_size == 1_000_000
    assert train_gpt2.parse_config([]) == TrainConfig()  # the defaults: build-nanogpt's recipe
    for shipped in sorted((ROOT / "configs").glob("*.toml")):  # every shipped config is valid settings,
        try:  # of train_gpt2.py's or of finetune_mc.py's
            TrainConfig.from_values(TrainConfig.read_toml(shipped))
        except UserError:
            FinetuneConfig.from_values(FinetuneConfig.read_toml(shipped))


@pytest.mark.parametrize(("argv", "toml", "message"), [
    (["--max-setps", "5"], None, "unknown key 'max_setps'; did you mean 'max_steps'?"),
    ([], "warmup_step = 5\n", "unknown key 'warmup_step'; did you mean 'warmup_steps'?"),
    (["--n-layer", "two"], None, "n_layer must be an int, got 'two'"),
    (["--seq-len", "2048"], None, "seq_len 2048 is longer than block_size 1024"),
    (["--dtype", "float16"], None, "float16 would need loss scaling"),
])
def test_bad_settings_fail_in_one_line(argv: list[str], toml: str | None, message: str, tmp_path: Path) -> None:
    if toml is not None:
        (tmp_path / "bad.toml").write_text(toml)
        argv = ["--config", str(tmp_path / "bad.toml"), *argv]
    with pytest.raises(UserError) as raised:
        train_gpt2.parse_config(argv)
    assert message in str(raised.value) and "\n" not in str(raised.value)


def test_impossible_runs_fail_at_start_in_one_line(shakespeare_shards: Path, tmp_path: Path) -> None:
    cl100k = tmp_path / "cl100k"
    (tmp_path / "text.txt").write_text("Some English text for a few tokens. " * 50)
    fineweb.main(["--input", str(tmp_path / "text.txt"), "--out", str(cl100k), "--tokenizer", "cl100k_base",
                  "--val-tokens", "0", "--workers", "1"])
    gpt2_model = tmp_path / "gpt2_model"
    save_checkpoint(gpt2_model, GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=1, n_head=2, n_embd=8)), "gpt2")
    cases = [
        (["--data-dir", str(shakespeare_shards), "--total-batch-size", "1000"],
         "total_batch_size 1,000 is not a multiple of micro_batch_size 4 x seq_len 32 x 1 process(es) = 128 tokens"),
        (["--data-dir", str(tmp_path / "nowhere")], "does not exist: make it with `python fineweb.py`"),
        (["--data-dir", str(cl100k), "--init-from", str(gpt2_model)],
         "uses the 'gpt2' tokenizer but the shards in"),
        (["--data-dir", str(shakespeare_shards), "--init-from", str(gpt2_model), "--seq-len", "48",
          "--total-batch-size", "192", "--block-size", "64"], "seq_len 48 is longer than the model's block_size 32"),
    ]
    for argv, message in cases:
        result = run_script(ROOT / "train_gpt2.py", *SMALL, "--log-dir", str(tmp_path / "log"), *argv, cwd=tmp_path)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0].startswith("train_gpt2.py: error: ") and message in lines[0]


# -- the loader --------------------------------------------------------------------------------------

@pytest.fixture
def numbered_shards(tmp_path: Path) -> Path:
    """Three train shards of 1000, 37 and 500 tokens whose ids count up, so every token says where it is from."""
    start = 0
    for index, size in enumerate([1000, 37, 500]):
        write_shard(tmp_path / f"num_train_{index:06d}.bin", np.arange(start, start + size) % 50000, "gpt2", 50257)
        start += size
    return tmp_path


def test_loader_covers_every_shard_to_its_last_whole_sequence(numbered_shards: Path) -> None:
    T = 10
    loader = TokenLoader(numbered_shards, "train", micro_batch=3, seq_len=T, tokenizer="gpt2")
    per_shard = [(1000 - 1) // T, (37 - 1) // T, (500 - 1) // T]  # 99, 3, 49 sequences of T + 1 tokens
    expected = [np.asarray(open_shard(path)[s * T: s * T + T + 1]) for path, n in
                zip(list_shards(numbered_shards, "train"), per_shard, strict=True) for s in range(n)]
    seen = []
    while len(seen) < 2 * len(expected):  # two epochs: the second starts over at the first shard
        x, y = loader.next_batch()
        assert x.dtype == torch.int64 and x.shape == (3, T)
        torch.testing.assert_close(x[:, 1:], y[:, :-1])
        seen += [np.concatenate([row_x[:1], row_y]) for row_x, row_y in zip(x.numpy(), y.numpy(), strict=True)]
    for i, sequence in enumerate(seen[: 2 * len(expected)]):
        np.testing.assert_array_equal(sequence, expected[i % len(expected)])
    assert loader.epoch == 2  # 101 batches of 3 read 303 sequences: the third epoch has begun


@pytest.mark.parametrize("shuffle", [False, True])
def test_loader_resumes_exactly_from_its_state(numbered_shards: Path, shuffle: bool) -> None:
    loader = TokenLoader(numbered_shards, "train", micro_batch=4, seq_len=8, tokenizer="gpt2", shuffle=shuffle, seed=3)
    for _ in range(45):  # then 50 more batches, across the end of the epoch (124 + 4 + 62 = 190 sequences)
        loader.next_batch()
    state = loader.state_dict()
    expected = [loader.next_batch()[0] for _ in range(50)]
    fresh = TokenLoader(numbered_shards, "train", micro_batch=4, seq_len=8, tokenizer="gpt2", shuffle=shuffle, seed=3)
    fresh.load_state_dict(state)
    for batch in expected:
        torch.testing.assert_close(fresh.next_batch()[0], batch, rtol=0, atol=0)


def test_shuffled_epochs_are_permutations_of_the_same_sequences(numbered_shards: Path) -> None:
    loader = TokenLoader(numbered_shards, "train", micro_batch=1, seq_len=8, tokenizer="gpt2", shuffle=True, seed=3)
    epochs = [[tuple(loader.next_batch()[0][0].tolist()) for _ in range(190)] for _ in range(2)]
    plain = TokenLoader(numbered_shards, "train", micro_batch=1, seq_len=8, tokenizer="gpt2")
    in_order = [tuple(plain.next_batch()[0][0].tolist()) for _ in range(190)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(in_order)
    assert epochs[0] != in_order and epochs[0] != epochs[1]


def test_ranks_read_disjoint_slices_of_the_one_process_stream(numbered_shards: Path) -> None:
    single = TokenLoader(numbered_shards, "train", micro_batch=6, seq_len=8, tokenizer="gpt2")
    ranks = [TokenLoader(numbered_shards, "train", micro_batch=3, seq_len=8, tokenizer="gpt2", rank=r, world_size=2)
             for r in range(2)]
    for _ in range(40):
        both = torch.cat([rank.next_batch()[0] for rank in ranks])
        torch.testing.assert_close(both, single.next_batch()[0], rtol=0, atol=0)


def test_val_set_is_fixed_by_val_tokens_alone(numbered_shards: Path) -> None:
    for index, path in enumerate(list_shards(numbered_shards, "train")):
        path.rename(numbered_shards / f"num_val_{index:06d}.bin")
    whole = torch.cat([x for x, _ in ValSet(numbered_shards, 5, 8, "gpt2", val_tokens=800).batches()])
    assert whole.shape == (100, 8)
    for micro_batch, world_size in [(1, 1), (7, 1), (3, 2), (4, 3)]:
        shares = [torch.cat([x for x, _ in ValSet(numbered_shards, micro_batch, 8, "gpt2", 800, r, world_size)
                             .batches()]) for r in range(world_size)]
        torch.testing.assert_close(torch.cat(shares), whole, rtol=0, atol=0)


# -- the training loop ---------------------------------------------------------------------------------

def test_tiny_config_learns_tiny_shakespeare(shakespeare_shards: Path, tmp_path: Path) -> None:
    # tiny.toml's training as it is; evaluation only at the start and the end, on 16k val tokens, to save time.
    result = run_script(ROOT / "train_gpt2.py", "--config", str(ROOT / "configs" / "tiny.toml"),
                        "--data-dir", str(shakespeare_shards), "--log-dir", str(tmp_path / "log"),
                        "--eval-interval", "200", "--val-tokens", "16384", "--device", "cpu", "--dtype", "float32",
                        "--progress", "false", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    val = records(tmp_path / "log", "val")
    print(f"tiny.toml val loss: {val[0]['val_loss']:.3f} at step 0, {val[-1]['val_loss']:.3f} at step 200")
    assert val[0]["step"] == 0 and val[0]["val_loss"] == pytest.approx(math.log(50257), abs=0.3)
    assert val[-1]["step"] == 200 and val[-1]["val_loss"] < 6.5
    train_records = records(tmp_path / "log", "train")
    assert [r["step"] for r in train_records] == list(range(200))
    for record in train_records:
        assert {"loss", "lr", "grad_norm", "tokens_per_second", "mfu"} <= record.keys()
    samples = records(tmp_path / "log", "sample")[-1]["samples"]
    assert len(samples) == 2 and all(s.startswith("Hello, I'm a language model,") for s in samples)
    log_txt = (tmp_path / "log" / "log.txt").read_text().splitlines()
    assert log_txt[0].startswith("0 val ") and "199 train " in log_txt[-2] and log_txt[-1].startswith("200 val ")
    # The checkpoint is an ordinary model spec for the other stages.
    sample = run_script(ROOT / "sample.py", "-m", str(tmp_path / "log" / "checkpoints" / "step_000200"), "--device",
                        "cpu", "--dtype", "float32", "--greedy", "--max-new-tokens", "5", "--json", "ROMEO:",
                        cwd=tmp_path)
    assert sample.returncode == 0, sample.stderr
    assert len(json.loads(sample.stdout)["samples"][0]["tokens"]) == 5


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(shakespeare_shards: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    forward = GPT.forward
    calls = []

    def poisoned(self: GPT, idx: torch.Tensor, targets: torch.Tensor | None = None, **kwargs: object) -> tuple:
        logits, loss = forward(self, idx, targets, **kwargs)
        calls.append(1)
        if loss is not None and len(calls) > 6:  # micro-steps 7 and on: the 4th step (2 per step)
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", poisoned)
    with pytest.raises(UserError, match=r"the loss is nan at step 3: stopping before the update; the last good "
                                        r"checkpoint is .*step_000002"):
        train_gpt2.main(["--data-dir", str(shakespeare_shards), "--log-dir", str(tmp_path / "log"), *SMALL,
                         "--total-batch-size", "256", "--max-steps", "10", "--checkpoint-interval", "2"])
    assert [path.name for path in (tmp_path / "log" / "checkpoints").iterdir()] == ["step_000002"]
    assert [r["step"] for r in records(tmp_path / "log", "train")] == [0, 1, 2]


LAUNCHER = textwrap.dedent("""
    # Runs train_gpt2.main with test instruments patched in from the outside.
    import json, os, signal, sys
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    from torch.nn.parallel import DistributedDataParallel
    import train_gpt2

    mode, out = sys.argv[1], sys.argv[2]
    if mode == "count-allreduce":  # count DDP's all-reduce rounds: one per backward that syncs
        rounds = []
        original_init = DistributedDataParallel.__init__
        def init(self, *args, **kwargs):
            original_init(self, *args, **kwargs)
            def hook(state, bucket):
                if bucket.is_last():
                    rounds.append(1)
                return default_hooks.allreduce_hook(state, bucket)
            self.register_comm_hook(None, hook)
        DistributedDataParallel.__init__ = init
    elif mode.startswith("kill-after-step-"):  # die as `kill -9` would, right after that checkpoint
        from core import training
        kill_step = int(mode.rsplit("-", 1)[1])
        original_save = training.save_checkpoint
        def save(folder, *args, **kwargs):
            result = original_save(folder, *args, **kwargs)
            if kwargs["step"] == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        training.save_checkpoint = save
    train_gpt2.main(sys.argv[3:])
    if mode == "count-allreduce":
        with open(f"{out}.rank{os.environ.get('RANK', 0)}", "w") as f:
            json.dump(len(rounds), f)
        # The hook above is Python held by gloo's C++ reducer: torn down at interpreter exit, it once
        # aborted the process ("terminate called without an active exception"), after the run was done.
        sys.stdout.flush()
        os._exit(0)
""")


@pytest.fixture
def launcher(tmp_path: Path) -> Path:
    path = tmp_path / "launch_train.py"
    path.write_text(LAUNCHER)
    return path


@pytest.mark.parametrize(("dtype", "optimizer"), [("float32", "adamw"), ("bfloat16", "adamw"), ("float32", "muon")])
def test_ddp_with_accumulation_equals_one_process(shakespeare_shards: Path, tmp_path: Path, launcher: Path,
                                                  dtype: str, optimizer: str) -> None:
    """2 ranks x 2 micro-steps and 1 rank x 4 micro-steps see the same global batch: same weights after 3 steps,
    and DDP all-reduces once per optimizer step, not once per micro-step. In either dtype --dtype auto may pick;
    with Muon, whose orthogonalization the 2 ranks split between them."""
    common = ["--total-batch-size", "512", "--max-steps", "3", "--checkpoint-interval", "3", "--dropout", "0",
              "--dtype", dtype, "--peak-flops", "1e12",  # no bfloat16 peak to measure on a CPU without its units
              "--optimizer", optimizer]
    # One thread, as torchrun gives each rank: the same kernels, so that bfloat16 products round alike.
    single = train(shakespeare_shards, tmp_path / "single", *common, env={"OMP_NUM_THREADS": "1"})
    assert single.returncode == 0, single.stderr
    counts = tmp_path / "allreduce"
    ddp = run_script(launcher, "count-allreduce", str(counts), "--data-dir", str(shakespeare_shards), "--log-dir",
                     str(tmp_path / "ddp"), *SMALL, *common, cwd=tmp_path, torchrun=2)
    assert ddp.returncode == 0, ddp.stderr
    assert "batch: 512 tokens = 4 x 32 x 2 process(es) x 2 accumulation step(s)" in ddp.stdout
    assert [json.loads(Path(f"{counts}.rank{r}").read_text()) for r in range(2)] == [3, 3]
    single_weights, ddp_weights = final_weights(tmp_path / "single", 3), final_weights(tmp_path / "ddp", 3)
    assert single_weights.keys() == ddp_weights.keys()
    for name, tensor in single_weights.items():
        ddp_tensor = ddp_weights[name]
        if name.endswith("attn.c_attn.bias"):
            # Not the keys' bias: softmax ignores it, so its gradient is zero but for rounding noise, which
            # AdamW scales up to lr-sized steps (in bfloat16 the noise differs with the accumulation's grouping).
            tensor, ddp_tensor = (torch.cat([t[: 32], t[64:]]) for t in (tensor, ddp_tensor))
        torch.testing.assert_close(ddp_tensor, tensor, atol=1e-5, rtol=0, msg=name)
    single_losses = [r["loss"] for r in records(tmp_path / "single", "train")]
    assert [r["loss"] for r in records(tmp_path / "ddp", "train")] == pytest.approx(single_losses, abs=1e-5)


@pytest.mark.parametrize(("processes", "dtype", "optimizer"), [
    (1, "float32", "adamw"), (1, "bfloat16", "adamw"), (2, "float32", "adamw"), (2, "bfloat16", "adamw"),
    (1, "float32", "muon"),  # Muon over 2 ranks: test_ddp_with_accumulation_equals_one_process
], ids=lambda value: {1: "one-process", 2: "torchrun-2"}.get(value, value))
def test_killed_run_resumes_exactly(shakespeare_shards: Path, tmp_path: Path, launcher: Path, processes: int,
                                    dtype: str, optimizer: str) -> None:
    """12 steps straight equal 6 steps, SIGKILL right after the step-6 checkpoint, then --resume auto: bitwise,
    with shuffling and dropout on, so the data position and every random state must come back; in either dtype
    --dtype auto may pick (bfloat16 on a CPU with bfloat16 units), and with Muon's momentum (and WSD)."""
    common = ["--total-batch-size", str(256 * processes), "--max-steps", "12", "--checkpoint-interval", "6",
              "--shuffle", "true", "--dropout", "0.1", "--val-tokens", "1024", "--eval-interval", "4",
              "--dtype", dtype, "--peak-flops", "1e12", "--optimizer", optimizer]
    torchrun = processes if processes > 1 else 0
    straight = train(shakespeare_shards, tmp_path / "straight", *common, torchrun=torchrun)
    assert straight.returncode == 0, straight.stderr
    killed_log = tmp_path / "killed"
    killed = run_script(launcher, "kill-after-step-6", "-", "--data-dir", str(shakespeare_shards), "--log-dir",
                        str(killed_log), *SMALL, *common, cwd=tmp_path, torchrun=torchrun)
    assert killed.returncode != 0
    assert [path.name for path in (killed_log / "checkpoints").iterdir()] == ["step_000006"]
    resumed = train(shakespeare_shards, killed_log, *common, "--resume", "auto", torchrun=torchrun)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout and "at step 6" in resumed.stdout
    for name, tensor in final_weights(tmp_path / "straight", 12).items():
        assert torch.equal(final_weights(killed_log, 12)[name], tensor), name
    for kind, key in (("train", "loss"), ("val", "val_loss")):
        expected = [(r["step"], r[key]) for r in records(tmp_path / "straight", kind)]
        assert [(r["step"], r[key]) for r in records(killed_log, kind)] == expected


def test_a_torn_last_metrics_line_is_dropped_with_a_note_on_resume(shakespeare_shards: Path,
                                                                   tmp_path: Path) -> None:
    """A hard kill mid-write leaves half a line at the end of metrics.jsonl: resuming drops it, says so, and goes on."""
    log_dir = tmp_path / "log"
    first = train(shakespeare_shards, log_dir, "--total-batch-size", "128", "--max-steps", "2")
    assert first.returncode == 0, first.stderr
    with open(log_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 2, "loss": 7.1')
    resumed = train(shakespeare_shards, log_dir, "--total-batch-size", "128", "--max-steps", "4")
    assert resumed.returncode == 0, resumed.stderr
    assert "note: dropped the torn last line" in resumed.stdout
    assert [r["step"] for r in records(log_dir, "train")] == [0, 1, 2, 3]  # every line whole JSON again
    (log_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 0}\n{"kind": "tr\n{"kind": "val", "step": 0}\n')
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a metrics record"):
        read_records(log_dir / "metrics.jsonl")


def test_sigterm_saves_a_checkpoint_that_resumes(shakespeare_shards: Path, tmp_path: Path) -> None:
    """SIGTERM (preemption) saves and exits 0; Ctrl-C's 130 is tested with quickstart.sh."""
    log_dir = tmp_path / "log"
    command = [sys.executable, str(ROOT / "train_gpt2.py"), "--data-dir", str(shakespeare_shards), "--log-dir",
               str(log_dir), *SMALL, "--total-batch-size", "128", "--max-steps", "100000",
               "--checkpoint-interval", "100000"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONPATH": with_root_on_path()})
    metrics = log_dir / "metrics.jsonl"
    deadline = time.monotonic() + HANG_GUARD_SECONDS
    while not (metrics.exists() and metrics.read_text().count('"train"') >= 2) and time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=HANG_GUARD_SECONDS)
    assert process.returncode == 0, stderr
    done = len(records(log_dir, "train"))
    assert f"stopped at step {done}" in stdout
    assert [path.name for path in (log_dir / "checkpoints").iterdir()] == [f"step_{done:06d}"]
    resumed = train(shakespeare_shards, log_dir, "--total-batch-size", "128", "--max-steps", str(done + 2))
    assert resumed.returncode == 0, resumed.stderr
    assert [r["step"] for r in records(log_dir, "train")] == list(range(done + 2))


def test_a_damaged_newest_checkpoint_resumes_from_the_one_before(shakespeare_shards: Path, tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    args = ["--total-batch-size", "128", "--checkpoint-interval", "2", "--keep-checkpoints", "0"]
    assert train(shakespeare_shards, log_dir, *args, "--max-steps", "4").returncode == 0
    weights = log_dir / "checkpoints" / "step_000004" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a write cut short
    (log_dir / "checkpoints" / ".step_000006.tmp").mkdir()  # a save that never finished
    resumed = train(shakespeare_shards, log_dir, *args, "--max-steps", "5")
    assert resumed.returncode == 0, resumed.stderr
    assert "skipping checkpoint" in resumed.stdout and "step_000004" in resumed.stdout
    assert "at step 2" in resumed.stdout
    assert [r["step"] for r in records(log_dir, "train")] == [0, 1, 2, 3, 4]


def test_init_from_a_model_pads_its_vocab_and_keeps_its_function(shakespeare_shards: Path, tmp_path: Path) -> None:
    torch.manual_seed(5)
    original = GPT(GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
    save_checkpoint(tmp_path / "base", original, "gpt2")
    padded = original.with_settings(vocab_multiple=64, dropout=0.0)
    assert padded.transformer.wte.weight.shape == (50304, 32) and padded.config.dropout == 0.0
    idx = torch.randint(0, 50257, (2, 32))
    torch.testing.assert_close(padded.eval()(idx)[0][..., :50257], original.eval()(idx)[0], rtol=0, atol=1e-6)
    log_dir = tmp_path / "log"
    result = train(shakespeare_shards, log_dir, "--init-from", str(tmp_path / "base"), "--max-steps", "1",
                   "--total-batch-size", "128", "--val-tokens", "1024")
    assert result.returncode == 0, result.stderr
    val = ValSet(shakespeare_shards, 4, 32, "gpt2", 1024)
    with torch.no_grad():
        losses = [original.eval()(x, y)[1] * y.numel() for x, y in val.batches()]
    expected = (sum(losses) / 1024).item()
    assert records(log_dir, "val")[0]["val_loss"] == pytest.approx(expected, abs=1e-5)


def test_cl100k_shards_train_a_100277_token_model(tmp_path: Path) -> None:
    data = tmp_path / "zh"
    (tmp_path / "zh.txt").write_text("维基百科是一个自由的百科全书。" * 200 + "\n\n" + "中文文本。" * 300)
    fineweb.main(["--input", str(tmp_path / "zh.txt"), "--txt-paragraphs", "--out", str(data), "--tokenizer",
                  "cl100k_base", "--val-tokens", "0", "--workers", "1"])
    assert open_shard(list_shards(data, "train")[0]).dtype == np.uint32
    result = train(data, tmp_path / "log", "--max-steps", "1", "--total-batch-size", "128")
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "log" / "checkpoints" / "step_000001" / "meta.json").read_text())
    assert meta["tokenizer"] == "cl100k_base" and meta["config"]["vocab_size"] == 100277


def test_mfu_peaks_come_from_the_table_or_are_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    from core import mfu

    cuda = torch.device("cuda", 0)
    for name, expected in [("NVIDIA A100-SXM4-80GB", 312e12), ("NVIDIA A100-SXM4-40GB", 312e12), ("NVIDIA A10", 125e12),
                           ("NVIDIA H100 80GB HBM3", 989.4e12), ("NVIDIA H100 NVL", 835.5e12),
                           ("NVIDIA H100 PCIe", 756e12), ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12),
                           ("NVIDIA L4", 121e12), ("NVIDIA GeForce RTX 4090", 165.2e12),
                           ("Tesla V100-SXM2-16GB", None), ("NVIDIA L40S-PCIE-48GB (a guess)", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None, name=name: name)
        assert mfu.peak_flops(cuda, torch.bfloat16) == expected, name
    assert mfu.peak_flops(cuda, torch.bfloat16, override=1e15) == 1e15
    model = GPT(GPTConfig(block_size=64, vocab_size=100, n_layer=2, n_head=2, n_embd=16))
    # 6 per matmul weight (wpe is a lookup) + attention's 12 x n_layer x n_embd x T
    matmul_params = model.num_params() - 64 * 16
    assert mfu.flops_per_token(model, 64) == 6 * matmul_params + 12 * 2 * 16 * 64


def test_hellaswag_tensorboard_and_compile_in_a_run(shakespeare_shards: Path,
                                                    tmp_path: Path) -> None:
    """HellaSwag records from the shipped examples, TensorBoard event files, and a compiled model whose
    evaluation and sampling run on the raw module and whose checkpoint has no `_orig_mod.` names."""
    pytest.importorskip("tensorboard")
    log_dir = tmp_path / "log"
    result = train(shakespeare_shards, log_dir, "--max-steps", "2", "--total-batch-size", "128", "--eval-interval",
                   "2", "--hellaswag-examples", "8", "--hellaswag-data",
                   str(HELLASWAG), "--block-size", "256",
                   "--num-samples", "1", "--sample-tokens", "4", "--val-tokens", "512", "--tensorboard", "--compile")
    assert result.returncode == 0, result.stderr
    hellaswag = records(log_dir, "hellaswag")
    assert [r["step"] for r in hellaswag] == [0, 2] and all(r["n"] == 8 for r in hellaswag)
    assert all(0 <= r["acc"] <= 1 and 0 <= r["acc_norm"] <= 1 for r in hellaswag)
    assert [r["step"] for r in records(log_dir, "sample")] == [0, 2]
    assert list(log_dir.glob("events.out.tfevents.*"))
    assert not any(key.startswith("_orig_mod.") for key in final_weights(log_dir, 2))
    assert "compile = true" in (log_dir / "config.toml").read_text()


def test_missing_hellaswag_data_offline_is_one_line_and_the_run_goes_on(shakespeare_shards: Path,
                                                                       tmp_path: Path) -> None:
    result = run_script(ROOT / "train_gpt2.py", "--data-dir", str(shakespeare_shards), "--log-dir",
                        str(tmp_path / "log"), *SMALL, "--max-steps", "1", "--total-batch-size", "128",
                        "--hellaswag-examples", "10", cwd=tmp_path,
                        env={"GPT2_TOOLKIT_CACHE": str(tmp_path / "cache"),
                             "GPT2_TOOLKIT_HELLASWAG_URL": "http://127.0.0.1:9/hellaswag_val.jsonl"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "HellaSwag" in line]
    assert len(lines) == 1 and lines[0].startswith("HellaSwag is off for this run: cannot download"), result.stdout
    assert "with --hellaswag-data PATH" in lines[0]  # train_gpt2.py's flag: --data would prefix-match --data-dir
    assert not records(tmp_path / "log", "hellaswag")


def test_core_in_a_run_goes_to_metrics_log_tensorboard_and_the_plot(shakespeare_shards: Path,
                                                                   tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    bundle = make_bundle(tmp_path / "bundle")
    log_dir = tmp_path / "log"
    result = train(shakespeare_shards, log_dir, "--max-steps", "4", "--total-batch-size", "128", "--eval-interval",
                   "2", "--core-interval", "4", "--core-max-per-task", "6", "--core-bundle", str(bundle),
                   "--tensorboard")
    assert result.returncode == 0, result.stderr
    core = records(log_dir, "core")
    assert [r["step"] for r in core] == [0, 4]  # at the evaluations of steps 0 and 4, not 2
    for record in core:
        assert set(record["centered"]) == {"my_mc", "my_schema", "my_lm"}
        assert (record["tasks"], record["examples"]) == (3, 18)
        assert record["core"] == pytest.approx(sum(record["centered"].values()) / 3)
    assert [line.split()[:2] for line in (log_dir / "log.txt").read_text().splitlines() if " core " in line] == [
        ["0", "core"], ["4", "core"]]
    assert sum("| CORE " in line for line in result.stdout.splitlines()) == 2
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir)).Reload()
    assert {"core/core", "core/centered/my_mc"} <= set(events.Tags()["scalars"])
    assert (log_dir / "plot.png").stat().st_size > 0


def test_core_without_its_bundle_offline_is_one_line_and_the_run_goes_on(shakespeare_shards: Path,
                                                                        tmp_path: Path) -> None:
    result = train(shakespeare_shards, tmp_path / "log", "--max-steps", "1", "--total-batch-size", "128",
                   "--core-interval", "1", env={"GPT2_TOOLKIT_CACHE": str(tmp_path / "cache"),
                                                "GPT2_TOOLKIT_CORE_BUNDLE_URL": "http://127.0.0.1:9/eval_bundle.zip"})
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if "CORE" in line]
    assert len(lines) == 1 and lines[0].startswith("CORE is off for this run: cannot download"), result.stdout
    assert "--core-bundle DIR" in lines[0]
    assert not records(tmp_path / "log", "core")


TORCH = Path(torch.__file__).parent


def caller_outside_torch() -> str:
    """The file name of the nearest caller that is not torch's own code (a wrapper of an optimizer's
    step, say) nor this file's."""
    frame = sys._getframe(1)
    while frame.f_code.co_filename.startswith(str(TORCH)) or frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return Path(frame.f_code.co_filename).name


def test_each_trainer_writes_its_own_step(shakespeare_shards: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The backward, the clipping and the optimizer's update of every step are called from the trainer's
    own file, where a reader looks for them (build-nanogpt's shape); so is the gradient sync, set on the
    last micro-step before its forward pass (build-nanogpt #30), which one process cannot run: read from
    the code here, and run by test_ddp_with_accumulation_equals_one_process (one all-reduce a step)."""
    from tests.story_cloze_files import story_cloze_args

    calls: list[tuple[str, str]] = []
    backward, clip, adamw_step = torch.Tensor.backward, torch.nn.utils.clip_grad_norm_, torch.optim.AdamW.step
    def spy(name: str, function: Callable) -> Callable:
        return lambda *a, **k: calls.append((name, caller_outside_torch())) or function(*a, **k)

    monkeypatch.setattr(torch.Tensor, "backward", spy("backward", backward))
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy("clip", clip))
    monkeypatch.setattr(torch.optim.AdamW, "step", spy("update", adamw_step))
    train_gpt2.main(["--data-dir", str(shakespeare_shards), "--log-dir", str(tmp_path / "log"), *SMALL,
                     "--total-batch-size", "256", "--max-steps", "2"])  # 2 micro-steps a step
    step = [("backward", "train_gpt2.py")] * 2 + [("clip", "train_gpt2.py"), ("update", "train_gpt2.py")]
    assert calls == step * 2
    calls.clear()
    save_checkpoint(tmp_path / "pretrained", GPT(GPTConfig(block_size=64, vocab_size=50257, n_layer=1, n_head=2,
                                                           n_embd=16)), "gpt2")
    finetune_mc.main(story_cloze_args(tmp_path, tmp_path / "finetune", tmp_path / "pretrained", 20, 4,
                                      val_examples=4, epochs=1, batch_size=8, micro_batch_size=4, zero_shot="false"))
    step = [("backward", "finetune_mc.py")] * 2 + [("clip", "finetune_mc.py"), ("update", "finetune_mc.py")]
    assert calls == step * 2

    for script, trainer in (("train_gpt2.py", "Trainer"), ("finetune_mc.py", "Finetuner")):
        tree = ast.parse((ROOT / script).read_text())
        step_function = next(node for node in ast.walk(tree) if isinstance(node, ast.ClassDef) and node.name == trainer)
        train_step = next(node for node in step_function.body
                          if isinstance(node, ast.FunctionDef) and node.name == "train_step")
        loop = next(node for node in ast.walk(train_step) if isinstance(node, ast.For)
                    and isinstance(node.target, ast.Name) and node.target.id == "micro_step")
        sync = [node for node in ast.walk(loop) if isinstance(node, ast.Assign)
                and any(isinstance(t, ast.Attribute) and t.attr == "require_backward_grad_sync" for t in node.targets)]
        assert len(sync) == 1, f"{script}: the sync on the last micro-step is set in its step's loop"
        assert ast.unparse(sync[0].value) == "micro_step == self.accum - 1", script
        assert ast.unparse(sync[0].targets[0].value) == "model", f"{script}: on the module that runs the forward"
        forward = min(node.lineno for node in ast.walk(loop) if isinstance(node, ast.Call)
                      and isinstance(node.func, ast.Name) and node.func.id == "model")
        assert sync[0].lineno < forward, f"{script}: DDP decides in the forward pass, so it is set before it"


OUR_FILES = {path.relative_to(ROOT).as_posix() for path in ROOT.glob("**/*.py")
             if not path.relative_to(ROOT).as_posix().startswith(("tests/", ".venv/"))}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_steady_step_runs_code_from_six_of_our_files_at_most(shakespeare_shards: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch, dtype: str) -> None:
    """From the end of one optimizer update to the end of the next (the batch, forward, loss, backward,
    clip, update and the step's log line; AdamW, eager, one process, no evaluation due): the files a
    reader must open to follow it. None of them times or caches anything per machine."""
    ran: set[str] = set()
    updates = [0]
    adamw_step = torch.optim.AdamW.step

    def record(frame: object, event: str, arg: object) -> None:
        if event == "call":
            name = Path(frame.f_code.co_filename)
            if name.is_relative_to(ROOT) and name.relative_to(ROOT).as_posix() in OUR_FILES:
                ran.add(name.relative_to(ROOT).as_posix())

    def step(*args: object, **kwargs: object) -> object:
        result = adamw_step(*args, **kwargs)
        updates[0] += 1
        sys.setprofile(record if updates[0] == 2 else None)  # the third step: caches and allocator settled
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    try:
        train_gpt2.main(["--data-dir", str(shakespeare_shards), "--log-dir", str(tmp_path / "log"), *SMALL,
                         "--total-batch-size", "256", "--max-steps", "4", "--eval-interval", "1000", "--dtype", dtype,
                         "--peak-flops", "1e12"])  # 2 micro-steps a step
    finally:
        sys.setprofile(None)
    assert updates[0] == 4
    assert {"train_gpt2.py", "model.py"} <= ran and len(ran) <= 6, sorted(ran)
    assert not ran & {"core/cpu_speedups.py", "core/cache.py", "core/mfu.py"}, sorted(ran)  # nothing measured, kept


def test_a_training_run_writes_nothing_outside_its_log_dir(shakespeare_shards: Path, tmp_path: Path) -> None:
    """With HOME and the cache folder empty, HellaSwag and CORE off: no per-machine answer kept anywhere,
    nothing in the working folder; the data folder as it was."""
    home, cache, work, temporary = tmp_path / "home", tmp_path / "cache", tmp_path / "work", tmp_path / "tmp"
    for folder in (home, cache, work, temporary):
        folder.mkdir()
    data_before = snapshot(shakespeare_shards)
    # matplotlib keeps its own font cache (plot.png): a library's, once per user, pointed elsewhere here.
    env = {"HOME": str(home), "GPT2_TOOLKIT_CACHE": str(cache), "XDG_CACHE_HOME": str(home / ".cache"),
           "MPLCONFIGDIR": str(tmp_path / "matplotlib"), "TMPDIR": str(temporary)}
    result = train(shakespeare_shards, tmp_path / "log", "--total-batch-size", "128", "--max-steps", "2",
                   "--num-samples", "1", "--sample-tokens", "4", "--eval-interval", "1", "--core-interval", "0",
                   "--val-tokens", "1024", cwd=work, env=env)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "log" / "checkpoints" / "step_000002").is_dir() and (tmp_path / "log" / "plot.png").is_file()
    assert [list(folder.rglob("*")) for folder in (home, cache, work)] == [[], [], []]
    # torch's fused AdamW makes an empty torchinductor_<user> folder in the temporary folder: no file
    assert [path for path in temporary.rglob("*") if not path.is_dir()] == []
    assert snapshot(shakespeare_shards) == data_before


def test_resume_never_on_a_used_folder_ends_every_rank(shakespeare_shards: Path, tmp_path: Path) -> None:
    """Rank 0 alone looks at the folder; its refusal must reach the other rank, which would otherwise wait
    for it forever (until the hang guard)."""
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    (log_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 0, "loss": 1.0}\n')
    result = train(shakespeare_shards, log_dir, "--max-steps", "1", "--total-batch-size", "256", "--resume", "never",
                   torchrun=2)
    assert result.returncode != 0
    assert result.stderr.count("already holds a run: continue it with --resume auto") == 2  # from both ranks


@pytest.mark.parametrize("present", [1, 2, 4])
def test_cuda_random_states_restore_on_fewer_or_more_gpus(present: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from core import resume

    state = resume.rng_state()
    state["cuda"] = [bytes([i]) * 16 for i in range(2)]  # saved on a machine with 2 GPUs
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: present)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda tensor, device: restored.update({device: bytes(tensor)}))
    note = resume.set_rng_state(state)
    assert restored == {i: bytes([i]) * 16 for i in range(min(2, present))}
    assert (note is None) == (present == 2)
    if note:
        assert f"of 2 GPU(s), this process sees {present}: {min(2, present)} restored" in note


def test_a_stop_signal_on_an_evaluation_step_saves_first_and_skips_the_evaluation(
        shakespeare_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun sends SIGKILL 30 s after its SIGTERM: the checkpoint cannot wait for an evaluation."""
    from core.training import TrainingRun

    events = []
    evaluate, save = train_gpt2.Trainer.evaluate, train_gpt2.Trainer.save
    monkeypatch.setattr(train_gpt2.Trainer, "evaluate", lambda self: events.append(("evaluate", self.step)) or
                        evaluate(self))
    monkeypatch.setattr(train_gpt2.Trainer, "save", lambda self: events.append(("save", self.step)) or save(self))
    monkeypatch.setattr(TrainingRun, "stop_requested", lambda self: len([e for e in events if e[0] == "step"]) == 2)
    step = train_gpt2.Trainer.train_step
    monkeypatch.setattr(train_gpt2.Trainer, "train_step", lambda self: events.append(("step", None)) or step(self))
    train_gpt2.main(["--data-dir", str(shakespeare_shards), "--log-dir", str(tmp_path / "log"), *SMALL,
                     "--total-batch-size", "128", "--max-steps", "10", "--eval-interval", "2"])
    assert [e for e in events if e[0] != "step"] == [("evaluate", 0), ("save", 2)]  # step 2's evaluation skipped
    assert [path.name for path in (tmp_path / "log" / "checkpoints").iterdir()] == ["step_000002"]


def test_checkpoints_by_time(shakespeare_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from core.training import TrainingRun

    minutes = iter([1.0, 45.0, 0.5, 2.0, 31.0])  # rank 0's minutes since the last save, after steps 1 to 5
    monkeypatch.setattr(TrainingRun, "minutes_since_save", lambda self: next(minutes))
    train_gpt2.main(["--data-dir", str(shakespeare_shards), "--log-dir", str(tmp_path / "log"), *SMALL,
                     "--total-batch-size", "128", "--max-steps", "6", "--checkpoint-minutes", "30",
                     "--keep-checkpoints", "0"])
    saved = sorted(path.name for path in (tmp_path / "log" / "checkpoints").iterdir())
    assert saved == ["step_000002", "step_000005", "step_000006"]  # 45 and 31 minutes, then the end


def test_micro_batch_auto_halves_on_out_of_memory_and_records_its_choice(shakespeare_shards: Path, tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from core.runlog import RunLog
    from core.training import TrainingRun, largest_fitting

    # The search on its own, through the trial that CUDA runs, with an OOM simulated above 4 sequences.
    run = TrainingRun(TrainConfig(device="cpu"), train_gpt2.Distributed(0, 0, 1, torch.device("cpu")),
                      RunLog(tmp_path, enabled=False))
    model = GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=1, n_head=2, n_embd=16))
    forward, tried = GPT.forward, []

    def forward_or_oom(self: GPT, idx: torch.Tensor, *args: object, **kwargs: object) -> tuple:
        tried.append(idx.size(0))
        if idx.size(0) > 4:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward_or_oom)
    assert largest_fitting(32, lambda size: run._fits(model, size, 32)) == 4 and tried == [32, 16, 8, 4]
    assert all(param.grad is None for param in model.parameters())  # the trials leave no gradients behind
    monkeypatch.undo()
    # In a run: the choice is printed and recorded in config.toml (off CUDA: the largest divisor, up to 16).
    result = train(shakespeare_shards, tmp_path / "log", "--micro-batch-size", "auto", "--total-batch-size", "256",
                   "--max-steps", "1")
    assert result.returncode == 0, result.stderr
    assert "micro_batch_size auto: 8" in result.stdout  # 256 tokens / 32 = 8 sequences
    assert TrainConfig.read_toml(tmp_path / "log" / "config.toml")["micro_batch_size"] == 8


def test_out_of_memory_in_training_is_one_line_naming_the_setting(shakespeare_shards: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    def oom(self: train_gpt2.Trainer) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.28 GiB (simulated)")

    monkeypatch.setattr(train_gpt2.Trainer, "train_step", oom)
    with pytest.raises(UserError, match=r"^out of memory on cpu: lower --micro-batch-size \(now 4;") as raised:
        train_gpt2.main(["--data-dir", str(shakespeare_shards), "--log-dir", str(tmp_path / "log"), *SMALL,
                         "--total-batch-size", "128", "--max-steps", "2"])
    assert "\n" not in str(raised.value)


class Float64Spy(TorchDispatchMode):
    """Records every op that makes a float64 tensor: MPS has none (pytorch#122602)."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[str] = []

    def __torch_dispatch__(self, func: object, types: object, args: tuple = (), kwargs: dict | None = None) -> object:
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.dtype == torch.float64:
            self.made.append(str(func))
        return out


def test_the_mps_branch_of_validation_and_accuracy_makes_no_float64(shakespeare_shards: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The val loss and multiple-choice accuracy sum in float64, except on MPS: with the MPS branch forced
    (the sums' dtype is the one place the two differ), no op makes a float64 tensor."""
    from core import devices, multiple_choice

    as_on_mps = lambda device: devices.accumulation_dtype(torch.device("mps"))  # noqa: E731
    assert as_on_mps(None) == torch.float32 and devices.accumulation_dtype(torch.device("cpu")) == torch.float64
    monkeypatch.setattr(train_gpt2, "accumulation_dtype", as_on_mps)
    monkeypatch.setattr(multiple_choice, "accumulation_dtype", as_on_mps)
    trainer = train_gpt2.Trainer(train_gpt2.parse_config(["--data-dir", str(shakespeare_shards), "--log-dir",
                                                          str(tmp_path / "log"), *SMALL, "--val-tokens", "1024"]),
                                 train_gpt2.Distributed(0, 0, 1, torch.device("cpu")))
    gpt = GPT(GPTConfig(block_size=32, vocab_size=100, n_layer=1, n_head=2, n_embd=16))
    questions = [multiple_choice.Encoded(i, i % 2, ([1, 2, 3, 4], [5, 6, 7])) for i in range(4)]
    scorer = multiple_choice.MultipleChoiceModel(gpt, multiple_choice.ChoiceHead(16, 0.0))
    spy = Float64Spy()
    with spy:
        val_loss = trainer.validation_loss()
        accuracy = multiple_choice.accuracy(scorer, questions, batch_size=2)
    assert spy.made == [] and math.isfinite(val_loss) and 0 <= accuracy <= 1
