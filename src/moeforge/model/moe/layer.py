"""The MoE layer: route -> dispatch -> grouped experts -> gated combine, plus shared experts.

Dropless: every token reaches its top-k experts, however unbalanced the routing. A call returns its
output together with what it measured (`MoEStats`: the balance losses and the tokens per expert);
nothing is left on the module. The four phases are methods of their own, so that a schedule can run
one micro-batch's all-to-all while another computes (`forward` is them in a row):

    routing  = layer.route(tokens)                         router: scores, top-k, gates
    sorted, per_expert, state = layer.dispatch(tokens, routing)   rows grouped by expert (maybe all-to-all)
    out      = layer.compute_experts(sorted, per_expert)   one grouped GEMM per projection
    y        = layer.combine(out, state, tokens)           gate-weighted sum back in token order + shared

`forward` runs them with the gates applied inside the experts instead (Megatron's permuted probs):
`compute_experts(sorted, per_expert, state.row_gates)` scales each row's hidden activations by its
gate, where rows are `expert_ffn_dim` wide rather than `dim` wide, and `combine(out,
state.gates_applied(), tokens)` only sums. The output is the same; the gates' gradient is a row-wise
dot over the hidden width instead of a gather of the outputs in token order.

`start_dispatch` / `start_combine` are the two exchanges left in flight (`wait()` finishes them), for
a schedule that computes something else meanwhile (parallel/overlap.py).

Two seams let `parallel/` distribute the layer without the layer knowing: `dispatcher` (local, or
the all-to-all one under expert parallelism) and `sum_over_data_parallel` (the identity, or an
all-reduce over the data-parallel ranks for the batch-wise aux loss, which counts the global batch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import nn

from moeforge.config import ConfigError, MoEConfig
from moeforge.model.mlp import SwiGLU
from moeforge.model.moe.balance import batch_aux_loss, router_z_loss, sequence_aux_loss
from moeforge.in_flight import Pending
from moeforge.model.moe.dispatch import DispatchState, Dispatched, LocalDispatcher, TokenDispatcher
from moeforge.model.moe.experts import RoutedExperts
from moeforge.model.moe.router import Router, RouterOutput


class MoEStats(NamedTuple):
    """What one MoE call measured beside its output."""

    balance_losses: dict[str, torch.Tensor]
    """the enabled balance losses by name ('seq_aux', 'batch_aux', 'z_loss'), differentiable scalars;
    empty in eval mode"""
    tokens_per_expert: torch.Tensor
    """[E] int64, the (token, expert) assignments routed to each expert by this call"""

    @property
    def balance_loss(self) -> torch.Tensor:
        """Their sum, the term to add to the training loss (a zero scalar when none is enabled)."""
        if not self.balance_losses:
            return torch.zeros((), device=self.tokens_per_expert.device)
        return torch.stack(list(self.balance_losses.values())).sum()


def _identity(counts: torch.Tensor) -> torch.Tensor:
    return counts


class MoE(nn.Module):
    """`MoE(cfg)(x [B, S, dim]) -> (y [B, S, dim], MoEStats)`."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        if cfg.dim <= 0:
            raise ConfigError(f"moe.dim: got {cfg.dim!r}; allowed: an integer >= 1 (the model width)")
        cfg.validate()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = RoutedExperts(cfg.n_experts, cfg.dim, cfg.expert_ffn_dim, cfg.backend)
        self.shared_experts = (
            SwiGLU(cfg.dim, cfg.n_shared_experts * cfg.expert_ffn_dim) if cfg.n_shared_experts else None
        )
        self.dispatcher: TokenDispatcher = LocalDispatcher(cfg.n_experts)
        self.sum_over_data_parallel: Callable[[torch.Tensor], torch.Tensor] = _identity
        """expert counts [E] -> the same summed over the data-parallel ranks (installed by `parallelize`)"""
        self.init_weights()

    def init_weights(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Normal(0, std) for the router and the input projections, Normal(0, out_std or std) for the
        output projections; the balancing bias restarts at zero."""
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        batch, seq, dim = x.shape
        tokens = x.reshape(batch * seq, dim)
        routing = self.route(tokens)
        x_sorted, tokens_per_expert, state = self.dispatch(tokens, routing)
        expert_out = self.compute_experts(x_sorted, tokens_per_expert, state.row_gates)
        out = self.combine(expert_out, state.gates_applied(), tokens)
        return out.view(batch, seq, dim), self.stats(routing, batch, seq)

    def route(self, tokens: torch.Tensor) -> RouterOutput:
        """The experts and gates of each token [N, dim]."""
        return self.router(tokens)

    def dispatch(self, tokens: torch.Tensor, routing: RouterOutput) -> Dispatched[DispatchState]:
        """(rows grouped by local expert, rows per local expert, state for `combine`); under expert
        parallelism this is where tokens leave for the ranks that own their experts."""
        return self.dispatcher.dispatch(tokens, routing.expert_indices, routing.gates)

    def compute_experts(
        self, x_sorted: torch.Tensor, tokens_per_expert: torch.Tensor, row_gates: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The routed experts' outputs on the grouped rows [R, dim], each scaled by its gate in
        `row_gates` [R] when given (then `combine` needs `state.gates_applied()`)."""
        return self.experts(x_sorted, tokens_per_expert, row_gates)

    def combine(self, expert_out: torch.Tensor, state: DispatchState, tokens: torch.Tensor) -> torch.Tensor:
        """Each token's gate-weighted expert outputs [N, dim] (brought back first under expert
        parallelism), plus the shared experts' output on `tokens`."""
        return self.add_shared_output(self.dispatcher.combine(expert_out, state), self.shared_output(tokens))

    def start_dispatch(self, tokens: torch.Tensor, routing: RouterOutput) -> Pending[Dispatched[DispatchState]]:
        """`dispatch` with its exchanges left in flight: `wait()` returns what `dispatch` returns."""
        return self.dispatcher.start_dispatch(tokens, routing.expert_indices, routing.gates)

    def start_combine(self, expert_out: torch.Tensor, state: DispatchState) -> Pending[torch.Tensor]:
        """The routed half of `combine` with its exchange left in flight: `wait()` returns the routed
        output [N, dim] (`add_shared_output` completes it)."""
        return self.dispatcher.start_combine(expert_out, state)

    def shared_output(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """The shared experts' output on tokens [N, dim] (None without shared experts)."""
        return None if self.shared_experts is None else self.shared_experts(tokens)

    @staticmethod
    def add_shared_output(routed: torch.Tensor, shared: torch.Tensor | None) -> torch.Tensor:
        return routed if shared is None else routed + shared

    def stats(self, routing: RouterOutput, batch: int, seq: int) -> MoEStats:
        counts = torch.bincount(routing.expert_indices.reshape(-1), minlength=self.cfg.n_experts)
        losses = self.balance_losses(routing, batch, seq) if self.training else {}
        return MoEStats(losses, counts)

    def balance_losses(self, routing: RouterOutput, batch: int, seq: int) -> dict[str, torch.Tensor]:
        """The enabled balance losses of this routing, by name."""
        cfg = self.cfg
        losses = {}
        if cfg.seq_aux_coef > 0:
            losses["seq_aux"] = sequence_aux_loss(
                routing.scores, routing.expert_indices, batch, seq, cfg.seq_aux_coef
            )
        if cfg.aux_coef > 0:
            losses["batch_aux"] = batch_aux_loss(
                routing.logits, routing.expert_indices, cfg.aux_coef, self.sum_over_data_parallel
            )
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = router_z_loss(routing.logits, cfg.z_loss_coef)
        return losses
