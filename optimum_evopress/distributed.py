"""Several processes, one search: database building and candidate scoring shared over torch.distributed.

Launch any script or the CLI with `torchrun --nproc_per_node N` (or `accelerate launch`); every process
runs the same `compress` call on its own model replica. Then:

- the database is built block by block, each process solving a share of the block's layers (balanced
  by their cost) and all processes exchanging the results, so every process holds every variant;
- each selection stage scores the candidates round-robin across processes and gathers the scores, so
  every process makes the same choices and the result equals a single-process run with the same seed;
- only the main process (rank 0) writes: the database files, the search state and the checkpoint.
  A `database_dir` must be on a filesystem every process sees (e.g. one machine's disk).

With CUDA every process uses `cuda:<LOCAL_RANK>` and NCCL, otherwise the CPU and gloo.
"""

from __future__ import annotations

import atexit
import os
from typing import Any, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["ProcessGroup", "current_group", "balanced_shares"]

T = TypeVar("T")


class ProcessGroup:
    """The processes of a torch.distributed run as EvoPress uses them (one process: everything is local)."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> None:
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def default_device(self) -> str:
        if torch.cuda.is_available():
            return f"cuda:{self.local_rank}" if self.active else "cuda"
        return "cpu"

    def resolve_device(self, device: str | None) -> str:
        """`device` for this process: a bare `cuda` becomes this process's GPU."""
        if device is None:
            return self.default_device()
        if self.active and device == "cuda":
            return f"cuda:{self.local_rank}"
        return device

    def all_gather(self, value: T) -> list[T]:
        """Every process's `value`, in rank order (any picklable object, tensors included)."""
        if not self.active:
            return [value]
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, value)
        return gathered

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def __repr__(self) -> str:
        return f"ProcessGroup(rank={self.rank}, world_size={self.world_size})"


def current_group(device: str | None = None) -> ProcessGroup:
    """The running torch.distributed group, initialised from the launcher's environment when needed.

    Args:
        device: the device the run asks for (`EvoPressConfig.device`): NCCL when it is CUDA (or unset and
            CUDA is present), else gloo.
    """
    if not dist.is_available():
        return ProcessGroup()
    if not dist.is_initialized():
        if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            return ProcessGroup()
        cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_destroy)
    rank = dist.get_rank()
    # Launchers set LOCAL_RANK; without it (a group made by the caller), ranks fill the GPUs of each machine in turn.
    fallback = rank % torch.cuda.device_count() if torch.cuda.is_available() else rank
    local_rank = int(os.environ.get("LOCAL_RANK", fallback))
    backend = dist.get_backend()  # as given: "nccl", "cpu:gloo,cuda:nccl", or "undefined" (NCCL for CUDA)
    if torch.cuda.is_available() and ("nccl" in backend or backend == "undefined"):
        torch.cuda.set_device(local_rank)  # NCCL's collectives run on the current device: this process's GPU
    return ProcessGroup(rank, dist.get_world_size(), local_rank)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def balanced_shares(costs: Sequence[float], parts: int) -> list[list[int]]:
    """Splits item indices into `parts` shares of nearly equal total cost (largest first, to the lightest share).

    Deterministic, so every process computes the same split.
    """
    shares: list[list[int]] = [[] for _ in range(parts)]
    loads = [0.0] * parts
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        lightest = min(range(parts), key=lambda p: (loads[p], p))
        shares[lightest].append(index)
        loads[lightest] += costs[index]
    return [sorted(share) for share in shares]
