"""Scale-out: the DeviceMesh, expert parallelism and FSDP2/HSDP applied from outside the model."""

from moeforge.parallel.mesh import ParallelMesh, build_mesh, data_parallel_rank
from moeforge.parallel.process_group import World, init_distributed, launched_distributed, leave_process_group
from moeforge.parallel.parallelize import clip_grad_norm_, parallelize, sum_across_ranks
from moeforge.parallel.regional import apply_block_wrappers

__all__ = [
    "ParallelMesh",
    "World",
    "apply_block_wrappers",
    "build_mesh",
    "data_parallel_rank",
    "clip_grad_norm_",
    "init_distributed",
    "launched_distributed",
    "leave_process_group",
    "parallelize",
    "sum_across_ranks",
]
