"""Chunked top-k messages (diloco/sparse.py, diloco/wire.py) against references written here: the
kept values found by a float64 sort of each chunk, byte counts worked out by hand."""

from __future__ import annotations

import pytest
import torch

from moeforge.diloco.codecs import CODECS, encode, encoded_nbytes
from moeforge.diloco.sparse import kept_per_chunk, pack_offsets, unpack_offsets
from moeforge.diloco.wire import WireFormat


def gaussian(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def topk_reference(values: torch.Tensor, fraction: float, chunk: int) -> torch.Tensor:
    """(n,) -> (n,) float64: each chunk's round(fraction * length) (at least 1) largest magnitudes
    kept in place, found by sorting the chunk in float64, everything else zero."""
    kept = torch.zeros(len(values), dtype=torch.float64)
    for start in range(0, len(values), chunk):
        part = values[start : start + chunk].double()
        k = min(len(part), max(1, round(fraction * len(part))))
        order = part.abs().argsort(descending=True)[:k]
        kept[start + order] = part[order]
    return kept


@pytest.mark.parametrize(
    "n, fraction, chunk", [(1, 0.5, 4), (10, 0.5, 4), (1000, 0.02, 256), (5000, 0.01, 4096), (300, 1 / 3, 300)]
)
def test_top_k_keeps_the_largest_values_of_each_chunk(n, fraction, chunk):
    values = gaussian(n, n)  # distinct magnitudes: no ties
    wire = WireFormat("none", 4, fraction, chunk)
    decoded = wire.decode(wire.encode(values), n)
    assert torch.equal(decoded.double(), topk_reference(values, fraction, chunk))


@pytest.mark.parametrize("codec", CODECS)
def test_kept_values_travel_in_the_value_codec(codec):
    """The kept values, in chunk order and ascending offsets, are encoded as a message of their own."""
    values, fraction, chunk, block = gaussian(700, 1), 0.1, 256, 8
    wire = WireFormat(codec, block, fraction, chunk)
    payload = wire.encode(values)
    reference = topk_reference(values, fraction, chunk)
    where = reference.nonzero().flatten()
    kept = values[where]
    offsets = pack_offsets(where % chunk, chunk)
    assert torch.equal(payload, torch.cat([offsets, encode(kept, codec, block)]))
    decoded = wire.decode(payload, len(values))
    assert torch.equal(decoded[where], WireFormat(codec, block).decode(encode(kept, codec, block), len(kept)))
    assert not decoded[reference == 0].any()


@pytest.mark.parametrize(
    "n, fraction, chunk, codec, block, expected",
    [
        # 2 chunks of 4096 keep 82 each (0.02*4096 = 81.92), a chunk of 808 keeps 16: 180 values;
        # offsets in 12 bits (270 B), int2 codes 45 B, 2 scales of 128 values (8 B)
        (9000, 0.02, 4096, "int2", 128, 270 + 45 + 8),
        # chunks of 8192: 16-bit offsets; 1 chunk keeps 164, one of 808 keeps 16: 180 values
        (9000, 0.02, 8192, "int2", 128, 360 + 45 + 8),
        # 3 values kept from chunks of 300: 12 bits each, 4.5 bytes rounded up to 5
        (900, 1 / 300, 300, "none", 128, 5 + 12),
        # 4 chunks of 256 keep 64: 256 offsets as uint8, fp4 128 B + 8 scales of 32
        (1024, 0.25, 256, "fp4-e3m0", 32, 256 + 128 + 32),
        # a chunk of 3 keeps 1 (0.25*3 rounds to 1): 1 offset, one fp32
        (3, 0.25, 256, "none", 32, 1 + 4),
        (0, 0.25, 256, "fp8", 32, 0),
        (5, 1.0, 4, "bf16", 32, 10),  # dense: no offsets
    ],
)
def test_message_bytes_by_hand(n, fraction, chunk, codec, block, expected):
    wire = WireFormat(codec, block, fraction, chunk)
    assert wire.nbytes(n) == expected
    for values in (torch.zeros(n), gaussian(n, 2), gaussian(n, 3) * 1e30):
        assert wire.encode(values).shape == (expected,)


@pytest.mark.parametrize("chunk, bits", [(1, 8), (256, 8), (257, 12), (4096, 12), (4097, 16), (65536, 16)])
def test_offsets_take_8_bits_up_to_256_12_up_to_4096_and_16_above(chunk, bits):
    n, fraction = 3 * chunk, 0.5
    wire = WireFormat("none", 4, fraction, chunk)
    kept = 3 * kept_per_chunk(chunk, fraction)
    assert wire.nbytes(n) == -(-kept * bits // 8) + 4 * kept
    assert encoded_nbytes(kept, "none", 4) == 4 * kept
    values = gaussian(n, 4)
    assert torch.equal(wire.decode(wire.encode(values), n).double(), topk_reference(values, fraction, chunk))


@pytest.mark.parametrize("chunk, count", [(300, 1), (300, 2), (300, 7), (4096, 1000), (65536, 5)])
def test_offsets_round_trip_every_value(chunk, count):
    offsets = torch.randint(0, chunk, (count,), generator=torch.Generator().manual_seed(count))
    offsets[0] = chunk - 1
    assert torch.equal(unpack_offsets(pack_offsets(offsets, chunk), chunk, count), offsets)


def test_offsets_bytes_by_hand():
    # 12 bits, little-endian: 0x123 and 0xABC -> 0x23, 0xC1, 0xAB; an odd last one -> 0x56, 0x04
    assert pack_offsets(torch.tensor([0x123, 0xABC, 0x456]), 4096).tolist() == [0x23, 0xC1, 0xAB, 0x56, 0x04]
    big = torch.zeros(2 * 8192)
    big[8192 + 258] = 5.0  # chunk 1 of 8192, offset 258 = 0x0102 in 16 bits
    assert WireFormat("none", 4, 1 / 8192, 8192).encode(big)[2:4].tolist() == [0x02, 0x01]


def test_a_chunk_holding_a_non_finite_value_sends_nan():
    values = gaussian(40, 5)
    values[13] = float("inf")
    # 2 values kept per chunk of 10; a codec block of 2 holds one chunk's (one of 4 would take the
    # neighbour's kept values into the NaN block too)
    wire = WireFormat("fp4-e2m1", 2, 0.25, 10)
    decoded = wire.decode(wire.encode(values), 40)
    chunk_of_inf = decoded[10:20]
    assert chunk_of_inf.isnan().sum() == 2 and (chunk_of_inf.isnan() | (chunk_of_inf == 0)).all()
    others = torch.cat([decoded[:10], decoded[20:]])
    assert others.isfinite().all()


def test_a_bad_payload_is_named():
    wire = WireFormat("int2", 8, 0.5, 16)  # 16 kept: 16 offsets, 4 B of codes, 2 scales
    with pytest.raises(ValueError, match=r"top-0.5 of 16 \+ int2 payload for 32 values: expected \(28,\) uint8"):
        wire.decode(torch.zeros(5, dtype=torch.uint8), 32)
