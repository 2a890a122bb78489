"""Expert parallelism: experts live on different ranks of the `ep` mesh dim and tokens travel to them.

`AllToAllDispatcher` has the interface of `LocalDispatcher` (model/moe/dispatch.py), so the MoE layer
does not know whether its experts are local:

    dispatch:  sort the N*k assignments by global expert (LocalDispatcher)
               -> exchange per-expert counts (one small all-to-all; the only host sync: split sizes)
               -> all-to-all the rows: each rank receives the rows of its own E/ep experts
               -> regroup the received rows, which arrive ordered (source rank, expert), by expert
    combine:   the exact reverse, then LocalDispatcher's gate-weighted combine.

Dropless: any rank may receive any number of rows, zero included, from any rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd

from moeforge.model.moe.dispatch import LocalDispatch, LocalDispatcher, _PermuteRows, inverse_permutation


class ExpertParallelDispatch(NamedTuple):
    local: LocalDispatch
    """how this rank's own assignments were sorted by global expert"""
    send_splits: list[int]
    """rows sent to each ep rank"""
    recv_splits: list[int]
    """rows received from each ep rank"""
    expert_of_received: torch.Tensor
    """[R] permutation putting the received rows (source-major) in local-expert order"""
    received_of_expert: torch.Tensor
    """[R] its inverse"""


class AllToAllDispatcher:
    """Dispatch to experts sharded contiguously over an ep process group (rank r owns experts
    [r*E/ep, (r+1)*E/ep))."""

    def __init__(self, n_experts: int, group: dist.ProcessGroup):
        self.group = group
        self.ep = dist.get_world_size(group)
        self.n_experts = n_experts
        self.local_experts = n_experts // self.ep
        self._local = LocalDispatcher(n_experts)

    def dispatch(
        self, x: torch.Tensor, expert_indices: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, ExpertParallelDispatch]:
        x_sorted, tokens_per_expert, local = self._local.dispatch(x, expert_indices)
        send_counts = tokens_per_expert.view(self.ep, self.local_experts)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group)
        splits = torch.stack([send_counts.sum(1), recv_counts.sum(1)]).tolist()
        send_splits, recv_splits = splits[0], splits[1]
        received = all_to_all_single_autograd(x_sorted, recv_splits, send_splits, self.group)
        expert_of_received = _source_major_to_expert_major(recv_counts)
        received_of_expert = inverse_permutation(expert_of_received)
        by_expert = _PermuteRows.apply(received, expert_of_received, received_of_expert)
        state = ExpertParallelDispatch(local, send_splits, recv_splits, expert_of_received, received_of_expert)
        return by_expert, recv_counts.sum(0), state

    def combine(self, expert_out: torch.Tensor, gates: torch.Tensor, state: ExpertParallelDispatch) -> torch.Tensor:
        source_major = _PermuteRows.apply(expert_out, state.received_of_expert, state.expert_of_received)
        returned = all_to_all_single_autograd(source_major, state.send_splits, state.recv_splits, self.group)
        return self._local.combine(returned, gates, state.local)


def _source_major_to_expert_major(recv_counts: torch.Tensor) -> torch.Tensor:
    """The permutation that reorders rows laid out (source rank, local expert) as (local expert, source).

    recv_counts [ep, E_local] is the number of rows each source sent to each local expert.
    """
    ep, local_experts = recv_counts.shape
    expert_ids = torch.arange(local_experts, device=recv_counts.device).repeat(ep)
    expert_of_row = torch.repeat_interleave(expert_ids, recv_counts.reshape(-1))
    return torch.argsort(expert_of_row, stable=True)
