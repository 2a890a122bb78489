"""Which block of each tensor this rank holds, and where a block of the full tensor lands in it, so
that a loader reads from storage only the slices that land in this rank's own shards.

A plain tensor is all local. A DTensor (experts `Shard(0)` over ep, FSDP2 shards, HSDP replicas)
holds one block of the full tensor at an offset, located as torch.distributed.checkpoint locates it.
A loader describes what one stored tensor fills of the full tensor as a box (`index_box`), and reads
of it only the box's `overlap` with the local block.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

Box = list[tuple[int, int, bool]]
"""[start, stop) in each dim of the full tensor, and whether the stored tensor has that dim"""


def local_shard(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a tensor: a DTensor's local shard (its storage itself), a plain tensor."""
    with torch.no_grad():  # to_local() then returns the local shard, not an autograd view of it
        return tensor.to_local() if isinstance(tensor, DTensor) else tensor


@dataclass(frozen=True)
class LocalPart:
    """The block of a tensor this process holds: `tensor` is full[o0 : o0 + n0, o1 : o1 + n1, ...]
    for (o0, o1, ...) = `offset` and (n0, n1, ...) = `tensor.shape`."""

    tensor: torch.Tensor
    offset: tuple[int, ...]
    full_shape: tuple[int, ...]


def local_part(tensor: torch.Tensor) -> LocalPart:
    """All of a plain tensor; of a DTensor the one block its placements give this rank (`local_shard`)."""
    offset = (0,) * tensor.dim()
    if isinstance(tensor, DTensor):
        _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return LocalPart(local_shard(tensor), tuple(offset), tuple(tensor.shape))


def index_box(index: tuple[Any, ...], shape: tuple[int, ...]) -> Box:
    """The box that `full[index]` covers in a tensor of `shape`; `index` holds integers and slices
    for its leading dims (an integer, e.g. one expert, is a dim the indexed tensor does not have)."""
    index = (*index, *[slice(None)] * (len(shape) - len(index)))
    box = []
    for i, size in zip(index, shape):
        if isinstance(i, int):
            box.append((i, i + 1, False))
        else:
            start, stop, _ = i.indices(size)
            box.append((start, stop, True))
    return box


def overlap(box: Box, part: LocalPart) -> tuple[tuple[Any, ...], list[tuple[int, int]]] | None:
    """Where a box meets this process's part: the index into the local tensor, and the [start, stop)
    ranges of the box's kept dims (counted from the box's start) that land there; None when they do
    not meet."""
    local_index: list[Any] = []
    ranges = []
    for (start, stop, kept), offset, size in zip(box, part.offset, part.tensor.shape):
        low, high = max(start, offset), min(stop, offset + size)
        if low >= high:
            return None
        local_index.append(slice(low - offset, high - offset) if kept else low - offset)
        if kept:
            ranges.append((low - start, high - start))
    return tuple(local_index), ranges
