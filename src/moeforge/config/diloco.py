"""The `[diloco]` section: Streaming DiLoCo replicas that synchronise every H steps (diloco/)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moeforge.config.checks import _check, _check_choices, _check_values

Codec = Literal["none", "bf16", "fp8", "fp4-e3m0", "fp4-e2m1"]


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
    outer_lr: float = 0.7
    """learning rate of the outer SGD with Nesterov momentum"""
    outer_momentum: float = 0.9
    """Nesterov momentum of the outer SGD; 0 = plain SGD"""
    quantize: Codec = "none"
    """number format of the outer gradients on the wire: 'none' (fp32), 'bf16', 'fp8' (e4m3),
    'fp4-e3m0' (powers of two, Streaming DiLoCo's) or 'fp4-e2m1' (OCP MX); summed in fp32 after"""
    quantize_block: int = 128
    """values sharing one fp32 scale in the fp8/fp4 formats"""
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
