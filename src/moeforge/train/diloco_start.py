"""The trainer's Streaming DiLoCo: its groups on the mesh and the parameter count it reports against."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from moeforge.config import Config
from moeforge.diloco import StreamingDiLoCo
from moeforge.parallel.pipeline import StageModel


def start_diloco(model: nn.Module, cfg: Config, mesh: DeviceMesh | None, replica: int, device: torch.device) -> StreamingDiLoCo:
    """DiLoCo over `model` for replica `replica`: exchanges across the `diloco` mesh dimension (the
    world without a mesh), agreements inside the replica (`replica_world`)."""
    group = mesh["diloco"].get_group() if mesh is not None else dist.group.WORLD
    replica_group = mesh["replica_world"].get_group() if mesh is not None else None
    count = replica_parameter_count(model, cfg, mesh, device)
    return StreamingDiLoCo(model, cfg.diloco, replica, group, device, replica_group, count)


def replica_parameter_count(model: nn.Module, cfg: Config, mesh: DeviceMesh | None, device: torch.device) -> int:
    """Parameters of the whole model, each once (a pipeline's stages summed over the pp ranks, the
    last stage's embedding copy left out): what data parallelism would all-reduce each step."""
    if mesh is None or cfg.parallel.pp == 1:
        return sum(param.numel() for param in model.parameters())  # a DTensor's numel is global
    assert isinstance(model, StageModel)
    count = sum(param.numel() for param in model.norm_parameters())  # not the embedding's copy
    total = torch.tensor([count], dtype=torch.int64, device=device)
    dist.all_reduce(total, group=mesh["pp"].get_group())
    return int(total.item())
