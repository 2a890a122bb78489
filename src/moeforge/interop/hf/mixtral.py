"""Mixtral (`MixtralForCausalLM`): its config.json mapping and its tensor names.

Config: softmax over all experts, top-k, renormalised over the k; every layer MoE, no query/key norm,
no sliding window. Tensors: the common layout (layout.py) with the MoE block at `block_sparse_moe`
and each expert's projections named w1 (gate), w3 (up), w2 (down).
"""

from __future__ import annotations

from typing import Any

from moeforge.config import ModelConfig
from moeforge.interop.hf.architecture import (
    Architecture,
    common_hf_fields,
    common_model_fields,
    require,
    softmax_misfits,
    softmax_moe,
)


def _mixtral_unsupported(values: dict[str, Any]) -> list[str]:
    if values.get("sliding_window") is not None:
        return [f"sliding_window={values['sliding_window']} (full causal attention only)"]
    return []


def _mixtral_to_model(values: dict[str, Any]) -> ModelConfig:
    """Mixtral: softmax over all experts, top-k, renormalised over the k (= top-k-then-softmax)."""
    expert_ffn_dim = require(values, "intermediate_size")
    moe = softmax_moe(values, require(values, "num_local_experts"), expert_ffn_dim, route_norm=True)
    moe.jitter = float(values.get("router_jitter_noise") or 0.0)
    return ModelConfig(**common_model_fields(values), n_dense_layers=0, ffn_dim=expert_ffn_dim, moe=moe)


def _mixtral_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **common_hf_fields(cfg, "mixtral", MIXTRAL.hf_class),
        "intermediate_size": cfg.moe.expert_ffn_dim,
        "num_local_experts": cfg.moe.n_experts,
        "router_jitter_noise": cfg.moe.jitter,
        "sliding_window": None,
    }


def _mixtral_misfits(cfg: ModelConfig) -> list[str]:
    problems = softmax_misfits(cfg)
    if cfg.n_dense_layers:
        problems.append(f"n-dense-layers={cfg.n_dense_layers} (needs 0)")
    if not cfg.moe.route_norm:
        problems.append("moe.route-norm=false (Mixtral renormalises the top-k gates)")
    if cfg.qk_norm:
        problems.append("qk-norm=true (Mixtral has no query/key norm)")
    return problems


MIXTRAL = Architecture(
    model_type="mixtral",
    hf_class="MixtralForCausalLM",
    fields=frozenset({"intermediate_size", "num_local_experts", "router_jitter_noise", "sliding_window"}),
    defaults={
        "rope_theta": 1e6,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 4096 * 32,
        "tie_word_embeddings": False,
    },
    moe_block="block_sparse_moe",
    expert_projections=("w1", "w3", "w2"),
    to_model=_mixtral_to_model,
    unsupported=_mixtral_unsupported,
    to_hf=_mixtral_to_hf,
    misfits=_mixtral_misfits,
)
