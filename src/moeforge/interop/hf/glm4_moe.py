"""GLM-4.5's MoE (`Glm4MoeForCausalLM`): its config.json mapping and its tensor names.

DeepSeek-V3's MoE with grouped-query attention: sigmoid scores, top-k inside the best expert groups
chosen with the correction bias, gates normalised and scaled by `routed_scaling_factor`; shared
experts; leading dense layers (`first_k_dense_replace`); query/key head norms when `use_qk_norm`.
It is the format of moeforge's default model (GQA attention with DeepSeek-V3 routing), which no
other architecture here holds. RoPE must rotate whole heads: `transformers` rotates half of each head
unless `partial_rotary_factor` says otherwise (its default 0.5), so exports write 1.0 and imports
refuse anything else. The multi-token-prediction layers of GLM-4.5 are not read or written.
Tensors: the common layout (layout.py) as DeepSeek-V3's: the MoE block at `mlp`, expert projections
gate_proj, up_proj, down_proj, shared experts at `mlp.shared_experts`, and the router's balancing
bias as `mlp.gate.e_score_correction_bias` (fp32); `self_attn.{q,k}_norm` hold the head norms.
"""

from __future__ import annotations

from typing import Any

from moeforge.config import ModelConfig
from moeforge.interop.hf.architecture import (
    Architecture,
    common_hf_fields,
    common_model_fields,
    require,
    sigmoid_group_hf_fields,
    sigmoid_group_misfits,
    sigmoid_group_moe,
)


def _glm4_unsupported(values: dict[str, Any]) -> list[str]:
    problems = []
    rope = values.get("rope_parameters") or {}
    factor = values.get("partial_rotary_factor", rope.get("partial_rotary_factor", "0.5 (the default)"))
    if factor != 1.0:
        problems.append(f"partial_rotary_factor={factor} (RoPE over whole heads only: 1.0)")
    if values.get("num_mtp_layers"):
        problems.append(f"num_mtp_layers={values['num_mtp_layers']} (GLM's MTP layers are not read: 0)")
    if not values["n_shared_experts"]:
        problems.append("n_shared_experts=0 (at least one shared expert)")
    return problems


def _glm4_to_model(values: dict[str, Any]) -> ModelConfig:
    """DeepSeek-V3's routing (trained with moeforge's default balancing: the bias and the sequence-wise
    loss) under grouped-query attention."""
    moe = sigmoid_group_moe(values)
    common = common_model_fields(values)
    return ModelConfig(
        **common,
        n_dense_layers=min(values["first_k_dense_replace"], common["n_layers"]),
        ffn_dim=require(values, "intermediate_size"),
        qk_norm=bool(values["use_qk_norm"]),
        moe=moe,
    )


def _glm4_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **common_hf_fields(cfg, "glm4_moe", GLM4_MOE.hf_class),
        **sigmoid_group_hf_fields(cfg),
        "partial_rotary_factor": 1.0,
        "use_qk_norm": cfg.qk_norm,
        "num_mtp_layers": 0,
    }


def _glm4_misfits(cfg: ModelConfig) -> list[str]:
    problems = sigmoid_group_misfits(cfg)
    if cfg.mtp_depth:
        problems.append(f"mtp-depth={cfg.mtp_depth} (needs 0: GLM's MTP layers are not written)")
    return problems


# config.json fields this architecture maps or checks, beyond the common ones.
_FIELDS = frozenset(
    {
        "intermediate_size", "moe_intermediate_size", "n_routed_experts", "n_shared_experts",
        "routed_scaling_factor", "norm_topk_prob", "n_group", "topk_group", "first_k_dense_replace",
        "use_qk_norm", "partial_rotary_factor", "num_mtp_layers", "num_nextn_predict_layers",
    }
)  # fmt: skip

GLM4_MOE = Architecture(
    model_type="glm4_moe",
    hf_class="Glm4MoeForCausalLM",
    fields=_FIELDS,
    defaults={
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "n_shared_experts": 1,
        "routed_scaling_factor": 1.0,
        "norm_topk_prob": True,
        "n_group": 1,
        "topk_group": 1,
        "first_k_dense_replace": 1,
        "use_qk_norm": False,
    },
    moe_block="mlp",
    expert_projections=("gate_proj", "up_proj", "down_proj"),
    to_model=_glm4_to_model,
    unsupported=_glm4_unsupported,
    to_hf=_glm4_to_hf,
    misfits=_glm4_misfits,
    correction_bias=True,
)
