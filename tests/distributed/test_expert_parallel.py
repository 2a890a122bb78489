"""The all-to-all dispatcher against the local one: same outputs and gradients, however uneven."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from moeforge.parallel.spawn import run_on_processes
from moeforge.config import ConfigError, ModelConfig, MoEConfig, ParallelConfig
from moeforge.model.moe import MoE
from moeforge.model.transformer import Transformer
from moeforge.parallel import build_mesh, clip_grad_norm_, parallelize
from moeforge.parallel.parallelize import apply_expert_parallel

CFG = MoEConfig(dim=16, n_experts=8, top_k=2, expert_ffn_dim=8, n_shared_experts=1, n_groups=1, topk_groups=1)
NODE_LIMITED = dataclasses.replace(CFG, top_k=3, n_groups=2, topk_groups=1)
"""with ep = ep-nodes = 2 each rank is a node: every token's 3 experts live on one rank"""
TOKENS_PER_RANK = 30


def reference_layer(skew: bool, cfg: MoEConfig = CFG) -> MoE:
    torch.manual_seed(0)
    layer = MoE(cfg)
    if skew:  # every token picks experts 0 and 1, which both live on rank 0
        layer.router.expert_bias.copy_(torch.tensor([10.0, 10.0, 0, 0, 0, 0, 0, 0]))
    return layer


def compare_with_local(rank: int, world_size: int, skew: bool, cfg: MoEConfig = CFG) -> None:
    torch.manual_seed(1)
    x_global = torch.randn(world_size * 6, TOKENS_PER_RANK // 6, cfg.dim)
    reference = reference_layer(skew, cfg)
    x_ref = x_global.clone().requires_grad_(True)
    out_ref, _ = reference(x_ref)
    out_ref.square().sum().backward()

    layer = reference_layer(skew, cfg)
    apply_expert_parallel(layer, init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))["ep"])
    rows = slice(rank * 6, (rank + 1) * 6)
    x_local = x_global[rows].clone().requires_grad_(True)
    tokens = x_local.reshape(-1, cfg.dim)
    routing = layer.route(tokens)
    x_sorted, tokens_per_expert, state = layer.dispatch(tokens, routing)  # the phases one at a time
    out = layer.combine(layer.compute_experts(x_sorted, tokens_per_expert), state, tokens).view_as(x_local)
    out.square().sum().backward()

    torch.testing.assert_close(out, out_ref[rows], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_local.grad, x_ref.grad[rows], rtol=1e-5, atol=1e-6)
    # the owner of each expert holds the gradient over every rank's tokens (x ep scale 1/ep)
    local = slice(rank * 8 // world_size, (rank + 1) * 8 // world_size)
    grad_w2 = layer.experts.w2.grad.to_local() * world_size
    torch.testing.assert_close(grad_w2, reference.experts.w2.grad[local], rtol=1e-4, atol=1e-6)
    rows_sent = sum(state.send_splits)
    if skew:
        assert torch.bincount(routing.expert_indices.reshape(-1), minlength=8)[2:].sum() == 0
        assert rows_sent == TOKENS_PER_RANK  # once to rank 0, although both experts live there
    if cfg is NODE_LIMITED:
        assert rows_sent == TOKENS_PER_RANK * cfg.topk_groups  # each token to one node, not top_k=3 rows
    else:
        assert TOKENS_PER_RANK <= rows_sent <= TOKENS_PER_RANK * cfg.top_k


@pytest.mark.parametrize("skew", [False, True], ids=["balanced", "all-to-rank0"])
def test_all_to_all_dispatch_equals_local(skew):
    run_on_processes(2, compare_with_local, 2, skew)


def test_node_limited_routing_sends_each_token_to_at_most_m_nodes():
    run_on_processes(2, compare_with_local, 2, False, NODE_LIMITED)


def parallelize_checks_layout(rank: int) -> None:
    model = Transformer(ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, moe=CFG))
    layout = ParallelConfig(ep=2, ep_nodes=2)
    mesh = build_mesh(ParallelConfig(ep=2), 2, "cpu")
    with pytest.raises(ConfigError, match=r"^model\.moe\.n-groups: got 1; allowed: a multiple of parallel\.ep-nodes=2"):
        parallelize(model, mesh, layout)
    with pytest.raises(ConfigError, match=r"^parallel\.ep: got 1; allowed: the mesh's ep size 2$"):
        parallelize(model, mesh, ParallelConfig(ep=1))


def test_parallelize_checks_the_layout_against_mesh_and_model():
    run_on_processes(2, parallelize_checks_layout)


def clip_norm_is_global_and_identical_on_every_rank(rank: int) -> None:
    layout = ParallelConfig(dp_replicate=2, ep=2)
    mesh = build_mesh(layout, 4, "cpu")
    torch.manual_seed(0)
    model = parallelize(Transformer(ModelConfig(dim=16, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=32, moe=CFG)), mesh)
    torch.manual_seed(1 + rank % 2)  # the two replicas see the same batch pair, as after HSDP's reduction
    model(torch.randint(0, 256, (2, 8))).logits.square().mean().backward()
    params = list(model.parameters())
    full = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in params]
    expected = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in full]))
    norm = clip_grad_norm_(params, max_norm=1e-3, shard_group=mesh["dp_shard"].get_group())
    torch.testing.assert_close(norm.double(), expected, rtol=1e-6, atol=0)
    norms = [torch.empty_like(norm) for _ in range(4)]
    dist.all_gather(norms, norm)
    assert all(torch.equal(n, norms[0]) for n in norms), norms  # the same bits: replicas stay identical
    clipped = [p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for p in params]
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.double()) for g in clipped]))
    torch.testing.assert_close(total, torch.tensor(1e-3, dtype=torch.float64), rtol=1e-4, atol=0)


def test_clip_grad_norm_over_hsdp_and_expert_shards():
    run_on_processes(4, clip_norm_is_global_and_identical_on_every_rank)
