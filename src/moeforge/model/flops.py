"""Parameter, FLOP and KV-cache sizes computed from a ModelConfig, without building the model.

One function per concept: `parameter_counts` (total and *activated per token*, main model and MTP
modules apart), `training_flops_per_token`, which counts only the parameters a token actually passes
through (top-k routed experts + shared experts), as MFU for MoE models must, and
`kv_cache_bytes_per_token` for MLA, GQA and MHA.
"""

from __future__ import annotations

from dataclasses import dataclass


from moeforge.config import ModelConfig


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    """the main model's parameters (embedding and head included, MTP modules not)"""
    active: int
    """main-model parameters one token passes through: top-k routed and shared experts, not all"""
    embedding: int
    mtp_total: int = 0
    """the MTP modules' own parameters (they share the main model's embedding and head)"""
    mtp_active: int = 0
    """MTP-module parameters one token passes through"""

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def attention_parameters(cfg: ModelConfig) -> int:
    if cfg.attention == "mla":
        return mla_parameters(cfg)
    hd = cfg.resolved_head_dim
    return cfg.dim * cfg.n_heads * hd * 2 + cfg.dim * cfg.n_kv_heads * hd * 2


def mla_parameters(cfg: ModelConfig) -> int:
    """Projections and latent norms of multi-head latent attention (DeepSeek-V3 eqs. 1-11)."""
    qk_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank:
        queries = cfg.dim * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * cfg.n_heads * qk_dim
    else:
        queries = cfg.dim * cfg.n_heads * qk_dim
    kv_down = cfg.dim * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    kv_up = cfg.kv_lora_rank * cfg.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return queries + kv_down + kv_up + cfg.n_heads * cfg.v_head_dim * cfg.dim


def attention_head_dims(cfg: ModelConfig) -> tuple[int, int]:
    """(query/key width, value width) of one attention head."""
    if cfg.attention == "mla":
        return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim
    return cfg.resolved_head_dim, cfg.resolved_head_dim


def moe_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters of one MoE layer."""
    moe = cfg.moe
    expert = 3 * cfg.dim * moe.expert_ffn_dim
    router = moe.n_experts * cfg.dim
    shared = moe.n_shared_experts * expert
    return router + moe.n_experts * expert + shared, router + moe.top_k * expert + shared


def block_parameters(cfg: ModelConfig, layer_id: int) -> tuple[int, int]:
    """(total, active per token) parameters of one transformer block: norms, attention, dense or MoE FFN."""
    common = attention_parameters(cfg) + 2 * cfg.dim
    if not cfg.is_moe_layer(layer_id):
        dense = 3 * cfg.dim * cfg.ffn_dim
        return common + dense, common + dense
    moe_total, moe_active = moe_parameters(cfg)
    return common + moe_total, common + moe_active


def mtp_module_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active) of one MTP module: three norms, the 2*dim -> dim projection, a block like the last."""
    own = 3 * cfg.dim + 2 * cfg.dim * cfg.dim
    total, active = block_parameters(cfg, cfg.n_layers - 1)
    return own + total, own + active


def parameter_counts(cfg: ModelConfig) -> ParameterCounts:
    embedding = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    blocks = [block_parameters(cfg, layer_id) for layer_id in range(cfg.n_layers)]
    final_norm = cfg.dim
    mtp_total, mtp_active = mtp_module_parameters(cfg)
    return ParameterCounts(
        total=embedding + head + sum(total for total, _ in blocks) + final_norm,
        active=embedding + head + sum(active for _, active in blocks) + final_norm,
        embedding=embedding,
        mtp_total=cfg.mtp_depth * mtp_total,
        mtp_active=cfg.mtp_depth * mtp_active,
    )


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6 x active non-embedding parameters (matmuls, incl. the head)
    plus 6 x layers x heads x (qk + v head widths) x seq_len for the attention scores and weighted sum
    (PaLM appendix B; causal masking is not discounted, as is customary). MTP modules count as D more
    blocks, each with its own pass through the shared head."""
    counts = parameter_counts(cfg)
    head = cfg.vocab_size * cfg.dim
    mtp = counts.mtp_active + cfg.mtp_depth * head
    qk_dim, v_dim = attention_head_dims(cfg)
    attention = 6 * (cfg.n_layers + cfg.mtp_depth) * cfg.n_heads * (qk_dim + v_dim) * seq_len
    return 6 * (counts.active_non_embedding + mtp) + attention


def kv_cache_bytes_per_token(cfg: ModelConfig, element_size: int, attention: str | None = None) -> int:
    """KV-cache bytes one token takes in all the main model's layers, for `attention` (default: the
    model's own) with this model's heads:
    'mla': the latent and the shared RoPE key, kv_lora_rank + qk_rope_head_dim (DeepSeek-V2 table 1);
    'gqa': keys and values of n_kv_heads heads; 'mha': keys and values of every head."""
    attention = attention or cfg.attention
    qk_dim, v_dim = attention_head_dims(cfg)
    per_layer = {
        "mla": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        "gqa": cfg.n_kv_heads * (qk_dim + v_dim),
        "mha": cfg.n_heads * (qk_dim + v_dim),
    }[attention]
    return cfg.n_layers * per_layer * element_size


def kv_cache_comparison(cfg: ModelConfig, element_size: int) -> dict[str, int]:
    """KV-cache bytes per token of this model under each attention it could use ('mla' only for MLA
    models, whose latent sizes are meaningful)."""
    kinds = ("mla", "gqa", "mha") if cfg.attention == "mla" else ("gqa", "mha")
    return {kind: kv_cache_bytes_per_token(cfg, element_size, kind) for kind in kinds}


