"""Multiple-choice fine-tuning as GPT-1 did it (Radford et al. 2018, section 3.3 and figure 1), shared
by finetune_mc.py and the tests: the data readers, the token sequences, the classifier head, the
joint loss, and accuracy.

A question is a context and a few endings. Each ending becomes one sequence,
    [start] context [delimiter] ending [extract]
and the LM runs over each. A linear unit on the final hidden state of the extract token scores the
ending, and a softmax over a question's endings gives the choice. Training minimises the classifier's
cross-entropy plus `lm_coef` times the LM's next-token loss over the same sequences (0.5 in the paper).
GPT-1 added start, delimiter and extract as new rows of its embedding, after the vocabulary; for GPT-2,
`<|endoftext|>` can serve as all three instead.
"""

from __future__ import annotations

import csv
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from core.checkpoint import read_meta
from core.devices import accumulation_dtype
from core.errors import UserError
from core.hellaswag import Example, read_hellaswag_rows, tokenize_example
from core.scoring import batches_by_length
from core.tokenizer import Tokenizer, added_tokens, with_added_tokens
from core.weights import read_tensor_file
from model import GPT

STORY_CLOZE_CONTEXT = ("InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4")
STORY_CLOZE_ENDINGS = ("RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2")
STORY_CLOZE_ANSWER = "AnswerRightEnding"
MARKER_NAMES = ("<|start|>", "<|delimiter|>", "<|extract|>")
MARKER_INIT_STD = 0.02  # GPT-1 drew its new embedding rows as it drew every embedding


@dataclass(frozen=True)
class Question:
    index: int  # position in the source file
    context: str
    endings: tuple[str, ...]
    label: int  # index of the right ending


# --- data -----------------------------------------------------------------------------------------

def read_questions(path: Path, limit: int | None = None) -> list[Question]:
    """A Story Cloze CSV (.csv) or a HellaSwag-format JSONL file (.jsonl), the first `limit` questions."""
    if not path.is_file():
        raise UserError(f"{path} does not exist")
    if path.suffix == ".csv":
        return read_story_cloze(path, limit)
    if path.suffix == ".jsonl":
        return [Question(i, ctx, tuple(endings), label) for i, (ctx, endings, label) in
                enumerate(read_hellaswag_rows(path, limit))]
    raise UserError(f"{path}: expected a Story Cloze .csv or a HellaSwag-format .jsonl")


def read_story_cloze(path: Path, limit: int | None = None) -> list[Question]:
    """Questions of a Story Cloze Test CSV: four sentences, two endings, `AnswerRightEnding` 1 or 2.
    A malformed row fails naming the file and the row (the header is row 1)."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None:
            raise UserError(f"{path} is empty")
        header = [name.strip() for name in header]
        needed = (*STORY_CLOZE_CONTEXT, *STORY_CLOZE_ENDINGS, STORY_CLOZE_ANSWER)
        missing = [name for name in needed if name not in header]
        if missing:
            raise UserError(f"{path}, row 1 (header): missing column(s) {', '.join(missing)}")
        endings = [name for name in header if name.startswith("RandomFifthSentenceQuiz")]
        if len(endings) != len(STORY_CLOZE_ENDINGS):
            raise UserError(f"{path}, row 1 (header): Story Cloze has 2 endings, this header has {len(endings)} "
                            f"({', '.join(endings)})")
        column = {name: header.index(name) for name in needed}
        questions = []
        for row_number, row in enumerate(rows, start=2):
            if limit is not None and len(questions) >= limit:
                break
            if not row:
                continue
            where = f"{path}, row {row_number}"
            if len(row) != len(header):
                raise UserError(f"{where}: {len(row)} fields where the header has {len(header)} (a missing "
                                "or extra column, or a wrong number of endings?)")
            values = {name: row[column[name]].strip() for name in needed}
            empty = [name for name in needed if not values[name]]
            if empty:
                raise UserError(f"{where}: {', '.join(empty)} is empty")
            if values[STORY_CLOZE_ANSWER] not in ("1", "2"):
                raise UserError(f"{where}: {STORY_CLOZE_ANSWER} must be 1 or 2, got {values[STORY_CLOZE_ANSWER]!r}")
            questions.append(Question(index=len(questions),
                                      context=" ".join(values[name] for name in STORY_CLOZE_CONTEXT),
                                      endings=tuple(values[name] for name in STORY_CLOZE_ENDINGS),
                                      label=int(values[STORY_CLOZE_ANSWER]) - 1))
    if not questions:
        raise UserError(f"{path} holds no questions")
    return questions


def split_off(questions: list[Question], count: int, seed: int) -> tuple[list[Question], list[Question]]:
    """(the rest, `count` questions drawn with `seed`), both in file order: GPT-1's 1497 + 374 split of
    Story Cloze's 1871 labelled validation stories is `split_off(val, 374, seed)`."""
    if count >= len(questions):
        raise UserError(f"cannot hold out {count} of {len(questions)} questions for validation and train on the rest")
    held_out = set(random.Random(seed).sample(range(len(questions)), count))
    return ([q for i, q in enumerate(questions) if i not in held_out],
            [q for i, q in enumerate(questions) if i in held_out])


# --- markers and sequences --------------------------------------------------------------------------

@dataclass(frozen=True)
class Markers:
    start: int
    delimiter: int
    extract: int


def add_markers(model: GPT, tokenizer: Tokenizer, kind: str,
                generator: torch.Generator | None = None) -> tuple[GPT, Tokenizer, Markers]:
    """The model, its tokenizer and the marker ids: "new" appends three embedding rows (reused when the
    model has them already, from an earlier fine-tuning), "eot" takes <|endoftext|> for all three."""
    if kind == "eot":
        if tokenizer.eot_token is None:
            raise UserError(f"markers = 'eot': the {tokenizer.name} tokenizer has no <|endoftext|>; use 'new'")
        return model, tokenizer, Markers(*[tokenizer.eot_token] * 3)
    if model.config.vocab_size != tokenizer.n_vocab:
        raise UserError(f"the model has {model.config.vocab_size} tokens and its tokenizer {tokenizer.n_vocab}: "
                        "new marker tokens would not have the same ids in both")
    if tuple(added_tokens(tokenizer)[-len(MARKER_NAMES):]) != MARKER_NAMES:
        model = with_new_rows(model, len(MARKER_NAMES), generator)
        tokenizer = with_added_tokens(tokenizer, MARKER_NAMES)
    first = tokenizer.n_vocab - len(MARKER_NAMES)
    return model, tokenizer, Markers(first, first + 1, first + 2)


def with_new_rows(model: GPT, count: int, generator: torch.Generator | None = None) -> GPT:
    """`model` with `count` new tokens after its vocabulary, their embeddings drawn from N(0, 0.02)."""
    config = model.config
    wte = model.transformer.wte.weight.detach()[: config.vocab_size]
    rows = torch.randn(count, config.n_embd, generator=generator).to(wte) * MARKER_INIT_STD
    weights = {key: value for key, value in model.state_dict().items() if key != "lm_head.weight"}
    weights["transformer.wte.weight"] = torch.cat([wte, rows])
    grown = GPT.from_state_dict(replace(config, vocab_size=config.vocab_size + count, vocab_multiple=1), weights)
    return grown.with_settings(config.vocab_multiple, config.dropout)  # the padding of the original


@dataclass(frozen=True)
class Encoded:
    index: int
    label: int
    choices: tuple[list[int], ...]  # one token sequence per ending, markers included


def crop_context(context: list[int], ending: list[int], room: int) -> list[int]:
    """The end of the context, as much as fits beside the ending in `room` positions."""
    return context[max(0, len(context) + len(ending) - room):] if len(ending) < room else []


def encode_questions(questions: list[Question], tokenizer: Tokenizer, markers: Markers,
                     block_size: int) -> tuple[list[Encoded], int]:
    """Each question's sequences, and how many had their context cropped from the left to fit
    block_size (an ending longer than the whole block loses its end instead)."""
    encoded, cropped = [], 0
    for question in questions:
        context = tokenizer.encode_ordinary(question.context)
        choices = []
        for text in question.endings:
            ending = tokenizer.encode_ordinary(" " + text)[: block_size - 3]
            kept = crop_context(context, ending, block_size - 3)
            cropped += len(kept) < len(context)
            choices.append([markers.start, *kept, markers.delimiter, *ending, markers.extract])
        encoded.append(Encoded(question.index, question.label, tuple(choices)))
    return encoded, cropped


def zero_shot_examples(questions: list[Question], tokenizer: Tokenizer, block_size: int) -> list[Example]:
    """The questions as core.hellaswag scores them zero-shot (the likelihood of each ending after the
    context, as hellaswag.py), contexts cropped from the left to fit block_size."""
    examples = []
    for question in questions:
        example = tokenize_example(question.index, question.context, list(question.endings), question.label,
                                   tokenizer)
        endings = [ending[: block_size - 1] for ending in example.endings]
        context = min((crop_context(example.context, ending, block_size) for ending in endings), key=len)
        examples.append(replace(example, context=context or example.context[-1:], endings=endings))
    return examples


def collate(batch: list[Encoded], device: torch.device | str = "cpu", pad_to: int = 0) -> dict[str, torch.Tensor]:
    """A batch as tensors: `idx` (B, K, T) padded on the right, `extract` (B, K) the extract token's
    position, `lm_targets` (B, K, T) the next token or -1 (padding, and after the extract token), `labels` (B,).
    Padding on the right changes nothing before it under causal attention. `pad_to` sets a longer T."""
    K = len(batch[0].choices)
    if any(len(item.choices) != K for item in batch):
        raise ValueError("all questions of a batch must have the same number of endings")
    T = max(pad_to, *(len(sequence) for item in batch for sequence in item.choices))
    idx = torch.zeros(len(batch), K, T, dtype=torch.long)
    lm_targets = torch.full((len(batch), K, T), -1, dtype=torch.long)
    extract = torch.zeros(len(batch), K, dtype=torch.long)
    for b, item in enumerate(batch):
        for k, sequence in enumerate(item.choices):
            tokens = torch.tensor(sequence)
            idx[b, k, : len(sequence)] = tokens
            lm_targets[b, k, : len(sequence) - 1] = tokens[1:]
            extract[b, k] = len(sequence) - 1
    labels = torch.tensor([item.label for item in batch])
    tensors = dict(idx=idx, extract=extract, lm_targets=lm_targets, labels=labels)
    return {name: tensor.to(device) for name, tensor in tensors.items()}


# --- the model ----------------------------------------------------------------------------------------

class ChoiceHead(nn.Module):
    """GPT-1's classifier: dropout, then one linear unit on the extract token's hidden state (HF's
    SequenceSummary with summary_type cls_index, summary_proj_to_labels and num_labels 1)."""

    def __init__(self, n_embd: int, dropout: float) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(n_embd, 1)
        nn.init.normal_(self.proj.weight, std=0.02)
        nn.init.zeros_(self.proj.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (...) scores."""
        return self.proj(self.dropout(hidden)).squeeze(-1)


class MultipleChoiceModel(nn.Module):
    """The LM and the choice head as one module, so that DDP and the optimizer see both."""

    def __init__(self, gpt: GPT, head: ChoiceHead) -> None:
        super().__init__()
        self.gpt, self.head = gpt, head

    def forward(self, idx: torch.Tensor, extract: torch.Tensor, labels: torch.Tensor | None = None,
                lm_targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Choice logits (B, K); the classifier's loss given labels (B,); the LM's mean next-token loss
        over the tokens whose lm_targets (B, K, T) are not -1, given those (see `collate`)."""
        B, K, T = idx.shape
        hidden = self.gpt.hidden_states(idx.view(B * K, T))  # (B*K, T, C)
        at_extract = hidden[torch.arange(B * K, device=idx.device), extract.view(-1)]  # (B*K, C)
        logits = self.head(at_extract).view(B, K).float()
        clf_loss = F.cross_entropy(logits, labels) if labels is not None else None
        lm_loss = None
        if lm_targets is not None:
            targets = lm_targets.view(B * K, T)
            scored = targets != -1
            # The head runs on the scored positions only: padding would cost (tokens, vocab) for nothing.
            lm_loss = self.gpt.loss(hidden[scored], targets[scored])
        return logits, clf_loss, lm_loss


def joint_loss(clf_loss: torch.Tensor, lm_loss: torch.Tensor | None, lm_coef: float) -> torch.Tensor:
    """GPT-1's fine-tuning objective, L3 = L2 + lambda x L1 (equation 5)."""
    return clf_loss if lm_loss is None or lm_coef == 0 else clf_loss + lm_coef * lm_loss


# --- accuracy -----------------------------------------------------------------------------------------

def longest_choice(question: Encoded) -> int:
    return max(map(len, question.choices))


@torch.no_grad()
def accuracy(model: MultipleChoiceModel, encoded: list[Encoded], batch_size: int) -> float:
    """The share of questions whose right ending scores highest, in eval mode. Under torch.distributed
    each rank scores every world_size-th question and the counts are summed, so all ranks get the total."""
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = next(model.parameters()).device
    counts = torch.zeros(2, device=device, dtype=accumulation_dtype(device))  # right, scored
    was_training = model.training
    model.eval()
    try:
        for batch in batches_by_length(encoded[rank::world_size], batch_size, longest_choice):
            inputs = collate(batch, device)
            logits, _, _ = model(inputs["idx"], inputs["extract"])
            counts[0] += (logits.argmax(dim=1) == inputs["labels"]).sum()
            counts[1] += len(batch)
    finally:
        model.train(was_training)
    if world_size > 1:
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    return (counts[0] / counts[1]).item()


# --- fine-tuned checkpoints ---------------------------------------------------------------------------

CLASSIFIER_FILE = "classifier.safetensors"


def with_classifier(gpt: GPT, folder: Path | str) -> tuple[MultipleChoiceModel, Markers]:
    """`gpt`, loaded from a checkpoint that finetune_mc.py saved (core.pretrained.load_model), with the
    classifier saved beside its weights, in eval mode on the model's device; and the marker ids."""
    folder = Path(folder)
    meta = read_meta(folder)
    if not isinstance(meta.get("markers"), dict) or not (folder / CLASSIFIER_FILE).is_file():
        raise UserError(f"{folder} is not a multiple-choice checkpoint of finetune_mc.py (no markers in meta.json, "
                        f"or no {CLASSIFIER_FILE})")
    head = ChoiceHead(gpt.config.n_embd, dropout=0.0)
    head.load_state_dict(read_tensor_file(folder / CLASSIFIER_FILE))
    return MultipleChoiceModel(gpt, head).to(gpt.device).eval(), Markers(**meta["markers"])
