"""Bytes one GPU holds: parameters, gradients and optimizer states under FSDP/HSDP, ZeRO-1 and EP
sharding (exactly: FSDP2 shards dim 0 in `torch.chunk` pieces, EP gives each rank a contiguous block
of experts), activations for the schedule and recomputation, communication buffers, DiLoCo state.

Rank r of a layout sits at (replica, pp rank, dp_replicate rank, dp_shard rank), outermost first; its
dp_shard rank s splits into efsdp rank s // ep and ep rank s % ep (`moeforge.parallel.mesh`).
"""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.config import ModelConfig
from moeforge.plan.layout import Layout, stage_block_counts
from moeforge.plan.pipeline import activations_in_flight
from moeforge.plan.tensors import ParamTensor, parameter_tensors


@dataclass(frozen=True)
class RankPosition:
    replica: int
    pp_rank: int
    dp_replicate_rank: int
    dp_shard_rank: int
    ep_rank: int
    efsdp_rank: int


def rank_position(layout: Layout, rank: int) -> RankPosition:
    """Where global rank `rank` sits in the layout's mesh (row-major, dp_shard innermost)."""
    rest, shard = divmod(rank, layout.dp_shard)
    rest, rep = divmod(rest, layout.dp_replicate)
    replica, pp_rank = divmod(rest, layout.pp)
    return RankPosition(replica, pp_rank, rep, shard, shard % layout.ep, shard // layout.ep)


def chunk_rows(rows: int, parts: int, index: int) -> int:
    """Rows of piece `index` when `torch.chunk` cuts `rows` into `parts` (FSDP2's dim-0 sharding):
    pieces of ceil(rows/parts), the last ones shorter or empty."""
    size = -(-rows // parts)
    return max(0, min(size, rows - index * size))


def blocks_of_rank(layout: Layout, cfg: ModelConfig, pp_rank: int) -> list[int]:
    """The blocks pipeline rank `pp_rank` holds: -1 stands for the embedding (first stage) and
    n_layers for the final norm, head and MTP modules (last stage)."""
    counts = stage_block_counts(layout, cfg)
    starts = [sum(counts[:i]) for i in range(len(counts))]
    blocks: list[int] = []
    for stage in layout.stages_of_rank(pp_rank):
        if stage == 0:
            blocks.append(-1)
        blocks.extend(range(starts[stage], starts[stage] + counts[stage]))
        if stage == len(counts) - 1:
            blocks.append(cfg.n_layers)
    return blocks


def local_elements(tensor: ParamTensor, layout: Layout, pos: RankPosition) -> int:
    """Elements of `tensor` this rank keeps as its parameter: experts cut over ep, then (FSDP) dim 0
    cut over efsdp; everything else cut over dp_shard (FSDP) or whole (ZeRO-1)."""
    rows, per_row = tensor.shape[0], tensor.numel // tensor.shape[0]
    if tensor.is_expert and layout.ep > 1:
        rows //= layout.ep
        if layout.data_sharding == "fsdp":
            rows = chunk_rows(rows, layout.dp_shard // layout.ep, pos.efsdp_rank)
    elif layout.data_sharding == "fsdp":
        rows = chunk_rows(rows, layout.dp_shard, pos.dp_shard_rank)
    return rows * per_row


def optimizer_elements(tensor: ParamTensor, layout: Layout, pos: RankPosition) -> int:
    """Elements of `tensor` whose optimizer state this rank keeps: its FSDP shard, or under ZeRO-1 an
    even 1/n of the flat tensor over the n data-parallel ranks holding the same copy (all of them for
    dense tensors, dp / ep for experts)."""
    if layout.data_sharding == "fsdp":
        return local_elements(tensor, layout, pos)
    held = local_elements(tensor, layout, pos)
    sharers = layout.data_parallel // (layout.ep if tensor.is_expert and layout.ep > 1 else 1)
    index = (pos.dp_replicate_rank * layout.dp_shard + pos.dp_shard_rank) // (
        layout.ep if tensor.is_expert and layout.ep > 1 else 1
    )
    return chunk_rows(held, sharers, index)


@dataclass(frozen=True)
class ShardedState:
    """Elements of parameters and optimizer state one rank holds."""

    param_elements: int
    optimizer_elements: int
    param_tensors: int
    """parameter tensors (each has one AdamW `step` scalar, kept on the host)"""


def sharded_state(cfg: ModelConfig, layout: Layout, rank: int) -> ShardedState:
    """Parameter and optimizer-state elements of global rank `rank`: exact, from the model's tensors."""
    pos = rank_position(layout, rank)
    blocks = set(blocks_of_rank(layout, cfg, pos.pp_rank))
    mine = [t for t in parameter_tensors(cfg) if t.block in blocks]
    return ShardedState(
        sum(local_elements(t, layout, pos) for t in mine),
        sum(optimizer_elements(t, layout, pos) for t in mine),
        len(mine),
    )


def activation_elements_per_token(cfg: ModelConfig, block: int, recompute: str = "none") -> int:
    """Activation elements one block saves per token for its backward: the inputs and outputs of its
    norms, projections, attention and FFN that autograd keeps. 'selective' drops what DeepSeek-V3
    recomputes (§3.2.3: RMSNorm outputs, MLA up-projections, SwiGLU products). An estimate by
    counting those tensors, not a profiler's figure."""
    if block < 0 or block >= cfg.n_layers:
        return 0
    dim, heads = cfg.dim, cfg.n_heads
    keep = recompute != "selective"
    norms = 2 * dim * (2 if keep else 1)  # each norm's input (and output unless recomputed)
    if cfg.attention == "mla":
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        q_down = 2 * cfg.q_lora_rank if cfg.q_lora_rank else 0
        up = heads * qk + heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # q and kv up-projections
        kv_down = cfg.kv_lora_rank + cfg.qk_rope_head_dim + cfg.kv_lora_rank
        attention = q_down + kv_down + (up if keep else 0) + heads * qk + heads * cfg.v_head_dim
    else:
        hd = cfg.resolved_head_dim
        attention = heads * hd + 2 * cfg.n_kv_heads * hd + heads * hd
    swiglu = 3 if keep else 2  # the two projections' outputs and their product
    if not cfg.is_moe_layer(block):
        return norms + attention + swiglu * cfg.ffn_dim
    moe = cfg.moe
    routed = moe.top_k * (dim + swiglu * moe.expert_ffn_dim + dim)  # gathered input, SwiGLU, output
    shared = moe.n_shared_experts * swiglu * moe.expert_ffn_dim
    return norms + attention + moe.n_experts + routed + shared + dim


def head_elements_per_token(cfg: ModelConfig, recompute: str = "none") -> int:
    """The last stage's extra activations per token: final norm, fp32 logits for the loss (counted
    as two elements each) and, per MTP depth, one MoE/dense block, its projection and its logits."""
    logits = 2 * cfg.vocab_size
    mtp = cfg.mtp_depth * (
        activation_elements_per_token(cfg, cfg.n_layers - 1, recompute) + 4 * cfg.dim + logits
    )
    return cfg.dim + logits + mtp


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes on one GPU (the busiest rank: first pipeline rank for activations, the largest shards)."""

    parameters: float
    gradients: float
    optimizer: float
    activations: float
    communication_buffers: float
    diloco_state: float

    @property
    def total(self) -> float:
        return (
            self.parameters
            + self.gradients
            + self.optimizer
            + self.activations
            + self.communication_buffers
            + self.diloco_state
        )


def memory_estimate(
    cfg: ModelConfig, layout: Layout, seq_len: int, n_micro: int, rows_per_token: float
) -> MemoryEstimate:
    """Peak bytes per GPU, maximised over pipeline ranks (rank 0 of each dp group: the largest FSDP
    pieces). `rows_per_token`: all-to-all rows a token sends per MoE layer (communication buffers)."""
    worst: MemoryEstimate | None = None
    rank_stride = layout.dp_replicate * layout.dp_shard
    for pp_rank in range(layout.pp):
        rank = pp_rank * rank_stride
        state = sharded_state(cfg, layout, rank)
        params = state.param_elements
        blocks = blocks_of_rank(layout, cfg, pp_rank)
        tokens = layout.micro_batch_size * seq_len
        in_flight = activations_in_flight(layout, n_micro, pp_rank)
        per_token = sum(activation_elements_per_token(cfg, b, layout.recompute) for b in blocks)
        if cfg.n_layers in blocks:
            per_token += head_elements_per_token(cfg, layout.recompute)
        if layout.recompute == "full":
            n_blocks = sum(1 for b in blocks if 0 <= b < cfg.n_layers)
            largest = max((activation_elements_per_token(cfg, b) for b in blocks), default=0)
            saved = tokens * n_blocks * cfg.dim * in_flight
            activations = (saved + tokens * largest) * layout.activation_bytes
        else:
            activations = tokens * per_token * in_flight * layout.activation_bytes
        buffers = _buffer_bytes(cfg, layout, tokens, rows_per_token, blocks)
        diloco = 0.0
        if layout.diloco_replicas > 1 and not layout.diloco_global_on_cpu:
            diloco = 2 * 4 * params  # theta_global and the outer momentum, fp32
        estimate = MemoryEstimate(
            parameters=params * layout.param_bytes,
            gradients=params * layout.grad_bytes,
            optimizer=state.optimizer_elements * (layout.master_bytes + 2 * layout.moment_bytes),
            activations=activations,
            communication_buffers=buffers,
            diloco_state=diloco,
        )
        if worst is None or estimate.total > worst.total:
            worst = estimate
    assert worst is not None
    return worst


def _buffer_bytes(
    cfg: ModelConfig, layout: Layout, tokens: int, rows_per_token: float, blocks: list[int]
) -> float:
    """All-to-all send and receive buffers of one MoE layer, and FSDP's two unsharded blocks in flight
    (the one computing and the one prefetched)."""
    a2a = 0.0
    if layout.ep > 1 and any(0 <= b < cfg.n_layers and cfg.is_moe_layer(b) for b in blocks):
        a2a = 2 * tokens * rows_per_token * cfg.dim * (layout.dispatch_bytes + layout.combine_bytes)
    fsdp = 0.0
    if layout.data_sharding == "fsdp" and layout.dp_shard > 1:
        per_block: dict[int, int] = {}
        for t in parameter_tensors(cfg):
            if t.block in blocks:
                share = t.numel // (layout.ep if t.is_expert else 1)
                per_block[t.block] = per_block.get(t.block, 0) + share
        largest = sorted(per_block.values(), reverse=True)[:2]
        fsdp = sum(largest) * layout.param_bytes
    return a2a + fsdp
