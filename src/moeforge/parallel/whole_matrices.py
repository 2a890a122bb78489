"""A function of whole matrices applied to a sharded stack of them: what Muon's orthogonalisation needs.

A tensor [*batch, m, n] is a stack of m x n matrices (a 2-D weight is one; a 3-D expert weight
[E, m, n] is E of them). A function such as Newton-Schulz orthogonalisation mixes every entry of a
matrix with every other, so it cannot run on a shard that cuts through a matrix. Under FSDP2 a 2-D
weight is `Shard(0)` over dp_shard (rows split); an expert weight is `Shard(0)` over ep and
`_StridedShard(0)` over efsdp, both on the expert dim, so each rank already holds whole experts.

`on_whole_matrices` gathers only the mesh dims that shard inside the matrices (the last two dims),
applies the function on every rank of the gathered group to the same whole matrices (redundant
compute, as Moonshot's Distributed Muon does: arXiv 2502.16982, §2.3), and keeps this rank's part of
the result (a local slice, no communication). Shards of the batch dim stay as they are: each rank
orthogonalises its own experts and nothing moves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.placement_types import Placement


def on_whole_matrices(fn: Callable[[torch.Tensor], torch.Tensor], stack: torch.Tensor) -> torch.Tensor:
    """fn(stack) for a plain tensor [*batch, m, n]; for a DTensor, the DTensor with `stack`'s mesh,
    placements and shape whose local part is this rank's part of fn applied to the whole matrices.
    `fn` maps a [*b, m, n] tensor to one of the same shape, matrix by matrix."""
    if not isinstance(stack, DTensor):
        return fn(stack)
    mesh, placements = stack.device_mesh, tuple(stack.placements)
    whole = tuple(_whole_matrix_placement(p, stack.ndim) for p in placements)
    gathered = stack.redistribute(mesh, whole) if whole != placements else stack
    result = DTensor.from_local(fn(gathered.to_local()), mesh, whole, shape=stack.shape, stride=stack.stride())
    return result.redistribute(mesh, placements) if whole != placements else result


def _whole_matrix_placement(placement: Placement, ndim: int) -> Placement:
    """Replicate for a shard of one of the last two dims (it cuts through matrices), else `placement`.
    (`_StridedShard`, FSDP's shard of an already-sharded dim, is no `Shard` subclass in torch 2.13 but
    has a `dim` too.)"""
    dim = getattr(placement, "dim", None)
    return Replicate() if dim is not None and dim % ndim >= ndim - 2 else placement
