"""Token dispatchers: move token rows to their experts and bring the results back (MegaBlocks' permute).

A dispatcher is the one seam between the model and expert parallelism. `LocalDispatcher` keeps
every expert on this device: it sorts the N*k (token, expert) assignments by expert id and gathers
the token rows in that order, so each expert's rows are one contiguous group. An expert-parallel
dispatcher implements the same two calls with all-to-alls in between; its `tokens_per_expert`
then counts the rows this rank's local experts receive.

Both directions are deterministic: sorting is stable, and every backward is a gather, a permutation
or a gather-and-sum in a fixed order (no atomic scatter-add; the gathers are row_gathers.py's), so
runs are bit-reproducible.
"""

from __future__ import annotations

from typing import Generic, NamedTuple, Protocol, Self, TypeVar

import torch

from moeforge.in_flight import Pending
from moeforge.model.moe.row_gathers import (
    fan_in_rows,
    fan_out_rows,
    gated_fan_in,
    inverse_permutation,
    permute_rows,
)


class DispatchState(Protocol):
    """What `dispatch` hands to `combine`: how the grouped rows map back to the tokens. Each
    dispatcher has its own (`LocalDispatch`, parallel's `ExpertParallelDispatch`); `combine` takes
    only the state its own dispatcher's `dispatch` returned."""

    @property
    def row_gates(self) -> torch.Tensor:
        """[R] the gates of the grouped rows, for experts that apply them (Megatron's permuted probs)."""
        ...

    def gates_applied(self) -> Self:
        """This state for expert outputs already scaled by `row_gates`: `combine` then only sums."""
        ...


StateT = TypeVar("StateT", bound=DispatchState, covariant=True)


class Dispatched(NamedTuple, Generic[StateT]):
    """What `dispatch` returns (a tuple: `rows, tokens_per_expert, state = dispatcher.dispatch(...)`)."""

    rows: torch.Tensor
    """[R, D] the token rows grouped by local expert"""
    tokens_per_expert: torch.Tensor
    """[E_local] rows per local expert"""
    state: StateT
    """what `combine` needs to bring the expert outputs back in token order"""


class TokenDispatcher(Protocol):
    def dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor
    ) -> Dispatched[DispatchState]:
        """The rows grouped by expert [R, D], the rows per local expert [E_local], the state for `combine`.

        The gates [N, k] travel with the tokens: an expert-parallel dispatcher sends them in the same
        exchange, so that the receiver can sum a token's expert outputs before sending them back.
        The state's `row_gates` [R] are the gates of the grouped rows, for experts that apply them
        (Megatron's permuted probs); `state.gates_applied()` tells `combine` that they did."""
        ...

    def combine(self, expert_out: torch.Tensor, state: DispatchState) -> torch.Tensor:
        """Gate-weighted sum over each token's k expert outputs, [N, D] in the original token order
        (a plain sum for a `gates_applied()` state)."""
        ...

    def start_dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor
    ) -> Pending[Dispatched[DispatchState]]:
        """`dispatch` with its exchanges left in flight, so that other work can run meanwhile."""
        ...

    def start_combine(self, expert_out: torch.Tensor, state: DispatchState) -> Pending[torch.Tensor]:
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
    ) -> Dispatched[LocalDispatch]:
        n_tokens, top_k = expert_indices.shape
        flat_experts = expert_indices.reshape(-1)  # assignment a = token * k + slot
        flat_of_row = torch.argsort(flat_experts, stable=True)
        row_of_flat = inverse_permutation(flat_of_row)
        tokens_per_expert = torch.bincount(flat_experts, minlength=self.n_experts)
        token_of_row = flat_of_row // top_k
        rows_of_token = row_of_flat.view(n_tokens, top_k)
        x_sorted = fan_out_rows(x, token_of_row, rows_of_token, padded=False)
        row_gates = permute_rows(gates.reshape(-1), flat_of_row, row_of_flat)
        state = LocalDispatch(token_of_row, rows_of_token, row_gates, gates)
        return Dispatched(x_sorted, tokens_per_expert, state)

    def combine(self, expert_out: torch.Tensor, state: LocalDispatch) -> torch.Tensor:
        if state.gates is None:
            return fan_in_rows(expert_out, state.rows_of_token, state.token_of_row, padded=False)
        weights = state.gates.to(expert_out.dtype)
        return gated_fan_in(expert_out, weights, state.rows_of_token, state.token_of_row)

    def start_dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor
    ) -> Pending[Dispatched[LocalDispatch]]:
        """Nothing to exchange: `dispatch`, already done."""
        return Pending.ready(self.dispatch(x, expert_indices, gates))

    def start_combine(self, expert_out: torch.Tensor, state: LocalDispatch) -> Pending[torch.Tensor]:
        return Pending.ready(self.combine(expert_out, state))
