"""Train GPT-2: build-nanogpt's 124M recipe on FineWeb-Edu 10B by default, on one process or many.

    python fineweb.py && python train_gpt2.py                   # GPT-2 124M on edu_fineweb10B/
    torchrun --standalone --nproc_per_node=8 train_gpt2.py      # the same on the 8 GPUs of one node
    python train_gpt2.py --config configs/tiny.toml --data-dir data/shakespeare --max-steps 200
    python train_gpt2.py --config configs/gpt2_124m_continue.toml      # continue OpenAI's GPT-2
    python train_gpt2.py --resume auto                          # continue the newest checkpoint in log/

Every setting is a TOML key in --config and a flag (`max_lr` is --max-lr); see `--help` and configs/.
Rank 0 reports to the terminal and to LOG_DIR (log.txt, metrics.jsonl, checkpoints/step_NNNNNN/).
SIGTERM or Ctrl-C saves a checkpoint at the end of the current step and exits (0 after SIGTERM, 130 after
Ctrl-C, so that a script running the stages stops); a second one exits at once.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist

from core.config import TrainConfig, grad_accum_steps
from core.core_benchmark import (
    PreparedTask,
    bundle_folder_on_every_rank,
    core_metric,
    evaluate_core,
    prepare_this_ranks_share,
    read_tasks,
)
from core.cpu_speedups import keep_freed_memory
from core.data import TokenLoader, ValSet, corpus_identity, to_device
from core.devices import accumulation_dtype
from core.distributed import Distributed
from core.errors import UserError, exit_on_user_error
from core.generation import Sampling, fit_to_context, generate
from core.hellaswag import (
    Example,
    gather_results,
    hellaswag_file_on_every_rank,
    read_examples_that_fit,
    score_examples,
    summarize,
)
from core.mfu import flops_per_token, peak_flops
from core.optim import build_optimizer, load_optimizer_state
from core.plotting import plot_run
from core.pretrained import load_model
from core.runlog import RunLog
from core.shards import list_shards
from core.tokenizer import get_tokenizer
from core.training import TrainingRun, run_trainer
from model import GPT, GPTConfig


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    return TrainConfig.from_argv(argv, __doc__)


# -- the learning rate: a function of the step alone, so that a resumed run picks it up where it stopped --

def cosine_learning_rate(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup to max_lr over warmup_steps (step 0 already gets max_lr / warmup_steps), then a
    cosine from max_lr down to min_lr at max_steps; min_lr after that (GPT-3's, build-nanogpt's)."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def wsd_learning_rate(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int,
                      decay_fraction: float) -> float:
    """Warmup-stable-decay: linear warmup to max_lr over warmup_steps (step 0 already gets
    max_lr / warmup_steps), max_lr until the last `decay_fraction` of max_steps, then a straight line
    down to min_lr at max_steps; min_lr after that. A run can be extended from any checkpoint taken
    before the decay, which cosine does not allow (Hagele et al. 2024, arXiv 2405.18392)."""
    decay_start = max_steps - round(decay_fraction * max_steps)
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps:
        return min_lr
    if step < decay_start:
        return max_lr
    return min_lr + (max_lr - min_lr) * (max_steps - step) / max(1, max_steps - decay_start)


def learning_rate(schedule: str, step: int, config: TrainConfig) -> float:
    """The lr of `step` under the schedule named "cosine" or "wsd" (config.schedule_name)."""
    min_lr = config.max_lr * config.min_lr_ratio
    if schedule == "wsd":
        return wsd_learning_rate(step, config.max_lr, min_lr, config.warmup_steps, config.max_steps,
                                 config.decay_fraction)
    return cosine_learning_rate(step, config.max_lr, min_lr, config.warmup_steps, config.max_steps)


class Trainer:
    def __init__(self, config: TrainConfig, distributed: Distributed) -> None:
        self.config, self.distributed = config, distributed
        self.device, self.is_main = distributed.device, distributed.is_main
        self.log_dir = Path(config.log_dir)
        self.log = RunLog(self.log_dir, enabled=self.is_main, tensorboard=config.tensorboard)
        self.run = TrainingRun(config, distributed, self.log)
        keep_freed_memory(self.device)  # on a CPU, before the model allocates: core/cpu_speedups.py
        self.dtype = self.run.dtype
        self.ddp = distributed.world_size > 1
        self.schedule = config.schedule_name  # "auto" resolved once: cosine for AdamW, wsd for Muon
        self.corpus = self._corpus()
        self.tokenizer_name = self.corpus["tokenizer"]
        self.tokenizer = get_tokenizer(self.tokenizer_name)
        # The MFU ceiling is measured (on a CPU) before any seeded draw, so that it moves no random state.
        self.peak = peak_flops(self.device, self.dtype, config.peak_flops) if self.is_main else None

        torch.manual_seed(config.seed)
        resume = self.run.find_resume_point(self.log_dir, config.resume)
        if resume is not None:
            self._check_resume(*resume)
        self.raw_model = self._build_model(resume)
        if config.micro_batch_size is None:
            chosen = self.run.choose_micro_batch(self.raw_model, config.seq_len, config.total_batch_size)
            self.config = config = replace(config, micro_batch_size=chosen)
        self.accum = grad_accum_steps(config, distributed.world_size)
        self.train_model = self.run.wrap(self.raw_model)
        self.optimizer = build_optimizer(config.optimizer, self.raw_model, config.max_lr, config.weight_decay,
                                         (config.beta1, config.beta2), config.eps, self.device, config.muon_lr,
                                         config.muon_momentum, config.muon_weight_decay)
        self.loader = TokenLoader(config.data_dir, "train", config.micro_batch_size, config.seq_len,
                                  self.tokenizer_name, distributed.rank, distributed.world_size, config.shuffle,
                                  config.seed)
        self.val_set = self._val_set()
        self.examples = self._hellaswag_examples()
        self.core_tasks = self._core_tasks()
        self.flops_per_step = flops_per_token(self.raw_model, config.seq_len) * config.total_batch_size
        self.step = 0
        self.val_loss: float | None = None
        torch.manual_seed(config.seed + distributed.rank)  # dropout masks differ between ranks
        if resume is not None:
            self._restore(*resume)
        else:
            self.run.start_over()
        self._report_setup()

    # -- setup ---------------------------------------------------------------------------------------

    def _corpus(self) -> dict:
        """The train shards' identity (core.data.corpus_identity: their tokenizer among it), which the
        checkpoints record; a folder holding val shards alone is named as what it is."""
        data_dir = Path(self.config.data_dir)
        if not data_dir.is_dir():
            raise UserError(f"data_dir {data_dir} does not exist: make it with `python fineweb.py` (FineWeb-Edu), "
                            "or point --data-dir at a folder of token shards")
        try:
            list_shards(data_dir, "train")
        except UserError as error:
            try:
                list_shards(data_dir, "val")
            except UserError:
                raise error from None
            raise UserError(f"{error}, only val shards: the whole corpus went to val; make it again with "
                            "`python fineweb.py` and a smaller --val-tokens") from None
        return corpus_identity(data_dir)

    def _build_model(self, resume: tuple[Path, tuple] | None) -> GPT:
        config = self.config
        if resume is not None:
            _, (meta, _, weights) = resume
            model = GPT.from_state_dict(GPTConfig.from_dict(meta["config"]), weights)
        elif config.init_from:
            model, tokenizer = load_model(config.init_from)
            if tokenizer.name != self.tokenizer_name:
                raise UserError(f"{config.init_from} uses the {tokenizer.name!r} tokenizer but the shards in "
                                f"{config.data_dir} were made with {self.tokenizer_name!r}")
            model = model.with_settings(config.vocab_multiple, config.dropout)
        else:
            model = GPT(config.model_config(self.tokenizer.n_vocab))
        if model.config.vocab_size < self.tokenizer.n_vocab:
            raise UserError(f"the model has {model.config.vocab_size} tokens, fewer than the {self.tokenizer.n_vocab} "
                            f"of the shards' tokenizer {self.tokenizer_name}")
        if config.seq_len > model.config.block_size:
            raise UserError(f"seq_len {config.seq_len} is longer than the model's block_size {model.config.block_size}")
        return model.to(self.device).train()

    def _val_set(self) -> ValSet | None:
        config = self.config
        if config.val_tokens == 0:
            return None
        try:
            list_shards(config.data_dir, "val")
        except UserError:
            self.log.print(f"no val shards in {config.data_dir}: val loss is off")
            return None
        return ValSet(config.data_dir, config.micro_batch_size, config.seq_len, self.tokenizer_name,
                      config.val_tokens, self.distributed.rank, self.distributed.world_size)

    def _hellaswag_examples(self) -> list[Example]:
        """The HellaSwag examples to score at every evaluation; none, with one line saying why, when the
        data cannot be had (offline) or HellaSwag is off."""
        config = self.config
        if config.hellaswag_examples == 0:
            return []
        try:
            path = hellaswag_file_on_every_rank(Path(config.hellaswag_data) if config.hellaswag_data else None,
                                                flag="--hellaswag-data")
        except UserError as error:
            self.log.print(f"HellaSwag is off for this run: {error}")
            return []
        block = self.raw_model.config.block_size
        examples, left_out = read_examples_that_fit(path, self.tokenizer, block, limit=config.hellaswag_examples)
        if left_out:
            self.log.print(f"HellaSwag: {left_out} of {left_out + len(examples)} examples are longer than "
                           f"block_size {block} and are left out")
        return examples

    def _core_tasks(self) -> list[PreparedTask]:
        """This rank's share of the CORE examples to score at CORE evaluations; none, with one line saying
        why, when CORE is off or its bundle cannot be had (offline)."""
        config = self.config
        if config.core_interval == 0:
            return []
        try:
            bundle = bundle_folder_on_every_rank(Path(config.core_bundle) if config.core_bundle else None,
                                                 flag="--core-bundle")
            return prepare_this_ranks_share(read_tasks(bundle), self.tokenizer, self.raw_model.config.block_size,
                                            config.core_max_per_task or None)
        except UserError as error:
            self.log.print(f"CORE is off for this run: {error}")
            return []

    def _check_resume(self, folder: Path, checkpoint: tuple) -> None:
        """Refuse to resume a checkpoint of another run (another model, tokenizer or corpus) or one past
        max_steps, before anything is written; say which settings this segment changes."""
        meta, trainer_state, _ = checkpoint
        if meta["tokenizer"] != self.tokenizer_name:
            raise UserError(f"{folder} was trained on {meta['tokenizer']} tokens but the shards in "
                            f"{self.config.data_dir} are {self.tokenizer_name}: resume on the run's own shards, or "
                            "choose another --log-dir")
        then = meta.get("corpus")
        if then is not None and then["fingerprint"] != self.corpus["fingerprint"]:
            raise UserError(f"--data-dir {self.config.data_dir} holds another corpus ({self.corpus['shards']} train "
                            f"shard(s), {self.corpus['tokens']:,} tokens) than the {then['shards']} shard(s), "
                            f"{then['tokens']:,} tokens that {folder} was trained on: resume on the run's own shards, "
                            "or choose another --log-dir")
        if trainer_state["step"] > self.config.max_steps:
            raise UserError(f"{folder} is at step {trainer_state['step']}, past --max-steps {self.config.max_steps}: "
                            "raise --max-steps to continue the run")
        self.run.check_resume(folder, trainer_state.get("config", {}), self.config)

    def _restore(self, folder: Path, checkpoint: tuple) -> None:
        meta, trainer_state, _ = checkpoint
        load_optimizer_state(self.optimizer, trainer_state["optimizer"], self.config.optimizer, str(folder))
        self.loader.load_state_dict(trainer_state["loader"])
        self.step = trainer_state["step"]
        self.val_loss = meta.get("val_loss")
        self.run.restore_rng(trainer_state["rng"])
        self.run.continue_logs(self.step)
        self.log.print(f"resuming from {folder} at step {self.step}")

    def _report_setup(self) -> None:
        config, model = self.config, self.raw_model
        self.run.write_settings(config, self.log_dir)
        peak = f"{self.peak:.3g} FLOP/s per device" if self.peak else "unknown (set --peak-flops for MFU)"
        self.log.print(f"model: {model.num_params():,} parameters, vocab {model.config.vocab_size} "
                       f"({model.config.padded_vocab_size} rows), tokenizer {self.tokenizer_name}")
        self.log.print(f"batch: {config.total_batch_size:,} tokens = {config.micro_batch_size} x {config.seq_len} x "
                       f"{self.distributed.world_size} process(es) x {self.accum} accumulation step(s); peak {peak}")

    # -- training ------------------------------------------------------------------------------------

    def train_step(self) -> tuple[float, float, float]:
        """One optimizer step over total_batch_size tokens, as build-nanogpt takes it: the batch's mean
        loss over every rank, the gradient norm before clipping, and the learning rate."""
        model, optimizer = self.train_model, self.optimizer
        lr = learning_rate(self.schedule, self.step, self.config)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # Muon's groups run at their multiple of it
        loss_accum = torch.zeros((), device=self.device)
        for micro_step in range(self.accum):
            x, y = (to_device(t, self.device) for t in self.loader.next_batch())
            if self.ddp:
                # All-reduce the gradients in the last micro-step's backward only. DDP decides that in
                # the forward pass, so it is set before it (build-nanogpt #30).
                model.require_backward_grad_sync = micro_step == self.accum - 1
            with self.run.autocast():  # bfloat16 autocast over float32 weights where the run is bf16
                _, loss = model(x, y)
            # Each micro-batch's share of the batch's mean, so that the gradient (and what the clip
            # threshold means) is the same whatever the accumulation (nanoGPT #168).
            loss = loss / self.accum
            loss_accum += loss.detach()
            loss.backward()
        if self.ddp:  # the loss of every rank's share, for the log; gloo has no AVG (build-nanogpt #4)
            dist.all_reduce(loss_accum, op=dist.ReduceOp.SUM)
            loss_accum /= self.distributed.world_size
        loss_value = loss_accum.item()
        if not math.isfinite(loss_value):  # stop before the update spreads it into every weight
            raise self.run.non_finite_loss(loss_value, self.step)
        max_norm = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
        # The raw model's parameters are the compiled and DDP-wrapped module's own.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), max_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss_value, grad_norm, lr

    def train(self) -> None:
        config = self.config
        self.run.stop_on_signals()
        if self.step == 0:
            self.evaluate()
        bar = self.log.progress(total=config.max_steps, initial=self.step, enabled=config.progress)
        with self.log:  # closes the progress bar and the event files, however the loop ends
            while self.step < config.max_steps:
                started = time.perf_counter()
                loss, grad_norm, lr = self.train_step()
                seconds = time.perf_counter() - started
                self._report_step(loss, grad_norm, lr, seconds)
                self.step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
                if self.run.stop_requested():  # save at once: torchrun's SIGKILL follows its SIGTERM in 30 s
                    self.save()
                    self.log.print(f"stopped at step {self.step}; continue with --resume auto")
                    self.run.end_if_interrupted()
                    return
                if self.step % config.eval_interval == 0 or self.step == config.max_steps:
                    self.evaluate()
                if (self.step % config.checkpoint_interval == 0 or self.step == config.max_steps
                        or 0 < config.checkpoint_minutes <= self.run.minutes_since_save()):
                    self.save()
        self.log.print(f"done: {self.step} steps" + (f", val loss {self.val_loss:.4f}" if self.val_loss else ""))

    def _report_step(self, loss: float, grad_norm: float, lr: float, seconds: float) -> None:
        tokens_per_second = self.config.total_batch_size / seconds
        mfu = self.flops_per_step / seconds / (self.peak * self.distributed.world_size) if self.peak else None
        on_cuda = self.device.type == "cuda"
        memory = {"peak_memory_gib": torch.cuda.max_memory_allocated(self.device) / 2**30} if on_cuda else {}
        self.log.record("train", self.step, loss=loss, lr=lr, grad_norm=grad_norm,
                        tokens_per_second=tokens_per_second, mfu=mfu, ms=seconds * 1000, **memory)
        mfu_text = f" | mfu {100 * mfu:.1f}%" if mfu is not None else ""
        if self.log.bar is None or self.step % 10 == 0:
            self.log.print(f"step {self.step:5d} | loss {loss:.6f} | lr {lr:.4e} | norm "
                           f"{grad_norm:.4f} | dt {seconds * 1000:.2f}ms | tok/sec {tokens_per_second:.2f}"
                           f"{mfu_text}")

    # -- evaluation ----------------------------------------------------------------------------------

    def evaluate(self) -> None:
        """Val loss, HellaSwag, CORE (every core_interval steps) and samples, on the raw model (every rank
        takes part in all but the samples), then the plot."""
        if self.val_set is not None:
            self.val_loss = self.validation_loss()
            self.log.record("val", self.step, val_loss=self.val_loss)
            self.log.print(f"step {self.step:5d} | val loss {self.val_loss:.4f}")
        if self.examples:
            with self.run.autocast():
                results = gather_results(score_examples(self.raw_model, self.examples, progress=False))
            summary = summarize(results)
            self.log.record("hellaswag", self.step, **summary)
            self.log.print(f"step {self.step:5d} | HellaSwag acc_norm {summary['acc_norm']:.4f} "
                           f"(acc {summary['acc']:.4f}, {summary['n']} examples)")
        if self.core_tasks and (self.step % self.config.core_interval == 0 or self.step == self.config.max_steps):
            with self.run.autocast():
                scores, _ = evaluate_core(self.raw_model, self.core_tasks, progress=False)
            core = core_metric(scores)
            self.log.record("core", self.step, core=core, centered={s.label: s.centered for s in scores},
                            tasks=len(scores), examples=sum(s.examples for s in scores))
            self.log.print(f"step {self.step:5d} | CORE {core:.4f} ({len(scores)} tasks, "
                           f"{sum(s.examples for s in scores)} examples)")
        if self.is_main and self.config.num_samples and self.config.sample_tokens:
            samples = self.samples()
            self.log.record("sample", self.step, samples=samples)
            for text in samples:
                self.log.print(f"sample: {text!r}")
        if self.is_main and self.config.plot and self.step > 0:  # from the first train record on
            plot_run(self.log_dir, self.log_dir / "plot.png")

    @torch.no_grad()
    def validation_loss(self) -> float:
        """The mean loss over the fixed val set, across ranks, in float32 from the logits (modded-nanogpt #133)."""
        totals = torch.zeros(2, device=self.device, dtype=accumulation_dtype(self.device))  # summed loss, tokens
        with self.raw_model.evaluating():
            for x, y in self.val_set.batches():
                with self.run.autocast():
                    _, loss = self.raw_model(to_device(x, self.device), to_device(y, self.device))
                totals[0] += loss.to(totals.dtype) * y.numel()
                totals[1] += y.numel()
        if self.distributed.world_size > 1:
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        return (totals[0] / totals[1]).item()

    def samples(self) -> list[str]:
        """A few continuations of the sample prompt, the same random draws at every evaluation."""
        prompt = self.tokenizer.encode_ordinary(self.config.sample_prompt) or [self.tokenizer.eot_token]
        prompt, new_tokens = fit_to_context(prompt, self.config.sample_tokens, self.raw_model.config.block_size)
        generator = torch.Generator(device=self.device).manual_seed(self.config.seed)
        rows = generate(self.raw_model, prompt, self.config.num_samples, new_tokens, Sampling(top_k=50), generator)
        return [self.tokenizer.decode(prompt + row) for row in rows]

    # -- checkpoints ---------------------------------------------------------------------------------

    def save(self) -> None:
        """A checkpoint with all that resuming needs, from every rank's random states to the data position."""
        trainer_state = {"optimizer": self.optimizer.state_dict(), "loader": self.loader.state_dict(),
                         "config": self.config.to_dict()}
        self.run.save(self.log_dir, self.step, self.raw_model, self.tokenizer_name, trainer_state,
                      self.config.keep_checkpoints, val_loss=self.val_loss, corpus=self.corpus)


def main(argv: list[str] | None = None) -> None:
    run_trainer(Trainer, parse_config(argv))


if __name__ == "__main__":
    exit_on_user_error(main)
