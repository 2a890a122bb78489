"""Where each Hugging Face tensor lives in a moeforge model: the name mapping all architectures share.

A layout maps every tensor name of a checkpoint to a `Slot`, its place in the moeforge state dict.
Which tensors there are follows the moeforge model (its attention kind, dense and MoE layers, MTP
modules); an architecture names its MoE block and expert projections, and whether the router stores
its balancing bias (architecture.py). Where a Hugging Face tensor sits inside a moeforge tensor:

    embed_tokens / norm / lm_head         tok_embeddings / norm / output
    self_attn.{q,k,v,o}_proj, q/k_norm    attention.{wq,wk,wv,wo}, attention.{q,k}_norm (Qwen3)
    mlp.{gate,up}_proj  [H, dim]          ffn.w13.weight [2H, dim] = cat(gate, up, dim=0)   (dense MLP,
    mlp.down_proj       [dim, H]          ffn.w2.weight                                    shared experts)
    experts.E.{gate,up} [H, dim]          ffn.experts.w13 [E, dim, 2H], w13[E] = cat(gate.T, up.T, dim=1)
    experts.E.down      [dim, H]          ffn.experts.w2 [E, H, dim],   w2[E] = down.T
    mlp.gate.weight     [E, dim]          ffn.router.weight
    mlp.gate.e_score_correction_bias      ffn.router.expert_bias (DeepSeek-V3; fp32)
    self_attn.q_a_proj, q_a_layernorm,    attention.wq_a, q_norm, wq_b (or wq), wkv_a, kv_norm, wkv_b
      q_b_proj (or q_proj), kv_a_proj_with_mqa, kv_a_layernorm, kv_b_proj    (MLA, DeepSeek-V3)

RoPE is the rotate-half layout on both sides, except DeepSeek's interleaved RoPE rows, which are
permuted on import (`_mla_layout`). DeepSeek-V3's multi-token-prediction layer, stored as layer
`num_hidden_layers`, becomes moeforge's MTP module (`_mtp_layout`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from moeforge.config import ModelConfig
from moeforge.interop.hf.architecture import Architecture


@dataclass(frozen=True)
class Slot:
    """One Hugging Face tensor = `state[param][index]`, transposed when `transpose`."""

    param: str
    index: tuple[Any, ...] = ()
    transpose: bool = False
    rows: tuple[int, ...] | None = None
    """moeforge row r holds Hugging Face row rows[r] (a permutation: DeepSeek's interleaved RoPE)"""
    columns: tuple[int, ...] | None = None
    """moeforge column c holds Hugging Face column columns[c] (DeepSeek's MTP projection)"""
    fp32: bool = False
    """stored in fp32 whatever the checkpoint's precision (`transformers` keeps the correction bias so)"""
    duplicate: bool = False
    """a copy of a tensor another slot places (DeepSeek's MTP layer repeats the shared embedding and
    head): checked equal on import, written again on export"""

    def order(self, dim: int) -> tuple[int, ...] | None:
        """The permutation along `dim` of the Hugging Face layout, if any."""
        return (self.rows, self.columns)[dim] if dim < 2 else None


def tensor_layout(
    cfg: ModelConfig, arch: Architecture, hf_config: dict[str, Any], mtp_layers: int
) -> dict[str, Slot]:
    """Every tensor of the Hugging Face checkpoint of `cfg` with its first `mtp_layers` multi-token
    prediction layers, by name, with its place in moeforge."""
    layout = {
        "model.embed_tokens.weight": Slot("tok_embeddings.weight"),
        "model.norm.weight": Slot("norm.weight"),
    }
    if not cfg.tie_embeddings:
        layout["lm_head.weight"] = Slot("output.weight")
    for i in range(cfg.n_layers):
        moe = cfg.is_moe_layer(i)
        layout.update(_block_layout(cfg, arch, hf_config, f"model.layers.{i}.", f"layers.{i}.", moe))
    for depth in range(mtp_layers):
        layout.update(_mtp_layout(cfg, arch, hf_config, depth))
    return layout


def _mtp_layout(
    cfg: ModelConfig, arch: Architecture, hf_config: dict[str, Any], depth: int
) -> dict[str, Slot]:
    """DeepSeek's MTP layer `n_layers + depth` (vLLM and SGLang run it as: shared_head.norm of the block
    of eh_proj [enorm(emb); hnorm(h)], read by the shared head). moeforge's projection takes [h; emb],
    so the halves of eh_proj's columns swap; shared_head.norm is the module's final norm; the layer's
    embed_tokens and shared_head.head repeat the main model's, which moeforge shares."""
    hf, ours = f"model.layers.{cfg.n_layers + depth}.", f"mtp.{depth}."
    halves_swapped = (*range(cfg.dim, 2 * cfg.dim), *range(cfg.dim))
    layout = {
        f"{hf}enorm.weight": Slot(f"{ours}embed_norm.weight"),
        f"{hf}hnorm.weight": Slot(f"{ours}hidden_norm.weight"),
        f"{hf}eh_proj.weight": Slot(f"{ours}proj.weight", columns=halves_swapped),
        f"{hf}shared_head.norm.weight": Slot(f"{ours}norm.weight"),
        f"{hf}embed_tokens.weight": Slot("tok_embeddings.weight", duplicate=True),
        f"{hf}shared_head.head.weight": Slot("output.weight", duplicate=True),
    }
    moe = cfg.is_moe_layer(cfg.n_layers - 1)  # moeforge's MTP block is built like the last block
    layout.update(_block_layout(cfg, arch, hf_config, hf, f"{ours}block.", moe))
    return layout


def _block_layout(
    cfg: ModelConfig, arch: Architecture, hf_config: dict[str, Any], hf: str, ours: str, moe: bool
) -> dict[str, Slot]:
    """One decoder layer `hf` (HF prefix) = the moeforge `Block` at `ours`."""
    layout = {
        f"{hf}input_layernorm.weight": Slot(f"{ours}attention_norm.weight"),
        f"{hf}post_attention_layernorm.weight": Slot(f"{ours}ffn_norm.weight"),
    }
    if cfg.attention == "mla":
        interleaved = hf_config.get("rope_interleave", True)
        layout.update(_mla_layout(cfg, f"{hf}self_attn.", f"{ours}attention.", interleaved))
    else:
        layout.update(_attention_layout(cfg, f"{hf}self_attn.", f"{ours}attention."))
    if moe:
        layout.update(_moe_layout(cfg, arch, f"{hf}{arch.moe_block}.", f"{ours}ffn."))
    else:
        layout.update(_swiglu_layout(f"{hf}mlp.", f"{ours}ffn.", cfg.ffn_dim))
    return layout


def _attention_layout(cfg: ModelConfig, hf: str, ours: str) -> dict[str, Slot]:
    layout = {f"{hf}{name}_proj.weight": Slot(f"{ours}w{name}.weight") for name in ("q", "k", "v", "o")}
    if cfg.qk_norm:
        layout.update({f"{hf}{name}_norm.weight": Slot(f"{ours}{name}_norm.weight") for name in ("q", "k")})
    return layout


def _mla_layout(cfg: ModelConfig, hf: str, ours: str, interleaved: bool) -> dict[str, Slot]:
    """Multi-head latent attention. With `rope_interleave` (DeepSeek's layout) a RoPE pair is two
    adjacent dims (x0, x1), (x2, x3), ...; moeforge rotates halves, so the RoPE rows of the query and
    shared-key projections are de-interleaved on import: the same scores, dims in another order."""
    q_rows = _rope_rows(cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim) if interleaved else None
    kv_rows = _rope_rows(1, cfg.kv_lora_rank, cfg.qk_rope_head_dim) if interleaved else None
    if cfg.q_lora_rank:
        layout = {
            f"{hf}q_a_proj.weight": Slot(f"{ours}wq_a.weight"),
            f"{hf}q_a_layernorm.weight": Slot(f"{ours}q_norm.weight"),
            f"{hf}q_b_proj.weight": Slot(f"{ours}wq_b.weight", rows=q_rows),
        }
    else:
        layout = {f"{hf}q_proj.weight": Slot(f"{ours}wq.weight", rows=q_rows)}
    layout.update(
        {
            f"{hf}kv_a_proj_with_mqa.weight": Slot(f"{ours}wkv_a.weight", rows=kv_rows),
            f"{hf}kv_a_layernorm.weight": Slot(f"{ours}kv_norm.weight"),
            f"{hf}kv_b_proj.weight": Slot(f"{ours}wkv_b.weight"),
            f"{hf}o_proj.weight": Slot(f"{ours}wo.weight"),
        }
    )
    return layout


def _rope_rows(n_blocks: int, plain: int, rope: int) -> tuple[int, ...]:
    """Row order of `n_blocks` blocks of [plain rows | rope rows] with each block's rope rows taken
    evens first, then odds: interleaved pairs -> rotate-half halves."""
    block = [*range(plain), *range(plain, plain + rope, 2), *range(plain + 1, plain + rope, 2)]
    return tuple(b * (plain + rope) + r for b in range(n_blocks) for r in block)


def _swiglu_layout(hf: str, ours: str, hidden: int) -> dict[str, Slot]:
    """A dense MLP or the shared experts: gate and up stacked in `w13.weight` [2*hidden, dim]."""
    return {
        f"{hf}gate_proj.weight": Slot(f"{ours}w13.weight", (slice(0, hidden),)),
        f"{hf}up_proj.weight": Slot(f"{ours}w13.weight", (slice(hidden, 2 * hidden),)),
        f"{hf}down_proj.weight": Slot(f"{ours}w2.weight"),
    }


def _moe_layout(cfg: ModelConfig, arch: Architecture, hf: str, ours: str) -> dict[str, Slot]:
    moe = cfg.moe
    hidden = moe.expert_ffn_dim
    gate, up, down = arch.expert_projections
    layout = {f"{hf}gate.weight": Slot(f"{ours}router.weight")}
    for e in range(moe.n_experts):
        expert = f"{hf}experts.{e}."
        layout[f"{expert}{gate}.weight"] = Slot(
            f"{ours}experts.w13", (e, slice(None), slice(0, hidden)), True
        )
        layout[f"{expert}{up}.weight"] = Slot(
            f"{ours}experts.w13", (e, slice(None), slice(hidden, 2 * hidden)), True
        )
        layout[f"{expert}{down}.weight"] = Slot(f"{ours}experts.w2", (e,), True)
    if moe.n_shared_experts:
        layout.update(
            _swiglu_layout(f"{hf}shared_experts.", f"{ours}shared_experts.", moe.n_shared_experts * hidden)
        )
    if arch.correction_bias:
        layout[f"{hf}gate.e_score_correction_bias"] = Slot(f"{ours}router.expert_bias", fp32=True)
    return layout


def view(state: dict[str, torch.Tensor], slot: Slot) -> torch.Tensor:
    """The part of a moeforge tensor that holds one Hugging Face tensor, in the Hugging Face layout."""
    view = state[slot.param][slot.index]
    return view.T if slot.transpose else view


def layer_index(name: str) -> int | None:
    """i of a tensor `model.layers.{i}.*`, else None."""
    prefix = "model.layers."
    return int(name[len(prefix) :].split(".", 1)[0]) if name.startswith(prefix) else None


def declared_mtp_layers(hf_config: dict[str, Any]) -> int:
    return hf_config.get("num_nextn_predict_layers") or hf_config.get("num_mtp_layers") or 0


def stored_mtp_layers(names: Iterable[str], n_layers: int, declared: int) -> int:
    """How many of the `declared` MTP layers (stored as layers n_layers, n_layers + 1, ...) have tensors."""
    return len({layer_index(name) for name in names} & set(range(n_layers, n_layers + declared)))
