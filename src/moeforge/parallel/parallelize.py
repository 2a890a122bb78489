"""Apply expert parallelism and FSDP2/HSDP to a plain `Transformer`, from outside (the torchtitan way).

- Experts: `w13`, `w2` become DTensors `Shard(0)` over "ep" (each rank keeps E/ep experts), the MoE
  layer's dispatcher becomes the all-to-all one, and FSDP shards them over ("dp_replicate", "efsdp")
  (HSDP: replicated across dp_replicate, sharded over efsdp).
- Everything else: FSDP over ("dp_replicate", "dp_shard"), one unit per block plus the root.
- The batch-wise aux loss counts the global batch: each MoE layer sums its counts over "dp".
- Between EP and FSDP (torchtitan's order), activation checkpointing and regional compilation of
  each block when asked for (`regional.py`).

Gradient scale: an expert's gradient on its owner already sums the contributions of every ep rank's
tokens (through the all-to-all backward), and FSDP then reduces it over R x efsdp ranks. Dividing that
by R x efsdp (FSDP's default) would leave it ep times too large, so the experts scale their weight
gradients by 1/ep (`ExpertParallelExperts`), which makes every gradient the mean over the global
batch. (FSDP's `set_gradient_divide_factor` would do the same with a PREMUL_SUM reduction, which
gloo does not support.)
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from moeforge.config import ConfigError, ParallelConfig
from moeforge.config.cross_section import check_layout_fits_experts
from moeforge.model.moe import MoE
from moeforge.model.transformer import Block, Transformer
from moeforge.parallel.expert_parallel import AllToAllDispatcher, ExpertParallelExperts
from moeforge.parallel.mesh import ParallelMesh
from moeforge.parallel.pipeline import StageModel
from moeforge.parallel.regional import apply_block_wrappers


def parallelize(
    model: Transformer | StageModel,
    mesh: ParallelMesh,
    cfg: ParallelConfig | None = None,
    stages: list[nn.Module] | None = None,
    reshard_after_forward: bool = True,
    activation_checkpoint: str = "none",
    compile: bool = False,
) -> nn.Module:
    """Shard `model` in place over `mesh` (see `build_mesh`) and return it.

    Under pipelining, `model` is this rank's `StageModel` and `stages` its stage chunks: each chunk
    is an FSDP root of its own (a module may not sit under two roots), and the zero-bubble schedules
    need `reshard_after_forward=False` (their split backward finds the weights in the autograd graph
    by the parameters the forward used). `activation_checkpoint` ('none' | 'experts' | 'block') and
    `compile` wrap each block before FSDP does (`apply_block_wrappers`).

    With the `cfg` the mesh was built from, the layout is first checked against the mesh and the
    model: experts divisible by ep, routing groups whole on each of the ep-nodes (node-limited
    routing), with one-line errors."""
    ep_mesh = mesh["ep"]
    if cfg is not None:
        check_layout_fits_experts(cfg, model.cfg.moe)
        if ep_mesh.size() != cfg.ep:
            raise ConfigError(f"parallel.ep: got {cfg.ep}; allowed: the mesh's ep size {ep_mesh.size()}")
    if ep_mesh.size() > 1:
        for layer in model.moe_layers():
            apply_expert_parallel(layer, ep_mesh)
    dp_group = mesh["dp"].get_group()
    for layer in model.moe_layers():
        layer.sum_over_data_parallel = functools.partial(sum_across_ranks, group=dp_group)
    apply_block_wrappers(model, activation_checkpoint, compile)
    apply_fsdp(model, mesh, stages or [model], reshard_after_forward)
    return model


def apply_expert_parallel(layer: MoE, ep_mesh: DeviceMesh) -> None:
    """Keep this rank's contiguous block of experts (DTensor Shard(0)) and route tokens by all-to-all."""
    experts = layer.experts
    for name, param in list(experts.named_parameters(recurse=False)):
        sharded = distribute_tensor(param.data, ep_mesh, [Shard(0)])
        experts.register_parameter(name, nn.Parameter(sharded, requires_grad=param.requires_grad))
    experts.__class__ = ExpertParallelExperts
    experts.ep_size = ep_mesh.size()
    layer.dispatcher = AllToAllDispatcher(layer.cfg.n_experts, ep_mesh.get_group())


def apply_fsdp(
    model: nn.Module, mesh: ParallelMesh, roots: list[nn.Module], reshard_after_forward: bool = True
) -> None:
    """One FSDP unit per block (main and MTP blocks), experts their own unit under EP, then each of
    the `roots` (the model, or each pipeline stage chunk)."""
    dp_mesh = mesh["dp_replicate", "dp_shard"]
    expert_mesh = mesh["dp_replicate", "efsdp"]
    expert_parallel = mesh["ep"].size() > 1
    blocks = [module for module in model.modules() if isinstance(module, Block)]
    for block in blocks:
        if expert_parallel and isinstance(block.ffn, MoE):
            fully_shard(block.ffn.experts, mesh=expert_mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(block, mesh=dp_mesh, reshard_after_forward=reshard_after_forward)
    for root in roots:
        fully_shard(root, mesh=dp_mesh)


def clip_grad_norm_(
    parameters: list[nn.Parameter],
    max_norm: float,
    shard_group: dist.ProcessGroup | None = None,
    counted: list[nn.Parameter] | None = None,
    stage_group: dist.ProcessGroup | None = None,
) -> torch.Tensor:
    """Clip to the global gradient norm and return it.

    The parameters are plain tensors (one process), or DTensors whose local shards, over the ranks
    of `shard_group` (dp_shard: experts split over efsdp x ep, the rest over dp_shard), are disjoint
    parts of the whole; replicas (dp_replicate) hold the same gradients. Each rank adds its shards'
    squares and one all-reduce over the group gives every rank the same bits, so replicated
    parameters stay identical (a DTensor's full_tensor() would reduce mesh dim by mesh dim, in an
    order that can differ between ranks). Under pipelining, the norm counts the `counted` subset
    (each model parameter once over the stages) and a second all-reduce over the pp `stage_group`
    adds the stages; every parameter is scaled."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    counted_grads = grads if counted is None else [p.grad for p in counted if p.grad is not None]
    squares = torch.stack([_local_square_sum(grad) for grad in counted_grads]).sum()
    if shard_group is not None:
        dist.all_reduce(squares, group=shard_group)
    if stage_group is not None:
        dist.all_reduce(squares, group=stage_group)
    total = squares.sqrt()
    if max_norm != float("inf"):
        scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for grad in grads:
            grad.mul_(scale)
    return total


def _local_square_sum(grad: torch.Tensor) -> torch.Tensor:
    """Sum of squares of this rank's part of `grad`, divided by the copies of it that the shard group
    holds (a DTensor replicated over a mesh dim other than dp_replicate)."""
    if not isinstance(grad, DTensor):
        return _square_sum(grad)
    mesh, copies = grad.device_mesh, 1
    for dim, placement in enumerate(grad.placements):
        if placement.is_replicate() and mesh.mesh_dim_names[dim] != "dp_replicate":
            copies *= mesh.size(dim)
    return _square_sum(grad.to_local()) / copies


def _square_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of the squares of `tensor`'s elements in fp32, as one dot product: one read, no squared
    copy (half the time of square().sum() over a small model's gradients on the CPU)."""
    flat = tensor.float().reshape(-1)
    return torch.dot(flat, flat)


def sum_across_ranks(value: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """A new tensor: `value` summed over the ranks of `group` (default: all); the value itself in one
    process."""
    if not dist.is_initialized():
        return value
    value = value.clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM, group=group)
    return value
