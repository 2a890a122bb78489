"""The training objective from a forward's `ModelOutput` and the next-token targets:

    loss = CE(logits, targets) + balance loss (the MoE layers') + L_MTP
    L_MTP = (lambda / D) * sum_k CE_k      (DeepSeek-V3 eqs. 24-25)

Cross-entropies run in fp32 whatever the compute dtype (model/cross_entropy.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeforge.model.cross_entropy import token_cross_entropy
from moeforge.model.mtp import mtp_inputs_and_labels
from moeforge.model.transformer import ModelOutput


def mtp_depth_losses(mtp_logits: list[torch.Tensor], targets: torch.Tensor) -> list[torch.Tensor]:
    """CE_k of each MTP depth k = 1..D against t_{i+k+1} (eq. 24)."""
    return [
        token_cross_entropy(logits, mtp_inputs_and_labels(targets, depth)[1])
        for depth, logits in enumerate(mtp_logits, start=1)
    ]


def weighted_mtp_loss(depth_losses: list[torch.Tensor], weight: float) -> torch.Tensor:
    """L_MTP = (lambda / D) * sum_k CE_k (eq. 25); a zero scalar without MTP modules."""
    if not depth_losses:
        return torch.zeros(())
    return weight * torch.stack(depth_losses).mean()


@dataclass
class TrainingLosses:
    """The terms of one micro-batch's loss, each a scalar tensor."""

    lm: torch.Tensor
    balance: torch.Tensor
    mtp: torch.Tensor
    mtp_depths: list[torch.Tensor]
    """CE_k of each MTP depth, unweighted (for logging)"""

    @property
    def total(self) -> torch.Tensor:
        return self.lm + self.balance + self.mtp


def training_losses(out: ModelOutput, targets: torch.Tensor, mtp_weight: float) -> TrainingLosses:
    lm = token_cross_entropy(out.logits, targets)
    depth_losses = mtp_depth_losses(out.mtp_logits, targets)
    mtp = weighted_mtp_loss(depth_losses, mtp_weight).to(lm.device)
    return TrainingLosses(lm, out.balance_loss.to(lm.device), mtp, depth_losses)
