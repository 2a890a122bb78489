"""The process world and its DeviceMesh.

Expert parallelism borrows its ranks from dp_shard (as in torchtitan and the PyTorch/Databricks MoE
recipe): dp_shard = efsdp x ep. One world of processes is seen through three views of one root mesh:

    experts  ("dp_replicate", "efsdp", "ep")   shape (R, S/E, E): expert DTensors sharded on "ep",
                                               FSDP-sharded over "efsdp"
    dense    ("dp_replicate", "dp_shard")      shape (R, S): FSDP of everything that is not an expert
    dp       ("dp",)                           every rank: data loading, global load counts

Both kinds of parameters are replicated over "dp_replicate" (HSDP). The views are kept as torch
builds them (flatten, then unflatten), since slicing a flattened dim out of a root mesh is deprecated.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moeforge.config import ParallelConfig


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """True under torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> World:
    """Join the process group torchrun describes in the environment (NCCL on CUDA, gloo on CPU)."""
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


@dataclass(frozen=True)
class ParallelMesh:
    """The three views of the world (module docstring); `mesh["ep"]`, `mesh["dp_replicate", "dp_shard"]`,
    `mesh["dp"]`... slices the view that has those dims."""

    experts: DeviceMesh
    dense: DeviceMesh
    dp: DeviceMesh

    def __getitem__(self, names: str | tuple[str, ...]) -> DeviceMesh:
        names = (names,) if isinstance(names, str) else tuple(names)
        for view in (self.dp, self.experts, self.dense):
            if set(names) <= set(view.mesh_dim_names or ()):
                return view[names]
        raise KeyError(f"no mesh view has the dims {names}")

    def size(self) -> int:
        return self.dp.size()

    @property
    def device_type(self) -> str:
        return self.dp.device_type


def build_mesh(cfg: ParallelConfig, world_size: int, device_type: str) -> ParallelMesh:
    """The experts, dense and dp views of one mesh for the layout `cfg` on `world_size` ranks."""
    cfg.validate(world_size)
    shard = cfg.resolved_dp_shard(world_size)
    experts = init_device_mesh(
        device_type,
        (cfg.dp_replicate, shard // cfg.ep, cfg.ep),
        mesh_dim_names=("dp_replicate", "efsdp", "ep"),
    )
    dp = experts._flatten("dp")
    dense = dp._unflatten(0, (cfg.dp_replicate, shard), ("dp_replicate", "dp_shard"))
    return ParallelMesh(experts, dense, dp)
