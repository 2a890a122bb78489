"""The MoE layers of peers, built at a moeforge layer's shape for `moeforge bench moe --peers`.

Each peer is built from a small config of its own (same dim, expert width, expert count and top-k;
fp32; no shared experts) and gets the moeforge layer's router and expert weights copied in where the
layouts allow; each keeps its own routing rules (Qwen3-MoE: softmax). A peer that is not installed,
or does not import here, is skipped with a one-line note.

- transformers Qwen3-MoE `Qwen3MoeSparseMoeBlock` and DeepSeek-V3 `DeepseekV3MoE`, with the
  `grouped_mm` experts implementation (`torch._grouped_mm`, what transformers picks on torch >= 2.9).
- torchtitan's `MoE` (`torchtitan.models.common.moe`, 0.3.0): token-choice router with moeforge's
  routing settings (score function, normalisation, scale), local token dispatcher, grouped experts.
  Its experts always compute in bf16 (0.3.0 casts their inputs and weights before
  `torch._grouped_mm`), so in an fp32 run it is not like for like; `--dtype bf16` is. It is not in
  the `bench` extra: importing it needs `spmd_types`, `tyro`, `einops`, `torch_checkpointing` and
  `triton` beside it (docs/benchmarks/moe.md has the install line).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from moeforge.model.moe.layer import MoE

PeerBuilder = Callable[[MoE], nn.Module]


def peer_layers(layer: MoE) -> tuple[dict[str, nn.Module], list[str]]:
    """(the peers' MoE layers by name, on the layer's device and dtype; a note per peer that could
    not be built, and one per peer whose numerics differ from the run's dtype)."""
    weight = layer.router.weight
    layers, notes = {}, []
    for name, build in PEERS.items():
        try:
            with warnings.catch_warnings():  # DeepSeek-V3's empty shared-expert MLP warns at init
                warnings.simplefilter("ignore", UserWarning)
                layers[name] = build(layer).to(weight.device, weight.dtype).train()
        except ImportError as error:
            notes.append(f"{name}: not installed or does not import here ({error})")
        except Exception as error:  # another version's API: a note, not a failed benchmark
            notes.append(f"{name}: could not be built here ({type(error).__name__}: {error})")
    if "torchtitan" in layers and weight.dtype != torch.bfloat16:
        notes.append("torchtitan: its experts compute in bf16 whatever the run's dtype (not like for like; "
                     "compare with --dtype bf16)")
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
    """Router [E, dim] as is; experts [E, 2*hidden, dim] (gate rows first) and [E, dim, hidden]."""
    gate, up, down_out_in = experts_out_in(layer)
    router.copy_(layer.router.weight)
    gate_up.copy_(torch.cat([gate, up], dim=1))
    down.copy_(down_out_in)


def experts_out_in(layer: MoE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layer's experts as [out, in] matrices, the peers' layout: gate [E, hidden, dim], up
    [E, hidden, dim], down [E, dim, hidden] (views of moeforge's [in, out] `w13` [E, dim, 2*hidden]
    and `w2` [E, hidden, dim])."""
    w13, w2 = layer.experts.w13, layer.experts.w2
    hidden = w2.shape[1]
    return w13[:, :, :hidden].transpose(1, 2), w13[:, :, hidden:].transpose(1, 2), w2.transpose(1, 2)


def torchtitan_moe(layer: MoE) -> nn.Module:
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE as TorchtitanMoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    cfg = layer.cfg
    config = TorchtitanMoE.Config(
        num_experts=cfg.n_experts,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=cfg.dim, hidden_dim=cfg.expert_ffn_dim, num_experts=cfg.n_experts),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=cfg.n_experts, top_k=cfg.top_k),
        ),
        router=TokenChoiceTopKRouter.Config(
            num_experts=cfg.n_experts,
            gate=Linear.Config(in_features=cfg.dim, out_features=cfg.n_experts),
            top_k=cfg.top_k,
            score_func=cfg.score_func,
            route_norm=cfg.route_norm,
            route_scale=cfg.route_scale,
        ),
    )
    block = config.build()
    experts = block.routed_experts.inner_experts
    with torch.no_grad():  # w1 gate, w3 up, w2 down
        block.router.gate.weight.copy_(layer.router.weight)
        for weight, source in zip((experts.w1_EFD, experts.w3_EFD, experts.w2_EDF), experts_out_in(layer)):
            weight.copy_(source)
    return block


PEERS: dict[str, PeerBuilder] = {
    "transformers Qwen3-MoE": qwen3_moe_block,
    "transformers DeepSeek-V3": deepseek_v3_moe,
    "torchtitan": torchtitan_moe,
}
