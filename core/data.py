"""Batches of token sequences from memory-mapped shards, for training and for val loss.

The data is cut into sequences of seq_len + 1 tokens (inputs and their next-token targets), shard by
shard: sequence i of a shard holds tokens [i * seq_len, (i + 1) * seq_len + 1), so only the last
< seq_len tokens of a shard go unused. Every micro-step consumes the next micro_batch x world_size
sequences of that stream, and rank r takes the r-th block of micro_batch of them: ranks read disjoint
data, and the stream is the same whatever the world size, so 2 ranks x 2 accumulation steps see the
same batch as 1 rank x 4. A batch may span two shards. At the end of the last shard the next epoch
starts. With `shuffle`, every epoch draws a shard order and, per shard, a sequence order from the seed.

The position is three integers (epoch, shard, sequence), which `state_dict()` saves and
`load_state_dict()` restores, so a resumed run reads exactly the batches it would have read.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.errors import UserError
from core.shards import list_shards, open_shard, read_shard_info


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host batch on `device`. On CUDA through pinned memory, so that the copy runs asynchronously;
    elsewhere a plain copy: `non_blocking` from pageable memory is a known silent-corruption pattern
    on MPS (pytorch#139550)."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def check_shards(paths: list[Path], tokenizer: str) -> None:
    """Every shard is readable and made with `tokenizer`, checked from the headers before training starts."""
    for path in paths:
        info = read_shard_info(path)
        if info.tokenizer != tokenizer:
            raise UserError(f"{path} was made with the {info.tokenizer!r} tokenizer, but the model uses "
                            f"{tokenizer!r}: tokenize the data again with fineweb.py --tokenizer {tokenizer}")


def corpus_identity(data_dir: Path | str, split: str = "train") -> dict[str, Any]:
    """What names a corpus wherever its folder is: its tokenizer, and its shards' names and sizes, in
    numbers and as a fingerprint (the names and sizes hashed: hashing 10B tokens would take minutes)."""
    infos = [read_shard_info(path) for path in list_shards(data_dir, split)]
    listing = json.dumps([[info.path.name, info.num_tokens] for info in infos])
    return {"tokenizer": infos[0].tokenizer, "shards": len(infos), "tokens": sum(info.num_tokens for info in infos),
            "fingerprint": hashlib.sha256(listing.encode()).hexdigest()[:16]}


class TokenLoader:
    def __init__(self, data_dir: Path | str, split: str, micro_batch: int, seq_len: int, tokenizer: str,
                 rank: int = 0, world_size: int = 1, shuffle: bool = False, seed: int = 0) -> None:
        self.paths = list_shards(data_dir, split)
        check_shards(self.paths, tokenizer)
        self.split, self.tokenizer = split, tokenizer
        self.micro_batch, self.seq_len = micro_batch, seq_len
        self.rank, self.world_size = rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.sequences_per_shard = [max(0, (read_shard_info(p).num_tokens - 1) // seq_len) for p in self.paths]
        if sum(self.sequences_per_shard) == 0:
            raise UserError(f"the {split!r} shards in {data_dir} hold no sequence of {seq_len + 1} tokens")
        self.epoch = self.shard = self.sequence = 0
        self._order_epoch: int | None = None
        self._open_key: tuple[int, int] | None = None

    # -- position ------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "shard": self.shard, "sequence": self.sequence,
                "world_size": self.world_size, "micro_batch": self.micro_batch, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["seq_len"] != self.seq_len:
            raise UserError(f"the checkpoint read sequences of {state['seq_len']} tokens, this run "
                            f"{self.seq_len}: resume with the same seq_len")
        self.epoch, self.shard, self.sequence = state["epoch"], state["shard"], state["sequence"]
        # world_size and micro_batch may change: the position counts sequences of the shared stream.

    def reset(self) -> None:
        self.epoch = self.shard = self.sequence = 0

    # -- reading -------------------------------------------------------------------------------------

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (micro_batch, seq_len) inputs and targets, as int64 on the CPU."""
        rows = []
        for index in range(self.micro_batch * self.world_size):
            shard, sequence = self._take()
            if self.rank * self.micro_batch <= index < (self.rank + 1) * self.micro_batch:
                rows.append(self._read(shard, sequence))
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))  # int64 per batch, never per shard
        return batch[:, :-1], batch[:, 1:]

    def _take(self) -> tuple[int, int]:
        """The (shard, sequence-in-shard) at the current position, then advance by one sequence."""
        while self.sequence >= self.sequences_per_shard[self._shard_order()[self.shard]]:
            self.shard, self.sequence = self.shard + 1, 0
            if self.shard == len(self.paths):
                self.epoch, self.shard = self.epoch + 1, 0
        shard = int(self._shard_order()[self.shard])
        sequence = int(self._sequence_order(shard)[self.sequence]) if self.shuffle else self.sequence
        self.sequence += 1
        return shard, sequence

    def _read(self, shard: int, sequence: int) -> np.ndarray:
        if self._open_key != (self.epoch, shard):
            # One shard mapped at a time: a map kept open for the whole run grows the resident memory.
            self._tokens = open_shard(self.paths[shard], self.tokenizer)
            self._open_key = (self.epoch, shard)
        start = sequence * self.seq_len
        return np.asarray(self._tokens[start : start + self.seq_len + 1])

    def _shard_order(self) -> np.ndarray:
        if self._order_epoch != self.epoch:
            self._order_epoch = self.epoch
            n = len(self.paths)
            self._shards = (np.random.default_rng([self.seed, self.epoch]).permutation(n) if self.shuffle
                            else np.arange(n))
            self._sequences: dict[int, np.ndarray] = {}
        return self._shards

    def _sequence_order(self, shard: int) -> np.ndarray:
        if shard not in self._sequences:
            self._sequences = {shard: np.random.default_rng([self.seed, self.epoch, shard + 1]).permutation(
                self.sequences_per_shard[shard])}
        return self._sequences[shard]


class ValSet:
    """This rank's share of the val set: the first val_tokens // seq_len sequences of the val split.
    The set is fixed by val_tokens alone, so val loss does not move with the batch size or the number
    of ranks (nanochat #541). Batches are read afresh at every evaluation, nothing is held in memory."""

    def __init__(self, data_dir: Path | str, micro_batch: int, seq_len: int, tokenizer: str, val_tokens: int,
                 rank: int = 0, world_size: int = 1) -> None:
        self.loader = TokenLoader(data_dir, "val", 1, seq_len, tokenizer)
        self.total = min(val_tokens // seq_len, sum(self.loader.sequences_per_shard))
        if self.total == 0:
            raise UserError(f"val_tokens {val_tokens} is less than one sequence of {seq_len} tokens")
        self.start, self.end = self.total * rank // world_size, self.total * (rank + 1) // world_size
        self.micro_batch = micro_batch

    def batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.loader.reset()
        self.loader.sequence = self.start  # in order, so _take skips whole shards to reach it
        for first in range(self.start, self.end, self.micro_batch):
            rows = [self.loader.next_batch() for _ in range(min(self.micro_batch, self.end - first))]
            yield torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])
