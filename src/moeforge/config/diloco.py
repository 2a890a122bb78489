"""The `[diloco]` section: Streaming DiLoCo replicas that synchronise every H steps (diloco/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moeforge.config.checks import _check, _check_choices, _check_values

Codec = Literal["none", "bf16", "fp8", "fp4-e3m0", "fp4-e2m1", "int2"]
Outer = Literal["nesterov", "sparseloco"]

TOPK_CHUNK_MAX = 65536
"""the largest top-k chunk: offsets inside a chunk travel in at most 16 bits"""


@dataclass
class DiLoCoConfig:
    """Replicas train alone for H steps, then average their outer gradients fragment by fragment."""

    replicas: int = 1
    """DiLoCo replicas M: the outermost mesh dimension; each replica runs its own inner steps on its
    own data and exchanges outer gradients every sync-every steps; 1 = off (plain data parallelism)"""
    sync_every: int = 100
    """inner steps H between two synchronisations of a fragment"""
    fragments: int = 1
    """streaming fragments P: blocks p, p+P, ... form fragment p (embedding in the first, final norm,
    head and MTP modules in the last); fragment p synchronises at steps = p*H/P (mod H)"""
    overlap_steps: int = 0
    """tau: inner steps that run while a fragment's exchange is in flight; 0 = wait for it"""
    mix: float = 0.5
    """alpha, with overlap-steps > 0: a landed exchange sets theta_local = alpha*theta_local +
    (1-alpha)*theta_global (without overlap the local fragment is replaced by theta_global)"""
    outer: Outer = "nesterov"
    """the outer optimizer: 'nesterov' (DiLoCo's SGD with Nesterov momentum on the replicas' mean) or
    'sparseloco' (SparseLoCo: no momentum; each replica's decayed error-feedback accumulator
    e = ef-decay*e + delta is what it compresses and sends, and theta_global -= outer-lr * mean)"""
    outer_lr: float = 0.7
    """learning rate of the outer step (SparseLoCo's paper uses 1)"""
    outer_momentum: float = 0.9
    """Nesterov momentum of the outer SGD; 0 = plain SGD (not used by outer 'sparseloco')"""
    quantize: Codec = "int2"
    """number format of the outer gradients on the wire: 'none' (fp32), 'bf16', 'fp8' (e4m3),
    'fp4-e3m0' (powers of two, Streaming DiLoCo's), 'fp4-e2m1' (OCP MX) or 'int2' (2 bits,
    {-1.5, -0.5, 0.5, 1.5} times the block's rms); summed in fp32 after. int2 by default: with error
    feedback it stayed within 0.6 % of fp32 at 14x fewer bytes (docs/benchmarks/diloco.md)"""
    quantize_block: int = 128
    """values sharing one fp32 scale in the fp8/fp4/int2 formats"""
    topk_fraction: float = 1.0
    """top-k sparsification: the fraction of each chunk's outer-gradient values a replica sends (the
    largest in magnitude, with their offsets in the chunk), in the quantize format; 1 = dense"""
    topk_chunk: int = 4096
    """values per top-k chunk (an offset travels in 8 bits up to 256, 12 up to 4096, 16 above)"""
    error_feedback: bool = True
    """keep what the wire dropped (the outer gradient minus what its message decodes to) per replica
    and fragment, and add it to the fragment's next outer gradient before encoding; one more fp32
    copy of this rank's parameters, kept only when the wire is lossy (quantize or top-k)"""
    ef_decay: float = 0.95
    """beta of outer 'sparseloco''s accumulator, e = beta*e + delta (the Nesterov outer's error
    feedback keeps all it dropped: beta 1)"""
    global_on_cpu: bool = False
    """keep theta_global and the outer momentum in host memory (pinned when training on CUDA)"""

    @property
    def enabled(self) -> bool:
        return self.replicas > 1

    def validate(self) -> None:
        _check_values(self, "diloco")
        _check_choices(self, "diloco")
        _check(self.replicas >= 1, "diloco.replicas", self.replicas, "an integer >= 1")
        _check(self.sync_every >= 1, "diloco.sync-every", self.sync_every, "an integer >= 1")
        _check(
            1 <= self.fragments <= self.sync_every,
            "diloco.fragments",
            self.fragments,
            f"an integer in [1, sync-every={self.sync_every}] (each fragment syncs once every H steps)",
        )
        _check(
            0 <= self.overlap_steps < self.sync_every,
            "diloco.overlap-steps",
            self.overlap_steps,
            f"an integer in [0, sync-every={self.sync_every}) (an exchange lands before its next one starts)",
        )
        _check(0 <= self.mix <= 1, "diloco.mix", self.mix, "a number in [0, 1]")
        _check(self.outer_lr > 0, "diloco.outer-lr", self.outer_lr, "a number > 0")
        _check(
            0 <= self.outer_momentum < 1, "diloco.outer-momentum", self.outer_momentum, "a number in [0, 1)"
        )
        _check(self.quantize_block >= 2, "diloco.quantize-block", self.quantize_block, "an integer >= 2")
        _check(0 < self.topk_fraction <= 1, "diloco.topk-fraction", self.topk_fraction, "a number in (0, 1]")
        _check(
            1 <= self.topk_chunk <= TOPK_CHUNK_MAX,
            "diloco.topk-chunk",
            self.topk_chunk,
            f"an integer in [1, {TOPK_CHUNK_MAX}] (offsets inside a chunk travel in 16 bits)",
        )
        _check(0 < self.ef_decay <= 1, "diloco.ef-decay", self.ef_decay, "a number in (0, 1]")
        _check(
            self.error_feedback or self.outer != "sparseloco",
            "diloco.error-feedback",
            self.error_feedback,
            "true with diloco.outer 'sparseloco' (its accumulator is the error feedback)",
        )
