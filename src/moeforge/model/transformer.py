"""The decoder-only transformer: embedding, pre-norm blocks (dense SwiGLU first, MoE after), head,
and the optional multi-token prediction modules (`model/mtp.py`).

Plain single-device `nn.Module` code; parallelism is applied from outside by `moeforge.parallelize`.
A forward returns one `ModelOutput` record: the logits, the hidden state the MTP modules read, the
MTP modules' logits, the summed balance loss and the load of every MoE layer. Losses against the
targets are the trainer's business.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from moeforge.config import ConfigError, ModelConfig
from moeforge.model.attention import (
    AttentionMask,
    CacheSlots,
    build_attention,
    cache_slots,
    attention_mask_for,
    document_positions,
    rope_tables,
)
from moeforge.model.mlp import SwiGLU
from moeforge.model.moe import MoE, MoEStats
from moeforge.model.mtp import MTPModule, mtp_inputs_and_labels


@dataclass
class ModelOutput:
    """What one `Transformer` forward computed."""

    logits: torch.Tensor
    """[B, S, vocab]"""
    hidden: torch.Tensor
    """[B, S, dim] the normalised final hidden state the head reads (h^0 of the MTP modules)"""
    moe_stats: list[MoEStats] = field(default_factory=list)
    """one per MoE layer that ran, main blocks first, then the MTP modules' blocks"""
    mtp_logits: list[torch.Tensor] = field(default_factory=list)
    """[B, S-k, vocab] of each MTP depth k = 1..D; empty unless `mtp_targets` were given"""

    @property
    def balance_loss(self) -> torch.Tensor:
        """The balance losses of every MoE layer, summed: the term the training loss adds."""
        if not self.moe_stats:
            return torch.zeros((), device=self.logits.device)
        return torch.stack([stats.balance_loss for stats in self.moe_stats]).sum()

    @property
    def load(self) -> torch.Tensor:
        """[L, E] int64 tokens per expert of each MoE layer (L = len(moe_stats))."""
        if not self.moe_stats:
            return torch.zeros(0, 0, dtype=torch.int64, device=self.logits.device)
        return torch.stack([stats.tokens_per_expert for stats in self.moe_stats])


class Block(nn.Module):
    """x + attention(norm(x)), then + ffn(norm(.)) where ffn is a dense SwiGLU or an MoE layer."""

    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attention_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attention = build_attention(cfg)
        self.ffn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        if cfg.is_moe_layer(layer_id):
            self.ffn: nn.Module = MoE(cfg.moe_layer_config())
        else:
            self.ffn = SwiGLU(cfg.dim, cfg.ffn_dim)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: CacheSlots | None = None,
        mask: AttentionMask | None = None,
    ) -> tuple[torch.Tensor, MoEStats | None]:
        """The block's output and, for an MoE block, what its MoE layer measured."""
        x = self.attend(x, cos, sin, slots, mask)
        if isinstance(self.ffn, MoE):
            out, stats = self.ffn(self.ffn_norm(x))
            return x + out, stats
        return x + self.ffn(self.ffn_norm(x)), None

    def attend(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: CacheSlots | None = None,
        mask: AttentionMask | None = None,
    ) -> torch.Tensor:
        """The first half of the block: x + attention(norm(x)), [B, S, dim] (over the KV cache with
        `slots`; inside documents with `mask`, `document_mask`)."""
        return x + self.attention(self.attention_norm(x), cos, sin, slots, mask)

    def init_weights(self, std: float, out_std: float) -> None:
        """Normal(0, std) on the projections, Normal(0, out_std) on the residual outputs, ones on norms."""
        for proj in self.attention.modules():
            if isinstance(proj, nn.Linear):
                nn.init.normal_(proj.weight, std=out_std if proj is self.attention.wo else std)
        self.ffn.init_weights(std, out_std)
        for norm in (m for m in self.modules() if isinstance(m, nn.RMSNorm)):
            nn.init.ones_(norm.weight)


class Transformer(nn.Module):
    """`Transformer(cfg)(tokens [B, S]) -> ModelOutput` (logits [B, S, vocab], ...).

    With KV caches set up (`setup_caches`), `start_pos` gives the cache slot of tokens[:, 0], or
    `input_pos` [S] the slots of all S tokens, and `pad` [B] the left padding of each row (see
    `positions`).
    Without caches, `document_ids` [B, S] (one id per token; a document is a run of equal ids) keep
    attention inside each document packed into a row, positions restarting at its start: every
    token's logits are those of its document run alone (`--data.document-mask`).
    `mtp` holds `cfg.mtp_depth` multi-token prediction modules, run only when `mtp_targets` are given.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        last_block = cfg.n_layers - 1  # MTP blocks are dense or MoE like the main model's last one
        self.mtp = nn.ModuleList(
            MTPModule(cfg.dim, cfg.norm_eps, Block(cfg, last_block)) for _ in range(cfg.mtp_depth)
        )
        cos, sin = rope_tables(cfg.rope_head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.cache_len: int | None = None
        """the length of the KV caches while they are set up"""
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2*n_layers) (GPT-2)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        for layer in self.layers:
            layer.init_weights(std, out_std)
        nn.init.ones_(self.norm.weight)
        for module in self.mtp:
            module.init_weights(std, out_std)

    def forward(
        self,
        tokens: torch.Tensor,
        start_pos: int = 0,
        mtp_targets: torch.Tensor | None = None,
        input_pos: torch.Tensor | None = None,
        pad: torch.Tensor | None = None,
        document_ids: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Run the model on tokens [B, S]; with the next-token `mtp_targets` [B, S] the MTP modules
        run too (they read the embeddings of the tokens ahead, eqs. 21-23)."""
        seq = tokens.shape[1]
        slots = mask = None
        if document_ids is not None:
            assert self.cache_len is None and start_pos == 0, "document_ids are for forwards without KV caches"
            cos, sin, mask = self.training_attention(seq, document_ids)
        elif self.cache_len is None:
            cos, sin = self.rope_cos[start_pos : start_pos + seq], self.rope_sin[start_pos : start_pos + seq]
        else:
            if input_pos is None:
                input_pos = torch.arange(start_pos, start_pos + seq, device=tokens.device)
            slots = cache_slots(input_pos, self.cache_len, pad)
            cos, sin = self.rope_at(self.positions(input_pos, pad))
        h = self.tok_embeddings(tokens)
        moe_stats: list[MoEStats] = []
        for layer in self.layers:
            h, stats = layer(h, cos, sin, slots, mask)
            _keep(moe_stats, stats)
        hidden = self.norm(h)
        out = ModelOutput(self.output(hidden), hidden, moe_stats)
        if mtp_targets is not None:
            out.mtp_logits = self._mtp_logits(hidden, mtp_targets, moe_stats, document_ids)
        return out

    def _mtp_logits(
        self,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        moe_stats: list[MoEStats],
        document_ids: torch.Tensor | None = None,
    ) -> list[torch.Tensor]:
        """Logits of each MTP depth k = 1..D, [B, S-k, vocab], over positions i = 0..S-k-1: depth k
        reads the first S-k positions of depth k-1 and the embeddings of t_{i+k} (eqs. 21-23).

        With `document_ids` its attention and positions are the main model's over those positions.
        Position i of a document's last k reads t_{i+k} and predicts t_{i+k+1} of the next document,
        as the main head's last position of a document predicts the next one's first token."""
        logits = []
        for depth, module in enumerate(self.mtp, start=1):
            embed_tokens, _ = mtp_inputs_and_labels(targets, depth)
            seq = embed_tokens.shape[1]
            embedded = self.tok_embeddings(embed_tokens)
            ids = None if document_ids is None else document_ids[:, :seq]
            cos, sin, mask = self.training_attention(seq, ids)
            hidden, stats = module(hidden[:, :seq], embedded, cos, sin, mask=mask)
            _keep(moe_stats, stats)
            logits.append(self.output(hidden))
        return logits

    def training_attention(
        self, seq: int, document_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """RoPE's cos and sin and the attention mask of a forward over `seq` positions without KV
        caches: positions 0..seq-1 and no mask (SDPA's causal kernel), or with `document_ids` [B, seq]
        each row's positions restarting at its documents' starts ([B, 1, seq, head_dim] tables) and
        the block-diagonal causal `document_mask`."""
        if document_ids is None:
            return self.rope_cos[:seq], self.rope_sin[:seq], None
        cos, sin = self.rope_at(document_positions(document_ids))
        return cos, sin, attention_mask_for(document_ids)

    @staticmethod
    def positions(input_pos: torch.Tensor, pad: torch.Tensor | None = None) -> torch.Tensor:
        """The positions (RoPE's) of tokens at cache slots `input_pos` [S]: the slots themselves, [S],
        or with left padding `pad` [B] the slot minus the row's padding, [B, S] (0 on padding)."""
        if pad is None:
            return input_pos
        return (input_pos[None, :] - pad[:, None]).clamp(min=0)

    def rope_at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin at `positions` [S] -> [S, head_dim], or [B, S] -> [B, 1, S, head_dim] (per row,
        broadcast over the heads)."""
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]
        if positions.dim() == 2:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        return cos, sin

    def moe_layers(self) -> Iterator[MoE]:
        """The MoE layers in `ModelOutput.moe_stats` order: main blocks, then the MTP modules'."""
        return (module for _, module in self.named_moe_layers())

    def named_moe_layers(self) -> Iterator[tuple[str, MoE]]:
        return ((name, m) for name, m in self.named_modules() if isinstance(m, MoE))

    def setup_caches(
        self, batch: int, max_len: int, dtype: torch.dtype | None = None, with_mtp: bool = False
    ) -> int:
        """Give every attention layer a KV cache (the MTP modules' blocks too with `with_mtp`, for
        drafting); returns the main model's cache bytes per token (all its layers)."""
        if max_len > self.cfg.max_seq_len:
            raise ConfigError(f"max_len {max_len} exceeds model.max-seq-len={self.cfg.max_seq_len}")
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        self.cache_len = max_len
        caches = [layer.attention.setup_cache(batch, max_len, dtype, device) for layer in self.layers]
        if with_mtp:
            for module in self.mtp:
                module.block.attention.setup_cache(batch, max_len, dtype, device)
        return sum(c.bytes_per_token() for c in caches)

    def clear_caches(self) -> None:
        self.cache_len = None
        for block in [*self.layers, *(module.block for module in self.mtp)]:
            block.attention.cache = None


def _keep(moe_stats: list[MoEStats], stats: MoEStats | None) -> None:
    if stats is not None:
        moe_stats.append(stats)
