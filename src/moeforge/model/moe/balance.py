"""Expert load balancing: aux losses, the aux-loss-free bias update and load statistics, in one place.

- `sequence_aux_loss`: DeepSeek-V3's complementary sequence-wise balance loss (eqs. 17-20).
- `batch_aux_loss`: the classic Switch/GShard load-balancing loss over the whole batch.
- `router_z_loss`: ST-MoE's penalty on large router logits.
- `update_expert_bias`: DeepSeek-V3's auxiliary-loss-free balancing, b_i += gamma*sign(mean(c) - c_i).
- `load_stats` / `update_biases_and_collect_load`: per-layer load metrics, after each optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn


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
    logits: torch.Tensor, expert_indices: torch.Tensor, alpha: float, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """alpha * E * sum_i f_i * P_i over the whole batch (Switch Transformer eq. 4, GShard).

    f_i is the fraction of the N*k assignments that went to expert i, so a perfectly balanced
    router scores exactly alpha. P_i is the mean over tokens of softmax(logits)_i: the loss needs a
    probability over experts, which sigmoid scores are not, so softmax is used whatever the score
    function. Under data parallelism pass the dp `group`: f then counts the global batch (it carries
    no gradient), and averaging the ranks' gradients of the local P gives the global loss's gradient.
    """
    n_experts = logits.shape[1]
    counts = torch.bincount(expert_indices.reshape(-1), minlength=n_experts).float()
    if group is not None:
        dist.all_reduce(counts, group=group)
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


def load_stats(counts: torch.Tensor) -> dict[str, Any]:
    """Load of one layer from its tokens-per-expert counts, as plain Python numbers.

    max_violation = max/mean - 1 (0 = perfectly balanced); cv = population std / mean. With no
    tokens at all both are 0.
    """
    values = counts.detach().to(torch.float64).cpu()
    mean = values.mean().item()
    has_tokens = mean > 0
    return {
        "tokens_per_expert": [int(c) for c in values.tolist()],
        "max_over_mean": values.max().item() / mean if has_tokens else 0.0,
        "max_violation": values.max().item() / mean - 1.0 if has_tokens else 0.0,
        "cv": values.std(correction=0).item() / mean if has_tokens else 0.0,
        "dead_experts": int((values == 0).sum().item()),
    }


@torch.no_grad()
def update_biases_and_collect_load(
    model: nn.Module, rate: float, group: dist.ProcessGroup | None = None
) -> list[dict[str, Any]]:
    """After an optimizer step: global load of every MoE layer, bias update, stats, reset.

    MoE layers are the modules with a `tokens_per_expert_accum` buffer and a `router.expert_bias`.
    Their counts since the last call are summed over `group` (None: the default world group, or no
    communication when torch.distributed is not initialised), so every rank applies the same update
    and the bias stays identical everywhere. Returns `load_stats` per layer, in module order.
    """
    layers = [m for m in model.modules() if hasattr(m, "tokens_per_expert_accum")]
    if not layers:
        return []
    counts = torch.stack([m.tokens_per_expert_accum for m in layers])
    if group is not None or (dist.is_available() and dist.is_initialized()):
        dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    stats = []
    for layer, layer_counts in zip(layers, counts):
        if rate > 0:
            update_expert_bias(layer.router.expert_bias, layer_counts, rate)
        stats.append(load_stats(layer_counts))
        layer.tokens_per_expert_accum.zero_()
    return stats
