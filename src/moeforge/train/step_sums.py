"""One optimizer step's sums, kept on the device until the step's single trip to the host.

Every micro-batch adds its losses and expert counts here (under pipelining, each rank the parts its
stages computed: the losses on the last stage's rank, each MoE layer's counts where it runs; the
layout is the same on every rank, zeros where a rank has nothing, so one sum over the ranks of the
pipeline and of data parallelism completes it); `packed` lays them out (with the stop
request, so every rank stops at the same step) for the trainer's one all-reduce, and `to_host` brings
the reduced vector and the gradient norm over in one transfer. Nothing here reads a tensor's value in between: on a GPU
the step is one device-to-host sync, not one per layer or micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
import torch

from moeforge.model.moe import MoEStats
from moeforge.model.transformer import ModelOutput
from moeforge.train.losses import TrainingLosses


@dataclass
class HostStep:
    """The step's figures on the host, averaged over the ranks (expert counts: summed)."""

    lm_loss: float
    balance_loss: float
    mtp_loss: float
    balance_parts: dict[str, float]
    mtp_depths: list[float]
    load: list[list[int]]
    """[L][E] tokens per expert of each MoE layer over the global batch"""
    grad_norm: float
    stop_requested: bool
    """some rank received SIGTERM/SIGINT"""


@dataclass
class StepSums:
    """Sums over the micro-batches of one step, each micro-batch weighted 1/n_micro."""

    n_micro: int
    device: torch.device
    balance_names: tuple[str, ...]
    """the balance losses the MoE layers compute, in their order ('seq_aux', 'batch_aux', 'z_loss')"""
    mtp_depth: int
    load_shape: tuple[int, int]
    """(MoE layers of the whole model, MTP modules' included; experts)"""
    lm: torch.Tensor = field(init=False)
    balance: torch.Tensor = field(init=False)
    mtp: torch.Tensor = field(init=False)
    balance_parts: dict[str, torch.Tensor] = field(init=False)
    mtp_depths: list[torch.Tensor] = field(init=False)
    load: torch.Tensor = field(init=False)
    """[L, E] int64"""

    def __post_init__(self) -> None:
        self.lm, self.balance, self.mtp = (torch.zeros((), device=self.device) for _ in range(3))
        self.balance_parts = {name: self._zero() for name in self.balance_names}
        self.mtp_depths = [self._zero() for _ in range(self.mtp_depth)]
        self.load = torch.zeros(self.load_shape, dtype=torch.int64, device=self.device)

    def _zero(self) -> torch.Tensor:
        return torch.zeros((), dtype=torch.float64, device=self.device)

    def add(self, losses: TrainingLosses, out: ModelOutput) -> None:
        """One micro-batch of the whole model: its losses (detached) and its MoE layers' counts."""
        self.add_losses(losses)
        self.balance += losses.balance.detach() / self.n_micro
        for stats in out.moe_stats:
            self._add_balance_parts(stats)
        self.load += out.load

    def add_losses(self, losses: TrainingLosses) -> None:
        """One micro-batch's language-model and MTP losses (the last pipeline stage's part)."""
        self.lm += losses.lm.detach() / self.n_micro
        self.mtp += losses.mtp.detach() / self.n_micro
        for depth, loss in enumerate(losses.mtp_depths):
            self.mtp_depths[depth] += loss.detach().double() / self.n_micro

    def add_moe_stats(self, row: int, stats: MoEStats) -> None:
        """One micro-batch's call of MoE layer `row` (a pipeline stage's part)."""
        self.balance += stats.balance_loss.detach() / self.n_micro
        self._add_balance_parts(stats)
        self.load[row] += stats.tokens_per_expert

    def _add_balance_parts(self, stats: MoEStats) -> None:
        for name, loss in stats.balance_losses.items():
            self.balance_parts[name] += loss.detach().double() / self.n_micro

    def packed(self, stop_requested: bool) -> torch.Tensor:
        """Everything to sum over the ranks, as one float64 vector (counts are exact in float64)."""
        load = self.load
        head = torch.stack([self.lm, self.balance, self.mtp]).double()
        flag = torch.tensor([float(stop_requested)], dtype=torch.float64, device=self.device)
        parts = [*self.balance_parts.values(), *self.mtp_depths]
        tail = torch.stack(parts) if parts else head.new_zeros(0)
        return torch.cat([head, flag, tail, load.reshape(-1).double()])

    def load_rows(self, packed: torch.Tensor) -> torch.Tensor:
        """The [L, E] expert counts of a (reduced) `packed` vector, still on the device."""
        n_layers, n_experts = self.load_shape
        return packed[packed.numel() - n_layers * n_experts :].view(n_layers, n_experts)

    def to_host(self, reduced: torch.Tensor, grad_norm: torch.Tensor, world_size: int) -> HostStep:
        """The step's one device-to-host transfer: the reduced vector and the gradient norm."""
        values: list[float] = torch.cat([reduced, grad_norm.reshape(1).double()]).tolist()
        n_parts, n_depths = len(self.balance_parts), len(self.mtp_depths)
        means = [value / world_size for value in values[: 4 + n_parts + n_depths]]
        counts = [int(value) for value in values[4 + n_parts + n_depths : -1]]
        n_experts = max(1, self.load_shape[1])
        return HostStep(
            lm_loss=means[0],
            balance_loss=means[1],
            mtp_loss=means[2],
            balance_parts=dict(zip(self.balance_parts, means[4 : 4 + n_parts])),
            mtp_depths=means[4 + n_parts :],
            load=[counts[i : i + n_experts] for i in range(0, len(counts), n_experts)],
            grad_norm=values[-1],
            stop_requested=values[3] > 0,
        )
