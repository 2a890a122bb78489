"""One outer-gradient message: optionally sparsified by chunked top-k (sparse.py), its values in a
number format (codecs.py).

    dense:   [ codec(x) ]                                   codecs.encoded_nbytes(n)
    sparse:  [ offsets of the kept values | codec(kept) ]   K*(8|12|16)/8 + codecs.encoded_nbytes(K)

with K = sparse.kept_count(n): the size depends on n alone, on every replica alike. Decoding gives
the dense (n,) fp32 vector the message stands for (zeros where top-k dropped a value), which the
receivers sum in replica order and the sender's error feedback subtracts from what it meant to send.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeforge.config import DiLoCoConfig
from moeforge.diloco import codecs, sparse


@dataclass(frozen=True)
class WireFormat:
    codec: str = "none"
    block: int = 128
    """values sharing one scale in the blocked codecs"""
    topk_fraction: float = 1.0
    """1 = dense: every value travels and no offsets do"""
    topk_chunk: int = 4096

    @classmethod
    def of(cls, cfg: DiLoCoConfig) -> WireFormat:
        return cls(cfg.quantize, cfg.quantize_block, cfg.topk_fraction, cfg.topk_chunk)

    @property
    def sparse(self) -> bool:
        return self.topk_fraction < 1

    @property
    def lossy(self) -> bool:
        """Whether a message can decode to other values than were encoded."""
        return self.sparse or self.codec != "none"

    def values_sent(self, n: int) -> int:
        """Values in the message for n: all of them, or those top-k keeps."""
        return sparse.kept_count(n, self.topk_fraction, self.topk_chunk) if self.sparse else n

    def nbytes(self, n: int) -> int:
        """Bytes of the message for n values, offsets and scales included."""
        offsets = sparse.offsets_nbytes(n, self.topk_fraction, self.topk_chunk) if self.sparse else 0
        return offsets + codecs.encoded_nbytes(self.values_sent(n), self.codec, self.block)

    def encode(self, values: torch.Tensor) -> torch.Tensor:
        """(n,) fp32 -> (nbytes(n),) uint8."""
        if not self.sparse:
            return codecs.encode(values, self.codec, self.block)
        offsets, kept = sparse.select(values, self.topk_fraction, self.topk_chunk)
        packed = sparse.pack_offsets(offsets, self.topk_chunk)
        return torch.cat([packed, codecs.encode(kept, self.codec, self.block)])

    def decode(self, payload: torch.Tensor, n: int) -> torch.Tensor:
        """(nbytes(n),) uint8 -> (n,) fp32."""
        if payload.dtype != torch.uint8 or payload.shape != (self.nbytes(n),):
            raise ValueError(
                f"{self.describe()} payload for {n} values: expected ({self.nbytes(n)},) uint8, got "
                f"{tuple(payload.shape)} {payload.dtype}"
            )
        if not self.sparse:
            return codecs.decode(payload, n, self.codec, self.block)
        split = sparse.offsets_nbytes(n, self.topk_fraction, self.topk_chunk)
        kept = codecs.decode(payload[split:], self.values_sent(n), self.codec, self.block)
        offsets = sparse.unpack_offsets(payload[:split], self.topk_chunk, self.values_sent(n))
        where = sparse.positions(offsets, n, self.topk_fraction, self.topk_chunk)
        return sparse.scatter(kept, where, n)

    def describe(self) -> str:
        """'fp4-e3m0' or 'top-2% of 4096 + int2'."""
        if not self.sparse:
            return self.codec
        return f"top-{self.topk_fraction:.3g} of {self.topk_chunk} + {self.codec}"
