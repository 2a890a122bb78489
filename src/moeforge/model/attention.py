"""Attention: rotary position embeddings, KV caches, grouped-query attention via SDPA, and multi-head
latent attention (MLA) with its compressed cache.

Training attention is causal over the whole sequence, or with document masking (`--data.document-mask`)
block-diagonal causal over the documents packed into it: `document_positions` restart RoPE's
positions at each document and `document_mask` lets a token see only the earlier tokens of its own
document, so each document computes what it would alone. On the CPU the mask is a boolean SDPA mask
(FlexAttention has no backward there in torch 2.13); on CUDA it is a FlexAttention `BlockMask`, run
by the compiled `flex_attention`, which skips the blocks outside every document instead of
computing and masking a dense [S, S] score matrix (`attention_mask_for`).

The caches are static, as gpt-fast's: allocated once at their full length, written at a tensor of
slot indices, and read whole under a mask, so that a decoding step has the same shapes at every
position (what `torch.compile` and CUDA graphs need). Slots past the newest token are masked, so
overwriting a slot is all it takes to roll a cache back (speculative decoding does).
A paged cache (`moeforge.serve.paged_cache`, the server's) takes the same `update(slots, ...)`: it
writes the new tokens at the rows `slots.index` of a shared pool and returns the rows `slots.read`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

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


class CacheSlots(NamedTuple):
    """Where a forward with KV caches writes its S new tokens, and which cached slots each reads."""

    index: torch.Tensor
    """[S] int64, the cache slot of each new token (the same for every row)"""
    mask: torch.Tensor
    """[B or 1, 1, S, max_len] bool, True where a new token's query may read a slot (a paged cache:
    [1, 1, S, T], over the T rows of `read`)"""
    read: torch.Tensor | None = None
    """[T] int64, the rows of a paged cache the queries read, in order (`moeforge.serve`); None for a
    static cache, which is read whole"""


def cache_slots(index: torch.Tensor, max_len: int, pad: torch.Tensor | None = None) -> CacheSlots:
    """The slots of new tokens at cache slots `index` [S]: causal (a query reads its own slot and the
    ones before), and with left padding `pad` [B] (row b's first `pad[b]` slots hold no token) the
    padding slots are hidden from every real token. A padding token reads only itself, so that no
    row of the mask is empty (an empty row would make NaNs)."""
    slot = torch.arange(max_len, device=index.device)
    mask = slot <= index[:, None]  # [S, max_len]
    if pad is None:
        return CacheSlots(index, mask[None, None])
    visible = (slot >= pad[:, None, None]) | (slot == index[:, None])  # [B, S, max_len]
    return CacheSlots(index, (mask & visible).unsqueeze(1))


def document_starts(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] bool, True where a document starts: at each row's first token and wherever the id
    differs from the one before (a document is a run of equal ids)."""
    starts = torch.ones_like(document_ids, dtype=torch.bool)
    starts[:, 1:] = document_ids[:, 1:] != document_ids[:, :-1]
    return starts


def document_positions(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, S] int64: each token's position inside its document, 0 at every start. A row that begins
    inside a document begins it at 0 too: that piece is all the row holds of it."""
    index = torch.arange(document_ids.shape[1], device=document_ids.device).expand_as(document_ids)
    last_start = torch.where(document_starts(document_ids), index, 0).cummax(dim=1).values
    return index - last_start


def document_mask(document_ids: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool, True where query i may attend key j: j <= i inside the same document
    (block-diagonal causal). The diagonal is always True, so no row is empty."""
    segment = document_starts(document_ids).cumsum(dim=1)  # [B, S] the document's number in the row
    same = segment[:, :, None] == segment[:, None, :]
    seq = document_ids.shape[1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=document_ids.device).tril()
    return (same & causal).unsqueeze(1)


def document_block_mask(document_ids: torch.Tensor) -> BlockMask:
    """`document_mask` as FlexAttention's block mask (what `flex_attention` takes)."""
    segment = document_starts(document_ids).cumsum(dim=1)
    batch, seq = document_ids.shape

    def same_document_causal(b, h, q, k):
        return (k <= q) & (segment[b, q] == segment[b, k])

    return create_block_mask(same_document_causal, batch, None, seq, seq, device=document_ids.device)


AttentionMask = torch.Tensor | BlockMask
"""A boolean [B, 1, S, S] SDPA mask or a FlexAttention block mask"""


def attention_mask_for(document_ids: torch.Tensor) -> AttentionMask:
    """The document mask in the form that pays on `document_ids`' device: a block mask on CUDA, a
    boolean SDPA mask elsewhere (module docstring)."""
    return document_block_mask(document_ids) if document_ids.is_cuda else document_mask(document_ids)


def masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask | None, scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """Attention of q [B, H, S, D] over k, v: causal without `mask`, else where it allows; SDPA for a
    boolean mask, FlexAttention (compiled where it runs on CUDA) for a block mask."""
    if isinstance(mask, BlockMask):
        attend = _compiled_flex_attention() if q.is_cuda else flex_attention
        return attend(q, k, v, block_mask=mask, scale=scale, enable_gqa=enable_gqa)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=enable_gqa
    )


@functools.cache
def _compiled_flex_attention():
    """`flex_attention` compiled once per process: uncompiled it materialises the scores."""
    return torch.compile(flex_attention, dynamic=False)


class KVCache(nn.Module):
    """Keys and values of one attention layer for incremental decoding, [B, n_kv_heads, max_len, head_dim]."""

    def __init__(self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype, device=None):
        super().__init__()
        shape = (batch, n_kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    def update(self, slots: CacheSlots, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [B, n_kv_heads, S, head_dim] at `slots.index` [S]; return the whole cache."""
        self.k.index_copy_(2, slots.index, k)
        self.v.index_copy_(2, slots.index, v)
        return self.k, self.v

    def bytes_per_token(self) -> int:
        """Bytes this layer's cache holds for one token of one sequence."""
        return 2 * self.k.shape[1] * self.k.shape[3] * self.k.element_size()


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
        self.q_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.cache: KVCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: CacheSlots | None = None,
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """x [B, S, dim] -> [B, S, dim]; causal over x alone, or where `mask` [B, 1, S, S] allows
        (`document_mask`), or with `slots` over the cache as well."""
        batch, seq, _ = x.shape
        q = self.wq(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(batch, seq, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_heads != self.n_heads
        if slots is None:
            out = masked_attention(q, k, v, mask, enable_gqa=gqa)
        else:
            k, v = self.cache.update(slots, k, v)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=slots.mask, enable_gqa=gqa)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> KVCache:
        self.cache = KVCache(batch, self.n_kv_heads, max_len, self.head_dim, dtype, device)
        return self.cache


class LatentCache(nn.Module):
    """MLA's cache: per token only the normalised KV latent c^KV and the one RoPE'd key k^R shared by
    all heads, side by side: `kv` [B, max_len, kv_lora_rank + qk_rope_head_dim] (DeepSeek-V2 §2.1.2)."""

    def __init__(self, batch: int, max_len: int, width: int, dtype: torch.dtype, device=None):
        super().__init__()
        self.register_buffer("kv", torch.zeros(batch, max_len, width, dtype=dtype, device=device), persistent=False)

    def update(self, slots: CacheSlots, latent_and_rope_key: torch.Tensor) -> torch.Tensor:
        """Store [B, S, width] at `slots.index` [S]; return the whole cache."""
        return self.kv.index_copy_(1, slots.index, latent_and_rope_key)

    def bytes_per_token(self) -> int:
        """Bytes this layer's cache holds for one token of one sequence."""
        return self.kv.shape[2] * self.kv.element_size()


class MultiHeadLatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2 §2.1; DeepSeek-V3 eqs. 1-11).

    Keys and values are expanded per head from one low-rank latent c^KV = RMSNorm(W^DKV x) (eqs. 1, 2, 5);
    position enters through a decoupled RoPE key k^R = RoPE(W^KR x) shared by all heads (eq. 3), so the
    latent stays position-free. Queries: c^Q = RMSNorm(W^DQ x) when q_lora_rank > 0 (eq. 6), then per
    head [q^C; RoPE(q^R)] (eqs. 7-9). Scores are scaled by 1/sqrt(qk_nope + qk_rope) (eq. 10).

    Without a cache (training) the latent is expanded into per-head keys and values for SDPA (values
    zero-padded to the key width where that lets SDPA use a fused kernel: `pads_mla_values`). With a
    cache only [c^KV; k^R] is kept, and attention runs in latent space: the key up-projection is
    absorbed into the queries and the value up-projection applied after the weighted sum (DeepSeek-V2
    §2.1.2), which makes it multi-query attention with one key [c^KV; k^R] and one value c^KV for all
    heads: the same numbers, without expanding the whole cache at every step.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.q_lora_rank = cfg.q_lora_rank
        self.kv_lora_rank = cfg.kv_lora_rank
        self.nope_dim = cfg.qk_nope_head_dim
        self.rope_dim = cfg.qk_rope_head_dim
        self.v_dim = cfg.v_head_dim
        self.scale = (self.nope_dim + self.rope_dim) ** -0.5
        q_width = cfg.n_heads * (self.nope_dim + self.rope_dim)
        if self.q_lora_rank:
            self.wq_a = nn.Linear(cfg.dim, self.q_lora_rank, bias=False)
            self.q_norm = nn.RMSNorm(self.q_lora_rank, eps=cfg.norm_eps)
            self.wq_b = nn.Linear(self.q_lora_rank, q_width, bias=False)
        else:
            self.wq = nn.Linear(cfg.dim, q_width, bias=False)
        self.wkv_a = nn.Linear(cfg.dim, self.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = nn.RMSNorm(self.kv_lora_rank, eps=cfg.norm_eps)
        self.wkv_b = nn.Linear(self.kv_lora_rank, cfg.n_heads * (self.nope_dim + self.v_dim), bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.v_dim, cfg.dim, bias=False)
        self.cache: LatentCache | None = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: CacheSlots | None = None,
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """x [B, S, dim] -> [B, S, dim]; causal over x alone, or where `mask` [B, 1, S, S] allows
        (`document_mask`), or with `slots` over the cache as well."""
        batch, seq, _ = x.shape
        q_nope, q_rope = self.queries(x)
        q_rope = apply_rope(q_rope, cos, sin)
        latent, rope_key = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_norm(latent)
        rope_key = apply_rope(rope_key.unsqueeze(1), cos, sin).squeeze(1)
        if slots is None:
            out = self._attend_expanded(q_nope, q_rope, latent, rope_key, mask)
        else:
            cached = self.cache.update(slots, torch.cat([latent, rope_key], dim=-1))
            out = self._attend_latent(q_nope, q_rope, cached, slots.mask)
        return self.wo(out.transpose(1, 2).reshape(batch, seq, -1))

    def queries(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head query parts without and with RoPE (not yet applied), [B, H, S, nope] and [B, H, S, rope]."""
        batch, seq, _ = x.shape
        q = self.wq_b(self.q_norm(self.wq_a(x))) if self.q_lora_rank else self.wq(x)
        q = q.view(batch, seq, self.n_heads, self.nope_dim + self.rope_dim).transpose(1, 2)
        return q.split([self.nope_dim, self.rope_dim], dim=-1)

    def _attend_expanded(
        self,
        q_nope: torch.Tensor,
        q_rope: torch.Tensor,
        latent: torch.Tensor,
        rope_key: torch.Tensor,
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """Attention over the whole sequence, causal or where `mask` [B, 1, S, S] allows, with per-head
        keys/values expanded from the latent."""
        batch, seq, _ = latent.shape
        kv = self.wkv_b(latent).view(batch, seq, self.n_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, rope_key.unsqueeze(1).expand(-1, self.n_heads, -1, -1)], dim=-1)
        q = torch.cat([q_nope, q_rope], dim=-1)
        pad = k.shape[-1] - self.v_dim if pads_mla_values(v.device.type) else 0
        if pad > 0:
            v = F.pad(v, (0, pad))
        out = masked_attention(q, k, v, mask, scale=self.scale)
        return out[..., : self.v_dim] if pad > 0 else out

    def _attend_latent(
        self, q_nope: torch.Tensor, q_rope: torch.Tensor, cached: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """The newest queries over the cached [c^KV; k^R] [B, T, r + rope] where `mask` [B or 1, 1, S, T]
        allows, W^UK and W^UV absorbed, [B, H, S, v]."""
        w_uk, w_uv = self.wkv_b.weight.view(self.n_heads, -1, self.kv_lora_rank).split(
            [self.nope_dim, self.v_dim], dim=1
        )
        # per head, not through a broadcast matmul, which would copy W^UK out once per request
        q = torch.cat([torch.einsum("bhsn,hnr->bhsr", q_nope, w_uk), q_rope], dim=-1)  # [B, H, S, r + rope]
        batch, heads, seq, width = q.shape
        # Every head reads the same keys (one latent per position, MQA-like), so the heads become
        # query rows of a single head: one [H*S, r + rope] x [r + rope, T] product per request,
        # where SDPA's grouped-query path would first copy the keys and values out to every head.
        rows = q.reshape(batch, heads * seq, width)
        row_mask = mask.unsqueeze(2).expand(-1, -1, heads, -1, -1).reshape(mask.shape[0], heads * seq, -1)
        values = cached[..., : self.kv_lora_rank]
        if cached.device.type == "cpu":
            out = latent_attention_cpu(rows, cached, values, row_mask, self.scale)
        else:
            heads_of = (rows.unsqueeze(1), cached.unsqueeze(1), values.unsqueeze(1))  # one head each
            out = F.scaled_dot_product_attention(*heads_of, attn_mask=row_mask.unsqueeze(1), scale=self.scale)
            out = out.squeeze(1)
        return torch.einsum("bhsr,hvr->bhsv", out.view(batch, heads, seq, self.kv_lora_rank), w_uv)

    def setup_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> LatentCache:
        self.cache = LatentCache(batch, max_len, self.kv_lora_rank + self.rope_dim, dtype, device)
        return self.cache


def latent_attention_cpu(
    rows: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(scale * rows keys^T where `mask` allows) values, [B, R, r], for query rows [B, R, w],
    keys [B, T, w], values [B, T, r] and mask [B or 1, R, T] (every row allows at least one key).

    The CPU's SDPA takes its math path here (MLA's keys and values differ in width), and the
    compiler lowers a masked SDPA to the same math: rows x keys^T, for which it copies the keys out
    transposed at every step (the whole context, gathered from the paged cache). The scores are
    computed as keys x rows^T [B, T, R] instead, which reads the keys as they lie.
    """
    scores = torch.bmm(keys, rows.transpose(1, 2)) * scale
    scores = scores.masked_fill(~mask.transpose(1, 2), float("-inf"))
    return torch.bmm(torch.softmax(scores, dim=1).transpose(1, 2), values)


def pads_mla_values(device_type: str) -> bool:
    """Whether MLA's training attention zero-pads its values to the query/key width on this device
    type, so that SDPA can take a fused kernel. On the CPU torch's only one (flash) needs equal widths;
    with unequal ones SDPA takes its math path, which writes the S x S scores out and makes an MLA
    layer's forward and backward slower (docs/benchmarks/train.md). The
    padded output columns are zeros and are dropped. CUDA's memory-efficient and cuDNN kernels take
    unequal widths as they are."""
    return device_type == "cpu"


def build_attention(cfg: ModelConfig) -> nn.Module:
    if cfg.attention == "gqa":
        return GroupedQueryAttention(cfg)
    if cfg.attention == "mla":
        return MultiHeadLatentAttention(cfg)
    raise ValueError(f"unknown attention type {cfg.attention!r}")  # config validation rejects it first
