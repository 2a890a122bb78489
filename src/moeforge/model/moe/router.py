"""The token router: scores, bias-for-selection, group-limited top-k, gates (DeepSeek-V3 §2.1.2).

scores s = sigmoid(x W^T) or softmax(x W^T), always in fp32. The experts of a token are the top-k
of (s + b), where b is the aux-loss-free balancing bias: b only decides *which* experts are chosen,
the gate of a chosen expert is its plain score s, optionally normalised over the chosen experts and
multiplied by `route_scale`. With group-limited routing the experts are split into `n_groups`
groups, a group scores the sum of its top-2 (s + b), and only the best `topk_groups` groups are
eligible for the top-k.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from moeforge.config import MoEConfig

# Keeps the gate normalisation finite when every selected sigmoid score underflows to 0.
_NORM_EPS = 1e-20


class RouterOutput(NamedTuple):
    expert_indices: torch.Tensor
    """[N, k] int64, the chosen experts of each token (best first by s + b)"""
    gates: torch.Tensor
    """[N, k] fp32, the weight of each chosen expert's output"""
    scores: torch.Tensor
    """[N, E] fp32, sigmoid/softmax scores of all experts (no bias)"""
    logits: torch.Tensor
    """[N, E] fp32, x W^T"""


class Router(nn.Module):
    """`Router(cfg)(x [N, dim]) -> RouterOutput`; `expert_bias` is the checkpointed balancing bias."""

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.n_experts = cfg.n_experts
        self.top_k = cfg.top_k
        self.score_func = cfg.score_func
        self.route_norm = cfg.route_norm
        self.route_scale = cfg.route_scale
        self.n_groups = cfg.n_groups
        self.topk_groups = cfg.topk_groups
        self.jitter = cfg.jitter
        self.weight = nn.Parameter(torch.empty(cfg.n_experts, cfg.dim))
        self.register_buffer("expert_bias", torch.zeros(cfg.n_experts, dtype=torch.float32))

    def init_weights(self, std: float) -> None:
        """Normal(0, std) weights; the bias restarts at zero (also initialises a meta-device build)."""
        nn.init.normal_(self.weight, std=std)
        self.expert_bias.zero_()

    def forward(self, x: torch.Tensor) -> RouterOutput:
        logits = self.router_logits(x)
        scores = logits.sigmoid() if self.score_func == "sigmoid" else logits.softmax(dim=-1)
        expert_indices = self.select_experts(scores.detach())
        return RouterOutput(expert_indices, self.gates(scores, expert_indices), scores, logits)

    def router_logits(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T in fp32 (autocast off: bf16 logits would flip near-tied selections), [N, E]."""
        if self.training and self.jitter > 0:
            x = x * torch.empty_like(x).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.linear(x.float(), self.weight.float())

    def select_experts(self, scores: torch.Tensor) -> torch.Tensor:
        """Top-k of (scores + bias), only inside the top groups when routing is group-limited, [N, k]."""
        biased = scores + self.expert_bias
        if self.n_groups > 1:
            biased = self.mask_outside_top_groups(biased)
        return biased.topk(self.top_k, dim=-1).indices

    def mask_outside_top_groups(self, biased: torch.Tensor) -> torch.Tensor:
        """`biased` with -inf on every expert outside the token's `topk_groups` best groups."""
        grouped = biased.view(biased.shape[0], self.n_groups, -1)
        if grouped.shape[-1] == 1:
            group_scores = grouped.amax(dim=-1)
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        kept = group_scores.topk(self.topk_groups, dim=-1).indices
        dropped = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)
        return grouped.masked_fill(dropped.unsqueeze(-1), float("-inf")).view_as(biased)

    def gates(self, scores: torch.Tensor, expert_indices: torch.Tensor) -> torch.Tensor:
        """Scores of the chosen experts, normalised over them if `route_norm`, times `route_scale`."""
        gates = scores.gather(1, expert_indices)
        if self.route_norm:
            gates = gates / (gates.sum(dim=-1, keepdim=True) + _NORM_EPS)
        return gates * self.route_scale
