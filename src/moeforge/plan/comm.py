"""Bytes on the wire: the MoE all-to-all (expected rows per token under uniform routing, with and
without node-limited routing, or exact rows from measured tokens per expert), FSDP/HSDP and ZeRO-1
collectives, pipeline sends, and DiLoCo's cross-replica exchange (its fragments and message sizes
by `moeforge.diloco`'s own rules) with the bandwidth that hides it.

Ring collectives: an all-gather or reduce-scatter of N bytes over n ranks moves N(n-1)/n bytes
through each rank's link, an all-reduce twice that (Patarasuk & Yuan 2009)."""

from __future__ import annotations

from dataclasses import dataclass
from math import comb

import torch

from moeforge.config import ModelConfig
from moeforge.diloco.exchange import STOP_FLAG_BYTES
from moeforge.diloco.wire import WireFormat
from moeforge.diloco.fragments import fragment_of
from moeforge.plan.layout import Layout
from moeforge.plan.tensors import parameter_tensors, router_bias_tensors


def hit_probability(cfg: ModelConfig, experts_in_set: int) -> float:
    """P(a token picks at least one expert of a contiguous set of `experts_in_set` experts), routing
    uniformly: top-M of G groups, then top-k experts inside the chosen groups (DeepSeek-V3
    node-limited routing; G = M = 1 without it). The set covers whole groups or part of one."""
    moe = cfg.moe
    n_experts, k = moe.n_experts, moe.top_k
    groups, chosen = moe.n_groups, moe.topk_groups
    per_group = n_experts // groups
    covered = max(1, experts_in_set // per_group)
    in_each = min(experts_in_set, per_group)
    pool = chosen * per_group
    total = 0.0
    for j in range(0, min(covered, chosen) + 1):
        p_j = comb(covered, j) * comb(groups - covered, chosen - j) / comb(groups, chosen)
        if j:
            total += p_j * (1 - comb(pool - j * in_each, k) / comb(pool, k))
    return total


@dataclass(frozen=True)
class AllToAllRows:
    """Rows (one hidden vector each) a token sends per MoE layer, by link."""

    nvlink: float
    network: float

    @property
    def total(self) -> float:
        return self.nvlink + self.network


def expected_rows(cfg: ModelConfig, layout: Layout, gpus_per_node: int) -> AllToAllRows:
    """Expected rows per token per MoE layer for the ep group under uniform routing. 'rank' dedup:
    one row to each other rank hit (moeforge's dispatcher); 'node' dedup: one row over the network to
    each other node hit, then a row over NVLink to each further rank hit there (DeepEP)."""
    ep = layout.ep
    if ep == 1:
        return AllToAllRows(0.0, 0.0)
    nodes = layout.resolved_ep_nodes(gpus_per_node)
    per_rank = cfg.moe.n_experts // ep
    p_rank = hit_probability(cfg, per_rank)
    ranks_per_node = ep // nodes
    if layout.dispatch_dedup == "rank":
        return AllToAllRows((ranks_per_node - 1) * p_rank, (ep - ranks_per_node) * p_rank)
    p_node = hit_probability(cfg, cfg.moe.n_experts // nodes)
    network = (nodes - 1) * p_node
    return AllToAllRows(max(0.0, ep * p_rank - p_rank - network), network)


def rows_from_counts(owner_hits: torch.Tensor, ep: int, ranks_per_node: int) -> tuple[int, int]:
    """Exact rows of 'rank' dedup from a routing: `owner_hits` [ranks, tokens, ep] bool, whether token
    t of rank s has an expert on ep rank d. Returns (intra-node, inter-node) rows sent, all ranks."""
    sources = torch.arange(owner_hits.shape[0])[:, None, None]
    dests = torch.arange(ep)[None, None, :]
    off_rank = owner_hits & (sources != dests)
    same_node = (sources // ranks_per_node) == (dests // ranks_per_node)
    return int((off_rank & same_node).sum()), int((off_rank & ~same_node).sum())


def all_to_all_bytes(rows: float, cfg: ModelConfig, layout: Layout) -> float:
    """Bytes `rows` dispatched rows cost in one forward pass: the hidden vector out (with its routing
    data), the expert output back. A backward pass sends the same again."""
    return rows * (cfg.dim * (layout.dispatch_bytes + layout.combine_bytes) + layout.routing_bytes)


def ring_bytes(size_bytes: float, ranks: int, all_reduce: bool = False) -> float:
    """Bytes through one rank's link in a ring all-gather/reduce-scatter (x2 for an all-reduce) of a
    `size_bytes` buffer over `ranks` ranks."""
    if ranks <= 1:
        return 0.0
    return size_bytes * (ranks - 1) / ranks * (2 if all_reduce else 1)


def fragment_elements(cfg: ModelConfig, n_fragments: int) -> list[tuple[int, int]]:
    """(parameter elements, router-bias elements) of each Streaming DiLoCo fragment, by
    `moeforge.diloco`'s own rule (blocks dealt out strided, embedding first, head and MTP last)."""
    sizes = [[0, 0] for _ in range(n_fragments)]
    for column, tensors in enumerate((parameter_tensors(cfg), router_bias_tensors(cfg))):
        for tensor in tensors:
            sizes[fragment_of(tensor.name, n_fragments)][column] += tensor.numel
    return [(params, biases) for params, biases in sizes]


def diloco_message_bytes(elements: int, wire: WireFormat, router_biases: int = 0, senders: int = 1) -> int:
    """Bytes `senders` ranks send carrying `elements` outer-gradient values between them
    (`moeforge.diloco.wire`'s format: top-k offsets and fp32 scales included), `router_biases`
    router biases as raw fp32, and each its stop byte."""
    return wire.nbytes(elements) + 4 * router_biases + STOP_FLAG_BYTES * senders


def all_gather_bytes(message_bytes: float, replicas: int) -> float:
    """Bytes one replica's links carry when `replicas` all-gather messages of `message_bytes`
    (moeforge's exchange): each message reaches the replicas - 1 others."""
    return (replicas - 1) * message_bytes


def bandwidth_for_utilisation(
    bits_per_exchange: float, exchanges_per_step: float, hidden_s: float, compute_s: float, utilisation: float
) -> float:
    """Bits/s a link needs so that compute is `utilisation` of the time: each exchange may overlap
    `hidden_s` seconds of compute, and what exceeds that, summed over a step's `exchanges_per_step`,
    may add at most compute_s x (1/utilisation - 1)."""
    allowed_per_step = compute_s * (1 / utilisation - 1)
    per_exchange = hidden_s + allowed_per_step / exchanges_per_step
    return bits_per_exchange / per_exchange
