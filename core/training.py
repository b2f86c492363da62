"""What every trainer shares around its optimizer step: the run's set-up (device, dtype, TF32, compile
then DDP, config.toml, stopping on SIGTERM and SIGINT) and resumable checkpoints. The step itself is
written out in each trainer, train_gpt2.py and finetune_mc.py, where a reader looks for it.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from core.checkpoint import save_checkpoint
from core.config import FinetuneConfig, TrainConfig, to_toml
from core.devices import dtype_name, enable_tf32, resolve_dtype, settle_cpu_threads
from core.distributed import Distributed, distributed_run
from core.errors import UserError
from core.resume import (
    changed_settings,
    checkpoint_folder,
    list_checkpoints,
    load_resumable,
    newest_resumable,
    prune_checkpoints,
    rng_state,
    set_aside_later_checkpoints,
    set_rng_state,
)
from core.runlog import METRICS_FILE, RunLog
from core.tokenizer import Tokenizer

CPU_MICRO_BATCH = 16  # micro_batch_size = "auto" off CUDA


def run_trainer(trainer: Callable[[Any, Distributed], Any], settings: TrainConfig | FinetuneConfig) -> None:
    """A trainer's process: `trainer(settings, distributed).train()` on every rank of a torchrun (or in
    one process), an out-of-memory error ending in one line."""
    with distributed_run(settings.device) as distributed, \
            out_of_memory_as_one_line(distributed.device, settings.micro_batch_size):
        trainer(settings, distributed).train()


@contextmanager
def out_of_memory_as_one_line(device: torch.device, micro_batch_size: int | None) -> Iterator[None]:
    """An out-of-memory error in a trainer becomes one line naming the setting to lower."""
    try:
        yield
    except torch.OutOfMemoryError:
        size = "auto" if micro_batch_size is None else micro_batch_size
        raise UserError(f"out of memory on {device}: lower --micro-batch-size (now {size}; gradient accumulation "
                        "keeps the batch)" + (", or set it to auto" if micro_batch_size is not None else "")) from None


def largest_fitting(largest: int, fits: Callable[[int], bool]) -> int:
    """The first of largest, largest / 2, ..., 1 for which `fits(size)`; 1 when none does (its OOM then
    comes in the first step, as a one-line error)."""
    size = largest
    while size > 1 and not fits(size):
        size //= 2
    return size


class TrainingRun:
    """The machine side of a training run, the same for every trainer: the device and dtype, TF32 on
    CUDA, the training module (compiled, then DDP-wrapped), autocast, the resolved settings written to
    LOG_DIR/config.toml, and SIGTERM / SIGINT turned into a request to stop at a step boundary."""

    def __init__(self, settings: TrainConfig | FinetuneConfig, distributed: Distributed, log: RunLog) -> None:
        self.distributed, self.log = distributed, log
        self.device = distributed.device
        # After every override (nanoGPT #708); bfloat16 on CPUs with bfloat16 units too, where a step runs
        # faster so (docs/benchmarks.md).
        self.dtype = resolve_dtype(settings.dtype, self.device, cpu_bfloat16=True)
        self.compile = settings.compile if settings.compile is not None else self.device.type == "cuda"
        self.compile_mode = settings.compile_mode
        if self.compile and sys.platform == "win32":
            log.print("torch.compile is not supported on Windows: running eagerly")
            self.compile = False
        enable_tf32(self.device)
        settle_cpu_threads(self.device)
        self.stop: StopSignal | None = None
        self.saved_at = time.monotonic()

    @property
    def world_size(self) -> int:
        return self.distributed.world_size

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module that trains: compiled, then DDP-wrapped. Evaluation, sampling and saving use the raw
        model, which shares its weights: shape-changing eval never recompiles the compiled module
        (build-nanogpt #79), and saved names never carry `_orig_mod.` or `module.`."""
        wrapped = model
        if self.compile:
            wrapped = torch.compile(wrapped, mode=self.compile_mode)
        if self.world_size > 1:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(wrapped, device_ids=device_ids)
        return wrapped

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast over float32 weights when the run's dtype is bfloat16; a no-op otherwise."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.dtype == torch.bfloat16)

    def write_settings(self, settings: TrainConfig | FinetuneConfig, log_dir: Path) -> None:
        """LOG_DIR/config.toml: the settings as this run resolved them (device, dtype, compile), printed too."""
        resolved = {**settings.to_dict(), "device": str(self.device), "dtype": dtype_name(self.dtype),
                    "compile": self.compile}
        if self.distributed.is_main:
            (log_dir / "config.toml").write_text(to_toml(resolved))
        self.log.print(to_toml(resolved).rstrip())

    def stop_on_signals(self) -> None:
        """From now on (the training loop), SIGTERM and SIGINT ask to stop at the end of the step."""
        self.stop = StopSignal(self.log)

    def stop_requested(self) -> bool:
        """Whether a signal asked to stop, agreed on by every rank: all stop at the same step, or the job hangs."""
        return self.agree(self.stop is not None and self.stop.requested)

    def end_if_interrupted(self) -> None:
        """After the checkpoint of a stop: a Ctrl-C (SIGINT) ends the process as an interrupted program
        does, with status 130, so that a script running the stages (quickstart.sh) stops too; a SIGTERM,
        a cluster's preemption, returns and exits 0 (the run is saved)."""
        if self.stop is not None and self.stop.signum == signal.SIGINT:
            raise KeyboardInterrupt

    def minutes_since_save(self) -> float:
        """Minutes since the last checkpoint of this process (or its start), as rank 0's clock says: the
        ranks must agree on whether it is time to save."""
        minutes = (time.monotonic() - self.saved_at) / 60
        if self.world_size == 1:
            return minutes  # no tensor, so no device sync at every step
        shared = torch.tensor([minutes], device=self.device)
        dist.broadcast(shared, src=0)
        return shared.item()

    def agree(self, flag: bool) -> bool:
        """True on every rank when any rank has it."""
        if self.world_size == 1:
            return flag
        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    # -- memory ---------------------------------------------------------------------------------------

    def choose_micro_batch(self, model: torch.nn.Module, seq_len: int, total_batch_size: int) -> int:
        """`micro_batch_size = "auto"`: the largest power of two that divides this rank's share of the
        batch and whose forward and backward fit on the GPU, tried at start-up, halving on each OOM; the
        smallest of every rank's. Off CUDA, nothing is tried: memory rarely binds there, and a trial of a
        large batch would take minutes, so it is at most CPU_MICRO_BATCH."""
        sequences = total_batch_size // (seq_len * self.world_size)
        largest = sequences & -sequences if sequences > 0 else 1  # the largest power of two dividing it
        if self.device.type != "cuda":
            chosen = min(largest, CPU_MICRO_BATCH)
        else:
            chosen = largest_fitting(largest, lambda size: self._fits(model, size, seq_len))
        if self.world_size > 1:
            agreed = torch.tensor([chosen], device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            chosen = int(agreed.item())
        self.log.print(f"micro_batch_size auto: {chosen}" + (" (the largest that fits)" if self.device.type == "cuda"
                                                           else f" (at most {CPU_MICRO_BATCH} off CUDA)"))
        return chosen

    def _fits(self, model: torch.nn.Module, size: int, seq_len: int) -> bool:
        """Whether a forward and backward of `size` sequences fits in memory beside AdamW's state, which
        the first step allocates (two float32 tensors per parameter): a stand-in holds its place."""
        adam_state = tokens = None
        try:
            adam_state = torch.empty(2 * sum(p.numel() for p in model.parameters()), device=self.device)
            tokens = torch.randint(0, model.config.vocab_size, (size, seq_len + 1), device=self.device)
            with self.autocast():
                _, loss = model(tokens[:, :-1], tokens[:, 1:])
            loss.backward()
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            model.zero_grad(set_to_none=True)
            del adam_state, tokens
            torch.cuda.empty_cache()

    # -- checkpoints ---------------------------------------------------------------------------------

    def find_resume_point(self, log_dir: Path, resume: str) -> tuple[Path, tuple] | None:
        """The checkpoint to resume (`resume`: auto, the newest readable one in log_dir, else none;
        never; or a folder) and what it holds (see core.resume.load_resumable). Found by rank 0 and
        shared, so every rank resumes the same one."""
        choice: list[Any] = [None, None]  # the folder, or a refusal that every rank raises
        loaded = None  # what rank 0 read while checking the newest checkpoint: not read twice
        if self.distributed.is_main:
            if resume == "auto":
                try:
                    found = newest_resumable(log_dir, warn=self.log.print)
                except UserError as error:
                    choice[1] = str(error)
                else:
                    choice[0], loaded = (found[0], found[1]) if found else (None, None)
            elif resume != "never":
                choice[0] = Path(resume)
            elif list_checkpoints(log_dir) or (log_dir / METRICS_FILE).exists():
                choice[1] = (f"{log_dir} already holds a run: continue it with --resume auto, "
                             "or choose another --log-dir")
        if self.world_size > 1:  # the other ranks wait here for rank 0's answer
            dist.broadcast_object_list(choice, src=0)
        if choice[1] is not None:
            raise UserError(choice[1])
        folder = choice[0]
        if folder is None:
            return None
        if not folder.is_dir():
            raise UserError(f"--resume {folder}: no such checkpoint folder")
        return folder, loaded or load_resumable(folder)

    def check_resume(self, folder: Path, saved: dict[str, Any], settings: TrainConfig | FinetuneConfig) -> None:
        """Refuse to resume `folder` with settings that make another run (settings.RESUME_FIXED), and say
        what else this segment changes: config.toml then records what it uses."""
        changes = changed_settings(saved, settings.to_dict(), settings.RESUME_FIXED, folder)
        if changes:
            self.log.print(f"resuming with changed settings: {'; '.join(changes)}")

    def continue_logs(self, step: int) -> None:
        """Before a run resumed at `step` writes: later checkpoints set aside, later records dropped."""
        if self.distributed.is_main:
            set_aside_later_checkpoints(self.log.log_dir, step, note=self.log.print)
        self.log.truncate_after(step)

    def start_over(self) -> None:
        """A fresh start in a log_dir that may hold the logs of a run that never saved a checkpoint: those
        steps cannot be resumed, so their records are dropped, and a line says so."""
        metrics = self.log.log_dir / METRICS_FILE
        if self.distributed.is_main and metrics.exists() and metrics.stat().st_size:
            self.log.print(f"note: {self.log.log_dir} holds the logs of a run that saved no checkpoint: starting over "
                           "at step 0, its records dropped")
        self.log.truncate_after(-1)

    def restore_rng(self, rng_states: list[dict[str, Any]]) -> None:
        """This rank's random states as saved, or, when the checkpoint had another number of ranks, a note."""
        if len(rng_states) != self.world_size:
            self.log.print(f"note: the checkpoint was written by {len(rng_states)} process(es), this run has "
                           f"{self.world_size}: the data position carries over, random states are reseeded")
        else:
            note = set_rng_state(rng_states[self.distributed.rank])
            if note:
                self.log.print(f"note: {note}")

    def save(self, log_dir: Path, step: int, model: torch.nn.Module, tokenizer: str | Tokenizer,
             trainer_state: dict[str, Any], keep: int, **save_options: Any) -> None:
        """LOG_DIR/checkpoints/step_NNNNNN: the weights and `trainer_state` with every rank's random
        states added, written by rank 0 (`save_options` as core.checkpoint.save_checkpoint takes them);
        all but the newest `keep` are deleted."""
        rng_states: list[Any] = [rng_state()]
        if self.world_size > 1:
            rng_states = [None] * self.world_size
            dist.all_gather_object(rng_states, rng_state())
        if self.distributed.is_main:
            folder = save_checkpoint(checkpoint_folder(log_dir, step), model, tokenizer,
                                     trainer_state={**trainer_state, "step": step, "rng": rng_states}, step=step,
                                     **save_options)
            prune_checkpoints(log_dir, keep, written=folder)
            self.log.print(f"saved {folder}")
        if self.world_size > 1:
            dist.barrier()  # no rank runs ahead of a checkpoint that it may have to resume from
        self.saved_at = time.monotonic()

    def non_finite_loss(self, loss: float, step: int) -> UserError:
        """The error that stops a run whose loss is not finite, before the update spreads it into the
        weights: it names the run's newest checkpoint."""
        saved = list_checkpoints(self.log.log_dir)
        kept = f"the last good checkpoint is {saved[-1]}" if saved else "no checkpoint was written"
        return UserError(f"the loss is {loss} at step {step}: stopping before the update; {kept}. "
                         "Lower --max-lr or check the data")


class StopSignal:
    """SIGTERM (a cluster preempting the job) or SIGINT ask for a checkpoint at the end of the current
    step, then a clean exit; a second signal exits at once. The handler only sets a flag: saving from
    inside it could catch the model mid-update (nanochat #432)."""

    def __init__(self, log: RunLog) -> None:
        self.requested = False
        self.signum: int | None = None
        self.log = log
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            os._exit(128 + signum)
        self.requested, self.signum = True, signum
        self.log.print(f"{signal.Signals(signum).name}: saving a checkpoint after this step, then exiting "
                       "(send it again to exit at once)")
