"""The outer-gradient number formats against references written here: code tables and byte layouts
worked out by hand, and a float64 search for the nearest representable value."""

from __future__ import annotations

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moeforge.diloco.codecs import CODECS, code_table, decode, encode, encoded_nbytes

FP4 = ("fp4-e3m0", "fp4-e2m1")
MAGNITUDES = {
    "fp4-e3m0": [0.0, 1 / 64, 1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 / 2, 1.0],
    "fp4-e2m1": [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
}
"""codes 0..7 by hand; codes 8..15 are their negatives (8 is zero)"""
HAND_TABLE = {codec: magnitudes + [-m for m in magnitudes] for codec, magnitudes in MAGNITUDES.items()}
WORST_ERROR = {"fp4-e3m0": 1 / 4, "fp4-e2m1": 1 / 6}
"""half the widest gap between magnitudes, as a fraction of the block's absmax"""


def round_trip(values: torch.Tensor, codec: str, block: int) -> torch.Tensor:
    payload = encode(values, codec, block)
    assert payload.dtype == torch.uint8 and payload.shape == (encoded_nbytes(len(values), codec, block),)
    return decode(payload, len(values), codec, block)


def nearest_reference(values: torch.Tensor, codec: str, block: int) -> torch.Tensor:
    """For each value: the table value times its block's scale (absmax / largest magnitude, in fp32)
    closest to it in float64; argmin takes the first of equals, the smaller magnitude on a tie."""
    table = torch.tensor(HAND_TABLE[codec], dtype=torch.float64)
    decoded = []
    for start in range(0, len(values), block):
        chunk = values[start : start + block]
        scale = chunk.abs().max() / MAGNITUDES[codec][-1]
        candidates = table * scale.double()
        distances = (chunk.double()[:, None] - candidates[None, :]).abs()
        decoded.append(candidates[distances.argmin(dim=1)])
    return torch.cat(decoded).float()


def heavy_tailed(n: int, seed: int) -> torch.Tensor:
    """Values spread over several orders of magnitude, so that every code gets used."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=generator) * torch.exp(2 * torch.randn(n, generator=generator))


def block_absmax(values: torch.Tensor, block: int) -> torch.Tensor:
    """Each value's block absmax, per value."""
    maxima = [
        values[s : s + block].abs().max().repeat(len(values[s : s + block]))
        for s in range(0, len(values), block)
    ]
    return torch.cat(maxima)


@pytest.mark.parametrize("codec", FP4)
def test_code_tables_are_the_hand_written_ones(codec):
    assert code_table(codec).tolist() == HAND_TABLE[codec]
    assert not code_table(codec)[8].signbit(), "code 8 decodes to +0"


@pytest.mark.parametrize("codec", FP4)
@pytest.mark.parametrize("scale", [1.0, 0.375, 5 * 2.0**-20, 1536.0])
def test_every_code_round_trips_exactly(codec, scale):
    """Three blocks of all 16 values in different orders; each block holds its largest magnitude."""
    table = torch.tensor(HAND_TABLE[codec])
    values = torch.cat(
        [table, table.flip(0), table[torch.randperm(16, generator=torch.Generator().manual_seed(0))]]
    )
    values = values * torch.tensor([scale, 2 * scale, scale / 8]).repeat_interleave(16)
    assert torch.equal(round_trip(values, codec, 16), values)


@pytest.mark.parametrize("codec", FP4)
@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n, block", [(1, 4), (7, 4), (128, 32), (333, 128), (1001, 16)])
def test_random_values_decode_to_the_nearest_table_value(codec, seed, n, block):
    values = heavy_tailed(n, seed)
    decoded = round_trip(values, codec, block)
    assert torch.equal(decoded, nearest_reference(values, codec, block))
    bound = WORST_ERROR[codec] * block_absmax(values, block).double()
    assert ((decoded.double() - values.double()).abs() <= bound * (1 + 1e-6)).all()


@pytest.mark.parametrize("codec", FP4)
@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(-(2.0**100), 2.0**100, width=32), min_size=1, max_size=40),
    block=st.integers(1, 9),
)
def test_any_finite_values_decode_to_the_nearest_table_value(codec, values, block):
    values = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(round_trip(values, codec, block), nearest_reference(values, codec, block))


@pytest.mark.parametrize("codec", FP4)
@pytest.mark.parametrize("absmax", [1.0, 0.1, 7.3e-5, 1234.567])
def test_values_one_step_from_a_midpoint_round_the_right_way(codec, absmax):
    """The fp32 numbers just below, at and just above each midpoint between two magnitudes (times the
    block's scale), where a rounded product or quotient would tip the choice."""
    scale = torch.tensor(absmax) / MAGNITUDES[codec][-1]
    magnitudes = torch.tensor(MAGNITUDES[codec], dtype=torch.float64)
    midpoints = ((magnitudes[1:] + magnitudes[:-1]) / 2 * scale.double()).float()
    near = torch.cat(
        [midpoints.nextafter(torch.zeros(7)), midpoints, midpoints.nextafter(torch.full((7,), 9e9))]
    )
    values = torch.cat([torch.tensor([absmax]), near, -near])
    assert torch.equal(round_trip(values, codec, len(values)), nearest_reference(values, codec, len(values)))


def test_ties_round_toward_zero_and_rounding_is_linear():
    e2m1 = torch.tensor([6.0, 5.0, -5.0, 0.25, 3.5, -0.75, 1.25])
    assert round_trip(e2m1, "fp4-e2m1", 8).tolist() == [6.0, 4.0, -4.0, 0.0, 3.0, -0.5, 1.0]
    e3m0 = torch.tensor([1.0, 0.75, -0.75, 1 / 128, 3 / 128, 0.7, 0.8, -0.3])
    assert round_trip(e3m0, "fp4-e3m0", 8).tolist() == [1.0, 0.5, -0.5, 0.0, 1 / 64, 0.5, 1.0, -0.25]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n, block", [(1, 1), (9, 4), (1000, 128)])
def test_wide_formats_error_bounds(seed, n, block):
    values = heavy_tailed(n, seed)
    assert torch.equal(round_trip(values, "none", block), values)
    bf16_error = (round_trip(values, "bf16", block) - values).abs()
    assert (bf16_error <= 2.0**-8 * values.abs()).all()
    # e4m3: half an ulp of 4 significant bits, or of the subnormal spacing 2^-9 below 2^-6 (times the
    # scale absmax / 448); the slack covers the fp32 division and multiplication by the scale.
    scale = block_absmax(values, block).double() / 448
    bound = torch.maximum(2.0**-4 * values.abs().double(), 2.0**-10 * scale)
    fp8_error = (round_trip(values, "fp8", block) - values).abs().double()
    assert (fp8_error <= bound * (1 + 1e-5)).all()


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("n, block", [(0, 4), (1, 4), (7, 4), (8, 4), (333, 128), (5, 1)])
def test_payload_size_depends_only_on_n(codec, n, block):
    blocks = -(-n // block)
    expected = {
        "none": 4 * n,
        "bf16": 2 * n,
        "fp8": n + 4 * blocks,
        "fp4-e3m0": (n + 1) // 2 + 4 * blocks,
        "fp4-e2m1": (n + 1) // 2 + 4 * blocks,
        "int2": (n + 3) // 4 + 4 * blocks,
    }[codec]
    assert encoded_nbytes(n, codec, block) == expected
    for values in (torch.zeros(n), heavy_tailed(n, 0)):
        assert encode(values, codec, block).shape == (expected,)


def scale_bytes(scale: float) -> list[int]:
    """An fp32 as the message holds it: the machine's byte order, little-endian on x86 and ARM."""
    return list(struct.pack("<f", scale))


@pytest.mark.parametrize(
    "codec, values, expected",
    [
        # 1.5 -> 0011, -6 -> 1111, 0.5 -> 0001 (scale 6/6 = 1): bytes 0xF3, then 0x01 with a zero pad
        ("fp4-e2m1", [1.5, -6.0, 0.5], [0xF3, 0x01, *scale_bytes(1.0)]),
        # -1/4 -> 1101, 1/64 -> 0001, 1 -> 0111, -0.001 -> 0000 (zero never gets a sign; scale 1)
        ("fp4-e3m0", [-0.25, 1 / 64, 1.0, -0.001], [0x1D, 0x07, *scale_bytes(1.0)]),
        # scale 896/448 = 2: 448 -> 0 1111 110, -1 -> 1 0111 000 (bias 7)
        ("fp8", [896.0, -2.0], [0x7E, 0xB8, *scale_bytes(2.0)]),
        # bf16 is the top half of fp32: 1 -> 0x3F80, -2 -> 0xC000
        ("bf16", [1.0, -2.0], [0x80, 0x3F, 0x00, 0xC0]),
        ("none", [1.0], scale_bytes(1.0)),
        # rms of (3, -1, -1, 1) is sqrt(3): 3 -> 01, -1 -> 10, -1 -> 10, 1 -> 00 (|x| <= s: 0.5 s),
        # packed 01 + 10<<2 + 10<<4 + 00<<6 = 0x29; then 0.25 -> 00 in a block of its own (rms 0.25)
        ("int2", [3.0, -1.0, -1.0, 1.0, 0.25], [0x29, 0x00, *scale_bytes(3**0.5), *scale_bytes(0.25)]),
    ],
)
def test_byte_layout_by_hand(codec, values, expected):
    assert encode(torch.tensor(values), codec, 4).tolist() == expected


@pytest.mark.parametrize("codec", CODECS)
def test_a_payload_sliced_from_a_gathered_buffer_decodes(codec):
    """all_gather delivers payloads back to back; an fp4 or fp8 one of odd length puts the next
    one's scales at an offset that is no multiple of 4."""
    parts = [heavy_tailed(3, seed) for seed in range(3)]
    payloads = [encode(part, codec, 2) for part in parts]
    gathered, size = torch.cat(payloads), len(payloads[0])
    for rank, part in enumerate(parts):
        assert torch.equal(
            decode(gathered[rank * size : (rank + 1) * size], 3, codec, 2), round_trip(part, codec, 2)
        )


@pytest.mark.parametrize("codec", CODECS)
def test_zeros_decode_to_exact_zeros(codec):
    values = torch.cat([torch.zeros(8), heavy_tailed(5, 0)])
    decoded = round_trip(values, codec, 4)
    assert torch.equal(decoded[:8], torch.zeros(8))
    assert decoded.isfinite().all()


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_stay_non_finite(codec, bad):
    clean = heavy_tailed(12, 1)
    values = clean.clone()
    values[5] = bad
    decoded = round_trip(values, codec, 4)
    assert not decoded[5].isfinite()
    if codec in ("none", "bf16"):
        assert torch.equal(decoded[torch.arange(12) != 5], round_trip(clean, codec, 4)[torch.arange(12) != 5])
    else:
        assert not decoded[4:8].isfinite().any(), "the whole block of a non-finite value"
        others = torch.cat([torch.arange(4), torch.arange(8, 12)])
        assert torch.equal(decoded[others], round_trip(clean, codec, 4)[others])


def test_unknown_codec_and_bad_block_are_named():
    with pytest.raises(ValueError, match="'fp3'"):
        encode(torch.ones(4), "fp3", 4)
    with pytest.raises(ValueError, match="'int8'"):
        decode(torch.zeros(4, dtype=torch.uint8), 4, "int8", 4)
    with pytest.raises(ValueError, match="'e5m2'"):
        encoded_nbytes(4, "e5m2", 4)
    with pytest.raises(ValueError, match="block 0"):
        encode(torch.ones(4), "fp8", 0)
    with pytest.raises(ValueError, match="block -3"):
        encoded_nbytes(4, "fp4-e2m1", -3)
    with pytest.raises(ValueError, match="'fp8'"):
        code_table("fp8")
    with pytest.raises(ValueError, match="expected \\(6,\\) uint8"):
        decode(torch.zeros(5, dtype=torch.uint8), 3, "fp4-e3m0", 4)


# ----------------------------------------------------------------------------------------------
# int2: {-1.5, -0.5, 0.5, 1.5} times the block's rms


def int2_reference(values: torch.Tensor, block: int) -> torch.Tensor:
    """Each value to the nearest of +-0.5 s, +-1.5 s (s the block's rms in float64, then fp32): the
    magnitude nearest |x| (0.5 s on a tie: argmin takes the first of equals), with x's sign unless x
    is zero or positive. (Nearest by signed distance in float64 errs where s exceeds 2^53.)"""
    decoded = []
    for start in range(0, len(values), block):
        chunk = values[start : start + block].double()
        scale = chunk.square().mean().sqrt().float().double()
        magnitudes = torch.tensor([0.5, 1.5], dtype=torch.float64) * scale
        nearest = magnitudes[(chunk.abs()[:, None] - magnitudes[None, :]).abs().argmin(dim=1)]
        decoded.append(torch.where(chunk < 0, -nearest, nearest))
    return torch.cat(decoded).float()


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("n, block", [(1, 4), (7, 4), (128, 32), (333, 128), (1001, 16)])
def test_int2_decodes_to_the_nearest_level_of_the_block_rms(seed, n, block):
    values = heavy_tailed(n, seed)
    assert torch.equal(round_trip(values, "int2", block), int2_reference(values, block))


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(-(2.0**100), 2.0**100, width=32), min_size=1, max_size=40), block=st.integers(1, 9))
def test_int2_any_finite_values_decode_to_the_nearest_level(values, block):
    values = torch.tensor(values, dtype=torch.float32)
    assert torch.equal(round_trip(values, "int2", block), int2_reference(values, block))


def test_int2_ties_go_toward_zero_and_zero_is_positive():
    rms = 2.0
    values = torch.tensor([2.0, -2.0, 2.0, -2.0])  # rms 2
    assert round_trip(values, "int2", 4).tolist() == [1.0, -1.0, 1.0, -1.0]  # |x| = s: 0.5 s
    values = torch.tensor([0.0, -0.0, 4.0, 0.0])  # rms 2
    assert round_trip(values, "int2", 4).tolist() == [rms / 2, rms / 2, 3 * rms / 2, rms / 2]


def test_int2_error_on_gaussian_values_is_the_uniform_quantisers():
    """A step of one rms is within half a percent of the Gaussian's optimal 4-level uniform step
    (0.9957 sigma, mean-square error 0.1189 sigma^2); the shrink <Q(x),x>/<x,x> - 1 is -11.7 %."""
    values = torch.randn(1 << 18, generator=torch.Generator().manual_seed(0))
    decoded = round_trip(values, "int2", 1 << 18).double()
    mse = (decoded - values.double()).square().mean() / values.double().square().mean()
    shrink = (decoded * values.double()).sum() / values.double().square().sum() - 1
    assert mse.item() == pytest.approx(0.1189, abs=2e-3)
    assert shrink.item() == pytest.approx(-0.117, abs=3e-3)
