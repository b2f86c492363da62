"""Fine-tune any model on multiple-choice questions with GPT-1's recipe, and measure what it gains.

    python finetune_mc.py --config configs/storycloze_gpt1.toml     # GPT-1 on Story Cloze, as in the paper
    python finetune_mc.py --config configs/storycloze_gpt2.toml --init-from log/checkpoints/step_019073
    torchrun --standalone --nproc_per_node=4 finetune_mc.py --config configs/storycloze_gpt1.toml

The data is a Story Cloze CSV (InputSentence1..4, RandomFifthSentenceQuiz1/2, AnswerRightEnding) or
HellaSwag-format JSONL (4 endings). `val_examples` questions of train_data are held out (a seeded draw)
to pick the best epoch; test_data is only scored. Each ending becomes [start] context [delimiter]
ending [extract]; a linear unit on the extract token's hidden state scores it, and training minimises
the classifier's loss + lm_coef x the LM loss with AdamW, a linear warmup and decay, and clipping.

First the model's zero-shot accuracy (the likelihood of each ending, as hellaswag.py measures it), then
train, val and test accuracy after every epoch, as a table and in LOG_DIR/metrics.jsonl. The best
epoch by val accuracy is saved to LOG_DIR/best: one of our checkpoints (sample.py, hellaswag.py and
export_hf.py read it) with its classifier in classifier.safetensors beside the weights.
Every setting is a TOML key in --config and a flag (`max_lr` is --max-lr); see --help and configs/.
A checkpoint at the end of every epoch (LOG_DIR/checkpoints/) lets a re-run continue (--resume auto, the
default); SIGTERM or Ctrl-C saves one at the end of the current step and exits.
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from core.checkpoint import save_checkpoint
from core.config import FinetuneConfig
from core.cpu_speedups import keep_freed_memory
from core.distributed import Distributed
from core.errors import UserError, exit_on_user_error
from core.hellaswag import gather_results, score_examples, summarize
from core.multiple_choice import (
    CLASSIFIER_FILE,
    ChoiceHead,
    Encoded,
    MultipleChoiceModel,
    Question,
    accuracy,
    add_markers,
    collate,
    encode_questions,
    joint_loss,
    read_questions,
    split_off,
    with_classifier,
    zero_shot_examples,
)
from core.optim import make_optimizer
from core.pretrained import load_model
from core.runlog import RunLog
from core.training import TrainingRun, run_trainer
from model import GPT

BEST_FOLDER = "best"


def linear_learning_rate(step: int, max_lr: float, warmup_steps: int, max_steps: int) -> float:
    """GPT-1's fine-tuning schedule: linear warmup to max_lr over warmup_steps (step 0 already gets
    max_lr / warmup_steps), then a straight line down to 0 at max_steps."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    return max_lr * max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


class Finetuner:
    def __init__(self, config: FinetuneConfig, distributed: Distributed) -> None:
        self.config, self.distributed = config, distributed
        self.device, self.is_main = distributed.device, distributed.is_main
        self.log_dir = Path(config.log_dir)
        self.log = RunLog(self.log_dir, enabled=self.is_main)
        self.run = TrainingRun(config, distributed, self.log)
        keep_freed_memory(self.device)  # on a CPU, before the model allocates: core/cpu_speedups.py
        resume = self.run.find_resume_point(self.log_dir, config.resume)
        if resume is not None:
            folder, (_, trainer_state, _) = resume
            self.run.check_resume(folder, trainer_state.get("config", {}), config)
        elif (self.log_dir / BEST_FOLDER).exists():
            raise UserError(f"{self.log_dir} holds the result of an earlier run ({BEST_FOLDER}/) and no checkpoint to "
                            "resume: choose another --log-dir, or move it away")
        else:
            self.run.start_over()
        self.show_progress = self.is_main and (sys.stderr.isatty() if config.progress is None else config.progress)
        per_step = config.micro_batch_size * distributed.world_size
        if config.batch_size % per_step:
            raise UserError(f"batch_size {config.batch_size} is not a multiple of micro_batch_size "
                            f"{config.micro_batch_size} x {distributed.world_size} process(es)")
        self.accum = config.batch_size // per_step
        self.ddp = distributed.world_size > 1

        self.train_questions, self.val_questions, self.test_questions = self._questions()
        model, head = self._build_model(resume)
        self.model = MultipleChoiceModel(model, head).to(self.device).train()
        self.train_model = self.run.wrap(self.model)
        self.optimizer = make_optimizer(self.model, config.max_lr, config.weight_decay, (config.beta1, config.beta2),
                                        config.eps, self.device)
        block_size = model.config.block_size
        self.train_set, self.val_set, self.test_set = (
            self._encode(questions, block_size, name) for questions, name in
            ((self.train_questions, "train"), (self.val_questions, "val"), (self.test_questions, "test")))
        # As OpenAI's code, a last batch smaller than batch_size is dropped (another one each epoch).
        self.steps_per_epoch = len(self.train_set) // config.batch_size
        if self.steps_per_epoch == 0:
            raise UserError(f"{len(self.train_set)} training questions are fewer than one batch of {config.batch_size}")
        self.max_steps = config.epochs * self.steps_per_epoch
        self.warmup_steps = max(1, round(config.warmup_fraction * self.max_steps)) if config.warmup_fraction else 0
        self.step, self.rows, self.best, self.epoch_losses = 0, [], None, []
        torch.manual_seed(config.seed + distributed.rank)  # dropout masks differ between ranks
        if resume is not None:
            self._restore(*resume)
        self._report_setup(model.num_params())

    # -- setup ---------------------------------------------------------------------------------------

    def _build_model(self, resume: tuple[Path, tuple] | None) -> tuple[GPT, ChoiceHead]:
        """The LM with its marker tokens and the classifier: from init_from, the markers and the head
        drawn from the seed, or as a checkpoint of this run holds them (with its tokenizer and markers)."""
        config = self.config
        if resume is not None:
            gpt, self.tokenizer = load_model(str(resume[0]))
            loaded, self.markers = with_classifier(gpt, resume[0])
            model, head = loaded.gpt, ChoiceHead(loaded.gpt.config.n_embd, config.clf_dropout)
            head.load_state_dict(loaded.head.state_dict())
            self.zero_shot = resume[1][1]["zero_shot"]
        else:
            model, self.tokenizer = load_model(config.init_from)
            self.zero_shot = self._zero_shot(model) if config.zero_shot else {}
            generator = torch.Generator().manual_seed(config.seed)
            model, self.tokenizer, self.markers = add_markers(model, self.tokenizer, config.markers, generator)
            torch.manual_seed(config.seed)
            head = ChoiceHead(model.config.n_embd, config.clf_dropout)
        return model.with_settings(model.config.vocab_multiple, config.dropout), head

    def _restore(self, folder: Path, checkpoint: tuple) -> None:
        _, trainer_state, _ = checkpoint
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.step, self.rows, self.best = trainer_state["step"], trainer_state["rows"], trainer_state["best"]
        self.epoch_losses = trainer_state["epoch_losses"]
        self.run.restore_rng(trainer_state["rng"])
        if self.step > self.max_steps:
            raise UserError(f"{folder} is at step {self.step}, past the {self.max_steps} steps of --epochs "
                            f"{self.config.epochs}: raise --epochs to continue the run")
        self.run.continue_logs(self.step)
        self.log.print(f"resuming from {folder} at step {self.step}")

    def _questions(self) -> tuple[list[Question], list[Question], list[Question]]:
        config = self.config
        labelled = read_questions(Path(config.train_data), config.max_train_examples or None)
        train, val = split_off(labelled, config.val_examples, config.split_seed) if config.val_examples else (
            labelled, [])
        test = read_questions(Path(config.test_data), config.max_test_examples or None) if config.test_data else []
        if len({len(q.endings) for q in [*train, *val, *test]}) > 1:
            raise UserError("train_data and test_data have different numbers of endings per question")
        return train, val, test

    def _encode(self, questions: list[Question], block_size: int, name: str) -> list[Encoded]:
        encoded, cropped = encode_questions(questions, self.tokenizer, self.markers, block_size)
        if cropped:
            self.log.print(f"{name}: {cropped} sequences longer than block_size {block_size} lost the start of "
                           "their context")
        return encoded

    def _zero_shot(self, model: torch.nn.Module) -> dict[str, dict]:
        """The untouched model's accuracy on val and test, ranking the endings by their likelihood."""
        scores = {}
        model.to(self.device)
        for name, questions in (("val", self.val_questions), ("test", self.test_questions)):
            if not questions:
                continue
            examples = zero_shot_examples(questions, self.tokenizer, model.config.block_size)
            with self.run.autocast():
                results = gather_results(score_examples(model, examples, self.config.eval_batch_size,
                                                  progress=self.show_progress, desc=f"zero-shot {name}"))
            scores[name] = summarize(results)
            self.log.record("zero_shot", 0, split=name, **scores[name])
            self.log.print(f"zero-shot {name}: acc {scores[name]['acc']:.4f}, acc_norm {scores[name]['acc_norm']:.4f} "
                           f"({scores[name]['n']} questions)")
        return scores

    def _report_setup(self, num_params: int) -> None:
        config = self.config
        self.run.write_settings(config, self.log_dir)
        self.log.print(f"model: {num_params:,} parameters, tokenizer {self.tokenizer.name}, markers "
                       f"start/delimiter/extract = {self.markers.start}/{self.markers.delimiter}/"
                       f"{self.markers.extract}")
        self.log.print(f"questions: {len(self.train_set)} train, {len(self.val_set)} val, {len(self.test_set)} test; "
                       f"{self.steps_per_epoch} steps per epoch of {config.batch_size} questions = "
                       f"{config.micro_batch_size} x {self.distributed.world_size} process(es) x {self.accum} "
                       f"accumulation step(s); warmup {self.warmup_steps} of {self.max_steps} steps")

    # -- training ------------------------------------------------------------------------------------

    def train(self) -> None:
        config = self.config
        if self.step == self.max_steps:
            self.log.print(f"{self.log_dir}: complete already, nothing to do")
            self.report(record=False)
            return
        self.run.stop_on_signals()
        bar = self.log.progress(total=self.max_steps, initial=self.step, enabled=config.progress)
        with self.log:  # closes the progress bar and the event files, however the loop ends
            while self.step < self.max_steps:
                epoch, index = divmod(self.step, self.steps_per_epoch)
                epoch += 1
                shuffle = torch.Generator().manual_seed(config.seed + epoch)  # the same order on every rank
                order = torch.randperm(len(self.train_set), generator=shuffle)[index * config.batch_size:]
                batch = [self.train_set[i] for i in order[: config.batch_size]]
                self.epoch_losses.append(self.train_step(self.step, batch))
                self.step += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(epoch=epoch, loss=f"{self.epoch_losses[-1]:.4f}", refresh=False)
                stopping = self.run.stop_requested()
                if self.step % self.steps_per_epoch == 0:
                    self.end_epoch(epoch)
                if self.step % self.steps_per_epoch == 0 or stopping:
                    self.save()
                if stopping:
                    self.log.print(f"stopped at step {self.step} of epoch {epoch}; continue with --resume auto")
                    self.run.end_if_interrupted()
                    return
        self.report()

    def end_epoch(self, epoch: int) -> None:
        """Accuracy on every split; LOG_DIR/best replaced when this epoch is the best so far."""
        row = self.evaluate(epoch, self.step, sum(self.epoch_losses) / len(self.epoch_losses))
        self.rows.append(row)
        self.epoch_losses = []
        # The first epoch of the best val accuracy; without a val set, the last epoch.
        if self.best is None or not self.val_set or row["val_acc"] > self.best["val_acc"]:
            self.best = row
            self.save_best(row)

    def train_step(self, step: int, batch: list[Encoded]) -> float:
        """One optimizer step over a batch of questions, this rank's share in micro-batches, as
        train_gpt2.py takes its step; the mean loss."""
        config, model, optimizer = self.config, self.train_model, self.optimizer
        lr = linear_learning_rate(step, config.max_lr, self.warmup_steps, self.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        mine = batch[self.distributed.rank :: self.distributed.world_size]
        size = config.micro_batch_size
        totals = torch.zeros(3, device=self.device)  # the joint loss, the classifier's, the LM's
        for micro_step in range(self.accum):
            inputs = collate(mine[micro_step * size : (micro_step + 1) * size], self.device)
            if self.ddp:
                # All-reduce the gradients in the last micro-step's backward only. DDP decides that in
                # the forward pass, so it is set before it (build-nanogpt #30).
                model.require_backward_grad_sync = micro_step == self.accum - 1
            with self.run.autocast():
                _, clf_loss, lm_loss = model(inputs["idx"], inputs["extract"], inputs["labels"],
                                             inputs["lm_targets"] if config.lm_coef > 0 else None)
                loss = joint_loss(clf_loss, lm_loss, config.lm_coef)
            (loss / self.accum).backward()  # each micro-batch's share of the batch's mean (nanoGPT #168)
            parts = (loss, clf_loss, lm_loss if lm_loss is not None else torch.zeros_like(clf_loss))
            totals += torch.stack([part.detach().float() for part in parts])
        totals /= self.accum
        if self.ddp:  # the mean over every rank, for the log; gloo has no AVG (build-nanogpt #4)
            dist.all_reduce(totals, op=dist.ReduceOp.SUM)
            totals /= self.distributed.world_size
        loss_value, clf, lm_value = totals.tolist()
        if not math.isfinite(loss_value):  # stop before the update spreads it into every weight
            raise self.run.non_finite_loss(loss_value, step)
        max_norm = config.grad_clip if config.grad_clip > 0 else math.inf
        # The model's parameters are the compiled and DDP-wrapped module's own.
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm).item()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

        lm = {"lm_loss": lm_value} if config.lm_coef > 0 else {}
        self.log.record("train", step, loss=loss_value, clf_loss=clf, **lm, lr=lr, grad_norm=grad_norm)
        if self.log.bar is None and (step % 10 == 0 or step == self.max_steps - 1):
            self.log.print(f"step {step:5d} | loss {loss_value:.4f} | clf {clf:.4f}"
                           + (f" | lm {lm_value:.4f}" if lm else "") + f" | lr {lr:.4e} | norm {grad_norm:.4f}")
        return loss_value

    # -- evaluation and checkpoints ------------------------------------------------------------------

    def evaluate(self, epoch: int, step: int, train_loss: float) -> dict:
        """Accuracy on every split after an epoch (every rank takes part); one table row."""
        started = time.perf_counter()
        row: dict = {"epoch": epoch, "train_loss": train_loss}
        for name, encoded in (("train", self.train_set), ("val", self.val_set), ("test", self.test_set)):
            if encoded:
                with self.run.autocast():
                    row[f"{name}_acc"] = accuracy(self.model, encoded, self.config.eval_batch_size)
        self.log.record("epoch", step, **row)
        scores = ", ".join(f"{name} acc {row[f'{name}_acc']:.4f}" for name in ("train", "val", "test")
                           if f"{name}_acc" in row)
        self.log.print(f"epoch {epoch} (step {step}) | train loss {train_loss:.4f} | {scores} "
                       f"({time.perf_counter() - started:.1f}s)")
        return row

    def save(self) -> None:
        """A checkpoint to resume from (LOG_DIR/checkpoints/step_NNNNNN, only the newest kept): the model
        as LOG_DIR/best holds it, and the optimizer, the epochs so far and every rank's random states."""
        trainer_state = {"optimizer": self.optimizer.state_dict(), "rows": self.rows, "best": self.best,
                         "epoch_losses": self.epoch_losses, "zero_shot": self.zero_shot,
                         "config": self.config.to_dict()}
        self.run.save(self.log_dir, self.step, self.model.gpt, self.tokenizer, trainer_state, keep=1,
                      extra_weights={CLASSIFIER_FILE: self.model.head.state_dict()}, markers=vars(self.markers))

    def save_best(self, row: dict) -> None:
        """LOG_DIR/best: the LM with its marker tokens, and the classifier beside it."""
        if self.is_main:
            folder = save_checkpoint(self.log_dir / BEST_FOLDER, self.model.gpt, self.tokenizer,
                                     extra_weights={CLASSIFIER_FILE: self.model.head.state_dict()},
                                     markers=vars(self.markers), lm_coef=self.config.lm_coef, **row)
            self.log.print(f"saved {folder} (epoch {row['epoch']})")
        if self.distributed.world_size > 1:
            dist.barrier()

    def report(self, record: bool = True) -> None:
        """The table of every epoch, the zero-shot row first, and the summary record."""
        rows, best = self.rows, self.best
        def cell(value: float | None) -> str:
            return f"{value:.4f}" if value is not None else "-"

        lines = ["| model | train loss | train acc | val acc | test acc |", "| --- | --- | --- | --- | --- |"]
        for metric in ("acc", "acc_norm") if self.zero_shot else ():
            lines.append(f"| zero-shot ({metric}) | - | - | {cell(self.zero_shot.get('val', {}).get(metric))} | "
                         f"{cell(self.zero_shot.get('test', {}).get(metric))} |")
        for row in rows:
            lines.append(f"| epoch {row['epoch']} | {row['train_loss']:.4f} | {cell(row.get('train_acc'))} | "
                         f"{cell(row.get('val_acc'))} | {cell(row.get('test_acc'))} |")
        self.log.print("\n".join(lines))
        self.log.print(f"best epoch by val accuracy: {best['epoch']} (val {cell(best.get('val_acc'))}, test "
                       f"{cell(best.get('test_acc'))}), saved in {self.log_dir / BEST_FOLDER}")
        if not record:
            return
        zero_shot = {f"zero_shot_{name}_acc": scores["acc"] for name, scores in self.zero_shot.items()}
        self.log.record("summary", self.max_steps, best_epoch=best["epoch"], best_val_acc=best.get("val_acc"),
                        best_test_acc=best.get("test_acc"), **zero_shot)


def main(argv: list[str] | None = None) -> None:
    run_trainer(Finetuner, FinetuneConfig.from_argv(argv, __doc__))


if __name__ == "__main__":
    exit_on_user_error(main)
