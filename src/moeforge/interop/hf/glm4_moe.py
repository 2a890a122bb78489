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

from moeforge.config import ModelConfig, MoEConfig
from moeforge.interop.hf.architecture import Architecture, common_hf_fields, common_model_fields, require


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
    moe = MoEConfig(
        n_experts=require(values, "n_routed_experts"),
        top_k=require(values, "num_experts_per_tok"),
        expert_ffn_dim=require(values, "moe_intermediate_size"),
        n_shared_experts=values["n_shared_experts"],
        score_func="sigmoid",
        route_norm=bool(values["norm_topk_prob"]),
        route_scale=float(values["routed_scaling_factor"]),
        n_groups=values["n_group"] or 1,
        topk_groups=values["topk_group"] or 1,
    )
    common = common_model_fields(values)
    return ModelConfig(
        **common,
        n_dense_layers=min(values["first_k_dense_replace"], common["n_layers"]),
        ffn_dim=require(values, "intermediate_size"),
        qk_norm=bool(values["use_qk_norm"]),
        moe=moe,
    )


def _glm4_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    return {
        **common_hf_fields(cfg, "glm4_moe", GLM4_MOE.hf_class),
        "partial_rotary_factor": 1.0,
        "intermediate_size": cfg.ffn_dim,
        "moe_intermediate_size": moe.expert_ffn_dim,
        "n_routed_experts": moe.n_experts,
        "n_shared_experts": moe.n_shared_experts,
        "routed_scaling_factor": moe.route_scale,
        "norm_topk_prob": moe.route_norm,
        "n_group": moe.n_groups,
        "topk_group": moe.topk_groups,
        "first_k_dense_replace": cfg.n_dense_layers,
        "use_qk_norm": cfg.qk_norm,
        "num_mtp_layers": 0,
    }


def _glm4_misfits(cfg: ModelConfig) -> list[str]:
    moe = cfg.moe
    problems = []
    if moe.score_func != "sigmoid":
        problems.append(f"moe.score-func={moe.score_func!r} (needs 'sigmoid')")
    if not moe.n_shared_experts:
        problems.append("moe.n-shared-experts=0 (needs >= 1)")
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
