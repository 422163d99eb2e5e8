"""Distributed setup from torchrun's environment: gloo on CPU, NCCL on GPU. Nothing else reads env vars."""

from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun's rendezvous variables are set (RANK and MASTER_ADDR), whatever the world size."""
    return "RANK" in os.environ and "MASTER_ADDR" in os.environ


def init_distributed(device_type: str, timeout_s: float = 1800.0) -> DistInfo:
    """Join the process group when launched by torchrun; a no-op for a plain `python`/`fastmae` process.

    A one-process torchrun job (WORLD_SIZE=1) joins a group too, so that NCCL/gloo setup is exercised on a
    machine with one GPU; with world size 1 nothing is wrapped in DDP and every collective helper is an identity.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not launched_by_torchrun():
        return DistInfo()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not tdist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        tdist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank)


def all_reduce_mean(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Mean of a tensor over ranks (identity in one process)."""
    if not info.distributed:
        return x
    x = x.detach().clone()
    tdist.all_reduce(x, op=tdist.ReduceOp.SUM)
    return x / info.world_size


def all_gather_cat(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Concatenate the ranks' tensors along dim 0, in rank order (identity in one process). Their first dims may
    differ (streamed shards give ranks unequal evaluation splits): each is padded to the longest and cut back."""
    if not info.distributed:
        return x
    n = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.empty_like(n) for _ in range(info.world_size)]
    tdist.all_gather(sizes, n)
    longest = max(int(s) for s in sizes)
    padded = torch.cat([x, x.new_zeros((longest - x.shape[0], *x.shape[1:]))]) if x.shape[0] < longest else x
    out = [torch.empty_like(padded) for _ in range(info.world_size)]
    tdist.all_gather(out, padded.contiguous())
    return torch.cat([o[: int(s)] for o, s in zip(out, sizes)], dim=0)


def any_rank(flag: bool, info: DistInfo, device: torch.device | None = None) -> bool:
    """True on every rank when the flag is true on any rank (an all-reduce MAX of one number)."""
    if not info.distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item() > 0)


def gather_objects(obj, info: DistInfo) -> list:
    """Every rank's picklable `obj`, in rank order, on every rank ([obj] in one process)."""
    if not info.distributed:
        return [obj]
    out: list = [None] * info.world_size
    tdist.all_gather_object(out, obj)
    return out


def barrier(info: DistInfo) -> None:
    if info.distributed:
        tdist.barrier()


def cleanup(wait_for_all: bool = False) -> None:
    """Leave the process group a command joined (a no-op in one process).

    wait_for_all (after a command succeeded): a barrier first, so no rank tears its group down while another
    still works (rank 0 writes figures after the last collective); a rank leaving early made gloo abort the
    other ("terminate called without an active exception"). Objects still holding the group (a DDP wrapper in
    a reference cycle) are collected first, so the group and its threads go down now, not at interpreter exit.
    """
    if tdist.is_available() and tdist.is_initialized():
        if wait_for_all and tdist.get_world_size() > 1:
            tdist.barrier()
        gc.collect()
        tdist.destroy_process_group()


def print0(info: DistInfo, *args, **kwargs) -> None:
    """print on rank 0 only."""
    if info.is_main:
        print(*args, **kwargs, flush=True)
