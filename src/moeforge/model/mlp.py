"""The SwiGLU feed-forward block (Shazeer 2020): dense layers and DeepSeek-style shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, for the last dim laid out as [gate | up] (one fused projection)."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class SwiGLU(nn.Module):
    """`w2(silu(x W1) * x W3)`, with W1 (gate) and W3 (up) fused into one `w13` matmul.

    `w13.weight` is [2*hidden, dim]: rows [:hidden] are the gate projection, rows [hidden:] the up
    projection. One matmul instead of two reads x once and is a little faster on every backend.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(swiglu(self.w13(x)))

    def init_weights(self, std: float, out_std: float | None = None) -> None:
        """Normal(0, std) on the input projection, Normal(0, out_std or std) on the output one."""
        nn.init.normal_(self.w13.weight, std=std)
        nn.init.normal_(self.w2.weight, std=std if out_std is None else out_std)
