"""Parameter and FLOP counts computed from a ModelConfig, without building the model.

One function per concept: `parameter_counts` (total and *activated per token*) and
`training_flops_per_token`, which counts only the parameters a token actually passes through
(top-k routed experts + shared experts), as MFU for MoE models must.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeforge.config import ModelConfig

# Dense bf16 tensor-core peak (no sparsity) per device, for MFU. Unknown devices report no MFU.
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12}


@dataclass(frozen=True)
class ParameterCounts:
    total: int
    active: int
    embedding: int

    @property
    def active_non_embedding(self) -> int:
        return self.active - self.embedding


def attention_parameters(cfg: ModelConfig) -> int:
    hd = cfg.resolved_head_dim
    return cfg.dim * cfg.n_heads * hd * 2 + cfg.dim * cfg.n_kv_heads * hd * 2


def moe_parameters(cfg: ModelConfig) -> tuple[int, int]:
    """(total, active per token) parameters of one MoE layer."""
    moe = cfg.moe
    expert = 3 * cfg.dim * moe.expert_ffn_dim
    router = moe.n_experts * cfg.dim
    shared = moe.n_shared_experts * expert
    return router + moe.n_experts * expert + shared, router + moe.top_k * expert + shared


def parameter_counts(cfg: ModelConfig) -> ParameterCounts:
    embedding = cfg.vocab_size * cfg.dim
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
    per_layer_common = attention_parameters(cfg) + 2 * cfg.dim
    dense_ffn = 3 * cfg.dim * cfg.ffn_dim
    moe_total, moe_active = moe_parameters(cfg)
    n_moe = cfg.n_layers - cfg.n_dense_layers
    layers_total = cfg.n_layers * per_layer_common + cfg.n_dense_layers * dense_ffn + n_moe * moe_total
    layers_active = cfg.n_layers * per_layer_common + cfg.n_dense_layers * dense_ffn + n_moe * moe_active
    final_norm = cfg.dim
    return ParameterCounts(
        total=embedding + head + layers_total + final_norm,
        active=embedding + head + layers_active + final_norm,
        embedding=embedding,
    )


def training_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward+backward FLOPs per token: 6 x active non-embedding parameters (matmuls, incl. the head)
    plus 12 x layers x heads x head_dim x seq_len for the attention scores and weighted sum
    (PaLM appendix B; causal masking is not discounted, as is customary)."""
    counts = parameter_counts(cfg)
    attention = 12 * cfg.n_layers * cfg.n_heads * cfg.resolved_head_dim * seq_len
    return 6 * counts.active_non_embedding + attention


def peak_flops(device: torch.device) -> float | None:
    """Dense bf16 peak of a known CUDA device, None elsewhere (no honest CPU figure exists)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None
