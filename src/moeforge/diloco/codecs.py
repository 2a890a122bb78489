"""Number formats for outer gradients on the wire: one flat uint8 message per tensor, same size on
every rank.

A message is the element codes followed by the per-block scales as raw fp32 bytes. The blocked
formats (fp8, fp4-*) split the values into consecutive blocks of `block` values (the last one may be
shorter) and give each block one fp32 scale.

fp4-e3m0 (the FP4 of Streaming DiLoCo): 1 sign bit, 3 exponent bits, no mantissa. A code is `s eee`;
bit 3 is the sign. The smallest exponent is given up to encode zero, and scale = block absmax, so the
block's largest value is exact:

    code  0000  0001  0010  0011  0100  0101  0110  0111
    value 0     1/64  1/32  1/16  1/8   1/4   1/2   1      (times the scale)

fp4-e2m1 (the element type of the OCP microscaling formats): 1 sign, 2 exponent, 1 mantissa bit;
zero is code 0000, and scale = block absmax / 6. MX shares a power-of-two (E8M0) scale per block of
32; we keep an exact fp32 scale instead, so the largest value is exact here too:

    code  0000  0001  0010  0011  0100  0101  0110  0111
    value 0     0.5   1     1.5   2     3     4     6        (times the scale)

Codes 1000..1111 are the negatives of 0000..0111; 1000 (a negative zero) decodes to +0 and encode
never emits it. Two codes share a byte: value 2i in the low nibble, 2i+1 in the high one; an odd
count pads a zero nibble.

fp8: torch.float8_e4m3fn elements, scale = block absmax / 448 (e4m3's largest finite value).

int2: 2 bits, a uniform grid without zero, {-1.5, -0.5, 0.5, 1.5} times the block's root mean square
s = sqrt(mean(x^2)). A code is `s m`: bit 1 the sign, bit 0 the magnitude (0: 0.5, 1: 1.5):

    code  00    01    10    11
    value 0.5   1.5   -0.5  -1.5     (times the scale)

Why this grid: four levels and no zero use all four codes (a grid with zero, {-1, 0, 1}, wastes one);
for Gaussian values the mean-square-optimal 4-level uniform quantiser has its step at 0.9957 sigma
(Max 1960), so a step of one rms is within half a percent of it, and an rms scale is not dragged by
one outlier the way absmax is. The values beyond 2 rms are clipped to 1.5 rms, and values near zero
get +-0.5 rms: the error is large (half the step, 0.5 rms, inside the grid; unbounded outside), which
is why int2 is meant to travel with error feedback. A value exactly between two levels (|x| = s, or
x = 0) goes toward zero (0.5 s; +0.5 s for 0). Four codes share a byte, value 4i+j in bits 2j..2j+1.

Rounding goes to the nearest representable value in linear terms (not in log terms: with e3m0,
0.7 goes to 1/2 and 0.8 to 1). For fp4 the decision is exact and a value exactly halfway between two
magnitudes goes to the smaller one (toward zero). fp8 divides by the scale in fp32, then uses torch's
cast, as bf16 does: nearest, half to even.

    codec     bytes per value          worst error of one value
    none      4                        0
    bf16      2                        2^-8 of the value (half an ulp of 8 significant bits)
    fp8       1 + 4/block              2^-4 of the value, or 2^-10 * scale below e4m3's normal range
                                       (at most absmax/28 overall)
    fp4-e3m0  0.5 + 4/block            absmax/4   (half the widest gap, 1/2 to 1)
    fp4-e2m1  0.5 + 4/block            absmax/6   (half the widest gap, 4 to 6, times the scale absmax/6)
    int2      0.25 + 4/block           rms/2 for |value| <= 2 rms; |value| - 1.5 rms beyond

A block holding NaN or +-inf gets a NaN scale, so all of it decodes to NaN and the caller's
`isfinite` check sees it. This is set outright rather than left to inf/inf and 0*inf inside the
arithmetic: torch's cast saturates, turning an inf that reaches it into e4m3's finite 448. An all-zero
block has scale 0 and decodes to exact zeros. Pure torch: runs on any device, no collectives.
"""

from __future__ import annotations

import torch

CODECS: tuple[str, ...] = ("none", "bf16", "fp8", "fp4-e3m0", "fp4-e2m1", "int2")

FP4_MAGNITUDES: dict[str, tuple[float, ...]] = {
    "fp4-e3m0": (0.0, 2**-6, 2**-5, 2**-4, 2**-3, 2**-2, 2**-1, 1.0),
    "fp4-e2m1": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
}
"""the magnitudes of codes 0..7 of each 4-bit format at scale 1, ascending; bit 3 is the sign"""
INT2_LEVELS = (0.5, 1.5, -0.5, -1.5)
"""the value of int2 codes 0..3 at scale 1 (bit 1 the sign, bit 0 the magnitude)"""
FP8_MAX = 448.0
"""torch.finfo(torch.float8_e4m3fn).max: fp8 scales map a block's absmax onto it"""
SCALE_BYTES = 4


def _check(codec: str, block: int) -> None:
    if codec not in CODECS:
        raise ValueError(f"unknown codec {codec!r}: expected one of {', '.join(CODECS)}")
    if block < 1:
        raise ValueError(f"block {block} for codec {codec!r}: expected an integer >= 1")


def _code_nbytes(n: int, codec: str) -> int:
    """Bytes of the element codes of n values (the part of a message before the scales)."""
    return {"none": 4 * n, "bf16": 2 * n, "fp8": n, "int2": (n + 3) // 4}.get(codec, (n + 1) // 2)


def _n_blocks(n: int, codec: str, block: int) -> int:
    """Scales in a message: one per block in the blocked formats, none otherwise."""
    return 0 if codec in ("none", "bf16") else -(-n // block)


def encoded_nbytes(n: int, codec: str, block: int) -> int:
    """Bytes of the payload `encode` returns for n values. It depends on n alone, never on the
    values, so that ranks can all_gather their payloads without exchanging sizes first."""
    _check(codec, block)
    return _code_nbytes(n, codec) + SCALE_BYTES * _n_blocks(n, codec, block)


def code_table(codec: str) -> torch.Tensor:
    """(16,) fp32: the value of each code 0..15 of a 4-bit format at scale 1. Codes 8..15 are the
    negatives of 0..7, except code 8 (a negative zero), which is +0."""
    if codec not in FP4_MAGNITUDES:
        raise ValueError(f"codec {codec!r} has no code table: expected one of {', '.join(FP4_MAGNITUDES)}")
    magnitudes = torch.tensor(FP4_MAGNITUDES[codec])
    negatives = -magnitudes
    negatives[0] = 0.0
    return torch.cat([magnitudes, negatives])


def _as_blocks(values: torch.Tensor, block: int) -> torch.Tensor:
    """(n,) -> (ceil(n/block), block), zero-padded: zeros change no block's absmax."""
    n_blocks = -(-values.numel() // block)
    return torch.nn.functional.pad(values, (0, n_blocks * block - values.numel())).view(n_blocks, block)


def _block_scales(blocks: torch.Tensor, largest: float) -> torch.Tensor:
    """(n_blocks,) fp32 scales that map each block's absmax onto the format's `largest` magnitude;
    NaN for a block holding a non-finite value."""
    scales = blocks.abs().amax(dim=1) / largest
    return torch.where(blocks.isfinite().all(dim=1), scales, torch.nan)


def _encode_fp8(values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(element bytes, scales). An all-zero block divides by 1 instead of its zero scale."""
    blocks = _as_blocks(values, block)
    scales = _block_scales(blocks, FP8_MAX)
    divisors = torch.where(scales > 0, scales, 1.0)
    elements = (blocks / divisors[:, None]).to(torch.float8_e4m3fn)
    return elements.flatten()[: values.numel()].view(torch.uint8), scales


def _midpoints_rounded_down(scales: torch.Tensor, magnitudes: tuple[float, ...]) -> torch.Tensor:
    """(n_blocks, 7) fp32: each midpoint between consecutive magnitudes times its block's scale,
    rounded toward zero. The product is exact in fp64; rounding it down to fp32 keeps an fp32
    |value| <= boundary exactly when |value| <= the true midpoint, so no rounding moves a decision."""
    table = torch.tensor(magnitudes, dtype=torch.float64, device=scales.device)
    exact = scales.double()[:, None] * (table[1:] + table[:-1]) / 2
    nearest = exact.float()
    return torch.where(nearest.double() > exact, torch.nextafter(nearest, torch.zeros_like(nearest)), nearest)


def _encode_fp4(values: torch.Tensor, codec: str, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, scales): each |value| is placed among its block's midpoints, which gives the
    code of the nearest magnitude; the sign goes to bit 3 unless the magnitude is zero."""
    blocks = _as_blocks(values, block)
    scales = _block_scales(blocks, FP4_MAGNITUDES[codec][-1])
    boundaries = _midpoints_rounded_down(scales, FP4_MAGNITUDES[codec])
    # searchsorted (right=False) puts a value equal to a midpoint below it: ties round toward zero.
    magnitude_codes = torch.searchsorted(boundaries, blocks.abs().contiguous())
    codes = torch.where((blocks < 0) & (magnitude_codes > 0), magnitude_codes + 8, magnitude_codes)
    return _pack_codes(codes.flatten()[: values.numel()].to(torch.uint8), 4), scales


def _encode_int2(values: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed codes, scales): the scale is each block's rms over its own values (the padding of the
    last block left out), taken in fp64 so that squares cannot overflow; |value| <= scale is the
    smaller magnitude, and a value that is not positive gets the sign unless it is zero."""
    blocks = _as_blocks(values, block)
    counts = torch.full((blocks.shape[0],), block, dtype=torch.float64, device=values.device)
    counts[-1:] = values.numel() - block * (blocks.shape[0] - 1)
    scales = (blocks.double().square().sum(dim=1) / counts).sqrt().float()
    scales = torch.where(blocks.isfinite().all(dim=1), scales, torch.nan)
    large = blocks.abs() > scales[:, None]
    codes = large.to(torch.uint8) | ((blocks < 0).to(torch.uint8) << 1)
    codes = codes.flatten()[: values.numel()]
    return _pack_codes(codes, 2), scales


def _pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(n,) uint8 codes of `bits` bits (2 or 4) -> (ceil(n * bits / 8),) bytes, little-endian inside a
    byte: with k = 8 / bits codes a byte, code k*i + j sits in bits j*bits.. of byte i (fp4: code 2i
    in the low nibble; int2: code 4i+j in bits 2j..2j+1)."""
    per_byte = 8 // bits
    padded = torch.nn.functional.pad(codes, (0, -codes.numel() % per_byte)).view(-1, per_byte)
    packed = padded[:, 0].clone()
    for j in range(1, per_byte):
        packed |= padded[:, j] << (bits * j)
    return packed


def _unpack_codes(packed: torch.Tensor, n: int, bits: int) -> torch.Tensor:
    """The inverse of `_pack_codes`: (n,) uint8 codes."""
    mask = (1 << bits) - 1
    return torch.stack([(packed >> (bits * j)) & mask for j in range(8 // bits)], dim=1).flatten()[:n]


def encode(values: torch.Tensor, codec: str, block: int) -> torch.Tensor:
    """(n,) fp32 -> the whole message: (encoded_nbytes(n, codec, block),) uint8 on values' device,
    the element codes followed by the scales' fp32 bytes. Never shares memory with `values`."""
    _check(codec, block)
    assert values.dim() == 1 and values.dtype == torch.float32, (values.shape, values.dtype)
    if codec == "none":
        return values.clone(memory_format=torch.contiguous_format).view(torch.uint8)
    if codec == "bf16":
        return values.to(torch.bfloat16).contiguous().view(torch.uint8)
    if codec == "fp8":
        elements, scales = _encode_fp8(values, block)
    elif codec == "int2":
        elements, scales = _encode_int2(values, block)
    else:
        elements, scales = _encode_fp4(values, codec, block)
    return torch.cat([elements, scales.view(torch.uint8)])


def _reinterpret(raw: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Bytes as `dtype`, copied first: a slice of a received buffer may start at an offset that is not
    a multiple of the dtype's size (the scales after an odd count of fp4 bytes), which `view` refuses."""
    return raw.clone().view(dtype)


def decode(payload: torch.Tensor, n: int, codec: str, block: int) -> torch.Tensor:
    """The inverse of `encode`: a message for n values -> (n,) fp32 on the payload's device."""
    _check(codec, block)
    expected = encoded_nbytes(n, codec, block)
    if payload.dtype != torch.uint8 or payload.shape != (expected,):
        raise ValueError(
            f"{codec} payload for {n} values: expected ({expected},) uint8, got "
            f"{tuple(payload.shape)} {payload.dtype}"
        )
    if codec == "none":
        return _reinterpret(payload, torch.float32)
    if codec == "bf16":
        return _reinterpret(payload, torch.bfloat16).float()
    code_nbytes = _code_nbytes(n, codec)
    scales = _reinterpret(payload[code_nbytes:], torch.float32)
    if codec == "fp8":
        elements = payload[:code_nbytes].view(torch.float8_e4m3fn).float()
    elif codec == "int2":
        codes = _unpack_codes(payload[:code_nbytes], n, 2)
        elements = torch.tensor(INT2_LEVELS, device=payload.device)[codes.long()]
    else:
        codes = _unpack_codes(payload[:code_nbytes], n, 4)
        elements = code_table(codec).to(payload.device)[codes.long()]
    return (_as_blocks(elements, block) * scales[:, None]).flatten()[:n]
