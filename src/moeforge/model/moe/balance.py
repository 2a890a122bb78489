"""Expert load balancing: aux losses, the aux-loss-free bias update and load statistics, in one place.

- `sequence_aux_loss`: DeepSeek-V3's complementary sequence-wise balance loss (eqs. 17-20).
- `batch_aux_loss`: the classic Switch/GShard load-balancing loss over the whole batch.
- `router_z_loss`: ST-MoE's penalty on large router logits.
- `update_expert_bias`: DeepSeek-V3's auxiliary-loss-free balancing, b_i += gamma*sign(mean(c) - c_i).
- `load_stats`: per-layer load metrics from the counts of one step.

Everything here is single-device arithmetic; the trainer sums the counts over the ranks first.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch


def sequence_aux_loss(
    scores: torch.Tensor, expert_indices: torch.Tensor, batch: int, seq: int, alpha: float
) -> torch.Tensor:
    """alpha * sum_i f_i * P_i per sequence, averaged over the sequences (DeepSeek-V3 eqs. 17-20).

    f_i = E/(K*T) * #{t : i in topk(t)} (eq. 18), s'_{i,t} = s_{i,t} / sum_j s_{j,t} (eq. 19),
    P_i = mean_t s'_{i,t} (eq. 20). `scores` [B*S, E] are the router scores of all experts (no bias);
    only P carries gradient.
    """
    n_experts, top_k = scores.shape[1], expert_indices.shape[1]
    f = assignment_counts_per_sequence(expert_indices, batch, n_experts).float() * (n_experts / (top_k * seq))
    normalised = scores / scores.sum(dim=-1, keepdim=True)
    p = normalised.view(batch, seq, n_experts).mean(dim=1)
    return alpha * (f * p).sum(dim=-1).mean()


def assignment_counts_per_sequence(expert_indices: torch.Tensor, batch: int, n_experts: int) -> torch.Tensor:
    """[B, E] int64: how many tokens of each sequence chose each expert."""
    per_sequence = expert_indices.reshape(batch, -1)
    offsets = torch.arange(batch, device=expert_indices.device).unsqueeze(1) * n_experts
    counts = torch.bincount((per_sequence + offsets).reshape(-1), minlength=batch * n_experts)
    return counts.view(batch, n_experts)


def batch_aux_loss(
    logits: torch.Tensor,
    expert_indices: torch.Tensor,
    alpha: float,
    sum_over_data_parallel: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """alpha * E * sum_i f_i * P_i over the whole batch (Switch Transformer eq. 4, GShard).

    f_i is the fraction of the N*k assignments that went to expert i, so a perfectly balanced
    router scores exactly alpha. P_i is the mean over tokens of softmax(logits)_i: the loss needs a
    probability over experts, which sigmoid scores are not, so softmax is used whatever the score
    function. Under data parallelism `sum_over_data_parallel` sums the counts over the ranks: f then
    counts the global batch (it carries no gradient), and averaging the ranks' gradients of the local
    P gives the global loss's gradient.
    """
    n_experts = logits.shape[1]
    counts = torch.bincount(expert_indices.reshape(-1), minlength=n_experts).float()
    if sum_over_data_parallel is not None:
        counts = sum_over_data_parallel(counts)
    f = counts / counts.sum()
    p = logits.float().softmax(dim=-1).mean(dim=0)
    return alpha * n_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor, coef: float) -> torch.Tensor:
    """coef * mean_t logsumexp(logits_t)^2 (ST-MoE eq. 5): keeps router logits small and stable."""
    return coef * logits.float().logsumexp(dim=-1).square().mean()


@torch.no_grad()
def update_expert_bias(bias: torch.Tensor, counts: torch.Tensor, rate: float) -> None:
    """In place: b_i += rate * sign(mean(c) - c_i) (DeepSeek-V3 §2.1.2): overloaded experts get less."""
    counts = counts.to(torch.float64)
    bias += (rate * torch.sign(counts.mean() - counts)).to(bias.dtype)


def load_stats(counts: Sequence[int] | torch.Tensor) -> dict[str, Any]:
    """Load of one layer from its tokens-per-expert counts, as plain Python numbers.

    max_violation = max/mean - 1 (0 = perfectly balanced); cv = population std / mean. With no
    tokens at all both are 0. The trainer passes host lists, so that no statistic costs a sync.
    """
    values = [int(c) for c in (counts.tolist() if isinstance(counts, torch.Tensor) else counts)]
    mean = sum(values) / len(values)
    has_tokens = mean > 0
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return {
        "tokens_per_expert": values,
        "max_over_mean": max(values) / mean if has_tokens else 0.0,
        "max_violation": max(values) / mean - 1.0 if has_tokens else 0.0,
        "cv": std / mean if has_tokens else 0.0,
        "dead_experts": sum(v == 0 for v in values),
    }


@torch.no_grad()
def update_expert_biases(biases: Sequence[torch.Tensor], counts: torch.Tensor, rate: float) -> None:
    """`update_expert_bias` of each MoE layer's bias [E] from its row of `counts` [L, E], the
    tokens per expert of one step summed over every rank (so the biases stay identical everywhere)."""
    if rate > 0:
        for bias, layer_counts in zip(biases, counts, strict=True):
            update_expert_bias(bias, layer_counts, rate)
