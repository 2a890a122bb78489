"""Bytes one GPU holds: parameters, gradients and optimizer states under FSDP/HSDP, ZeRO-1 and EP
sharding (exactly: FSDP2 shards dim 0 in `torch.chunk` pieces, EP gives each rank a contiguous block
of experts), activations for the schedule and recomputation, communication buffers, DiLoCo state.

Rank r of a layout sits at (replica, pp rank, dp_replicate rank, dp_shard rank), outermost first; its
dp_shard rank s splits into efsdp rank s // ep and ep rank s % ep (`moeforge.parallel.mesh`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from moeforge.config import ModelConfig
from moeforge.plan.comm import all_to_all_bytes
from moeforge.plan.layout import Layout, attended_head_dims, resolved_attention_kernel, stage_block_counts
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


MOMENTS = {"adamw": 2, "sgd": 0}
"""moments the optimizer keeps per element (Muon: `moments_per_element`)"""


def moments_per_element(tensor: ParamTensor, optimizer: str) -> int:
    """Optimizer moments per element of `tensor`: AdamW's exp_avg and exp_avg_sq, Muon's momentum
    buffer for a hidden matrix (AdamW's two for the rest), none for plain SGD."""
    if optimizer == "muon":
        return 1 if tensor.is_hidden_matrix else MOMENTS["adamw"]
    return MOMENTS[optimizer]


@dataclass(frozen=True)
class ShardedState:
    """Elements of parameters and optimizer state one rank holds."""

    param_elements: int
    optimizer_elements: int
    """elements whose optimizer state this rank keeps (a master copy of each where there is one)"""
    moment_elements: int
    """optimizer moments over those elements: `moments_per_element` of each"""
    param_tensors: int
    """parameter tensors (each has one AdamW `step` scalar, kept on the host)"""

    def optimizer_bytes(self, layout: Layout) -> int:
        """Bytes of the optimizer's state: the master copy and the moments."""
        return self.optimizer_elements * layout.master_bytes + self.moment_elements * layout.moment_bytes


def sharded_state(cfg: ModelConfig, layout: Layout, rank: int) -> ShardedState:
    """Parameter and optimizer-state elements of global rank `rank`: exact, from the model's tensors,
    with the last stage's copy of the embedding where the rank holds one (`embedding_copy`)."""
    pos = rank_position(layout, rank)
    blocks = set(blocks_of_rank(layout, cfg, pos.pp_rank))
    mine = [t for t in parameter_tensors(cfg) if t.block in blocks]
    copy = embedding_copy(cfg, layout, pos.pp_rank)
    embedding = next(t for t in parameter_tensors(cfg) if t.block == -1)
    held = mine + [embedding] * bool(copy)  # the copy's parameter
    updated = mine + [embedding] * (copy == "updated")  # its optimizer state
    params = sum(local_elements(t, layout, pos) for t in held)
    optimizer = [optimizer_elements(t, layout, pos) for t in updated]
    moments = sum(n * moments_per_element(t, layout.optimizer) for t, n in zip(updated, optimizer))
    return ShardedState(params, sum(optimizer), moments, len(updated))


def embedding_copy(cfg: ModelConfig, layout: Layout, pp_rank: int) -> str:
    """The copy of the embedding pipeline rank `pp_rank` holds for the last stage, as moeforge's
    pipelines make it (parallel/pipeline.py) when the MTP modules read the embedding or the head is
    tied to it: '' none; 'updated' on the last stage's rank when it does not hold the first stage
    (loop placement): its own module, with a gradient and optimizer state; 'mirror' on the rank that
    holds both (V placement): a copy with a gradient, set from the embedding after each update. Not
    under DualPipe, where DeepSeek-V3 shares the embedding and the head between the main model and
    the MTP modules physically (the paper's section 3.2.3)."""
    if layout.pp == 1 or layout.pp_schedule == "dualpipe" or not (cfg.mtp_depth or cfg.tie_embeddings):
        return ""
    stages = layout.stages_of_rank(pp_rank)
    if layout.n_stages() - 1 not in stages:
        return ""
    return "mirror" if 0 in stages else "updated"


INDEX_BYTES = 8
"""int64 routing indices autograd keeps"""


def _norm(width: int, keep_output: bool) -> int:
    """Elements an RMSNorm leaves for the backward per token: its input and 1/rms, and (unless it is
    recomputed) its output and the flattened copy the next projection saves."""
    return width + 1 + (2 * width if keep_output else 0)


def _attention(cfg: ModelConfig, kernel: str, seq_len: int, keep: bool) -> int:
    """Elements the attention saves per token after its input norm: MLA's down-projections and their
    norms, the queries and keys (up-projected, RoPE applied), the values, the output; 'eager'
    attention also the softmax probabilities, heads x seq_len, the fused kernels only the
    log-sum-exp per head. 'padded' (MLA's values zero-padded to the query width): the values and
    SDPA's output are query-wide, and the output projection keeps its own unpadded copy of the
    output. `keep` False: MLA's up-projections recomputed (q, k and v)."""
    heads = cfg.n_heads
    if cfg.attention == "mla":
        qk, v = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
        q_down = _norm(cfg.q_lora_rank, keep) if cfg.q_lora_rank else 0  # its input: wq_a out
        kv_down = cfg.kv_lora_rank + cfg.qk_rope_head_dim + _norm(cfg.kv_lora_rank, keep) - cfg.kv_lora_rank
        _, values = attended_head_dims(cfg, kernel)
        up = 2 * heads * qk + heads * values if keep else 0
        downs = q_down + kv_down
    else:
        qk = v = values = cfg.resolved_head_dim
        up = heads * qk + 2 * cfg.n_kv_heads * qk
        downs = 0
    scores = heads * seq_len if kernel == "eager" else heads
    output = heads * v + (heads * values if kernel == "padded" else 0)
    return downs + up + scores + output


def activation_bytes_per_token(cfg: ModelConfig, block: int, layout: Layout, seq_len: int) -> float:
    """Bytes block `block` keeps per token for its backward, counted tensor by tensor as moeforge's
    modules save them (checked against autograd's saved tensors on the CPU): norms, attention, and a
    dense SwiGLU (its w1|w3 output, SiLU, product) or the MoE layer (router scores and indices, each
    of the k rows sent to an expert with its SwiGLU, the row gates, the shared experts).
    'selective' recomputation drops what DeepSeek-V3 recomputes (§3.2.3): norm outputs, MLA
    up-projections, SwiGLU SiLU and product."""
    if block < 0 or block >= cfg.n_layers:
        return 0.0
    keep = layout.recompute != "selective"
    kernel = resolved_attention_kernel(layout, cfg)
    dim = cfg.dim
    swiglu = 4 if keep else 2  # w1|w3 output (2 wide), SiLU and product (1 wide each)
    elements = _norm(dim, keep) + _attention(cfg, kernel, seq_len, keep) + _norm(dim, keep)
    indices = 0
    if not cfg.is_moe_layer(block):
        elements += swiglu * cfg.ffn_dim
    else:
        moe = cfg.moe
        k, hidden = moe.top_k, moe.expert_ffn_dim
        elements += moe.n_experts + 1 + k  # scores, the normaliser, the selected scores
        # rows, SwiGLU; the row gates, applied inside the experts' SwiGLU (so the combine is a plain
        # sum that keeps no expert outputs)
        elements += k * (dim + swiglu * hidden) + k
        elements += moe.n_shared_experts * swiglu * hidden + 1
        indices = 3 * k  # the top-k choice, its copy for the gates, the expert-sorted order
    return elements * layout.activation_bytes + indices * INDEX_BYTES


def head_bytes_per_token(cfg: ModelConfig, layout: Layout, seq_len: int) -> float:
    """The last stage's extra bytes per token: the final norm, fp32 logits for the loss and, per MTP
    depth, its norms and projection, one block like the last, its norm and logits."""
    logits = 4 * cfg.vocab_size
    norm = _norm(cfg.dim, layout.recompute != "selective") * layout.activation_bytes
    mtp_module = (
        3 * norm
        + 2 * cfg.dim * layout.activation_bytes
        + activation_bytes_per_token(cfg, cfg.n_layers - 1, layout, seq_len)
        + logits
    )
    return norm + logits + cfg.mtp_depth * mtp_module


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
        per_token = sum(activation_bytes_per_token(cfg, b, layout, seq_len) for b in blocks)
        if cfg.n_layers in blocks:
            per_token += head_bytes_per_token(cfg, layout, seq_len)
        if layout.recompute == "full":
            n_blocks = sum(1 for b in blocks if 0 <= b < cfg.n_layers)
            no_recompute = dataclasses.replace(layout, recompute="none")
            largest = max(
                (activation_bytes_per_token(cfg, b, no_recompute, seq_len) for b in blocks), default=0
            )
            saved = tokens * n_blocks * cfg.dim * layout.activation_bytes * in_flight
            activations = saved + tokens * largest
        else:
            activations = tokens * per_token * in_flight
        buffers = _buffer_bytes(cfg, layout, tokens, rows_per_token, blocks)
        diloco = 0.0
        if layout.diloco_replicas > 1 and not layout.diloco_global_on_cpu:
            diloco = layout.diloco_state_copies() * 4 * params  # theta_global, momentum, residuals: fp32
        estimate = MemoryEstimate(
            parameters=params * layout.param_bytes,
            gradients=params * layout.grad_bytes,
            optimizer=state.optimizer_bytes(layout),
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
        a2a = 2 * all_to_all_bytes(tokens * rows_per_token, cfg, layout)
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
