"""The MoE layers of peers, built at a moeforge layer's shape for `moeforge bench moe --peers`.

Each peer is built from a small config of its own (same dim, expert width, expert count and top-k;
fp32; no shared experts) and gets the moeforge layer's router and expert weights copied in where the
layouts allow; each keeps its own routing rules (Qwen3-MoE: softmax). A peer that is not installed,
or does not import here, is skipped with a one-line note.

- transformers Qwen3-MoE `Qwen3MoeSparseMoeBlock` and DeepSeek-V3 `DeepseekV3MoE`, with the
  `grouped_mm` experts implementation (`torch._grouped_mm`, what transformers picks on torch >= 2.9).
- torchtitan is not timed: 0.3.0 from PyPI, installed without its dependencies (so as not to touch
  torch), cannot import its MoE module (`torchtitan.models.common.moe` needs `spmd_types`, `tyro`
  and more); the table says so in a note.
"""

from __future__ import annotations

import importlib.util
import warnings
from collections.abc import Callable

import torch
from torch import nn

from moeforge.model.moe.layer import MoE

PeerBuilder = Callable[[MoE], nn.Module]


def peer_layers(layer: MoE) -> tuple[dict[str, nn.Module], list[str]]:
    """(the peers' MoE layers by name, a note per peer that could not be built)."""
    layers, notes = {}, []
    for name, build in PEERS.items():
        try:
            with warnings.catch_warnings():  # DeepSeek-V3's empty shared-expert MLP warns at init
                warnings.simplefilter("ignore", UserWarning)
                layers[name] = build(layer).to(layer.router.weight.device).train()
        except ImportError as error:
            notes.append(f"{name}: not installed ({error})")
    installed = importlib.util.find_spec("torchtitan") is not None
    notes.append(f"torchtitan: {'installed but ' if installed else ''}not timed (see docs/moe-performance.md)")
    return layers, notes


def qwen3_moe_block(layer: MoE) -> nn.Module:
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    cfg = layer.cfg
    config = Qwen3MoeConfig(
        hidden_size=cfg.dim,
        moe_intermediate_size=cfg.expert_ffn_dim,
        num_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k,
        norm_topk_prob=True,
        experts_implementation="grouped_mm",
    )
    block = Qwen3MoeSparseMoeBlock(config)
    copy_expert_weights(layer, block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj)
    return block


def deepseek_v3_moe(layer: MoE) -> nn.Module:
    from transformers.models.deepseek_v3.configuration_deepseek_v3 import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    cfg = layer.cfg
    config = DeepseekV3Config(
        hidden_size=cfg.dim,
        moe_intermediate_size=cfg.expert_ffn_dim,
        n_routed_experts=cfg.n_experts,
        num_experts_per_tok=cfg.top_k,
        n_shared_experts=0,
        n_group=1,
        topk_group=1,
        norm_topk_prob=cfg.route_norm,
        routed_scaling_factor=cfg.route_scale,
        experts_implementation="grouped_mm",
    )
    block = DeepseekV3MoE(config)
    copy_expert_weights(layer, block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj)
    return block


@torch.no_grad()
def copy_expert_weights(layer: MoE, router: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor) -> None:
    """Router [E, dim] as is; experts [E, 2*hidden, dim] and [E, dim, hidden] ([out, in], gate rows
    first), from moeforge's [in, out] `w13` [E, dim, 2*hidden] and `w2` [E, hidden, dim]."""
    router.copy_(layer.router.weight)
    gate_up.copy_(layer.experts.w13.transpose(1, 2))
    down.copy_(layer.experts.w2.transpose(1, 2))


PEERS: dict[str, PeerBuilder] = {
    "transformers Qwen3-MoE": qwen3_moe_block,
    "transformers DeepSeek-V3": deepseek_v3_moe,
}
