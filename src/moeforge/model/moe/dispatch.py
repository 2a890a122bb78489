"""Token dispatchers: move token rows to their experts and bring the results back (MegaBlocks' permute).

A dispatcher is the one seam between the model and expert parallelism. `LocalDispatcher` keeps
every expert on this device: it sorts the N*k (token, expert) assignments by expert id and gathers
the token rows in that order, so each expert's rows are one contiguous group. An expert-parallel
dispatcher implements the same two calls with all-to-alls in between; its `tokens_per_expert`
then counts the rows this rank's local experts receive.

Both directions are deterministic: sorting is stable, and every backward is a gather or a
permutation (no atomic scatter-add), so runs are bit-reproducible.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, NamedTuple, Protocol, TypeVar

import torch

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
        exchange, so that the receiver can sum a token's expert outputs before sending them back."""
        ...

    def combine(self, expert_out: torch.Tensor, state: Any) -> torch.Tensor:
        """Gate-weighted sum over each token's k expert outputs, [N, D] in the original token order."""
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
    """How `LocalDispatcher.dispatch` permuted the N*k assignments (flat index = token*k + slot)."""

    flat_of_sorted: torch.Tensor
    """[N*k] the flat assignment each sorted row came from"""
    sorted_of_flat: torch.Tensor
    """[N*k] the sorted row of each flat assignment (inverse permutation)"""
    gates: torch.Tensor
    """[N, k] the gate of each assignment"""


class LocalDispatcher:
    """Sort-by-expert dispatch and gather-back combine, with all experts on this device."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, LocalDispatch]:
        flat_experts = expert_indices.reshape(-1)
        flat_of_sorted = torch.argsort(flat_experts, stable=True)
        sorted_of_flat = inverse_permutation(flat_of_sorted)
        tokens_per_expert = torch.bincount(flat_experts, minlength=self.n_experts)
        top_k = expert_indices.shape[1]
        x_sorted = fan_out_rows(x, flat_of_sorted // top_k, sorted_of_flat.view(-1, top_k), padded=False)
        return x_sorted, tokens_per_expert, LocalDispatch(flat_of_sorted, sorted_of_flat, gates)

    def combine(self, expert_out: torch.Tensor, state: LocalDispatch) -> torch.Tensor:
        gates = state.gates
        n_tokens, top_k = gates.shape
        per_token = _PermuteRows.apply(expert_out, state.sorted_of_flat, state.flat_of_sorted)
        per_token = per_token.view(n_tokens, top_k, -1)
        return torch.bmm(gates.to(per_token.dtype).unsqueeze(1), per_token).squeeze(1)

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


def fan_in_rows(y: torch.Tensor, slot_table: torch.Tensor, row_owner: torch.Tensor) -> torch.Tensor:
    """out[n] = sum of y[slot_table[n, c]] over c (entries len(y) are empty); the transpose of
    `fan_out_rows` (see `_FanInRows`)."""
    return _FanInRows.apply(y, slot_table, row_owner)


class _FanOutRows(torch.autograd.Function):
    """x[rows] [R, D], where a row of x may be copied to several output rows.

    `slot_table` [N, C] lists, for each row n of x, the output rows it was copied to; entries equal
    to R are empty slots (when `padded`). The default backward of such a gather is an index_add_
    with several writers per row of x, which uses atomics on CUDA; this one gathers each row's C
    gradient rows and adds them in slot order, so it is deterministic.
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
        if ctx.padded:
            grad = torch.cat([grad, grad.new_zeros(1, grad.shape[1])])
        return _sum_slots(grad, slot_table), None, None, None


class _FanInRows(torch.autograd.Function):
    """out[n] = sum over c of y[slot_table[n, c]] (entries equal to len(y) are empty), [N, D].

    The transpose of `_FanOutRows`: every row of y belongs to exactly one output row, `row_owner[r]`,
    so the backward is a plain gather. Sums run in slot order: deterministic.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx, y: torch.Tensor, slot_table: torch.Tensor, row_owner: torch.Tensor
    ) -> torch.Tensor:
        ctx.save_for_backward(row_owner)
        return _sum_slots(torch.cat([y, y.new_zeros(1, y.shape[1])]), slot_table)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (row_owner,) = ctx.saved_tensors
        return grad.index_select(0, row_owner), None, None


def _sum_slots(rows: torch.Tensor, slot_table: torch.Tensor) -> torch.Tensor:
    """sum over c of rows[slot_table[:, c]], [N, D], added in slot order."""
    total = rows.index_select(0, slot_table[:, 0])
    for slot in range(1, slot_table.shape[1]):
        total += rows.index_select(0, slot_table[:, slot])
    return total


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
