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

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moeforge.model.moe.dispatch import fan_in_rows, fan_out_rows


class ExpertParallelDispatch(NamedTuple):
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
    gate_of_sorted: torch.Tensor
    """[A] the gate of each expert-sorted assignment"""


class AllToAllDispatcher:
    """Dispatch to experts sharded contiguously over an ep process group (rank r owns experts
    [r*E/ep, (r+1)*E/ep))."""

    def __init__(self, n_experts: int, group: dist.ProcessGroup):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.n_experts = n_experts
        self.local_experts = n_experts // self.ep
        self.last_send_splits: list[int] = []
        """rows this rank sent to each ep rank by the last dispatch (for traffic figures)"""

    def dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor, gates: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, ExpertParallelDispatch]:
        n_tokens, top_k = expert_indices.shape
        rank_of_slot = torch.div(expert_indices, self.local_experts, rounding_mode="floor")
        goes_to = torch.zeros(n_tokens, self.ep, dtype=torch.bool, device=x.device)
        goes_to.scatter_(1, rank_of_slot, True)
        assignments = torch.bincount(expert_indices.reshape(-1), minlength=self.n_experts)
        send_counts = torch.cat(
            [goes_to.sum(0).unsqueeze(1), assignments.view(self.ep, self.local_experts)], 1
        )
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        tokens_per_expert = recv_counts[:, 1:].sum(0)
        sizes = torch.cat(
            [send_counts[:, 0], recv_counts[:, 0], tokens_per_expert.sum(0, keepdim=True)]
        ).tolist()
        send_splits, recv_splits, n_assignments = sizes[: self.ep], sizes[self.ep : 2 * self.ep], sizes[-1]
        self.last_send_splits = send_splits

        token_of_sent, sent_of_token, slot_served, local_expert = self._rows_to_send(
            goes_to, expert_indices, rank_of_slot, sum(send_splits)
        )
        x_sent = fan_out_rows(x, token_of_sent, sent_of_token, padded=True)
        received = all_to_all_single_autograd(x_sent, recv_splits, send_splits, self.group)
        gates_sent = fan_out_rows(gates.float(), token_of_sent, sent_of_token, padded=True) * slot_served
        # one exchange for both: expert ids are exact in fp32, and only the gates carry a gradient
        routing_sent = torch.cat([gates_sent, local_expert.float()], dim=1)
        routing_received = all_to_all_single_autograd(routing_sent, recv_splits, send_splits, self.group)
        gates_received, received_expert = routing_received.split(top_k, dim=1)
        received_expert = received_expert.detach().long()

        sort_key = torch.where(received_expert >= 0, received_expert, self.local_experts).reshape(-1)
        slot_of_sorted = torch.argsort(sort_key, stable=True)[:n_assignments]
        sorted_of_slot = torch.full_like(sort_key, n_assignments)
        sorted_of_slot[slot_of_sorted] = torch.arange(n_assignments, device=x.device)
        sorted_of_slot = sorted_of_slot.view(-1, top_k)
        received_of_sorted = torch.div(slot_of_sorted, top_k, rounding_mode="floor")
        by_expert = fan_out_rows(received, received_of_sorted, sorted_of_slot, padded=True)
        gate_of_sorted = gates_received.reshape(-1).index_select(0, slot_of_sorted)
        state = ExpertParallelDispatch(
            token_of_sent,
            sent_of_token,
            send_splits,
            recv_splits,
            received_of_sorted,
            sorted_of_slot,
            gate_of_sorted,
        )
        return by_expert, tokens_per_expert, state

    def _rows_to_send(
        self, goes_to: torch.Tensor, expert_indices: torch.Tensor, rank_of_slot: torch.Tensor, n_sent: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The (token, rank) rows, ordered by rank then token: (token of each row [S], row of each
        (token, rank) [N, ep] (S = not sent), slots each row serves [S, k], their local expert or -1)."""
        n_tokens = goes_to.shape[0]
        not_sent = (~goes_to).t().reshape(-1).to(torch.uint8)
        flat = torch.argsort(not_sent, stable=True)[:n_sent]
        rank_of_sent = torch.div(flat, n_tokens, rounding_mode="floor")
        token_of_sent = flat - rank_of_sent * n_tokens
        sent_of_token = torch.full((n_tokens, self.ep), n_sent, dtype=torch.long, device=goes_to.device)
        sent_of_token[token_of_sent, rank_of_sent] = torch.arange(n_sent, device=goes_to.device)
        slot_served = rank_of_slot.index_select(0, token_of_sent) == rank_of_sent.unsqueeze(1)
        first_local = rank_of_sent.unsqueeze(1) * self.local_experts
        local_expert = torch.where(
            slot_served, expert_indices.index_select(0, token_of_sent) - first_local, -1
        )
        return token_of_sent, sent_of_token, slot_served, local_expert

    def combine(self, expert_out: torch.Tensor, state: ExpertParallelDispatch) -> torch.Tensor:
        weighted = expert_out * state.gate_of_sorted.to(expert_out.dtype).unsqueeze(1)
        per_received = fan_in_rows(weighted, state.sorted_of_slot, state.received_of_sorted)
        returned = all_to_all_single_autograd(per_received, state.send_splits, state.recv_splits, self.group)
        return fan_in_rows(returned, state.sent_of_token, state.token_of_sent)
