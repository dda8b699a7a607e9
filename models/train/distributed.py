"""Multi-process training helpers for ``torchrun`` + DistributedDataParallel.

``torchrun`` starts one process per GPU and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR`` and ``MASTER_PORT``. :func:`init_distributed` turns those into a process group
(nccl on CUDA, gloo on CPU); everything else here works the same whether or not a group exists, so
single-process code needs no special cases: with no group, rank is 0 and reductions are no-ops.
"""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ...convert.errors import UserInputError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise UserInputError(f"environment variable {name} must be an integer, got {raw!r}") from None


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group described by the torchrun environment, if there is one.

    Returns rank 0 of 1 when ``WORLD_SIZE`` is unset or 1 (plain ``python`` launch). Calling it
    again once a group exists just reports that group.
    """
    if is_initialized():
        return info()
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world <= 1:
        return DistInfo(0, 1, 0)
    for var in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(var):
            raise UserInputError(f"WORLD_SIZE={world} but {var} is not set; launch with torchrun")
    use_cuda = torch.cuda.is_available()
    if backend is None:
        backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        # Each process owns one GPU; nccl collectives go to the current device.
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world)
    return DistInfo(rank, world, local_rank)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def info() -> DistInfo:
    """Rank and world size of the current process group (0 of 1 without one)."""
    if not is_initialized():
        return DistInfo()
    return DistInfo(dist.get_rank(), dist.get_world_size(), _env_int("LOCAL_RANK", 0))


def cleanup() -> None:
    """Leave the process group.

    A DDP wrapper left in a reference cycle keeps the process group alive past
    ``destroy_process_group``; gloo's worker threads then die with the interpreter and abort the
    process ("terminate called without an active exception"). Collect such garbage first, and
    let every rank finish its last collective before tearing down.
    """
    gc.collect()
    if is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum ``t`` over all ranks in place (no-op without a group). ``t`` must live on the device
    the backend expects (CPU for gloo, CUDA for nccl)."""
    if is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running stats, frozen gains) to every rank.

    DDP only syncs buffers at the start of each forward, so after the last training batch every
    rank holds running statistics of its own batch; evaluation and checkpoints must agree.
    """
    if not (is_initialized() and dist.get_world_size() > 1):
        return
    for buf in module.buffers():
        dist.broadcast(buf, src=src)


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]``; ``[obj]`` without a group."""
    if not (is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shard(n: int, rank: int, world_size: int) -> list[int]:
    """Indices of an n-item dataset that ``rank`` evaluates: strided, no padding, no overlap, so
    summed counts equal n exactly (DistributedSampler would pad with repeats)."""
    return list(range(rank, n, world_size))
