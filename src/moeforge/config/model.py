"""The model's sections: `ModelConfig` and the `MoEConfig` of its MoE layers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

from moeforge.config.checks import _check, _check_bounds, _check_choices, _check_values, _flag

MOE_BOUNDS = {
    "dim": (0, 2**16),
    "n_experts": (1, 2**16),
    "expert_ffn_dim": (1, 2**20),
    "n_shared_experts": (0, 2**10),
}
"""Upper bounds of an MoE layer's sizes, far above every released model so that none is forbidden,
and low enough that no shape product overflows int64 and the planner's meta-device count stays quick.
The width as the model's (`MODEL_BOUNDS`). Routed experts: 256 in DeepSeek-V3, 384 in Kimi K2, 512 in Qwen3-Next; 65,536 leaves 128x room.
Expert width: 2,048 in DeepSeek-V3, 14,336 in Mixtral-8x7B; 2**20 as for a dense FFN. Shared
experts: 1 or 2 in every released model; 1,024. Whether a size *fits* is the memory check's job
(moeforge.plan.memory_budget), not these bounds'."""

MODEL_BOUNDS = {
    "vocab_size": (1, 2**24),
    "dim": (1, 2**16),
    "n_layers": (1, 1024),
    "n_heads": (1, 2**12),
    "n_kv_heads": (1, 2**12),
    "head_dim": (0, 2**12),
    "ffn_dim": (1, 2**20),
    "q_lora_rank": (0, 2**16),
    "kv_lora_rank": (1, 2**16),
    "qk_nope_head_dim": (1, 2**12),
    "qk_rope_head_dim": (2, 2**12),
    "v_head_dim": (1, 2**12),
    "max_seq_len": (1, 2**24),
    "mtp_depth": (0, 64),
}
"""Upper bounds of a model's sizes, each far above every released model (DeepSeek-V3-671B, Llama-3-
405B, PaLM-540B, Gemma 3, Llama 4 all validate), so that a typo such as n-layers 100000 is named at
once instead of building blocks for minutes, no shape product overflows int64, and the planner's
meta-device build of the model stays quick. Vocabulary: 262,144 at most in released models (Gemma
3); 2**24 = 16.7M. Width: 18,432 (PaLM), 16,384 (Llama-3-405B); 65,536. Blocks: 126 (Llama-3-405B),
118 (PaLM), 61 (DeepSeek-V3); 1,024. Heads: 128 (DeepSeek-V3, Llama-3-405B); 4,096, as for every
per-head width (128-256 in released models, 192 for MLA's query/key). Dense FFN width: 73,728
(PaLM); 2**20. MLA latent ranks: 1,536 / 512 (DeepSeek-V3); 65,536, the width's bound. Context:
10M tokens (Llama 4 Scout); 2**24 = 16.7M (the RoPE tables the model keeps grow with it: the memory
check counts them). MTP depth: 1 in DeepSeek-V3, 4-8 in the multi-token-prediction papers; 64.
Whether a model *fits* is the memory check's job (moeforge.plan.memory_budget), not these bounds'."""


@dataclass
class MoEConfig:
    """One Mixture-of-Experts layer: router, routed experts, shared experts and load balancing."""

    dim: int = 0
    """model width; 0 inside a ModelConfig, which fills it from model.dim"""
    n_experts: int = 8
    """routed experts per MoE layer"""
    top_k: int = 2
    """routed experts chosen per token"""
    expert_ffn_dim: int = 128
    """hidden width of each routed (and shared) SwiGLU expert"""
    n_shared_experts: int = 1
    """always-on experts every token passes through (DeepSeek: 1)"""
    score_func: Literal["sigmoid", "softmax"] = "sigmoid"
    """router score: 'sigmoid' (DeepSeek-V3) or 'softmax' (Mixtral, Qwen)"""
    route_norm: bool = True
    """normalise the selected gates to sum to 1 (with softmax this equals top-k-then-softmax)"""
    route_scale: float = 1.0
    """multiplier on the gates after normalisation (DeepSeek-V3: 2.5)"""
    n_groups: int = 1
    """expert groups for group-limited routing (DeepSeek-V3: 8, one per node); 1 = off"""
    topk_groups: int = 1
    """groups a token may choose experts from (DeepSeek-V3: 4)"""
    jitter: float = 0.0
    """multiplicative uniform noise on router inputs while training (MegaBlocks); 0 = off"""
    backend: Literal["grouped", "loop"] = "grouped"
    """expert compute: 'grouped' (one grouped GEMM, torch._grouped_mm) or 'loop' (per-expert matmuls)"""
    bias_update_rate: float = 1e-3
    """gamma of aux-loss-free balancing: b_i += gamma*sign(mean_load - load_i) per step; 0 = off"""
    seq_aux_coef: float = 1e-4
    """alpha of the complementary sequence-wise balance loss (DeepSeek-V3 eq. 17-20); 0 = off"""
    aux_coef: float = 0.0
    """alpha of the classic batch-wise aux loss (Switch/GShard, ~1e-2); 0 = off"""
    z_loss_coef: float = 0.0
    """router z-loss coefficient (ST-MoE, 1e-3); 0 = off"""

    def balance_loss_names(self) -> tuple[str, ...]:
        """The balance losses an MoE layer computes while training, in `MoEStats` order."""
        coefs = (("seq_aux", self.seq_aux_coef), ("batch_aux", self.aux_coef), ("z_loss", self.z_loss_coef))
        return tuple(name for name, coef in coefs if coef > 0)

    def validate(self, prefix: str = "moe") -> None:
        _check_values(self, prefix)
        _check_choices(self, prefix)
        _check_bounds(self, prefix, MOE_BOUNDS)
        _check(self.dim >= 0, f"{prefix}.dim", self.dim, "an integer >= 0")
        _check(self.n_experts >= 1, f"{prefix}.n-experts", self.n_experts, "an integer >= 1")
        _check(
            1 <= self.top_k <= self.n_experts,
            f"{prefix}.top-k",
            self.top_k,
            f"an integer in [1, n-experts={self.n_experts}]",
        )
        _check(self.expert_ffn_dim >= 1, f"{prefix}.expert-ffn-dim", self.expert_ffn_dim, "an integer >= 1")
        _check(
            self.n_shared_experts >= 0, f"{prefix}.n-shared-experts", self.n_shared_experts, "an integer >= 0"
        )
        _check(self.route_scale > 0, f"{prefix}.route-scale", self.route_scale, "a number > 0")
        _check(
            self.n_groups >= 1 and self.n_experts % self.n_groups == 0,
            f"{prefix}.n-groups",
            self.n_groups,
            f"a divisor of n-experts={self.n_experts}",
        )
        _check(
            1 <= self.topk_groups <= self.n_groups,
            f"{prefix}.topk-groups",
            self.topk_groups,
            f"an integer in [1, n-groups={self.n_groups}]",
        )
        experts_reachable = self.topk_groups * (self.n_experts // self.n_groups)
        _check(
            self.top_k <= experts_reachable,
            f"{prefix}.top-k",
            self.top_k,
            f"at most topk-groups*experts-per-group={experts_reachable}",
        )
        if self.n_groups > 1:
            per_group = self.n_experts // self.n_groups
            _check(
                per_group >= 2, f"{prefix}.n-groups", self.n_groups, "a value leaving >= 2 experts per group"
            )
        for name in ("jitter", "bias_update_rate", "seq_aux_coef", "aux_coef", "z_loss_coef"):
            value = getattr(self, name)
            _check(value >= 0, f"{prefix}.{_flag(name)}", value, "a number >= 0")
        _check(self.jitter < 1, f"{prefix}.jitter", self.jitter, "a number in [0, 1)")


@dataclass
class ModelConfig:
    """A decoder-only transformer: dense SwiGLU blocks first, MoE blocks after."""

    vocab_size: int = 256
    """tokens in the vocabulary (256 for the byte tokenizer; set from tokenizer.json otherwise)"""
    dim: int = 128
    """model width d_model"""
    n_layers: int = 4
    """transformer blocks"""
    n_dense_layers: int = 1
    """leading blocks with a dense SwiGLU MLP instead of MoE (DeepSeek-V3: 3)"""
    n_heads: int = 4
    """attention query heads"""
    n_kv_heads: int = 2
    """key/value heads for grouped-query attention (divides n-heads); 'mla': the GQA point of the KV-cache report"""
    head_dim: int = 0
    """per-head width; 0 = dim / n-heads"""
    ffn_dim: int = 384
    """hidden width of the dense SwiGLU MLP"""
    attention: Literal["gqa", "mla"] = "gqa"
    """attention type: 'gqa' (grouped-query attention via SDPA) or 'mla' (DeepSeek multi-head latent)"""
    qk_norm: bool = False
    """RMSNorm over each query and key head before RoPE (Qwen3); 'gqa' attention only"""
    q_lora_rank: int = 0
    """'mla': rank of the compressed query latent (DeepSeek-V3: 1536); 0 = queries projected directly"""
    kv_lora_rank: int = 64
    """'mla': rank of the compressed key/value latent, what the KV cache stores (DeepSeek-V3: 512)"""
    qk_nope_head_dim: int = 32
    """'mla': per-head query/key width without RoPE, expanded from the latent (DeepSeek-V3: 128)"""
    qk_rope_head_dim: int = 16
    """'mla': per-head query width with RoPE, and of the one shared RoPE key (DeepSeek-V3: 64)"""
    v_head_dim: int = 32
    """'mla': per-head value width (DeepSeek-V3: 128)"""
    max_seq_len: int = 2048
    """longest sequence RoPE and the KV cache are sized for"""
    rope_theta: float = 10000.0
    """RoPE base"""
    norm_eps: float = 1e-6
    """RMSNorm epsilon"""
    tie_embeddings: bool = False
    """share the token embedding with the output head (DeepSeek-V3: untied)"""
    init_std: float = 0.02
    """std of the normal init of weights"""
    mtp_depth: int = 0
    """multi-token prediction modules D, each predicting one token further ahead (DeepSeek-V3: 1); 0 = off"""
    moe: MoEConfig = field(default_factory=MoEConfig)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def rope_head_dim(self) -> int:
        """Width RoPE rotates: the decoupled rope part with MLA, the whole head otherwise."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.resolved_head_dim

    def moe_layer_config(self) -> MoEConfig:
        """The MoE config of one layer, with the width filled in from the model."""
        return dataclasses.replace(self.moe, dim=self.dim)

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers

    def validate(self) -> None:
        _check_values(self, "model")
        _check_choices(self, "model")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            value = getattr(self, name)
            _check(value >= 1, f"model.{_flag(name)}", value, "an integer >= 1")
        _check_bounds(self, "model", MODEL_BOUNDS)
        _check(
            0 <= self.n_dense_layers <= self.n_layers,
            "model.n-dense-layers",
            self.n_dense_layers,
            f"an integer in [0, n-layers={self.n_layers}]",
        )
        _check(
            self.n_heads % self.n_kv_heads == 0,
            "model.n-kv-heads",
            self.n_kv_heads,
            f"a divisor of n-heads={self.n_heads}",
        )
        if self.head_dim == 0:
            _check(
                self.dim % self.n_heads == 0,
                "model.n-heads",
                self.n_heads,
                f"a divisor of dim={self.dim} (or set model.head-dim)",
            )
        _check(self.resolved_head_dim % 2 == 0, "model.head-dim", self.resolved_head_dim, "an even integer")
        self.validate_mla()
        _check(
            not self.qk_norm or self.attention == "gqa",
            "model.qk-norm",
            self.qk_norm,
            "false unless attention is 'gqa'",
        )
        _check(self.rope_theta > 0, "model.rope-theta", self.rope_theta, "a number > 0")
        _check(self.norm_eps > 0, "model.norm-eps", self.norm_eps, "a number > 0")
        _check(self.init_std > 0, "model.init-std", self.init_std, "a number > 0")
        _check(self.mtp_depth >= 0, "model.mtp-depth", self.mtp_depth, "an integer >= 0")
        _check(
            self.moe.dim in (0, self.dim),
            "model.moe.dim",
            self.moe.dim,
            f"0 or model.dim={self.dim}",
        )
        self.moe.validate("model.moe")

    def validate_mla(self) -> None:
        _check(
            self.q_lora_rank >= 0,
            "model.q-lora-rank",
            self.q_lora_rank,
            "an integer >= 0 (0 = no compression)",
        )
        for name in ("kv_lora_rank", "qk_nope_head_dim", "v_head_dim"):
            value = getattr(self, name)
            _check(value >= 1, f"model.{_flag(name)}", value, "an integer >= 1")
        rope = self.qk_rope_head_dim
        _check(rope >= 2 and rope % 2 == 0, "model.qk-rope-head-dim", rope, "an even integer >= 2")
