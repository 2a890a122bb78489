"""Deterministic row gathers for token dispatch, each a custom autograd function with its backward.

Moving token rows to their experts and back is a gather with repeated rows one way and a
gather-and-sum the other. PyTorch's default backward of such a gather is an `index_add_` with several
writers per row, which uses atomics on CUDA and is not bit-reproducible. Each function here pairs
the gather with a backward that is itself a gather, a permutation or a gather-and-sum in a fixed
(slot) order. The local dispatcher (dispatch.py) and the expert-parallel one
(parallel/expert_parallel.py) are both built from them.

    fan_out_rows     x[rows], a row copied to several output rows; backward adds the copies in slot order
    fan_in_rows      the transpose: each output row sums its slots; backward is a plain gather
    gated_fan_in     fan_in_rows with a weight per slot (the gate-weighted combine)
    permute_rows     x[perm], backward gathers through the inverse permutation
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv with inv[perm[i]] = i."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


def fan_out_rows(x: torch.Tensor, rows: torch.Tensor, slot_table: torch.Tensor, padded: bool) -> torch.Tensor:
    """x[rows], where a row of x may be copied several times; the backward adds each row's copies in
    `slot_table` order (see `_FanOutRows`)."""
    return _FanOutRows.apply(x, rows, slot_table, padded)


def fan_in_rows(
    y: torch.Tensor, slot_table: torch.Tensor, row_owner: torch.Tensor, padded: bool = True
) -> torch.Tensor:
    """out[n] = sum of y[slot_table[n, c]] over c (when `padded`, entries len(y) are empty); the
    transpose of `fan_out_rows` (see `_FanInRows`)."""
    return _FanInRows.apply(y, slot_table, row_owner, padded)


def gated_fan_in(
    y: torch.Tensor, weights: torch.Tensor, slot_table: torch.Tensor, row_owner: torch.Tensor
) -> torch.Tensor:
    """out[n] = sum of weights[n, c] * y[slot_table[n, c]] over c, [N, D] (no empty slots); the
    combine when the experts did not apply the gates (see `_GatedFanIn`)."""
    return _GatedFanIn.apply(y, weights, slot_table, row_owner)


def permute_rows(x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x[perm], with `inverse` = inverse_permutation(perm) for the backward (see `_PermuteRows`)."""
    return _PermuteRows.apply(x, perm, inverse)


class _FanOutRows(torch.autograd.Function):
    """x[rows] [R, D], where a row of x may be copied to several output rows.

    `slot_table` [N, C] lists, for each row n of x, the output rows it was copied to; entries equal
    to R are empty slots (when `padded`). The default backward of such a gather is an index_add_
    with several writers per row of x, which uses atomics on CUDA; this one gathers each row's C
    gradient rows and adds them in slot order, in one pass (`_sum_slots`), so it is deterministic.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        rows: torch.Tensor,
        slot_table: torch.Tensor,
        padded: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(slot_table)
        ctx.padded = padded
        return x.index_select(0, rows)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (slot_table,) = ctx.saved_tensors
        return _sum_slots(grad, slot_table, ctx.padded), None, None, None


class _FanInRows(torch.autograd.Function):
    """out[n] = sum over c of y[slot_table[n, c]] (when `padded`, entries equal to len(y) are
    empty), [N, D].

    The transpose of `_FanOutRows`: every row of y belongs to exactly one output row, `row_owner[r]`,
    so the backward is a plain gather. Sums run in slot order: deterministic.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        y: torch.Tensor,
        slot_table: torch.Tensor,
        row_owner: torch.Tensor,
        padded: bool,
    ) -> torch.Tensor:
        ctx.save_for_backward(row_owner)
        return _sum_slots(y, slot_table, padded)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (row_owner,) = ctx.saved_tensors
        return grad.index_select(0, row_owner), None, None, None


class _GatedFanIn(torch.autograd.Function):
    """out[n] = sum over c of w[n, c] * y[slot_table[n, c]], [N, D] (no empty slots); the combine
    when the gates w [N, C] were not applied by the experts.

    Forward: one weighted gather-and-sum. Backward: dy[r] = w(r) * dout[row_owner[r]], one weighted
    gather, and dw[n, c] = <dout[n], y[slot_table[n, c]]>, a gather of y in token order and a batched
    matrix-vector product.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        y: torch.Tensor,
        weights: torch.Tensor,
        slot_table: torch.Tensor,
        row_owner: torch.Tensor,
    ) -> torch.Tensor:
        ctx.save_for_backward(y, weights, slot_table, row_owner)
        return _sum_slots(y, slot_table, padded=False, weights=weights)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        y, weights, slot_table, row_owner = ctx.saved_tensors
        grad_y = grad_weights = None
        if ctx.needs_input_grad[0]:
            row_weights = torch.empty_like(weights.reshape(-1))
            row_weights[slot_table.reshape(-1)] = weights.reshape(-1)
            grad_y = _sum_slots(grad, row_owner.unsqueeze(1), padded=False, weights=row_weights.unsqueeze(1))
        if ctx.needs_input_grad[1]:
            y_by_token = y.index_select(0, slot_table.reshape(-1)).view(*slot_table.shape, -1)
            grad_weights = torch.bmm(y_by_token, grad.unsqueeze(-1)).squeeze(-1)
        return grad_y, grad_weights, None, None


def _sum_slots(
    rows: torch.Tensor, slot_table: torch.Tensor, padded: bool, weights: torch.Tensor | None = None
) -> torch.Tensor:
    """sum over c of weights[:, c] * rows[slot_table[:, c]] (weights 1 when None), [N, D], added in
    slot order by one `embedding_bag` (a fused gather-and-sum; no [N, C, D] intermediate).

    With `padded`, entries equal to len(rows) are empty slots: they are dropped and each token's
    remaining slots form a bag of its own size (an empty bag sums to zero).
    """
    if not padded:
        return F.embedding_bag(slot_table, rows, per_sample_weights=weights, mode="sum")
    filled = slot_table < rows.shape[0]
    bag_sizes = filled.sum(dim=1)
    offsets = bag_sizes.cumsum(0) - bag_sizes
    return F.embedding_bag(slot_table[filled], rows, offsets, mode="sum")


class _PermuteRows(torch.autograd.Function):
    """x[perm] with the gradient gathered back through the inverse permutation.

    The default backward of a row gather zero-fills a gradient buffer and index_add_s into it;
    for a permutation a second gather does the same work in one pass.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, perm: torch.Tensor, inverse: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None
