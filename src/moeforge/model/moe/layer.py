"""The MoE layer: router -> dispatch -> grouped experts -> gated combine, plus shared experts.

Dropless: every token reaches its top-k experts, however unbalanced the routing. The balance
losses, the load of the call and the running load for the aux-loss-free bias update are left on
the module after each forward, for the trainer to read.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from moeforge.config import ConfigError, MoEConfig
from moeforge.model.mlp import SwiGLU
from moeforge.model.moe.balance import batch_aux_loss, router_z_loss, sequence_aux_loss
from moeforge.model.moe.dispatch import LocalDispatcher, TokenDispatcher
from moeforge.model.moe.experts import RoutedExperts
from moeforge.model.moe.router import Router, RouterOutput


class MoE(nn.Module):
    """`MoE(cfg)(x [B, S, dim]) -> [B, S, dim]`.

    After each call:
    - `aux_loss`: scalar tensor, the sum of the enabled balance losses (seq-aux, batch-aux, z-loss);
      computed in training mode only, a zero tensor otherwise or when all are off. Add it to the loss.
    - `aux_losses`: {'seq_aux' | 'batch_aux' | 'z_loss': detached scalar} for logging.
    - `last_load`: [E] int64 tokens routed to each expert by this call.
    In training mode the counts also accumulate in the buffer `tokens_per_expert_accum`, consumed by
    `balance.update_biases_and_collect_load` after each optimizer step (activation checkpointing
    that recomputes this forward counts twice, which leaves the sign-based bias update unchanged).
    `dispatcher` is the seam for expert parallelism: swap in one with the same interface.
    """

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
        self.load_group: dist.ProcessGroup | None = None
        """the data-parallel group whose global batch the batch aux loss counts (set by `parallelize`)"""
        self.register_buffer(
            "tokens_per_expert_accum", torch.zeros(cfg.n_experts, dtype=torch.int64), persistent=False
        )
        self.aux_loss = torch.zeros(())
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.last_load = torch.zeros(cfg.n_experts, dtype=torch.int64)
        self.init_weights()

    def init_weights(self, std: float = 0.02, out_std: float | None = None) -> None:
        """Normal(0, std) for the router and the input projections, Normal(0, out_std or std) for the
        output projections; the balancing bias and load counters restart at zero."""
        self.router.init_weights(std)
        self.experts.init_weights(std, out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(std, out_std)
        self.tokens_per_expert_accum.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, seq, dim = x.shape
        tokens = x.reshape(batch * seq, dim)
        routing = self.router(tokens)
        self.record_load(routing.expert_indices)
        x_sorted, tokens_per_expert, state = self.dispatcher.dispatch(tokens, routing.expert_indices, routing.gates)
        expert_out = self.experts(x_sorted, tokens_per_expert)
        out = self.dispatcher.combine(expert_out, state)
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens)
        self.set_aux_losses(routing, batch, seq)
        return out.view(batch, seq, dim)

    @torch.no_grad()
    def record_load(self, expert_indices: torch.Tensor) -> None:
        self.last_load = torch.bincount(expert_indices.reshape(-1), minlength=self.cfg.n_experts)
        if self.training:
            self.tokens_per_expert_accum += self.last_load

    def set_aux_losses(self, routing: RouterOutput, batch: int, seq: int) -> None:
        losses = self.balance_losses(routing, batch, seq) if self.training else {}
        zero = torch.zeros((), device=routing.scores.device)
        self.aux_loss = torch.stack(list(losses.values())).sum() if losses else zero
        self.aux_losses = {name: loss.detach() for name, loss in losses.items()}

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
                routing.logits, routing.expert_indices, cfg.aux_coef, self.load_group
            )
        if cfg.z_loss_coef > 0:
            losses["z_loss"] = router_z_loss(routing.logits, cfg.z_loss_coef)
        return losses
