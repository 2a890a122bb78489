"""The planner's step-time terms beyond matmul FLOPs: memory-bound bytes (hand counts), operator
counts (stable, and additive over blocks), and that each term is charged only where the cluster
gives its constant, so the GPU presets' plans stay what their published whole-step efficiencies say."""

import dataclasses

import pytest
import torch

from moeforge.config import ConfigError, ModelConfig, load_config
from moeforge.config.model import MoEConfig
from moeforge.plan import Layout, TrainingShape, available_clusters, load_cluster, plan_layout
from moeforge.plan import memory_traffic as traffic
from moeforge.plan import op_counts
from moeforge.plan.cluster import Cluster
from moeforge.plan.block_flops import flops_per_token_by_block

SMALL = ModelConfig(
    vocab_size=32,
    dim=8,
    n_layers=2,
    n_dense_layers=1,
    n_heads=2,
    n_kv_heads=1,
    head_dim=4,
    ffn_dim=12,
    max_seq_len=16,
    moe=MoEConfig(n_experts=4, top_k=2, expert_ffn_dim=4, n_shared_experts=1, seq_aux_coef=1e-4),
)


def test_memory_traffic_matches_hand_counts():
    # attention: norm 7*8, RoPE 12 x (2+1) x 4, SDPA in (2+2) x 4 and out 2 x 4, the output's copy
    # 2 x 2 x 4, residual 3*8
    assert traffic.attention_elements(SMALL) == 56 + 144 + 24 + 16 + 24
    # dense: norm 56, SwiGLU 5 x 12, residual 24
    assert traffic.dense_ffn_elements(SMALL) == 56 + 60 + 24
    # router over 4 experts, top-2, one balance loss: 2E + 3E + E + 6k + 4E
    assert traffic.router_elements(SMALL) == 8 + 12 + 4 + 12 + 16
    # MoE: norm 56, router 52, gather 2 x 2 x 8, SwiGLU 2 x 5 x 4 + shared 5 x 4, permutation back
    # 2 x 2 x 8, weighted sum 2 x 8 + 8, shared add 24, residual 24
    assert traffic.moe_ffn_elements(SMALL) == 56 + 52 + 32 + 60 + 32 + 24 + 24 + 24
    # head: norm 56, log-softmax over 32 read and written, the label's gather
    assert traffic.head_loss_elements(SMALL) == 56 + 64 + 1
    by_block = traffic.forward_elements_by_block(SMALL)
    assert by_block == {-1: 16, 0: 264 + 140, 1: 264 + 304, 2: 121}
    # backward: twice the forward, but 25 rather than 2 x 7 per normalised element (two norms a block)
    backward = traffic.backward_elements_by_block(SMALL)
    assert backward == {-1: 32, 0: 2 * 404 + 11 * 16, 1: 2 * 568 + 11 * 16, 2: 2 * 121 + 11 * 8}
    # fused AdamW: reads parameter, gradient, two moments; writes three; clipping 5
    assert traffic.optimizer_elements_per_parameter() == 12
    assert traffic.optimizer_elements_per_parameter(clipping=False) == 7


def test_memory_traffic_of_mla_counts_its_norms_and_cats():
    cfg = dataclasses.replace(
        SMALL,
        attention="mla",
        q_lora_rank=8,
        kv_lora_rank=4,
        qk_nope_head_dim=4,
        qk_rope_head_dim=2,
        v_head_dim=4,
    )
    # norms 7 x (8 + 4 + 8) (input, kv latent, q latent); RoPE 12 x (2 x 2 + 2); two cats
    # 2 x 2 x 2 x 6; SDPA in 2 x 2 x 6 + 2 x 4, out 2 x 4 (40); the output's copy 2 x 2 x 4; residual 24
    assert traffic.attention_elements(cfg) == 140 + 72 + 48 + 40 + 16 + 24
    # values padded from 4 to 6 wide: the pad reads 2 x 4 and writes 2 x 6; SDPA reads and writes
    # 2 x 2 more each
    assert traffic.padding_elements(cfg) == 8 + 12 + 4 + 4
    fused, padded = (traffic.forward_elements_by_block(cfg, 16, kernel) for kernel in ("fused", "padded"))
    assert {b: padded[b] - fused[b] for b in fused} == {-1: 0, 0: 28, 1: 28, 2: 0}
    fused, padded = (traffic.backward_elements_by_block(cfg, 16, kernel) for kernel in ("fused", "padded"))
    assert {b: padded[b] - fused[b] for b in fused} == {-1: 0, 0: 56, 1: 56, 2: 0}


def test_padded_values_charge_the_wider_product():
    """MLA's padded values make the weighted sum query-wide: the attention's FLOPs at the rate grow
    by (qk + qk) / (qk + v), the matmuls' do not."""
    cfg = load_config("deepseek-v3-tiny").model
    layout = dict(compute_dtype="fp32", activation_bytes=4, micro_batch_size=2)
    shape = TrainingShape(8, 64)
    plans = []
    for kernel in ("fused", "padded"):
        planned = Layout(attention_kernel=kernel, **layout)
        planned.validate(1, CPU.gpus_per_node)
        plans.append(plan_layout(cfg, planned, CPU, shape))
    fused, padded = plans
    flops = flops_per_token_by_block(cfg, 64)
    attention = sum(f.attention for f in flops.values()) * shape.global_batch_size * shape.seq_len
    qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    extra = attention * (2 * qk / (qk + v) - 1) / CPU.achieved_flops("fp32")
    assert padded.compute_s - fused.compute_s == pytest.approx(extra, rel=1e-6)


def test_operator_counts_are_stable_and_add_up_over_blocks():
    op_counts._COUNTED.clear()
    first = op_counts.step_operators(SMALL)
    op_counts._COUNTED.clear()
    assert op_counts.step_operators(SMALL) == first
    assert 0 < first.dense_block.forward < first.moe_block.forward
    assert first.dense_block.backward > 0 and first.optimizer_per_tensor > 0
    # widths do not change the counts
    wider = dataclasses.replace(SMALL, dim=16, ffn_dim=24)
    assert op_counts.step_operators(wider) == first
    # a model of 2 dense and 3 MoE blocks dispatches what the per-block counts add up to
    cfg = op_counts.shrunk_config(SMALL, 2, 3, 0)
    whole, _ = op_counts._pass_operators(cfg)
    by_block = first.by_block(cfg)
    assert sum(ops.forward for ops in by_block.values()) == whole.forward
    assert sum(ops.backward for ops in by_block.values()) == whole.backward


def test_operator_counter_counts_forward_and_backward():
    x = torch.ones(3, requires_grad=True)
    assert op_counts.count_operators(lambda: x * 2.0 + 1.0) == 2


def _plan(cluster: Cluster, **layout: int) -> object:
    cfg = load_config("tiny").model
    plan_layout_ = Layout(compute_dtype="fp32", activation_bytes=4, micro_batch_size=2, **layout)
    plan_layout_.validate(plan_layout_.world_size(), cluster.gpus_per_node)
    return plan_layout(cfg, plan_layout_, cluster, TrainingShape(8, 64))


CPU = Cluster(
    name="cpu",
    gpus_per_node=2,
    peak_fp32_flops=1e11,
    fp32_efficiency=1.0,
    hbm_bytes=1e10,
    hbm_bandwidth=1e10,
    nvlink_bandwidth=1e9,
    nvlink_efficiency=1.0,
)


def test_new_terms_only_where_the_cluster_gives_them():
    base = _plan(CPU, dp_shard=2)
    assert base.memory_bound_s == base.operator_launch_s == base.optimizer_s == 0
    assert base.communication.step_calls_s == 0

    # one device (nothing to hide under the longer compute): the bytes add to the step
    alone = _plan(CPU, dp_shard=1)
    memory = _plan(dataclasses.replace(CPU, elementwise_bandwidth=1e10), dp_shard=1)
    assert memory.memory_bound_s > 0 and memory.optimizer_s > 0 and memory.operator_launch_s == 0
    assert memory.step_s == pytest.approx(alone.step_s + memory.memory_bound_s + memory.optimizer_s)

    launches = _plan(dataclasses.replace(CPU, operator_overhead=1e-5), dp_shard=2)
    assert launches.operator_launch_s == pytest.approx(
        (launches.operators_per_step - launches.optimizer_s / 1e-5) * 1e-5
    )

    latency = _plan(dataclasses.replace(CPU, collective_latency=1e-3), dp_shard=2)
    comm = latency.communication
    # FSDP over 2 ranks: per micro-batch 4 blocks x 3 and the root's 2; the step's 2 all-reduces
    assert comm.data_parallel_calls == 2 * (4 * 3 + 2)
    assert comm.step_calls == 2 and comm.step_calls_s == pytest.approx(2e-3)
    assert comm.data_parallel_s == pytest.approx(base.communication.data_parallel_s + 28e-3)

    a2a = _plan(dataclasses.replace(CPU, all_to_all_latency=1e-3), dp_shard=2, ep=2)
    # 3 MoE layers x 2 micro-batches x (4 forward + 3 backward)
    assert a2a.communication.all_to_all_calls == 3 * 2 * 7


@pytest.mark.parametrize("name", available_clusters())
def test_gpu_presets_fold_the_new_terms_into_their_efficiency(name):
    cluster = load_cluster(name)
    assert cluster.elementwise_bandwidth == cluster.operator_overhead == 0
    assert cluster.collective_latency == cluster.all_to_all_latency == 0


REDUCTIONS = ("aten::all", "aten::any", "aten::sum", "aten::amax", "aten::mean")
"""write one element per row: only their reads count"""
NO_TRAFFIC = (
    "aten::view", "aten::_unsafe_view", "aten::reshape", "aten::_reshape_alias", "aten::expand",
    "aten::as_strided", "aten::transpose", "aten::select", "aten::detach", "aten::resolve_conj",
    "aten::to",  # to the dtype it has: returns itself
    "aten::result_type", "aten::type_as", "aten::empty_like", "aten::empty_strided",
)  # fmt: skip


def kernel_traffic(fn, touches) -> tuple[float, list[str]]:
    """Elements read and written by the innermost kernels `fn` runs over tensors whose shape
    `touches(shape)` picks, from torch.profiler's recorded input shapes: each such input read once,
    an elementwise kernel's output written once (as large as its largest input), a reduction's not;
    matmuls excluded (their traffic is the matmul's). Also the kernels' names."""
    from torch.profiler import profile

    with profile(record_shapes=True) as prof:
        fn()

    def picked(event) -> list:
        matmul = "mm" in event.name or "matmul" in event.name
        if not event.name.startswith("aten::") or matmul or event.name in NO_TRAFFIC:
            return []
        return [s for s in event.input_shapes if s and touches(tuple(s))]

    elements, names = 0.0, []
    for event in prof.events():
        shapes = picked(event)
        if shapes and not any(picked(child) for child in event.cpu_children):  # the innermost
            size = max(int(torch.Size(s).numel()) for s in shapes)
            elements += sum(int(torch.Size(s).numel()) for s in shapes)
            elements += 0 if event.name in REDUCTIONS else size
            names.append(event.name)
    return elements, names


def test_written_out_attention_scores_traffic_is_what_sdpas_math_path_moves():
    """MLA's unequal q/k and v widths take SDPA's math path on CPU: the planner's per-token score
    elements, forward and backward, against the kernels that path runs (profiled)."""
    cfg = load_config("deepseek-v3-tiny").model
    batch, seq, heads = 2, 64, cfg.n_heads  # seq unlike every head width
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    q, k = (torch.randn(batch, heads, seq, qk, requires_grad=True) for _ in range(2))
    v = torch.randn(batch, heads, seq, cfg.v_head_dim, requires_grad=True)
    outputs = []
    scores = lambda shape: len(shape) >= 3 and shape[-2:] == (seq, seq)  # noqa: E731
    forward, forward_kernels = kernel_traffic(
        lambda: outputs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.1)),
        scores,
    )
    backward, backward_kernels = kernel_traffic(lambda: outputs[0].sum().backward(), scores)
    planned_forward, planned_backward = traffic.score_elements(cfg, seq)
    assert forward == pytest.approx(planned_forward * batch * seq, rel=0.05), forward_kernels
    assert backward == pytest.approx(planned_backward * batch * seq, rel=0.05), backward_kernels


def test_rms_norm_traffic_is_what_torchs_rms_norm_moves():
    """The planner's RMSNorm elements per normalised element, forward and backward, against the
    kernels nn.RMSNorm runs under autograd (profiled; the per-row statistics are negligible)."""
    tokens, width = 256, 96
    norm = torch.nn.RMSNorm(width, eps=1e-6)
    x = torch.randn(tokens, width, requires_grad=True)
    outputs = []
    rows = lambda shape: shape == (tokens, width)  # noqa: E731
    forward, forward_kernels = kernel_traffic(lambda: outputs.append(norm(x)), rows)
    grad = torch.ones(tokens, width)
    backward, backward_kernels = kernel_traffic(lambda: outputs[0].backward(grad), rows)
    assert forward == pytest.approx(traffic.RMS_NORM_FORWARD * tokens * width, rel=0.05), forward_kernels
    assert backward == pytest.approx(traffic.RMS_NORM_BACKWARD * tokens * width, rel=0.05), backward_kernels


def record_reduce_scatter_kernels(rank: int, out: str) -> None:
    """On a gloo group: the collectives and copies one reduce-scatter runs (profiled), to out."""
    import json
    from pathlib import Path

    import torch.distributed as dist
    from torch.profiler import profile

    full, shard = torch.ones(1024), torch.empty(512)
    with profile() as prof:
        dist.reduce_scatter_tensor(shard, full)
    if rank == 0:
        Path(out).write_text(json.dumps([e.name for e in prof.events()]))


def test_on_gloo_a_reduce_scatter_is_an_all_reduce_and_nothing_hides(tmp_path):
    """The fact behind `collective_backend = 'gloo'` (torch's gloo runs `_reduce_scatter_base` as a
    copy and an all-reduce of the whole tensor), and what the planner makes of it: twice the
    reduce-scatter bytes, and no data-parallel traffic hidden under compute."""
    import json

    from moeforge.parallel.spawn import run_on_processes

    run_on_processes(2, record_reduce_scatter_kernels, str(tmp_path / "kernels.json"))
    kernels = json.loads((tmp_path / "kernels.json").read_text())
    assert "gloo:all_reduce" in kernels and not any("reduce_scatter" in k and k.startswith("gloo") for k in kernels)

    nccl = _plan(CPU, dp_shard=2)
    gloo = _plan(dataclasses.replace(CPU, collective_backend="gloo"), dp_shard=2)
    # per micro-batch: two all-gathers (1/2 of the parameters each) and the reduction (1/2 -> 1)
    assert gloo.communication.data_parallel_bytes == pytest.approx(nccl.communication.data_parallel_bytes * 4 / 3)
    assert nccl.exposed_data_parallel_s < nccl.communication.data_parallel_s  # partly under compute
    assert gloo.exposed_data_parallel_s == pytest.approx(gloo.communication.data_parallel_s)
    with pytest.raises(ConfigError, match=r"^cluster\.collective-backend: got 'mpi'; allowed: 'nccl' \| 'gloo'$"):
        dataclasses.replace(CPU, collective_backend="mpi").validate()
