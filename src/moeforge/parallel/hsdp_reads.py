"""Read once per HSDP world, not once per dp_replicate replica: replica 0 reads, the others receive.

With dp_replicate R > 1, rank (r, s) of the mesh holds the same shards as rank (0, s), so whatever
replica 0 reads from storage (a checkpoint, a Hugging Face model) the other replicas can take over
dp_replicate instead of reading it again: storage serves it once instead of R times.

A reader that fails must not leave the other replicas waiting for tensors that never come, so
replica 0's verdict (None or the first line of the error) travels first, with any small objects,
and every rank raises the same error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from moeforge.parallel.mesh import ParallelMesh
from moeforge.parallel.sharded_load import local_shard


def replicated(mesh: ParallelMesh | None) -> bool:
    """True when the mesh has more than one replica (a plain or unreplicated run reads everywhere)."""
    return mesh is not None and mesh["dp_replicate"].size() > 1


def is_first_replica(mesh: ParallelMesh) -> bool:
    return mesh["dp_replicate"].get_local_rank() == 0


def broadcast_verdict(
    mesh: ParallelMesh, error: str | None, objects: list[Any]
) -> tuple[str | None, list[Any]]:
    """Replica 0's (error, objects) on every rank, pickled over dp_replicate."""
    payload = [error, objects]
    dist.broadcast_object_list(payload, group=mesh["dp_replicate"].get_group(), group_src=0)
    return payload[0], payload[1]


def broadcast_shards(mesh: ParallelMesh, tensors: Iterable[torch.Tensor]) -> None:
    """Overwrite each tensor's local part (a DTensor's local shard, a plain tensor) in place with
    replica 0's; the tensors must be on the mesh's device (NCCL cannot broadcast CPU tensors)."""
    group = mesh["dp_replicate"].get_group()
    works = [dist.broadcast(local_shard(t), group=group, group_src=0, async_op=True) for t in tensors]
    for work in works:
        work.wait()
