"""The DeviceMesh of a world of processes (joining that world: process_group.py).

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

from dataclasses import dataclass

from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moeforge.config import ParallelConfig


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
    shard = cfg.resolved_dp_shard(world_size)
    experts = init_device_mesh(
        device_type,
        (cfg.dp_replicate, shard // cfg.ep, cfg.ep),
        mesh_dim_names=("dp_replicate", "efsdp", "ep"),
    )
    dp = experts._flatten("dp")
    dense = dp._unflatten(0, (cfg.dp_replicate, shard), ("dp_replicate", "dp_shard"))
    return ParallelMesh(experts, dense, dp)
