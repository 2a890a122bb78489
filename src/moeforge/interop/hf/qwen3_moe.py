"""Qwen3-MoE (`Qwen3MoeForCausalLM`): its config.json mapping and its tensor names.

Config: softmax routing, top-k renormalised when `norm_topk_prob`; dense MLP layers only leading
(`mlp_only_layers` / `decoder_sparse_step`); query and key heads normalised (`qk_norm`).
Tensors: the common layout (layout.py) with the MoE block at `mlp` and each expert's projections
named gate_proj, up_proj, down_proj; `self_attn.{q,k}_norm` hold the query/key norms.
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
from moeforge.interop.hf.errors import HFInteropError


def _qwen3_dense_layers(values: dict[str, Any]) -> list[int]:
    """Layers with a dense MLP: those listed in mlp_only_layers and those off the sparse step."""
    step = values["decoder_sparse_step"] or 1
    listed = set(values["mlp_only_layers"] or [])
    n_layers = require(values, "num_hidden_layers")
    return [i for i in range(n_layers) if i in listed or (i + 1) % step != 0]


def _qwen3_unsupported(values: dict[str, Any]) -> list[str]:
    problems = []
    if values["use_sliding_window"]:
        problems.append("use_sliding_window=true (full causal attention only)")
    dense = _qwen3_dense_layers(values)
    if dense != list(range(len(dense))):
        problems.append(
            f"mlp_only_layers={values['mlp_only_layers']}, decoder_sparse_step={values['decoder_sparse_step']} "
            f"(dense layers {dense}; only leading dense layers are supported)"
        )
    return problems


def _qwen3_to_model(values: dict[str, Any]) -> ModelConfig:
    n_experts = values.get("num_experts") or values.get("num_local_experts")
    if not n_experts:
        raise HFInteropError("missing field 'num_experts'")
    moe = softmax_moe(
        values, n_experts, require(values, "moe_intermediate_size"), bool(values["norm_topk_prob"])
    )
    return ModelConfig(
        **common_model_fields(values),
        n_dense_layers=len(_qwen3_dense_layers(values)),
        ffn_dim=require(values, "intermediate_size"),
        qk_norm=True,
        moe=moe,
    )


def _qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **common_hf_fields(cfg, "qwen3_moe", QWEN3_MOE.hf_class),
        "intermediate_size": cfg.ffn_dim,
        "moe_intermediate_size": cfg.moe.expert_ffn_dim,
        "num_experts": cfg.moe.n_experts,
        "norm_topk_prob": cfg.moe.route_norm,
        "decoder_sparse_step": 1,
        "mlp_only_layers": list(range(cfg.n_dense_layers)),
        "use_sliding_window": False,
        "sliding_window": None,
    }


def _qwen3_misfits(cfg: ModelConfig) -> list[str]:
    problems = softmax_misfits(cfg)
    if not cfg.qk_norm:
        problems.append("qk-norm=false (Qwen3 normalises query and key heads)")
    return problems


# config.json fields this architecture maps or checks, beyond the common ones.
_FIELDS = frozenset(
    {
        "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts", "norm_topk_prob",
        "decoder_sparse_step", "mlp_only_layers", "use_sliding_window", "sliding_window", "max_window_layers",
    }
)  # fmt: skip

QWEN3_MOE = Architecture(
    model_type="qwen3_moe",
    hf_class="Qwen3MoeForCausalLM",
    fields=_FIELDS,
    defaults={
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "norm_topk_prob": False,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "use_sliding_window": False,
    },
    moe_block="mlp",
    expert_projections=("gate_proj", "up_proj", "down_proj"),
    to_model=_qwen3_to_model,
    unsupported=_qwen3_unsupported,
    to_hf=_qwen3_to_hf,
    misfits=_qwen3_misfits,
)
