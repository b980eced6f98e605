"""The few collectives a checkpoint needs; each is a no-op outside a process group."""
from __future__ import annotations

from typing import Any

import torch.distributed as dist


def dist_on() -> bool:
    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if dist_on():
        dist.barrier()


def all_gather(obj: Any, world_size: int) -> list[Any]:
    if not dist_on() or world_size == 1:
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast(obj: Any, rank: int) -> Any:
    """Rank 0's ``obj`` on every rank."""
    if not dist_on():
        return obj
    box = [obj if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
