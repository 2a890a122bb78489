"""Multi-token prediction (DeepSeek-V3 §2.2): D sequential modules after the main model.

Module k (k = 1..D) at position i combines the previous depth's representation h^{k-1}_i (h^0 is the
main model's normalised final hidden state, the one its output head reads) with the embedding of
token t_{i+k}, runs one transformer block and predicts t_{i+k+1} through the *shared* output head:

    h'^k_i = M_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]        (eq. 21)
    h^k_{1:T-k} = TRM_k(h'^k_{1:T-k})                                 (eq. 22)
    P^k_{i+k+1} = OutHead(h^k_i)                                      (eq. 23)
    L_MTP = (lambda / D) * sum_k CE_k          (eqs. 24-25, computed by train/losses.py)

Each depth sees one position fewer than the one before. The main model never reads these modules:
dropping them leaves its logits unchanged, and at inference they draft tokens for speculative
decoding (`moeforge.infer.speculative`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from moeforge.model.attention import AttentionMask


class MTPModule(nn.Module):
    """One depth: input norms, the projection M_k, one transformer block, and the norm before the head.

    `block` is built by the caller (dense or MoE like the main model's last block), so this module
    does not depend on the transformer's code. The final RMSNorm plays the role of the main model's
    final norm, so that h^k is what the shared head reads (the released DeepSeek-V3 checkpoint calls
    it `shared_head.norm`; its `eh_proj` takes [emb; h], the halves of M_k in the other order).
    """

    def __init__(self, dim: int, norm_eps: float, block: nn.Module):
        super().__init__()
        self.hidden_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.embed_norm = nn.RMSNorm(dim, eps=norm_eps)
        self.proj = nn.Linear(2 * dim, dim, bias=False)
        self.block = block
        self.norm = nn.RMSNorm(dim, eps=norm_eps)

    def forward(
        self,
        hidden: torch.Tensor,
        embedded: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: Any = None,
        mask: AttentionMask | None = None,
    ) -> tuple[torch.Tensor, Any]:
        """h^k [B, S, dim] from h^{k-1} and Emb(t_{i+k}) at the same S positions (eqs. 21-22), and
        what the block's MoE layer measured (None for a dense block). With the block's KV cache set
        up, `slots` (`CacheSlots`) say where these positions sit in it; with document masking, `mask`
        [B, 1, S, S] and the per-row cos/sin are the main model's for these S positions."""
        out, stats = self.block(self.merge(hidden, embedded), cos, sin, slots, mask)
        return self.norm(out), stats

    def merge(self, hidden: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """h'^k = M_k [RMSNorm(h^{k-1}); RMSNorm(Emb(t_{i+k}))] (eq. 21), [B, S, dim]: the block's input."""
        return self.proj(torch.cat([self.hidden_norm(hidden), self.embed_norm(embedded)], dim=-1))

    def init_weights(self, std: float, out_std: float) -> None:
        nn.init.normal_(self.proj.weight, std=std)
        self.block.init_weights(std, out_std)
        for norm in (self.hidden_norm, self.embed_norm, self.norm):
            nn.init.ones_(norm.weight)


def mtp_inputs_and_labels(targets: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For next-token targets [B, S] (t_1..t_S of inputs t_0..t_{S-1}) and depth k: the tokens t_{i+k}
    embedded at positions i = 0..S-k-1 and the labels t_{i+k+1} they predict, each [B, S-k]."""
    return targets[:, depth - 1 : -1], targets[:, depth:]
