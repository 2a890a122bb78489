"""Expert parallelism: experts live on different ranks of the `ep` mesh dim and tokens travel to them.

`AllToAllDispatcher` has the interface of `LocalDispatcher` (model/moe/dispatch.py), so the MoE layer
does not know whether its experts are local. A token goes to each rank that owns one of its top-k
experts *once*, however many of its experts live there (DeepSeek-V3 §3.2.2 sends a token once per
node, then fans it out): with node-limited routing a token's experts sit on at most M nodes, so it
crosses at most M node boundaries instead of up to k.

    dispatch:  rows to send = (token, destination rank) pairs, ordered by rank then token
               -> exchange counts (one small all-to-all; the only host sync: split sizes)
               -> all-to-all the rows, and in a second one each row's k gates and local experts
                  (-1 / gate 0 for slots served elsewhere)
               -> on the receiver, copy each row once per local expert it serves, grouped by expert
    combine:   the receiver sums each row's gate-weighted expert outputs and sends one row back per
               (token, rank); the sender adds a token's rows.

Dropless: any rank may receive any number of rows, zero included, from any rank. Every gather with
repeated rows has a slot-ordered backward (no atomics), so a run stays bit-reproducible.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch
import torch.distributed as dist

from moeforge.in_flight import AllToAllTimes, Pending
from moeforge.model.moe.dispatch import Dispatched
from moeforge.model.moe.experts import RoutedExperts
from moeforge.model.moe.row_gathers import fan_in_rows, fan_out_rows
from moeforge.parallel.async_all_to_all import start_all_to_all


class ExpertParallelDispatch(NamedTuple):
    """How `AllToAllDispatcher.dispatch` sent the tokens and grouped the received rows (a
    `DispatchState`): what `combine` needs to send the expert outputs back and sum them per token."""

    token_of_sent: torch.Tensor
    """[S] the token of each sent row (rows ordered by destination rank, then token)"""
    sent_of_token: torch.Tensor
    """[N, ep] the sent row of (token, rank), or S where the token does not go to that rank"""
    send_splits: list[int]
    """rows sent to each ep rank"""
    recv_splits: list[int]
    """rows received from each ep rank"""
    received_of_sorted: torch.Tensor
    """[A] the received row behind each expert-sorted assignment on this rank"""
    sorted_of_slot: torch.Tensor
    """[M, k] the expert-sorted assignment of each received row's slot, A where it is served elsewhere"""
    gate_of_sorted: torch.Tensor | None
    """[A] the gate of each expert-sorted assignment; None once the experts applied them"""

    @property
    def row_gates(self) -> torch.Tensor:
        """[A] the gates of the rows `dispatch` returned, for experts that apply them."""
        assert self.gate_of_sorted is not None, "the gates were applied already"
        return self.gate_of_sorted

    def gates_applied(self) -> ExpertParallelDispatch:
        """This state for expert outputs already scaled by `row_gates`: `combine` then only sums."""
        return self._replace(gate_of_sorted=None)


class _CountsExchanged(NamedTuple):
    """What the counts all-to-all settles: the split sizes of every later exchange."""

    send_splits: list[int]
    """rows this rank sends to each ep rank"""
    recv_splits: list[int]
    """rows this rank receives from each ep rank"""
    tokens_per_expert: torch.Tensor
    """[E/ep] assignments this rank's local experts receive, from all ranks"""
    n_assignments: int
    """their sum"""


class _RowsToSend(NamedTuple):
    """One row per (token, destination rank), ordered by rank then token (S rows)."""

    token_of_sent: torch.Tensor
    """[S] the token of each row"""
    sent_of_token: torch.Tensor
    """[N, ep] the row of (token, rank), or S where the token does not go to that rank"""
    slot_served: torch.Tensor
    """[S, k] whether each of the token's k slots is served by the row's rank"""
    local_expert: torch.Tensor
    """[S, k] the slot's expert numbered within the destination rank, or -1 where served elsewhere"""


class RecordedExchange(NamedTuple):
    """One exchange of a dispatcher that has a recorder: what it carried and when."""

    kind: str
    """counts (blocking, forward only), dispatch (rows), dispatch routing (gates, expert ids) or combine"""
    times: AllToAllTimes
    """issue and wait; the backward fields fill in when backward reaches the exchange"""


class AllToAllDispatcher:
    """Dispatch to experts sharded contiguously over an ep process group (rank r owns experts
    [r*E/ep, (r+1)*E/ep))."""

    def __init__(self, n_experts: int, group: dist.ProcessGroup):
        self.group = group
        self.grad_group: dist.ProcessGroup | None = None
        """the group of the backward's exchanges, over the same ranks; None: `group` (a second one
        lets a backward run while a forward does, see `overlap_forward_and_backward`)"""
        self.recorder: list[RecordedExchange] | None = None
        """None: nothing is recorded. A list: every exchange is appended to it when issued, with its
        issue and waits timed (a benchmark's timeline, `moeforge bench pp --ep`)"""
        self.ep = dist.get_world_size(group)
        self.n_experts = n_experts
        self.local_experts = n_experts // self.ep

    def dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor
    ) -> Dispatched[ExpertParallelDispatch]:
        """`start_dispatch`, waited on at once: the rows and their routing travel together."""
        return self.start_dispatch(x, expert_indices, gates).wait()

    def start_dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor
    ) -> Pending[Dispatched[ExpertParallelDispatch]]:
        """A dispatch with its two row exchanges left in flight; `wait()` returns the rows grouped by
        local expert, the tokens per local expert and the state `combine` needs. The counts
        exchange still blocks: its sizes are needed to issue the others."""
        # 1-2. Where each token goes, and the split sizes (`_plan_dispatch`).
        counts, rows = self._plan_dispatch(x, expert_indices)
        # 3. Send each row once, then its k gates and local expert ids (-1 / gate 0: served elsewhere).
        splits = (counts.recv_splits, counts.send_splits, self.group, self.grad_group)
        received = start_all_to_all(fan_out_rows(x, rows.token_of_sent, rows.sent_of_token, padded=True), *splits)
        routing_received = start_all_to_all(self._routing_to_send(gates, rows), *splits)
        self._record("dispatch", received.times)
        self._record("dispatch routing", routing_received.times)

        def finish() -> Dispatched[ExpertParallelDispatch]:
            return self._group_by_expert(received.wait(), routing_received.wait(), rows, counts)

        return Pending(finish, (received.times, routing_received.times))

    def combine(self, expert_out: torch.Tensor, state: ExpertParallelDispatch) -> torch.Tensor:
        """`start_combine`, waited on at once."""
        return self.start_combine(expert_out, state).wait()

    def start_combine(self, expert_out: torch.Tensor, state: ExpertParallelDispatch) -> Pending[torch.Tensor]:
        """A combine with its exchange left in flight: the receiver sums each row's gate-weighted
        expert outputs and sends one row back per (token, rank); `wait()` adds up a token's rows."""
        per_received = self._sum_per_received_row(expert_out, state)
        returned = start_all_to_all(per_received, state.send_splits, state.recv_splits, self.group, self.grad_group)
        self._record("combine", returned.times)

        def finish() -> torch.Tensor:
            return fan_in_rows(returned.wait(), state.sent_of_token, state.token_of_sent)

        return Pending(finish, (returned.times,))

    def _plan_dispatch(self, x: torch.Tensor, expert_indices: torch.Tensor) -> tuple[_CountsExchanged, _RowsToSend]:
        """Steps 1-2 of a dispatch: the split sizes of its exchanges and the rows to send."""
        # 1. Where each token goes: the ranks that own at least one of its k experts.
        rank_of_slot = torch.div(expert_indices, self.local_experts, rounding_mode="floor")
        goes_to = torch.zeros(expert_indices.shape[0], self.ep, dtype=torch.bool, device=x.device)
        goes_to.scatter_(1, rank_of_slot, True)
        # 2. Exchange counts (rows each way, assignments per local expert): the split sizes.
        counts = self._exchange_counts(goes_to, expert_indices)
        return counts, self._rows_to_send(goes_to, expert_indices, rank_of_slot, sum(counts.send_splits))

    def _group_by_expert(
        self, received: torch.Tensor, routing_received: torch.Tensor, rows: _RowsToSend, counts: _CountsExchanged
    ) -> Dispatched[ExpertParallelDispatch]:
        """Step 4 of a dispatch, on the receiver: copy each received row [M, D] once per local expert
        it serves, grouped by expert; `routing_received` [M, 2k] is each row's k gates, then its k
        local expert ids (-1 where served elsewhere)."""
        top_k = routing_received.shape[1] // 2
        gates_received, received_expert = routing_received.split(top_k, dim=1)
        received_expert = received_expert.detach().long()
        sort_key = torch.where(received_expert >= 0, received_expert, self.local_experts).reshape(-1)
        slot_of_sorted = torch.argsort(sort_key, stable=True)[: counts.n_assignments]
        sorted_of_slot = torch.full_like(sort_key, counts.n_assignments)
        sorted_of_slot[slot_of_sorted] = torch.arange(counts.n_assignments, device=received.device)
        sorted_of_slot = sorted_of_slot.view(-1, top_k)
        received_of_sorted = torch.div(slot_of_sorted, top_k, rounding_mode="floor")
        by_expert = fan_out_rows(received, received_of_sorted, sorted_of_slot, padded=True)
        state = ExpertParallelDispatch(
            rows.token_of_sent,
            rows.sent_of_token,
            counts.send_splits,
            counts.recv_splits,
            received_of_sorted,
            sorted_of_slot,
            gates_received.reshape(-1).index_select(0, slot_of_sorted),
        )
        return Dispatched(by_expert, counts.tokens_per_expert, state)

    def _sum_per_received_row(self, expert_out: torch.Tensor, state: ExpertParallelDispatch) -> torch.Tensor:
        """The gate-weighted sum of each received row's expert outputs, [M, D] (a plain sum when the
        experts applied the gates)."""
        if state.gate_of_sorted is not None:
            expert_out = expert_out * state.gate_of_sorted.to(expert_out.dtype).unsqueeze(1)
        return fan_in_rows(expert_out, state.sorted_of_slot, state.received_of_sorted)

    def _exchange_counts(self, goes_to: torch.Tensor, expert_indices: torch.Tensor) -> _CountsExchanged:
        """One small all-to-all of [rows, assignments per local expert] per destination rank; its
        sizes come to the host (the dispatcher's one sync)."""
        assignments = torch.bincount(expert_indices.reshape(-1), minlength=self.n_experts)
        send_counts = torch.cat(
            [goes_to.sum(0).unsqueeze(1), assignments.view(self.ep, self.local_experts)], 1
        )
        recv_counts = torch.empty_like(send_counts)
        issued = time.perf_counter() if self.recorder is not None else 0.0
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        if self.recorder is not None:  # blocking: issued and waited on at once
            self._record("counts", AllToAllTimes(issued, issued, time.perf_counter()))
        tokens_per_expert = recv_counts[:, 1:].sum(0)
        sizes = torch.cat(
            [send_counts[:, 0], recv_counts[:, 0], tokens_per_expert.sum(0, keepdim=True)]
        ).tolist()
        return _CountsExchanged(sizes[: self.ep], sizes[self.ep : 2 * self.ep], tokens_per_expert, sizes[-1])

    def _rows_to_send(
        self, goes_to: torch.Tensor, expert_indices: torch.Tensor, rank_of_slot: torch.Tensor, n_sent: int
    ) -> _RowsToSend:
        n_tokens = goes_to.shape[0]
        not_sent = (~goes_to).t().reshape(-1).to(torch.uint8)
        flat = torch.argsort(not_sent, stable=True)[:n_sent]  # (rank, token) pairs sent, rank-major
        rank_of_sent = torch.div(flat, n_tokens, rounding_mode="floor")
        token_of_sent = flat - rank_of_sent * n_tokens
        sent_of_token = torch.full((n_tokens, self.ep), n_sent, dtype=torch.long, device=goes_to.device)
        sent_of_token[token_of_sent, rank_of_sent] = torch.arange(n_sent, device=goes_to.device)
        slot_served = rank_of_slot.index_select(0, token_of_sent) == rank_of_sent.unsqueeze(1)
        first_local = rank_of_sent.unsqueeze(1) * self.local_experts
        local_expert = torch.where(
            slot_served, expert_indices.index_select(0, token_of_sent) - first_local, -1
        )
        return _RowsToSend(token_of_sent, sent_of_token, slot_served, local_expert)

    def _routing_to_send(self, gates: torch.Tensor, rows: _RowsToSend) -> torch.Tensor:
        """[S, 2k]: each sent row's k gates (0 where served elsewhere), then its k local expert ids,
        for one exchange: expert ids are exact in fp32, and only the gates carry a gradient."""
        gates_sent = fan_out_rows(gates.float(), rows.token_of_sent, rows.sent_of_token, padded=True)
        return torch.cat([gates_sent * rows.slot_served, rows.local_expert.float()], dim=1)

    def _record(self, kind: str, times: AllToAllTimes) -> None:
        if self.recorder is not None:
            self.recorder.append(RecordedExchange(kind, times))


class ExpertParallelExperts(RoutedExperts):
    """`RoutedExperts` whose weights are DTensors sharded over ep, with their gradients scaled by
    1/ep (the reason: parallelize.py's docstring). `parallelize` turns a layer's experts into this
    class in place, as FSDP2's `fully_shard` does with its own classes."""

    ep_size: int

    def local_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        w13, w2 = super().local_weights()
        scale = 1.0 / self.ep_size
        return _ScaleGradient.apply(w13, scale), _ScaleGradient.apply(w2, scale)


class _ScaleGradient(torch.autograd.Function):
    """Identity forward; multiplies the gradient by `scale` in backward."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None
