"""Token dispatchers: move token rows to their experts and bring the results back (MegaBlocks' permute).

A dispatcher is the one seam between the model and expert parallelism. `LocalDispatcher` keeps
every expert on this device: it sorts the N*k (token, expert) assignments by expert id and gathers
the token rows in that order, so each expert's rows are one contiguous group. An expert-parallel
dispatcher implements the same two calls with all-to-alls in between; its `tokens_per_expert`
then counts the rows this rank's local experts receive.

Both directions are deterministic: sorting is stable, and every backward is a gather, a permutation
or a gather-and-sum in a fixed order (no atomic scatter-add), so runs are bit-reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import torch
import torch.nn.functional as F

T = TypeVar("T")


class Pending(Generic[T]):
    """A result whose exchange may still be in flight: `wait()` finishes it and returns it (call it
    once). `exchanges` are the timings of the exchanges it waits on (the expert-parallel
    dispatcher's `AllToAllTimes`; empty when nothing was in flight)."""

    def __init__(self, finish: Callable[[], T], exchanges: tuple[Any, ...] = ()):
        self._finish = finish
        self.exchanges = exchanges

    @classmethod
    def ready(cls, value: T) -> Pending[T]:
        return cls(lambda: value)

    def wait(self) -> T:
        return self._finish()


class TokenDispatcher(Protocol):
    def dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(rows grouped by expert [R, D], rows per local expert [E_local], state for `combine`).

        The gates [N, k] travel with the tokens: an expert-parallel dispatcher sends them in the same
        exchange, so that the receiver can sum a token's expert outputs before sending them back.
        The state's `row_gates` [R] are the gates of the grouped rows, for experts that apply them
        (Megatron's permuted probs); `state.gates_applied()` tells `combine` that they did."""
        ...

    def combine(self, expert_out: torch.Tensor, state: Any) -> torch.Tensor:
        """Gate-weighted sum over each token's k expert outputs, [N, D] in the original token order
        (a plain sum for a `gates_applied()` state)."""
        ...

    def start_dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor
    ) -> Pending[tuple[torch.Tensor, torch.Tensor, Any]]:
        """`dispatch` with its exchanges left in flight, so that other work can run meanwhile."""
        ...

    def start_combine(self, expert_out: torch.Tensor, state: Any) -> Pending[torch.Tensor]:
        """`combine` with its exchange left in flight."""
        ...


class LocalDispatch(NamedTuple):
    """How `LocalDispatcher.dispatch` grouped the N*k (token, slot) assignments into R = N*k rows."""

    token_of_row: torch.Tensor
    """[R] the token each grouped row came from"""
    rows_of_token: torch.Tensor
    """[N, k] the grouped row of each of a token's k slots"""
    row_gates: torch.Tensor
    """[R] the gate of each grouped row, for experts that apply the gates themselves"""
    gates: torch.Tensor | None
    """[N, k] the gates `combine` weights the rows with; None once the experts applied them"""

    def gates_applied(self) -> LocalDispatch:
        """This state for expert outputs already scaled by `row_gates`: `combine` then only sums."""
        return self._replace(gates=None)


class LocalDispatcher:
    """Sort-by-expert dispatch and gather-back combine, with all experts on this device.

    The rows are gathered straight into the grouped GEMM's order (one `index_select`), and the
    combine is one fused gather-and-sum (`embedding_bag`) of each token's k rows, with the gates as
    its per-row weights unless the experts applied them already.
    """

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, LocalDispatch]:
        n_tokens, top_k = expert_indices.shape
        flat_experts = expert_indices.reshape(-1)  # assignment a = token * k + slot
        flat_of_row = torch.argsort(flat_experts, stable=True)
        row_of_flat = inverse_permutation(flat_of_row)
        tokens_per_expert = torch.bincount(flat_experts, minlength=self.n_experts)
        token_of_row = flat_of_row // top_k
        rows_of_token = row_of_flat.view(n_tokens, top_k)
        x_sorted = fan_out_rows(x, token_of_row, rows_of_token, padded=False)
        row_gates = _PermuteRows.apply(gates.reshape(-1), flat_of_row, row_of_flat)
        return x_sorted, tokens_per_expert, LocalDispatch(token_of_row, rows_of_token, row_gates, gates)

    def combine(self, expert_out: torch.Tensor, state: LocalDispatch) -> torch.Tensor:
        if state.gates is None:
            return fan_in_rows(expert_out, state.rows_of_token, state.token_of_row, padded=False)
        weights = state.gates.to(expert_out.dtype)
        return _GatedFanIn.apply(expert_out, weights, state.rows_of_token, state.token_of_row)

    def start_dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor
    ) -> Pending[tuple[torch.Tensor, torch.Tensor, LocalDispatch]]:
        """Nothing to exchange: `dispatch`, already done."""
        return Pending.ready(self.dispatch(x, expert_indices, gates))

    def start_combine(self, expert_out: torch.Tensor, state: LocalDispatch) -> Pending[torch.Tensor]:
        return Pending.ready(self.combine(expert_out, state))


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
