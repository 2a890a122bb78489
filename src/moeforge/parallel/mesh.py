"""The DeviceMesh of a world of processes (joining that world: process_group.py).

Expert parallelism borrows its ranks from dp_shard (as in torchtitan and the PyTorch/Databricks MoE
recipe): dp_shard = efsdp x ep. One world of processes is seen through three views of one root mesh:

    experts  ("dp_replicate", "efsdp", "ep")   shape (R, S/E, E): expert DTensors sharded on "ep",
                                               FSDP-sharded over "efsdp"
    dense    ("dp_replicate", "dp_shard")      shape (R, S): FSDP of everything that is not an expert
    dp       ("dp",)                           every rank: data loading, global load counts

Both kinds of parameters are replicated over "dp_replicate" (HSDP). The views are kept as torch
builds them (flatten, then unflatten), since slicing a flattened dim out of a root mesh is deprecated.

With pipeline parallelism (pipeline.py), a "pp" dim sits outside those three: the views above are
then those of one pipeline stage's ranks (FSDP, EP and the batch-wise counts work inside a stage),
`pp` joins the ranks that hold the stages of one data-parallel slice, and `replica_world` is every
rank of the replica (a step's losses and load counts are summed over stages and data together).

With DiLoCo replicas (diloco/), the root mesh has one more, outermost dim, "diloco": the views above
are then those of one replica (each replica is a world of its own for pipelining, FSDP, EP, data
loading and the load counts), and `replicas` is the 1-D view that joins rank x of every replica.

Outermost first: (diloco, pp, dp_replicate, efsdp, ep); a rank's data-parallel index counts the
ranks of every dim but pp (`data_parallel_rank`).
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
    pp: DeviceMesh
    """the "pp" dim: the ranks of one data-parallel slice's pipeline stages (size 1 without pipelining)"""
    replica_world: DeviceMesh
    """every rank of this DiLoCo replica (of the world without DiLoCo), flattened"""
    replicas: DeviceMesh | None = None
    """the "diloco" dim: the same rank of every DiLoCo replica (None without DiLoCo)"""

    def __getitem__(self, names: str | tuple[str, ...]) -> DeviceMesh:
        names = (names,) if isinstance(names, str) else tuple(names)
        views = (self.dp, self.experts, self.dense, self.pp, self.replica_world)
        views += (self.replicas,) if self.replicas is not None else ()
        for view in views:
            if set(names) <= set(view.mesh_dim_names or ()):
                return view[names]
        raise KeyError(f"no mesh view has the dims {names}")

    def size(self) -> int:
        """Ranks of one replica (all ranks without DiLoCo)."""
        return self.replica_world.size()

    @property
    def device_type(self) -> str:
        return self.dp.device_type


def build_mesh(cfg: ParallelConfig, world_size: int, device_type: str, replicas: int = 1) -> ParallelMesh:
    """The views of one mesh for the layout `cfg` inside each of `replicas` DiLoCo replicas of
    `world_size` ranks in all."""
    shard = cfg.resolved_dp_shard(world_size // replicas)
    inner_shape, inner_names = (cfg.pp, cfg.dp_replicate, shard // cfg.ep, cfg.ep), ("pp", "dp_replicate", "efsdp", "ep")
    replica_view = None
    if replicas == 1:
        root = init_device_mesh(device_type, inner_shape, mesh_dim_names=inner_names)
    else:
        root = init_device_mesh(device_type, (replicas, *inner_shape), mesh_dim_names=("diloco", *inner_names))
        replica_view = root["diloco"]
    experts = root[inner_names[1:]]
    dp = experts._flatten("dp")
    dense = dp._unflatten(0, (cfg.dp_replicate, shard), ("dp_replicate", "dp_shard"))
    replica_world = root[inner_names]._flatten("replica_world")
    return ParallelMesh(experts, dense, dp, root["pp"], replica_world, replica_view)


def data_parallel_rank(rank: int, world_size: int, pp: int, replicas: int = 1) -> tuple[int, int]:
    """(this rank's data-parallel index, data-parallel ranks) in a world laid out as the mesh is,
    (diloco, pp, dp...) outermost first: the stages of one pipeline read the same batch."""
    stage_ranks = world_size // (replicas * pp)
    replica, within = divmod(rank, world_size // replicas)
    return replica * stage_ranks + within % stage_ranks, replicas * stage_ranks
