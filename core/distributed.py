"""torch.distributed setup for scripts launched with torchrun (or not at all)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

# Imported before any process group exists, on purpose: its functions take `group=group.WORLD` as a
# default argument, evaluated at import. Imported later (torch._dynamo imports it, and loading a model
# may import torch._dynamo), those defaults hold the live group, destroy_process_group() then frees
# nothing, and gloo's worker threads die in interpreter shutdown: now and then a SIGABRT at exit,
# "terminate called without an active exception". (torch.distributed.optim's ZeroRedundancyOptimizer
# and FSDP's ShardedGradScaler have such defaults too: import them before the group, if ever used.)
if dist.is_available():
    import torch.distributed.nn

from core.devices import resolve_device
from core.errors import UserError

T = TypeVar("T")


@dataclass(frozen=True)
class Distributed:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str = "auto") -> Distributed:
    """Join the process group when torchrun started us (WORLD_SIZE is set), else run alone.

    Under torchrun each process takes the GPU of its LOCAL_RANK and NCCL, or gloo on the CPU.
    """
    if "WORLD_SIZE" not in os.environ:
        return Distributed(0, 0, 1, resolve_device(device_name))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    device = resolve_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group(backend="nccl", device_id=device)
        else:
            dist.init_process_group(backend="gloo")
    return Distributed(rank, local_rank, world_size, device)


def close_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed_run(device_name: str = "auto") -> Iterator[Distributed]:
    """This process's place in the run (see `init_distributed`), the process group closed at the end."""
    distributed = init_distributed(device_name)
    try:
        yield distributed
    finally:
        close_distributed()


def fetch_once_per_node(fetch: Callable[[], T]) -> T:
    """`fetch()` (a download into the cache, say) on the first rank of each node while the other ranks
    wait, since nodes rarely share ~/.cache; then on every rank, which finds it in its node's cache. A
    UserError of that first fetch ends every rank with the same message: the others would otherwise
    wait for it forever."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return fetch()
    failure = None
    if int(os.environ.get("LOCAL_RANK", dist.get_rank())) == 0:
        try:
            fetch()
        except UserError as error:
            failure = str(error)
    failures: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(failures, failure)  # every rank waits here for its node's fetch
    failure = next((failure for failure in failures if failure is not None), None)
    if failure is not None:
        raise UserError(failure)
    return fetch()
