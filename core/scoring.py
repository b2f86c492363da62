"""How a model scores continuations: the loss and the greedy guess at every scored token of many
candidate sequences, in few forward passes. HellaSwag (core/hellaswag.py) and CORE
(core/core_benchmark.py) both score through it.

A question is a few candidates, token sequences that usually share a prefix (the few-shot examples,
the context) and differ in their ends: the choices. Each question becomes one packed row, the shared
prefix once and then each candidate's remainder, which attends to the prefix and to itself only, its
positions continuing where the prefix ends. On a causal model this computes exactly what each
candidate alone would: the shared tokens see the same tokens at the same positions. Candidates that
share nothing (cropped from the left by different amounts) get a row each instead, so that no row
grows past the model's context by much. Only the scored positions go through the head, the largest
matmul of a small GPT; rows of similar length go in one batch.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import GPT

Item = TypeVar("Item")


def scoring_weights_dtype(dtype: torch.dtype) -> torch.dtype:
    """The weights' dtype for scoring in `dtype`: float32 weights under `scoring_autocast` for bfloat16,
    as training computes, so that a stage's number and the training run's agree on the same checkpoint;
    float16 keeps float16 weights."""
    return torch.float16 if dtype == torch.float16 else torch.float32


def scoring_autocast(device: torch.device, dtype: torch.dtype) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)


@dataclass(frozen=True)
class Candidate:
    tokens: list[int]  # the whole sequence the model reads
    start: int  # tokens[start:end] are scored, each predicted from the one before it: 1 <= start <= end
    end: int


@dataclass(frozen=True)
class Score:
    loss_sum: float  # summed cross-entropy of the scored tokens
    n_tokens: int
    greedy: bool  # every scored token is the model's argmax at its place

    @property
    def mean_loss(self) -> float:
        return self.loss_sum / self.n_tokens if self.n_tokens else float("nan")


@dataclass(frozen=True)
class PackedRow:
    tokens: list[int]
    positions: list[int]
    segments: list[int]  # -1 the shared prefix, k the remainder of candidate k
    scored: list[tuple[int, int, int]]  # (column whose logits predict it, token id, candidate k), per scored token


def common_prefix_length(sequences: list[list[int]]) -> int:
    shortest = min(len(sequence) for sequence in sequences)
    for i in range(shortest):
        if any(sequence[i] != sequences[0][i] for sequence in sequences):
            return i
    return shortest


def common_suffix_length(sequences: list[list[int]]) -> int:
    return common_prefix_length([sequence[::-1] for sequence in sequences])


def pack_row(candidates: list[tuple[int, Candidate]]) -> PackedRow:
    """One row for the numbered candidates: their common prefix, then each one's remainder."""
    sequences = [candidate.tokens for _, candidate in candidates]
    shared = common_prefix_length(sequences) if len(sequences) > 1 else len(sequences[0])
    tokens, positions, segments = sequences[0][:shared], list(range(shared)), [-1] * shared
    scored = []
    for k, candidate in candidates:
        offset = len(tokens) - shared  # index j >= shared of this candidate sits in column j + offset
        remainder = candidate.tokens[shared:]
        tokens = tokens + remainder
        positions += range(shared, len(candidate.tokens))
        segments += [k] * len(remainder)
        for j in range(candidate.start, candidate.end):
            before = j - 1
            scored.append((before if before < shared else before + offset, candidate.tokens[j], k))
    return PackedRow(tokens, positions, segments, scored)


def pack_question(question: list[Candidate]) -> list[PackedRow]:
    numbered = list(enumerate(question))
    if len(question) == 1 or common_prefix_length([candidate.tokens for candidate in question]) > 0:
        return [pack_row(numbered)]
    return [pack_row([pair]) for pair in numbered]


@torch.inference_mode()
def score_packed(model: GPT, questions: list[list[PackedRow]], sizes: list[int]) -> list[list[Score]]:
    """The scores of every candidate of the packed questions (`sizes[q]` candidates each), in one
    forward pass. Shapes: B rows of T columns; N scored tokens."""
    device = model.device
    rows = [(q, row) for q, packed in enumerate(questions) for row in packed]
    T, B = max(len(row.tokens) for _, row in rows), len(rows)
    idx = torch.zeros(B, T, dtype=torch.long)
    positions = torch.zeros(B, T, dtype=torch.long)
    segment = torch.full((B, T), -2, dtype=torch.long)  # -2 padding
    first_owner = [0, *itertools.accumulate(sizes)][:-1]  # the flat number of each question's first candidate
    row_of, columns, targets, owners = [], [], [], []
    for b, (q, row) in enumerate(rows):
        n = len(row.tokens)
        idx[b, :n], positions[b, :n], segment[b, :n] = (torch.tensor(row.tokens), torch.tensor(row.positions),
                                                       torch.tensor(row.segments))
        for column, target, k in row.scored:
            row_of.append(b)
            columns.append(column)
            targets.append(target)
            owners.append(first_owner[q] + k)
    idx = idx.to(device)
    if (segment < 0).all():  # no candidate remainders: plain causal rows, padded at the end
        hidden = model.hidden_states(idx)
    else:
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        same_segment = segment.unsqueeze(2) == segment.unsqueeze(1)  # (B, T, T)
        key_is_prefix = (segment == -1).unsqueeze(1)  # (B, 1, T)
        attn_mask = causal & (same_segment | key_is_prefix)  # padding attends to itself: no empty rows
        hidden = model.hidden_states(idx, positions=positions.to(device), attn_mask=attn_mask.unsqueeze(1).to(device))
    logits = model.logits(hidden[torch.tensor(row_of, device=device), torch.tensor(columns, device=device)])  # (N, V)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    targets = torch.tensor(targets, device=device)
    losses = F.cross_entropy(logits, targets, reduction="none")
    misses = (logits.argmax(dim=-1) != targets).to(losses.dtype)
    owners = torch.tensor(owners, device=device)
    n = sum(sizes)
    sums = torch.zeros(n, device=device, dtype=losses.dtype).index_add_(0, owners, losses).tolist()
    counts = torch.zeros(n, device=device, dtype=losses.dtype).index_add_(0, owners, torch.ones_like(losses)).tolist()
    missed = torch.zeros(n, device=device, dtype=losses.dtype).index_add_(0, owners, misses).tolist()
    scores = [Score(sums[i], int(counts[i]), missed[i] == 0) for i in range(n)]
    return [scores[first_owner[q] : first_owner[q] + sizes[q]] for q in range(len(sizes))]


def scored_batches(model: GPT, questions: list[list[Candidate]], batch_size: int
                   ) -> Iterator[tuple[list[int], list[list[Score]]]]:
    """(question indices, their candidates' scores) batch by batch, the longest rows first.

    A batch holds at most `batch_size` questions and at most `batch_size` x block_size tokens of
    padded rows, so that memory stays near that of `batch_size` full-length sequences."""
    packed = [pack_question(question) for question in questions]
    width = [max(len(row.tokens) for row in rows) for rows in packed]
    budget = batch_size * model.config.block_size
    order = sorted(range(len(questions)), key=lambda q: width[q], reverse=True)
    batch: list[int] = []
    n_rows = 0
    for q in order:
        if batch and (len(batch) == batch_size or (n_rows + len(packed[q])) * width[batch[0]] > budget):
            yield batch, score_packed(model, [packed[i] for i in batch], [len(questions[i]) for i in batch])
            batch, n_rows = [], 0
        batch.append(q)
        n_rows += len(packed[q])
    if batch:
        yield batch, score_packed(model, [packed[i] for i in batch], [len(questions[i]) for i in batch])


def batches_by_length(items: list[Item], batch_size: int, length: Callable[[Item], int]) -> Iterator[list[Item]]:
    """Batches of items of similar `length`, so that little compute goes to padding; the longest
    first, so that a batch too large for memory fails at once."""
    ordered = sorted(items, key=length, reverse=True)
    for start in range(0, len(ordered), batch_size):
        yield ordered[start : start + batch_size]


# --- several processes ----------------------------------------------------------------------------

def share_of_this_rank(items: list[Item]) -> list[Item]:
    """Every world_size-th item, from this rank's place: all of them without torch.distributed."""
    if not dist.is_initialized():
        return items
    return items[dist.get_rank() :: dist.get_world_size()]


def gather_from_ranks(results: list[Item], key: Callable[[Item], object]) -> list[Item]:
    """Every rank's results, sorted by `key`, on every rank (this rank's alone without torch.distributed)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sorted(results, key=key)
    everyone: list[list[Item] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, results)
    return sorted((result for rank_results in everyone for result in rank_results), key=key)
