"""Training FLOPs per token of each block, as `moeforge.model.flops` counts them for the whole model."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.config import ModelConfig
from moeforge.model.flops import attention_head_dims, block_parameters, mtp_module_parameters


@dataclass(frozen=True)
class BlockFlops:
    matmul: float
    """6 x the block's active parameters (forward + backward)"""
    attention: float
    """6 x heads x (qk + v head widths) x seq_len: the attention scores and their weighted sum"""

    @property
    def total(self) -> float:
        return self.matmul + self.attention


def flops_per_token_by_block(cfg: ModelConfig, seq_len: int) -> dict[int, BlockFlops]:
    """Training FLOPs per token of each block (-1 embedding: none; n_layers: head and MTP modules),
    summing to `moeforge.model.flops.training_flops_per_token`."""
    qk, v = attention_head_dims(cfg)
    attention = 6.0 * cfg.n_heads * (qk + v) * seq_len
    head = 6.0 * cfg.vocab_size * cfg.dim
    flops = {-1: BlockFlops(0.0, 0.0)}
    for b in range(cfg.n_layers):
        flops[b] = BlockFlops(6.0 * block_parameters(cfg, b)[1], attention)
    mtp = cfg.mtp_depth * (6.0 * mtp_module_parameters(cfg)[1] + head)
    final_norm = 6.0 * cfg.dim
    flops[cfg.n_layers] = BlockFlops(final_norm + head + mtp, cfg.mtp_depth * attention)
    return flops
