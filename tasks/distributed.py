"""What the tasks need from ``torch.distributed`` under DDP, in one place: this process's rank, gathering
Python objects from every process, and waiting for all of them. Outside a process group (one process)
each is the trivial single-process answer, so callers need no ``if distributed`` of their own.

Shared tool of the tasks (teacher caches, gathered metrics, merged predict outputs); not a task itself.
"""

from __future__ import annotations

from typing import Any, TypeVar

import torch

T = TypeVar("T")


def is_distributed() -> bool:
    """Whether a process group with more than one process is running."""
    return (
        torch.distributed.is_available()
        and torch.distributed.is_initialized()
        and torch.distributed.get_world_size() > 1
    )


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, number of processes); (0, 1) outside a process group."""
    if not is_distributed():
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def gather_objects(value: T) -> list[T]:
    """``value`` of every process, by rank (every process gets the whole list); ``[value]`` alone.

    Picklable objects of any size (``all_gather_object``): meant for once-per-epoch results (detections,
    embeddings of the evaluation images), not for per-step tensors."""
    if not is_distributed():
        return [value]
    gathered: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def barrier() -> None:
    """Wait until every process gets here (nothing to wait for alone)."""
    if is_distributed():
        torch.distributed.barrier()
