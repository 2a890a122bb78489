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

from typing import Any, NamedTuple, Protocol

import torch


class TokenDispatcher(Protocol):
    def dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """(rows grouped by expert [R, D], rows per local expert [E_local], state for `combine`)."""
        ...

    def combine(self, expert_out: torch.Tensor, gates: torch.Tensor, state: Any) -> torch.Tensor:
        """Gate-weighted sum over each token's k expert outputs, [N, D] in the original token order."""
        ...


class LocalDispatch(NamedTuple):
    """How `LocalDispatcher.dispatch` permuted the N*k assignments (flat index = token*k + slot)."""

    flat_of_sorted: torch.Tensor
    """[N*k] the flat assignment each sorted row came from"""
    sorted_of_flat: torch.Tensor
    """[N*k] the sorted row of each flat assignment (inverse permutation)"""


class LocalDispatcher:
    """Sort-by-expert dispatch and gather-back combine, with all experts on this device."""

    def __init__(self, n_experts: int):
        self.n_experts = n_experts

    def dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, LocalDispatch]:
        flat_experts = expert_indices.reshape(-1)
        flat_of_sorted = torch.argsort(flat_experts, stable=True)
        sorted_of_flat = inverse_permutation(flat_of_sorted)
        tokens_per_expert = torch.bincount(flat_experts, minlength=self.n_experts)
        x_sorted = _GatherAssignments.apply(x, flat_of_sorted, sorted_of_flat, expert_indices.shape[1])
        return x_sorted, tokens_per_expert, LocalDispatch(flat_of_sorted, sorted_of_flat)

    def combine(self, expert_out: torch.Tensor, gates: torch.Tensor, state: LocalDispatch) -> torch.Tensor:
        n_tokens, top_k = gates.shape
        per_token = _PermuteRows.apply(expert_out, state.sorted_of_flat, state.flat_of_sorted)
        per_token = per_token.view(n_tokens, top_k, -1)
        return torch.bmm(gates.to(per_token.dtype).unsqueeze(1), per_token).squeeze(1)


def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inv with inv[perm[i]] = i."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel(), device=perm.device)
    return inverse


class _GatherAssignments(torch.autograd.Function):
    """Row `flat_of_sorted[r] // k` of x for each sorted row r, [N*k, D].

    The default backward of such a gather is an index_add_ with k writers per token row, which uses
    atomics on CUDA; this one gathers each token's k gradient rows and adds them in slot order.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        x: torch.Tensor,
        flat_of_sorted: torch.Tensor,
        sorted_of_flat: torch.Tensor,
        top_k: int,
    ) -> torch.Tensor:
        ctx.save_for_backward(sorted_of_flat)
        ctx.top_k = top_k
        return x.index_select(0, flat_of_sorted // top_k)

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        (sorted_of_flat,) = ctx.saved_tensors
        rows_of_slot = sorted_of_flat.view(-1, ctx.top_k)
        grad_x = grad.index_select(0, rows_of_slot[:, 0])
        for slot in range(1, ctx.top_k):
            grad_x += grad.index_select(0, rows_of_slot[:, slot])
        return grad_x, None, None, None


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
