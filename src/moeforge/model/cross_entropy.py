"""Next-token cross-entropy of a model's logits: per batch (the training objective's main term) and
summed over many batches (validation during training, `moeforge eval` after it).

Both the trainer (train/) and evaluation (infer/) use these; they are siblings that may not import
each other, so the one copy lives here, below both. Cross-entropies run in fp32 whatever the compute
dtype; the sum over batches is kept in float64 so that the mean does not depend on how many batches
it is split into beyond float64 rounding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def token_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, S, V] against labels [B, S], in fp32."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())


@dataclass
class CrossEntropySum:
    """Token cross-entropy summed over batches of windows."""

    total: torch.Tensor
    """float64 scalar: the sum over every target token of -log p(token), in nats"""
    tokens: int
    """target tokens counted (inputs' positions: windows * seq_len)"""
    windows: int
    """sequences (rows) counted"""


def summed_token_cross_entropy(
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    logits_of: Callable[[torch.Tensor], torch.Tensor | None],
    device: torch.device | str,
) -> CrossEntropySum:
    """The cross-entropy of `logits_of(inputs)` [B, S, V] against targets [B, S], summed over `batches`.

    `logits_of` may return None on a process that holds no logits (a pipeline's earlier stages): its
    batches are counted but add nothing to the total, which the caller then sums across processes.
    The caller chooses the mode (eval, no_grad) and any autocast around `logits_of`.
    """
    total = torch.zeros((), dtype=torch.float64, device=device)
    tokens = windows = 0
    for inputs, targets in batches:
        logits = logits_of(inputs.to(device))
        if logits is not None:
            total += token_cross_entropy(logits, targets.to(device)).double() * targets.numel()
        tokens += targets.numel()
        windows += targets.shape[0]
    return CrossEntropySum(total, tokens, windows)
