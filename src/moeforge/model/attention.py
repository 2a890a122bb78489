"""Attention: rotary position embeddings, a KV cache, and grouped-query attention via SDPA."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moeforge.config import ModelConfig


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles, each [max_seq_len, head_dim]: the rotate-half layout (Llama/HF)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, S, D] by the angles of its positions (cos/sin [S, D])."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class KVCache(nn.Module):
    """Keys and values of one attention layer for incremental decoding, [B, n_kv_heads, max_len, head_dim]."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, start_pos: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v at positions [start_pos, start_pos + S) and return everything up to there."""
        end = start_pos + k.shape[2]
        self.k[:, :, start_pos:end] = k
        self.v[:, :, start_pos:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def bytes_per_token(self) -> int:
        """Bytes this layer's cache holds for one token of one sequence."""
        return 2 * self.k.shape[1] * self.k.shape[3] * self.k.element_size()


def causal_mask(q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask for queries that sit at the last q_len of kv_len positions."""
    offset = kv_len - q_len
    q_pos = torch.arange(q_len, device=device)[:, None] + offset
    return torch.arange(kv_len, device=device)[None, :] <= q_pos


class GroupedQueryAttention(nn.Module):
    """Multi-head attention with n_kv_heads <= n_heads shared key/value heads (GQA; MHA when equal)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.resolved_head_dim
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)
        self.cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)
        out = self._attend(q, k, v)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        gqa = self.n_kv_heads != self.n_heads
        q_len, kv_len = q.shape[2], k.shape[2]
        if q_len == kv_len:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        mask = causal_mask(q_len, kv_len, q.device)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        self.cache = KVCache(batch, self.n_kv_heads, max_len, self.head_dim, dtype, device)
        return self.cache


def build_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attention == "gqa":
        return GroupedQueryAttention(cfg)
    raise ValueError(f"unknown attention type {cfg.attention!r}")  # config validation rejects it first
