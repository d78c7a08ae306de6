"""What the tasks need from ``torch.distributed`` under DDP, in one place: this process's rank, gathering
Python objects from every process, waiting for all of them, and leaving together at exit. Outside a process
group (one process) each is the trivial single-process answer, so callers need no ``if distributed`` of
their own.

Shared tool of the tasks (teacher caches, gathered metrics, merged predict outputs); not a task itself.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
from typing import Any, TypeVar

import torch

T = TypeVar("T")

#: How long a process waits at exit for the others before it destroys the process group anyway.
EXIT_TIMEOUT = datetime.timedelta(seconds=120)


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


def _leave_together() -> None:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    with contextlib.suppress(Exception):  # a peer that died first: leave anyway after the timeout
        torch.distributed.barrier(async_op=True).wait(timeout=EXIT_TIMEOUT)
    with contextlib.suppress(Exception):
        torch.distributed.destroy_process_group()


def leave_together_at_exit() -> None:
    """Once per process, under a process group: at exit, wait for the other processes (at most
    ``EXIT_TIMEOUT``), then destroy the group. Lightning leaves the group alive; a process that then
    exited while its peer's gloo threads still talked to it made the peer abort ("terminate called without
    an active exception", exit code -6) after a finished run, in 2 of 4 test runs of one day."""
    if is_distributed():
        atexit.unregister(_leave_together)  # registered once, however often this is called
        atexit.register(_leave_together)
