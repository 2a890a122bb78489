"""The process world and its DeviceMesh.

One mesh carries every parallel dim. Expert parallelism borrows its ranks from dp_shard (as in
torchtitan and the PyTorch/Databricks MoE recipe): dp_shard = efsdp x ep, so the mesh is

    ("dp_replicate", "efsdp", "ep")      shape (R, S/E, E)

with two flattened views: "dp_shard" = efsdp x ep (FSDP of everything that is not an expert) and
"dp" = all three (data loading, loss averaging). Experts are DTensors sharded on "ep" and
FSDP-sharded over "efsdp"; both kinds of parameters are replicated over "dp_replicate" (HSDP).
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


def build_mesh(cfg: ParallelConfig, world_size: int, device_type: str) -> DeviceMesh:
    """The ("dp_replicate", "efsdp", "ep") mesh with "dp_shard" and "dp" flattened views."""
    cfg.validate(world_size)
    shard = cfg.resolved_dp_shard(world_size)
    mesh = init_device_mesh(
        device_type,
        (cfg.dp_replicate, shard // cfg.ep, cfg.ep),
        mesh_dim_names=("dp_replicate", "efsdp", "ep"),
    )
    mesh["efsdp", "ep"]._flatten("dp_shard")
    mesh["dp_replicate", "efsdp", "ep"]._flatten("dp")
    return mesh
