"""The decoder-only transformer: embedding, pre-norm blocks (dense SwiGLU first, MoE after), head.

Plain single-device `nn.Module` code; parallelism is applied from outside (DESIGN.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import nn

from moeforge.config import ModelConfig
from moeforge.model.attention import build_attention, rope_tables
from moeforge.model.mlp import SwiGLU
from moeforge.model.moe import MoE


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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, start_pos)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """`Transformer(cfg)(tokens [B, S]) -> logits [B, S, vocab]`.

    With KV caches set up (`setup_caches`), `start_pos` gives the position of tokens[:, 0].
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
        cos, sin = rope_tables(cfg.resolved_head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, init_std) everywhere; residual output projections scaled by 1/sqrt(2*n_layers) (GPT-2)."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        nn.init.normal_(self.tok_embeddings.weight, std=std)
        if not self.cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=std)
        for layer in self.layers:
            attn = layer.attention
            for proj in (attn.wq, attn.wk, attn.wv):
                nn.init.normal_(proj.weight, std=std)
            nn.init.normal_(attn.wo.weight, std=out_std)
            layer.ffn.init_weights(std, out_std)
            for norm in (layer.attention_norm, layer.ffn_norm):
                nn.init.ones_(norm.weight)
        nn.init.ones_(self.norm.weight)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        return self.output(self.norm(self.hidden_states(tokens, start_pos)))

    def hidden_states(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        """The last block's output before the final norm, [B, S, dim]."""
        seq = tokens.shape[1]
        cos = self.rope_cos[start_pos : start_pos + seq]
        sin = self.rope_sin[start_pos : start_pos + seq]
        h = self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, cos, sin, start_pos)
        return h

    def moe_layers(self) -> Iterator[MoE]:
        for module in self.modules():
            if isinstance(module, MoE):
                yield module

    def aux_loss(self) -> torch.Tensor:
        """Sum of the balance losses the MoE layers computed in the last forward."""
        losses = [m.aux_loss for m in self.moe_layers()]
        return torch.stack(losses).sum() if losses else torch.zeros(())

    def setup_caches(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> int:
        """Give every attention layer a KV cache; returns the cache bytes per token (all layers)."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"max_len {max_len} exceeds model.max-seq-len={self.cfg.max_seq_len}")
        dtype = dtype or self.tok_embeddings.weight.dtype
        device = self.tok_embeddings.weight.device
        caches = [layer.attention.setup_cache(batch, max_len, dtype, device) for layer in self.layers]
        return sum(c.bytes_per_token() for c in caches)

    def clear_caches(self) -> None:
        for layer in self.layers:
            layer.attention.cache = None
