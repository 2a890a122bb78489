"""Chunked top-k sparsification of outer gradients (SparseLoCo's): which values a replica sends.

The flat outer gradient of n values is cut into consecutive chunks of C values (the last one may be
shorter, L = n - C*floor(n/C)). From a chunk of L values the k(L) largest in magnitude are kept,

    k(L) = min(L, max(1, round(fraction * L)))

so the count kept, and with it the size of every message, depends on n alone: replicas all-gather
equal-sized messages without agreeing on sizes first. A kept value travels with its offset inside
its chunk, in 8 bits when C <= 256, 12 bits when C <= 4096 (SparseLoCo's chunk: two offsets in three
bytes, the first in the low 12 bits) and 16 bits up to 65,536, little-endian: an index costs 1, 1.5
or 2 bytes whatever n is. Offsets are sorted ascending inside each chunk; the kept values follow in
the same order, chunk after chunk.

A chunk holding a NaN or +-inf sends NaN in all its kept values, whichever were picked, so that the
receivers' `isfinite` check sees a diverged replica (as the blocked codecs' NaN scale does).
Pure torch, any device, no collectives.
"""

from __future__ import annotations

import torch


def kept_per_chunk(length: int, fraction: float) -> int:
    """k(L): the values kept from a chunk of `length` values."""
    return min(length, max(1, round(fraction * length)))


def _chunk_lengths(n: int, chunk: int) -> tuple[int, int]:
    """(number of full chunks, length of the last, shorter chunk or 0)."""
    return n // chunk, n % chunk


def kept_count(n: int, fraction: float, chunk: int) -> int:
    """Values kept from n: k(C) per full chunk plus k(L) from a shorter last one."""
    full, rest = _chunk_lengths(n, chunk)
    return full * kept_per_chunk(chunk, fraction) + (kept_per_chunk(rest, fraction) if rest else 0)


def offset_bits(chunk: int) -> int:
    """Bits of one offset in [0, chunk): 8, 12 or 16."""
    return 8 if chunk <= 256 else 12 if chunk <= 4096 else 16


def _offset_nbytes(count: int, chunk: int) -> int:
    return -(-count * offset_bits(chunk) // 8)


def offsets_nbytes(n: int, fraction: float, chunk: int) -> int:
    """Bytes of the offsets of the values kept from n."""
    return _offset_nbytes(kept_count(n, fraction, chunk), chunk)


def _top_offsets(chunks: torch.Tensor, k: int) -> torch.Tensor:
    """(rows, L) -> (rows, k) int64: each row's k largest magnitudes' offsets, ascending."""
    return torch.topk(chunks.abs(), k, dim=1, sorted=False).indices.sort(dim=1).values


def select(values: torch.Tensor, fraction: float, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) fp32 -> (offsets (K,) int64 inside their chunks, kept values (K,) fp32), K = kept_count."""
    full, rest = _chunk_lengths(values.numel(), chunk)
    parts = [values[: full * chunk].view(full, chunk)] if full else []
    if rest:
        parts.append(values[full * chunk :].view(1, rest))
    offsets, kept = [], []
    for rows in parts:
        top = _top_offsets(rows, kept_per_chunk(rows.shape[1], fraction))
        picked = rows.gather(1, top)
        finite = rows.isfinite().all(dim=1, keepdim=True)
        offsets.append(top.flatten())
        kept.append(torch.where(finite, picked, torch.nan).flatten())
    if not parts:
        return values.new_zeros(0, dtype=torch.int64), values.new_zeros(0)
    return torch.cat(offsets), torch.cat(kept)


def positions(offsets: torch.Tensor, n: int, fraction: float, chunk: int) -> torch.Tensor:
    """(K,) offsets inside chunks -> (K,) int64 positions in the flat gradient of n values."""
    full, rest = _chunk_lengths(n, chunk)
    per_chunk = [kept_per_chunk(chunk, fraction)] * full + ([kept_per_chunk(rest, fraction)] if rest else [])
    counts = torch.tensor(per_chunk, dtype=torch.int64, device=offsets.device)
    starts = torch.arange(len(per_chunk), dtype=torch.int64, device=offsets.device) * chunk
    return offsets.long() + starts.repeat_interleave(counts)


def pack_offsets(offsets: torch.Tensor, chunk: int) -> torch.Tensor:
    """(K,) int64 offsets -> their bytes, (ceil(K * offset_bits / 8),) uint8, little-endian; in 12
    bits, offsets 2i and 2i+1 fill bytes 3i..3i+2 (a, then b from bit 12; an odd count ends on the
    second byte of its last pair)."""
    bits = offset_bits(chunk)
    if bits == 8:
        return offsets.to(torch.uint8)
    if bits == 16:
        return torch.stack([offsets & 0xFF, offsets >> 8], dim=1).flatten().to(torch.uint8)
    pairs = torch.nn.functional.pad(offsets, (0, offsets.numel() % 2)).view(-1, 2)
    a, b = pairs[:, 0], pairs[:, 1]
    packed = torch.stack([a & 0xFF, (a >> 8) | ((b & 0x0F) << 4), b >> 4], dim=1).flatten()
    return packed[: _offset_nbytes(offsets.numel(), chunk)].to(torch.uint8)


def unpack_offsets(raw: torch.Tensor, chunk: int, count: int) -> torch.Tensor:
    """The inverse of `pack_offsets`: (count,) int64 offsets."""
    bits = offset_bits(chunk)
    if bits == 8:
        return raw.long()
    if bits == 16:
        pairs = raw.view(-1, 2).long()
        return pairs[:, 0] | (pairs[:, 1] << 8)
    triples = torch.nn.functional.pad(raw.long(), (0, -raw.numel() % 3)).view(-1, 3)
    a = triples[:, 0] | ((triples[:, 1] & 0x0F) << 8)
    b = (triples[:, 1] >> 4) | (triples[:, 2] << 4)
    return torch.stack([a, b], dim=1).flatten()[:count]


def scatter(kept: torch.Tensor, where: torch.Tensor, n: int) -> torch.Tensor:
    """(K,) values at (K,) distinct positions -> (n,) fp32, zero elsewhere."""
    dense = torch.zeros(n, dtype=torch.float32, device=kept.device)
    return dense.index_copy_(0, where, kept.float())
