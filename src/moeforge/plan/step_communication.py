"""What one training step of a layout sends, and the seconds it takes on the cluster's links.

Per step and per rank: the MoE all-to-all's bytes and calls, FSDP/HSDP's or ZeRO-1's collectives
(as `parallel.parallelize.apply_fsdp` wraps the model), the pipeline's activation sends, the step's
own all-reduces, the host work around FSDP's and the dispatcher's collectives, and Streaming
DiLoCo's exchange across replicas. The formulas for bytes on the wire are `plan.comm`'s; this
module counts how many of each a step makes. `plan.step_time` combines them with the compute.
"""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.config import ModelConfig
from moeforge.diloco.wire import WireFormat
from moeforge.plan.cluster import Cluster
from moeforge.plan.comm import (
    AllToAllRows,
    all_gather_bytes,
    all_to_all_bytes,
    bandwidth_for_utilisation,
    diloco_message_bytes,
    fragment_elements,
    ring_bytes,
)
from moeforge.plan.layout import Layout
from moeforge.plan.tensors import parameter_tensors, transformer_blocks


@dataclass(frozen=True)
class Communication:
    """Bytes one GPU sends per step, by kind, and the seconds they take on their links."""

    all_to_all_nvlink_bytes: float
    all_to_all_network_bytes: float
    all_to_all_rows_per_token: float
    all_to_all_network_rows_per_token: float
    data_parallel_bytes: float
    data_parallel_over_network: bool
    pipeline_bytes: float
    all_to_all_s: float
    data_parallel_s: float
    pipeline_s: float
    all_to_all_calls: float = 0.0
    """all-to-alls per step (4 per MoE layer forward, 3 backward), each charged the cluster's
    all-to-all latency (included in all_to_all_s)"""
    data_parallel_calls: float = 0.0
    """FSDP/HSDP/ZeRO collectives per step, each charged the collective latency (included in
    data_parallel_s)"""
    step_calls: float = 0.0
    """the step's own all-reduces (the gradient norm, the logged sums), charged the latency and
    never hidden"""
    step_calls_s: float = 0.0


@dataclass(frozen=True)
class DiLoCoTraffic:
    bytes_per_sync: float
    """bytes of one replica's messages per fragment exchange (its ranks' quantised shards and router
    biases), as the trainer counts `bytes_per_replica`; each reaches the other replicas"""
    syncs_per_step: float
    exchange_s: float
    exposed_per_step_s: float
    bandwidth_to_hide_bits: float
    """bits/s per replica that hide each exchange within its overlap steps (or for 95 % compute
    utilisation without overlap)"""


def moe_layers(cfg: ModelConfig, blocks: list[int]) -> int:
    """MoE layers among `blocks`, the MTP modules' blocks included (with the last stage)."""
    main = sum(1 for b in blocks if 0 <= b < cfg.n_layers and cfg.is_moe_layer(b))
    mtp = cfg.mtp_depth if cfg.n_layers in blocks and cfg.is_moe_layer(cfg.n_layers - 1) else 0
    return main + mtp


def step_communication(
    cfg: ModelConfig,
    layout: Layout,
    cluster: Cluster,
    rows: AllToAllRows,
    n_micro: int,
    tokens_mb: int,
    moe_layers: float,
    blocks: list[int],
) -> Communication:
    """What one rank sends per step and the seconds it takes: the MoE all-to-all's bytes over
    NVLink and the network (and its calls, each charged the all-to-all latency), the data-parallel
    collectives' bytes and calls, the pipeline's sends, and the step's own all-reduces."""
    passes = 3 if layout.recompute == "full" else 2  # forward, backward (and the recomputed forward)
    a2a_tokens = n_micro * tokens_mb * moe_layers * passes * all_to_all_bytes(1, cfg, layout)
    nvlink_bytes, network_bytes = a2a_tokens * rows.nvlink, a2a_tokens * rows.network
    a2a_s = max(
        nvlink_bytes / cluster.achieved_nvlink if nvlink_bytes else 0.0,
        network_bytes / cluster.achieved_network if network_bytes else 0.0,
    )
    a2a_calls = 0.0
    if layout.ep > 1:
        # forward: counts, rows, gates and ids, rows back; backward: the three that carry gradients
        forwards = 2 if layout.recompute == "full" else 1
        a2a_calls = n_micro * moe_layers * (4 * forwards + 3)
        a2a_s += a2a_calls * cluster.all_to_all_latency
    dp_bytes, over_network = _data_parallel_bytes(cfg, layout, cluster, n_micro, blocks)
    dp_s = 0.0
    if dp_bytes:  # one device sends nothing and needs no link
        dp_s = dp_bytes / (cluster.achieved_network if over_network else cluster.achieved_nvlink)
    dp_calls = _data_parallel_calls(cfg, layout, n_micro, blocks)
    dp_s += dp_calls * cluster.collective_latency
    # the gradient norm's all-reduce (and the pipeline stages'), and the one of the logged sums
    step_calls = 0.0 if layout.world_size() == 1 else 2.0 + (layout.pp > 1)
    pipe_bytes = 0.0
    if layout.pp > 1:
        pipe_bytes = 2 * n_micro * layout.chunks_per_rank() * tokens_mb * cfg.dim * layout.activation_bytes
    pipe_s = pipe_bytes / cluster.achieved_network if pipe_bytes else 0.0
    return Communication(
        all_to_all_nvlink_bytes=nvlink_bytes,
        all_to_all_network_bytes=network_bytes,
        all_to_all_rows_per_token=rows.total,
        all_to_all_network_rows_per_token=rows.network,
        data_parallel_bytes=dp_bytes,
        data_parallel_over_network=over_network,
        pipeline_bytes=pipe_bytes,
        all_to_all_s=a2a_s,
        data_parallel_s=dp_s,
        pipeline_s=pipe_s,
        all_to_all_calls=a2a_calls,
        data_parallel_calls=dp_calls,
        step_calls=step_calls,
        step_calls_s=step_calls * cluster.collective_latency,
    )


def _data_parallel_calls(cfg: ModelConfig, layout: Layout, n_micro: int, blocks: list[int]) -> float:
    """Collectives per step of FSDP2 as `parallel.parallelize.apply_fsdp` wraps the model: per
    micro-batch, each block unit (main and MTP blocks) all-gathers in the forward and again in the
    backward and reduce-scatters, the root (one per pipeline chunk, not resharded after forward)
    all-gathers once and reduce-scatters; under EP the experts of each MoE block are a unit of their
    own over (dp_replicate, efsdp); HSDP adds an all-reduce per unit. Groups of one rank send
    nothing. ZeRO-1: one reduce-scatter and one all-gather per group per step."""
    replicate = layout.dp_replicate > 1
    if layout.data_sharding != "fsdp":
        groups = (layout.data_parallel > 1) + (layout.ep > 1 and layout.data_parallel // layout.ep > 1)
        return 2.0 * groups
    block_units, root_units, expert_units = _fsdp_units(cfg, layout, blocks)
    calls = (block_units + expert_units) * (3 + replicate) + root_units * (2 + replicate)
    return n_micro * calls


def _fsdp_units(cfg: ModelConfig, layout: Layout, blocks: list[int]) -> tuple[float, float, float]:
    """FSDP2 units of a rank that communicate (their group has more than one rank), as
    `parallel.parallelize.apply_fsdp` wraps the model: (blocks, roots, MoE blocks' experts);
    none under ZeRO-1."""
    if layout.data_sharding != "fsdp":
        return 0.0, 0.0, 0.0
    sharded = layout.dp_shard * layout.dp_replicate > 1
    block_units = float(transformer_blocks(cfg, blocks)) if sharded else 0.0
    root_units = float(layout.chunks_per_rank()) if sharded else 0.0
    expert_units = 0.0
    if layout.ep > 1 and (layout.dp_shard // layout.ep) * layout.dp_replicate > 1:
        expert_units = float(moe_layers(cfg, blocks))
    return block_units, root_units, expert_units


def host_work_seconds(cfg: ModelConfig, layout: Layout, cluster: Cluster, n_micro: int, blocks: list[int]) -> float:
    """Host work per step beyond the collectives themselves: FSDP2's (hooks, copy-in/copy-out
    bookkeeping), `cluster.fsdp-unit-overhead` per communicating unit and micro-batch; and under EP
    the all-to-all dispatcher's, `cluster.ep-dispatch-overhead` per MoE layer and micro-batch."""
    fsdp = sum(_fsdp_units(cfg, layout, blocks)) * cluster.fsdp_unit_overhead
    dispatcher = moe_layers(cfg, blocks) * cluster.ep_dispatch_overhead if layout.ep > 1 else 0.0
    return n_micro * (fsdp + dispatcher)


def _data_parallel_bytes(
    cfg: ModelConfig, layout: Layout, cluster: Cluster, n_micro: int, blocks: list[int]
) -> tuple[float, bool]:
    """Bytes per step through one rank's link for FSDP (two all-gathers and a reduce-scatter per
    micro-batch, FSDP2's default without no-sync) plus HSDP's all-reduce of the shards, or ZeRO-1
    (one reduce-scatter of gradients and one all-gather of parameters per step), a reduce-scatter
    costing an all-reduce's bytes on gloo; and whether the group leaves the node."""
    dense = expert = 0
    for t in parameter_tensors(cfg):
        if t.block in blocks:
            if t.is_expert and layout.ep > 1:
                expert += t.numel // layout.ep
            else:
                dense += t.numel
    p, g = layout.gather_bytes or layout.param_bytes, layout.grad_bytes
    efsdp = layout.dp_shard // layout.ep
    reduce_as_all_reduce = cluster.collective_backend == "gloo"  # gloo's reduce-scatter
    if layout.data_sharding == "fsdp":
        per_micro = (
            ring_bytes(dense * p, layout.dp_shard) * 2
            + ring_bytes(dense * g, layout.dp_shard, all_reduce=reduce_as_all_reduce)
            + ring_bytes(expert * p, efsdp) * 2
            + ring_bytes(expert * g, efsdp, all_reduce=reduce_as_all_reduce)
        )
        replicate = ring_bytes(
            (dense / layout.dp_shard + expert / efsdp) * g, layout.dp_replicate, all_reduce=True
        )
        total = n_micro * (per_micro + replicate)
        over_network = layout.dp_shard > cluster.gpus_per_node or (
            layout.dp_replicate > 1 and layout.dp_shard * layout.dp_replicate > cluster.gpus_per_node
        )
        return total, over_network
    dp = layout.data_parallel
    expert_dp = dp // layout.ep
    total = (
        ring_bytes(dense * g, dp, all_reduce=reduce_as_all_reduce)
        + ring_bytes(dense * p, dp)
        + ring_bytes(expert * g, expert_dp, all_reduce=reduce_as_all_reduce)
        + ring_bytes(expert * p, expert_dp)
    )
    return total, dp > cluster.gpus_per_node


def diloco_traffic(
    cfg: ModelConfig, layout: Layout, cluster: Cluster, step_s: float, compute_s: float
) -> DiLoCoTraffic | None:
    """Streaming DiLoCo: each of P fragments is exchanged across the M replicas once every H steps
    (an all-gather of every rank's quantised shard, plus the fragment's router biases from every
    rank), overlapping tau inner steps. Sizes are those of the largest fragment; the bandwidth is per
    replica (its GPUs' network links together, or `cluster.cross-replica-bandwidth`)."""
    m = layout.diloco_replicas
    if m == 1:
        return None
    p = layout.diloco_fragments
    replica_gpus = layout.world_size() // m
    elements, biases = max(fragment_elements(cfg, p))
    # every rank sends its shard of the fragment and all of the fragment's router biases
    wire_format = WireFormat(
        layout.diloco_quantize, layout.diloco_quantize_block, layout.diloco_topk_fraction, layout.diloco_topk_chunk
    )
    message = diloco_message_bytes(elements, wire_format, router_biases=replica_gpus * biases, senders=replica_gpus)
    wire = all_gather_bytes(message, m)
    link = cluster.cross_replica_bandwidth or replica_gpus * cluster.achieved_network
    exchange = wire / link
    syncs_per_step = p / layout.diloco_sync_every
    hidden = layout.diloco_overlap_steps * step_s
    exposed = max(0.0, exchange - hidden) * syncs_per_step
    need = bandwidth_for_utilisation(8 * wire, syncs_per_step, hidden, compute_s, 0.95)
    return DiLoCoTraffic(message, syncs_per_step, exchange, exposed, need)
