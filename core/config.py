"""The settings of a run: one flat dataclass per stage, read from TOML and overridden from the command line.

`Settings` is what every stage's settings share; `TrainConfig` is train_gpt2.py's (defaults:
build-nanogpt's GPT-2 124M recipe on FineWeb-Edu 10B), `FinetuneConfig` finetune_mc.py's (defaults:
GPT-1's Story Cloze recipe). Each checks itself (`check()`); the model's shape is checked by the
model's own config (model.GPTConfig), never twice. Every field is a TOML key
and a flag: `max_lr = 6e-4` in a file is `--max-lr 6e-4` on the command line, typed from the field.
Unknown keys are refused by name, with the nearest known key suggested: a typo must never leave a
setting silently at its default.
"""

from __future__ import annotations

import argparse
import difflib
import json
import math
import sys
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from core.cli import StageParser
from core.errors import UserError
from model import GPTConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib
if typing.TYPE_CHECKING:  # annotations only (they are never evaluated here): Python 3.10 has no Self
    from typing import Self


class Settings:
    """A stage's settings: a dataclass whose every field is a TOML key and a flag. Subclasses add
    `check()`, refusing what can never work, and RESUME_FIXED, the settings that a resumed run must
    keep (the model's shape, the data): another value makes another run."""

    RESUME_FIXED: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_argv(cls, argv: list[str] | None, description: str = "") -> Self:
        """The settings of a command line: defaults, then --config FILE, then the flags given, then `check()`."""
        parser = StageParser(description)
        cls.add_arguments(parser)
        args, unknown = parser.parse_known_args(argv)
        if unknown:
            given = next((item for item in unknown if item.startswith("--")), unknown[0])
            raise cls.unknown_key(given.removeprefix("--").split("=")[0].replace("-", "_"), "command line")
        values = cls.read_toml(args.config) if args.config is not None else {}
        for name in cls.field_names():
            if hasattr(args, name):
                values[name] = cls.coerce(name, getattr(args, name), flag(name))
        return cls.from_values(values)

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> Self:
        settings = cls(**values)
        settings.check()
        return settings

    def check(self) -> None:
        """Raise a UserError for settings that can never work."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [field.name for field in fields(cls)]

    @classmethod
    def read_toml(cls, path: Path) -> dict[str, Any]:
        """A TOML file's values, each typed as its field; unknown keys refused by name."""
        try:
            with open(path, "rb") as f:
                values = tomllib.load(f)
        except OSError as error:
            raise UserError(f"cannot read config {path}: {error.strerror or error}") from None
        except tomllib.TOMLDecodeError as error:
            raise UserError(f"{path} is not valid TOML: {error}") from None
        for key, value in values.items():
            if key not in cls.field_names():
                raise cls.unknown_key(key, str(path))
            if isinstance(value, dict):
                raise UserError(f"{path}: [{key}] tables are not used; every setting is a top-level key")
        return {key: cls.coerce(key, value, str(path)) for key, value in values.items()}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """--config FILE, then one --some-key VALUE flag per field (a bool flag alone means true)."""
        parser.add_argument("--config", type=Path, help="a TOML file of settings (see configs/); flags override it")
        group: argparse._ArgumentGroup | argparse.ArgumentParser = parser
        for item in fields(cls):
            if item.metadata.get("group"):
                group = parser.add_argument_group(item.metadata["group"])
            base, _ = cls.field_type(item.name)
            metavar = {bool: "BOOL", int: "INT", float: "FLOAT", str: "TEXT"}[base]
            group.add_argument(flag(item.name), dest=item.name, metavar=metavar,
                               nargs="?" if base is bool else None, const="true" if base is bool else None,
                               default=argparse.SUPPRESS,
                               help=f"{item.metadata.get('help', '')} (default: {_shown(item.default)})")

    @classmethod
    def field_type(cls, name: str) -> tuple[type, bool]:
        """The base type of a field (bool, int, float or str) and whether it may be None."""
        hint = typing.get_type_hints(cls)[name]
        args = typing.get_args(hint)
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            return next(arg for arg in args if arg is not type(None)), type(None) in args
        return hint, False

    @classmethod
    def unknown_key(cls, key: str, where: str) -> UserError:
        close = difflib.get_close_matches(key, cls.field_names(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return UserError(f"{where}: unknown key {key!r}{hint}")

    @classmethod
    def coerce(cls, name: str, value: Any, where: str) -> Any:
        """`value` (from TOML or a command-line string) as field `name`'s type, or a UserError."""
        base, optional = cls.field_type(name)
        if isinstance(value, str) and base is not str:
            value = _parse_text(value, base, optional)
        if value is None and optional:
            return None
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if base is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if type(value) is not base:
            raise UserError(f"{where}: {name} must be {'a ' + base.__name__ if base is not int else 'an int'}, "
                            f"got {value!r}")
        return value


def flag(name: str) -> str:
    """The command-line flag of a setting: max_lr is --max-lr."""
    return "--" + name.replace("_", "-")


def _shown(default: Any) -> str:
    """A default as a user would type it: auto for None, true/false, text quoted."""
    if default is None:
        return "auto"
    return str(default).lower() if isinstance(default, bool) else json.dumps(default) if isinstance(default, str) \
        else str(default)


def _parse_text(text: str, base: type, optional: bool) -> Any:
    lowered = text.strip().lower()
    if optional and lowered in ("", "none", "auto"):
        return None
    if base is bool:
        return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(lowered, text)
    try:
        number = float(text.replace("_", ""))
    except ValueError:
        return text
    return number if base is float or not number.is_integer() else int(number)


def _require(config: Settings, at_least_one: tuple[str, ...] = (), not_negative: tuple[str, ...] = ()) -> None:
    for name in at_least_one:
        if getattr(config, name) is not None and getattr(config, name) < 1:
            raise UserError(f"{name} must be at least 1, got {getattr(config, name)}")
    for name in not_negative:
        if getattr(config, name) < 0:
            raise UserError(f"{name} must not be negative, got {getattr(config, name)}")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"{name} {value!r}: choose one of {', '.join(choices)}")


def _check_dtype(dtype: str) -> None:
    if dtype not in ("auto", "bfloat16", "float32"):
        raise UserError(f"dtype {dtype!r} cannot train here: choose auto, bfloat16 or float32 "
                        "(float16 would need loss scaling)")


def setting(default: Any, help: str, group: str = "") -> Any:
    """A settings field: its default, the one line that documents it (in --help), and, on the first
    field of a group, the group's title; the fields that follow belong to it until the next title."""
    return field(default=default, metadata={"help": help, "group": group})


@dataclass
class TrainConfig(Settings):
    """train_gpt2.py: build-nanogpt's GPT-2 124M recipe on FineWeb-Edu 10B by default."""

    data_dir: str = setting("edu_fineweb10B", "the folder of token shards (what `python fineweb.py` writes)",
                            group="data and logs")
    log_dir: str = setting("log", "where log.txt, metrics.jsonl, config.toml, plot.png and checkpoints/ go")
    shuffle: bool = setting(False, "shuffle shards and sequences each epoch, from --seed (build-nanogpt reads in "
                                   "order)")
    init_from: str = setting("", "start from this model spec (gpt2, an HF folder, a checkpoint) instead of "
                                 "random weights; the shape flags are then its own", group="model")
    n_layer: int = setting(12, "transformer blocks")
    n_head: int = setting(12, "attention heads per block")
    n_embd: int = setting(768, "width of the residual stream")
    block_size: int = setting(1024, "the longest context, in tokens (the position table's rows)")
    dropout: float = setting(0.0, "dropout probability in training (0: none, as GPT-2's pre-training)")
    vocab_multiple: int = setting(64, "pad the embedding rows to a multiple of this (50257 -> 50304): faster "
                                      "head matmuls on GPUs")
    total_batch_size: int = setting(524288, "tokens per optimizer step, over all processes and accumulation "
                                            "steps (2**19, ~0.5M, as GPT-3 Small)", group="batch")
    micro_batch_size: int | None = setting(64, "sequences per forward pass per process; auto: the largest power "
                                               "of two that fits, tried at start-up")
    seq_len: int = setting(1024, "tokens per training sequence (at most block_size)")
    max_steps: int = setting(19073, "optimizer steps in all (10B tokens / 2**19 tokens a step)",
                             group="optimizer and schedule (GPT-3 paper, table 2.1, as build-nanogpt)")
    warmup_steps: int = setting(715, "steps of linear warmup to max_lr")
    max_lr: float = setting(6e-4, "AdamW's peak learning rate")
    min_lr_ratio: float = setting(0.1, "the final learning rate as a fraction of max_lr")
    weight_decay: float = setting(0.1, "AdamW's decoupled weight decay, on 2-D weights only")
    beta1: float = setting(0.9, "AdamW's first-moment decay")
    beta2: float = setting(0.95, "AdamW's second-moment decay")
    eps: float = setting(1e-8, "AdamW's epsilon")
    grad_clip: float = setting(1.0, "clip the gradient's global norm to this; 0 turns clipping off")
    optimizer: str = setting("adamw", "adamw, or muon: Muon for the blocks' matrices, AdamW at max_lr for the "
                                      "rest")
    muon_lr: float = setting(0.02, "Muon's peak learning rate, scheduled as max_lr is")
    muon_momentum: float = setting(0.95, "Muon's Nesterov momentum")
    muon_weight_decay: float = setting(0.0, "Muon's decoupled weight decay (weight_decay is AdamW's)")
    schedule: str = setting("auto", "cosine, wsd (warmup-stable-decay), or auto: cosine for adamw, wsd for muon")
    decay_fraction: float = setting(0.2, "wsd: the last fraction of max_steps decays linearly to the final lr")
    eval_interval: int = setting(250, "evaluate (val loss, HellaSwag, samples) every this many steps",
                                 group="evaluation and samples")
    val_tokens: int = setting(10_485_760, "tokens of the val split in each val loss (build-nanogpt: 20 x 64 x "
                                          "1024 x 8); 0 turns val loss off")
    hellaswag_examples: int = setting(10042, "HellaSwag examples per evaluation; 0 turns it off; 10042 is the "
                                             "whole validation set")
    hellaswag_data: str = setting("", "a local hellaswag_val.jsonl; empty: the cache, downloaded on first use")
    core_interval: int = setting(0, "also score CORE (evaluate.py's) at evaluations whose step is a multiple "
                                    "of this; 0: off")
    core_max_per_task: int = setting(500, "the first examples of each CORE task (nanochat's choice in "
                                          "training); 0: all")
    core_bundle: str = setting("", "an unpacked CORE eval_bundle folder; empty: nanochat's, in the cache, "
                                   "downloaded on first use")
    sample_prompt: str = setting("Hello, I'm a language model,", "the prompt of the samples at evaluations")
    num_samples: int = setting(4, "samples per evaluation; 0: none")
    sample_tokens: int = setting(32, "new tokens per sample")
    checkpoint_interval: int = setting(5000, "save a checkpoint every this many steps (and at the end)",
                                       group="checkpoints and resuming")
    checkpoint_minutes: float = setting(30.0, "also save when this many minutes have passed since the last "
                                              "save; 0: off")
    keep_checkpoints: int = setting(3, "keep the newest K checkpoints; 0 keeps all")
    resume: str = setting("auto", "auto: continue the newest readable checkpoint in log_dir, else start; never: "
                                  "start, refusing a used log_dir; or PATH, a checkpoint folder")
    seed: int = setting(1337, "seeds the weights, the data order (with --shuffle), dropout and the samples",
                        group="machine")
    device: str = setting("auto", "auto, cpu, cuda or mps")
    dtype: str = setting("auto", "auto (bfloat16 where the device has it natively, else float32), bfloat16, "
                                 "float32")
    compile: bool | None = setting(None, "torch.compile the training step; auto: on for CUDA, off elsewhere")
    compile_mode: str = setting("default", "torch.compile's mode (reduce-overhead was slower on a 4090, "
                                           "build-nanogpt #6)")
    peak_flops: float = setting(0.0, "the device's peak FLOP/s, for MFU; 0: from the table, or measured on a "
                                     "CPU")
    tensorboard: bool = setting(False, "also write TensorBoard event files to log_dir (needs `pip install "
                                       "tensorboard`)")
    plot: bool = setting(True, "write log_dir/plot.png (losses, HellaSwag, CORE) at every evaluation")
    progress: bool | None = setting(None, "a progress bar; auto: when stderr is a terminal")

    RESUME_FIXED: ClassVar[tuple[str, ...]] = ("init_from", "n_layer", "n_head", "n_embd", "block_size",
                                               "vocab_multiple", "seq_len", "shuffle", "optimizer")

    def check(self) -> None:
        _require(self, at_least_one=("total_batch_size", "micro_batch_size", "seq_len", "max_steps", "eval_interval",
                                     "checkpoint_interval"),
                 not_negative=("warmup_steps", "val_tokens", "hellaswag_examples", "keep_checkpoints", "num_samples",
                               "sample_tokens", "weight_decay", "grad_clip", "peak_flops", "checkpoint_minutes",
                               "core_interval", "core_max_per_task"))
        self.model_config(vocab_size=1)  # the model's shape, checked where the model checks it
        if not 0 < self.max_lr < math.inf or not 0 <= self.min_lr_ratio <= 1:
            raise UserError(f"max_lr must be positive and min_lr_ratio in [0, 1], got {self.max_lr}, "
                            f"{self.min_lr_ratio}")
        if self.seq_len > self.block_size:
            raise UserError(f"seq_len {self.seq_len} is longer than block_size {self.block_size}")
        _check_dtype(self.dtype)
        _check_choice("optimizer", self.optimizer, ("adamw", "muon"))
        _check_choice("schedule", self.schedule, ("auto", "cosine", "wsd"))
        if not 0 < self.decay_fraction <= 1 or not 0 < self.muon_lr < math.inf or not 0 <= self.muon_momentum < 1:
            raise UserError(f"decay_fraction must be in (0, 1], muon_lr positive and muon_momentum in [0, 1), got "
                            f"{self.decay_fraction}, {self.muon_lr}, {self.muon_momentum}")
        if self.muon_weight_decay < 0:
            raise UserError(f"muon_weight_decay must not be negative, got {self.muon_weight_decay}")

    @property
    def schedule_name(self) -> str:
        """The schedule `auto` stands for: cosine for AdamW (GPT-3's), wsd for Muon (modded-nanogpt's)."""
        if self.schedule != "auto":
            return self.schedule
        return "wsd" if self.optimizer == "muon" else "cosine"

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The shape of a model trained from scratch, for a tokenizer of `vocab_size` tokens."""
        return GPTConfig(block_size=self.block_size, vocab_size=vocab_size, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, dropout=self.dropout, vocab_multiple=self.vocab_multiple)


@dataclass
class FinetuneConfig(Settings):
    """finetune_mc.py: GPT-1's multiple-choice fine-tuning (Radford et al. 2018, section 4.1 and OpenAI's
    finetune-transformer-lm code), for Story Cloze CSVs and HellaSwag-format JSONL."""

    train_data: str = setting("", "labelled questions, split into train and val: a Story Cloze .csv or "
                                  "HellaSwag-format .jsonl (the paper: Story Cloze's val CSV)", group="data")
    test_data: str = setting("", "questions scored every epoch, never trained on or selected by; empty: none")
    val_examples: int = setting(374, "questions of train_data held out to pick the best epoch (the paper: 374 "
                                     "of 1871)")
    split_seed: int = setting(42, "draws the val questions; the same seed gives the same split whatever --seed")
    max_train_examples: int = setting(0, "read only the first N labelled questions (0: all), for quick runs")
    max_test_examples: int = setting(0, "read only the first N test questions (0: all)")
    log_dir: str = setting("log/finetune", "where metrics.jsonl, config.toml, best/ and checkpoints/ go")
    resume: str = setting("auto", "auto: continue the newest readable checkpoint in log_dir, else start; never: "
                                  "start, refusing a used log_dir; or PATH, a checkpoint folder")
    init_from: str = setting("openai-gpt", "the model spec to fine-tune: openai-gpt, gpt2, an HF folder, one of "
                                           "our checkpoints", group="model")
    markers: str = setting("new", "new: start, delimiter and extract are new embedding rows; eot: "
                                  "<|endoftext|> (GPT-2)")
    dropout: float = setting(0.1, "the transformer's dropout, as in pre-training")
    clf_dropout: float = setting(0.1, "dropout before the classifier")
    lm_coef: float = setting(0.5, "loss = classifier loss + lm_coef x language-modelling loss")
    epochs: int = setting(3, "passes over the train questions", group="optimizer and schedule")
    batch_size: int = setting(32, "questions per optimizer step, over all processes")
    micro_batch_size: int = setting(8, "questions per forward pass; gradients accumulate up to batch_size")
    max_lr: float = setting(6.25e-5, "AdamW's peak learning rate")
    warmup_fraction: float = setting(0.002, "linear warmup over this fraction of the steps, then linear decay "
                                            "to 0")
    weight_decay: float = setting(0.01, "AdamW's decoupled weight decay, on 2-D weights only")
    beta1: float = setting(0.9, "AdamW's first-moment decay")
    beta2: float = setting(0.999, "AdamW's second-moment decay")
    eps: float = setting(1e-8, "AdamW's epsilon")
    grad_clip: float = setting(1.0, "clip the gradient's global norm to this; 0 turns clipping off")
    eval_batch_size: int = setting(32, "questions per forward pass when scoring", group="evaluation and machine")
    zero_shot: bool = setting(True, "score the model before fine-tuning by the likelihood of each ending, as "
                                    "hellaswag.py")
    seed: int = setting(42, "seeds the new rows, the classifier, the epochs' order and dropout")
    device: str = setting("auto", "auto, cpu, cuda or mps")
    dtype: str = setting("auto", "auto (bfloat16 where the device has it natively, else float32), bfloat16, "
                                 "float32")
    compile: bool | None = setting(None, "torch.compile the training step; auto: on for CUDA, off elsewhere")
    compile_mode: str = setting("default", "torch.compile's mode")
    progress: bool | None = setting(None, "a progress bar; auto: when stderr is a terminal")

    # What the questions, their split, the batches and the model are made of: another value of one is
    # another experiment, whose val accuracy must not compete with this run's best.
    RESUME_FIXED: ClassVar[tuple[str, ...]] = ("train_data", "test_data", "val_examples", "split_seed",
                                               "max_train_examples", "max_test_examples", "init_from", "markers",
                                               "batch_size", "seed")

    def check(self) -> None:
        if not self.train_data:
            raise UserError("train_data is not set: give a Story Cloze .csv or a HellaSwag-format .jsonl of labelled "
                            "examples (--train-data PATH)")
        _require(self, at_least_one=("epochs", "batch_size", "micro_batch_size", "eval_batch_size"),
                 not_negative=("val_examples", "max_train_examples", "max_test_examples", "weight_decay", "grad_clip",
                               "lm_coef"))
        if not 0 < self.max_lr < math.inf or not 0 <= self.warmup_fraction <= 1:
            raise UserError(f"max_lr must be positive and warmup_fraction in [0, 1], got {self.max_lr}, "
                            f"{self.warmup_fraction}")
        for name in ("dropout", "clf_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise UserError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if self.markers not in ("new", "eot"):
            raise UserError(f"markers must be 'new' (new embedding rows) or 'eot' (<|endoftext|>), got "
                            f"{self.markers!r}")
        _check_dtype(self.dtype)


def grad_accum_steps(config: TrainConfig, world_size: int) -> int:
    """Micro-steps per optimizer step: total batch / (micro-batch x seq-len x ranks), which must divide."""
    per_micro_step = config.micro_batch_size * config.seq_len * world_size
    if config.total_batch_size % per_micro_step:
        raise UserError(f"total_batch_size {config.total_batch_size:,} is not a multiple of micro_batch_size "
                        f"{config.micro_batch_size} x seq_len {config.seq_len} x {world_size} process(es) "
                        f"= {per_micro_step:,} tokens")
    return config.total_batch_size // per_micro_step


def to_toml(values: dict[str, Any]) -> str:
    """A flat dict of str, bool, int and float as TOML (None values are left out: they mean the default)."""
    lines = []
    for key, value in values.items():
        if value is None:
            continue
        text = json.dumps(value) if not isinstance(value, bool) else str(value).lower()
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"
