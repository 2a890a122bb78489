"""The server's KV cache in fixed-size blocks (paged, as vLLM's PagedAttention): one pool of rows per
attention layer, shared by every request, and a block table per request mapping its positions to
rows. A request holds only the blocks its tokens fill, so the cache holds as many requests as their
actual lengths allow, and a finished or preempted request returns its blocks at once.

Every layer's pool has the same rows: row `block * block_size + offset` holds position
`table[position // block_size] * block_size + position % block_size`'s keys and values in every
layer (the main model's and the MTP modules'), so one block table serves them all.

The engine computes a step's requests as rows (`moeforge.serve.rows`): a forward writes each new
token's keys and values at its row (`CacheSlots.index`) and each request's row reads the rows of its
own context, in order (`CacheSlots.read`), under a causal mask. The pools hold one block more than
the engine hands out: the scratch block, where padding writes. GQA keeps keys and values, MLA only
its latent and RoPE key.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from moeforge.model.attention import CacheSlots, GroupedQueryAttention, MultiHeadLatentAttention
from moeforge.model.transformer import Transformer


def blocks_for(positions: int, block_size: int) -> int:
    """Blocks that hold `positions` positions."""
    return math.ceil(positions / block_size)


def rows_of(table: list[int], positions: range, block_size: int) -> list[int]:
    """The pool rows of `positions` of a request whose block table is `table`."""
    return [table[p // block_size] * block_size + p % block_size for p in positions]


class PagedKVCache(nn.Module):
    """GQA's keys and values for every request: pools [rows, n_kv_heads, head_dim]."""

    def __init__(self, rows: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        super().__init__()
        shape = (rows, n_kv_heads, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(
        self, slots: CacheSlots, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv_heads, S, head_dim] at rows `slots.index` [B * S]; return the rows
        `slots.read` [B, T] as [B, n_kv_heads, T, head_dim] each."""
        heads, dim = self.k.shape[1:]
        self.k.index_copy_(0, slots.index, k.transpose(1, 2).reshape(-1, heads, dim))
        self.v.index_copy_(0, slots.index, v.transpose(1, 2).reshape(-1, heads, dim))
        return tuple(_gather(pool, slots.read).transpose(1, 2) for pool in (self.k, self.v))

    def bytes_per_row(self) -> int:
        return 2 * self.k[0].numel() * self.k.element_size()


class PagedLatentCache(nn.Module):
    """MLA's [c^KV; k^R] for every request: a pool [rows, kv_lora_rank + qk_rope_head_dim]."""

    def __init__(self, rows: int, width: int, dtype: torch.dtype, device):
        super().__init__()
        self.register_buffer("kv", torch.zeros(rows, width, dtype=dtype, device=device), persistent=False)

    def update(self, slots: CacheSlots, latent_and_rope_key: torch.Tensor) -> torch.Tensor:
        """Store [B, S, width] at rows `slots.index` [B * S]; return the rows `slots.read` [B, T] as [B, T, width]."""
        self.kv.index_copy_(0, slots.index, latent_and_rope_key.reshape(-1, self.kv.shape[1]))
        return _gather(self.kv, slots.read)

    def bytes_per_row(self) -> int:
        return self.kv[0].numel() * self.kv.element_size()


def _gather(pool: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """pool[rows] for rows [B, T]: [B, T, *pool.shape[1:]], by `index_select` (a plain copy)."""
    return pool.index_select(0, rows.reshape(-1)).view(*rows.shape, *pool.shape[1:])


def attach_paged_caches(model: Transformer, n_blocks: int, block_size: int, with_mtp: bool) -> int:
    """Give every attention layer (the MTP modules' too with `with_mtp`) a paged cache of
    `n_blocks * block_size` rows; returns the bytes the caches hold per position (all layers)."""
    weight = model.tok_embeddings.weight
    rows = n_blocks * block_size
    blocks = [*model.layers, *(module.block for module in model.mtp)] if with_mtp else list(model.layers)
    total = 0
    for block in blocks:
        attention = block.attention
        if isinstance(attention, MultiHeadLatentAttention):
            cache = PagedLatentCache(
                rows, attention.kv_lora_rank + attention.rope_dim, weight.dtype, weight.device
            )
        elif isinstance(attention, GroupedQueryAttention):
            cache = PagedKVCache(rows, attention.n_kv_heads, attention.head_dim, weight.dtype, weight.device)
        else:
            raise TypeError(f"no paged cache for {type(attention).__name__}")
        attention.cache = cache
        total += cache.bytes_per_row()
    return total
