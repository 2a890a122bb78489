"""The SwiGLU feed-forward block (Shazeer 2020): dense layers and DeepSeek-style shared experts.

`swiglu` is the pointwise middle of every SwiGLU here (dense, shared and routed experts), with an
optional per-row gate so that the MoE layer can apply its router gates where the rows are narrowest
(the hidden width) instead of on the model-width outputs. In eager mode it is one autograd Function
whose backward writes straight into the halves of its gradient (no chunk/cat copy); under
`torch.compile` it is the plain expression, which the compiler fuses itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def swiglu(gate_up: torch.Tensor, row_gates: torch.Tensor | None = None) -> torch.Tensor:
    """g_r * silu(a) * b [R, F] for gate_up [R, 2F] laid out as [a (gate) | b (up)], one fused
    projection; g = `row_gates` [R] (1 when None)."""
    if torch.compiler.is_compiling():
        return reference_swiglu(gate_up, row_gates)
    return _SwiGLU.apply(gate_up, row_gates)


def reference_swiglu(gate_up: torch.Tensor, row_gates: torch.Tensor | None = None) -> torch.Tensor:
    """`swiglu` as plain autograd ops (what the compiler sees, and the tests' reference)."""
    gate, up = gate_up.chunk(2, dim=-1)
    out = F.silu(gate) * up
    return out if row_gates is None else out * row_gates.to(out.dtype).unsqueeze(-1)


class _SwiGLU(torch.autograd.Function):
    """h = g * silu(a) * b, with silu(a) = a * sigmoid(a); for an incoming gradient dh:

        da = silu'(a) * (g * dh * b),   silu'(a) = sigmoid(a) * (1 + a * (1 - sigmoid(a)))
        db = g * dh * silu(a)
        dg = sum_f dh * silu(a) * b     (one number per row)

    It saves what autograd of the plain expression saves (the input and silu(a)), but writes da and
    db straight into the two halves of one gradient buffer, in place, where autograd allocates each
    and then concatenates them; the gate costs two in-place products and a row-wise dot on [R, F].
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, gate_up: torch.Tensor, row_gates: torch.Tensor | None
    ) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        silu_gate = F.silu(gate)
        out = silu_gate * up
        if row_gates is not None:
            row_gates = row_gates.to(out.dtype).unsqueeze(-1)
            out.mul_(row_gates)
        ctx.save_for_backward(gate_up, silu_gate, row_gates)
        return out

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_out: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        gate_up, silu_gate, row_gates = ctx.saved_tensors
        gate, up = gate_up.chunk(2, dim=-1)
        grad = torch.empty_like(gate_up)
        grad_gate, grad_up = grad.chunk(2, dim=-1)
        torch.mul(grad_out, silu_gate, out=grad_up)  # dh * silu(a)
        grad_row_gates = None
        if row_gates is None:
            torch.mul(grad_out, up, out=grad_gate)
        else:
            if ctx.needs_input_grad[1]:
                grad_row_gates = torch.linalg.vecdot(grad_up, up)
            grad_up.mul_(row_gates)
            torch.mul(grad_out, row_gates, out=grad_gate).mul_(up)
        torch.ops.aten.silu_backward.grad_input(grad_gate, gate, grad_input=grad_gate)
        return grad, grad_row_gates


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
