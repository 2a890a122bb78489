"""DeepSeek-V3 (`DeepseekV3ForCausalLM`): its config.json mapping and its tensor names.

Config: sigmoid scores, top-k inside the best expert groups chosen with the correction bias, gates
normalised and scaled by `routed_scaling_factor`; shared experts; leading dense layers
(`first_k_dense_replace`); multi-head latent attention; an optional multi-token-prediction layer.
Tensors: the common layout (layout.py) with the MoE block at `mlp`, each expert's projections named
gate_proj, up_proj, down_proj, the shared experts at `mlp.shared_experts`, and the router's balancing
bias as `mlp.gate.e_score_correction_bias` (fp32). The MLA projections and the MTP layer (stored as
layer `num_hidden_layers`) are placed by layout.py's `_mla_layout` and `_mtp_layout`, which go with
moeforge's attention kind and MTP modules rather than with the architecture.
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

# `transformers` builds MLA's latent norms with eps 1e-6 whatever rms_norm_eps says (as DeepSeek's
# own code does); moeforge uses model.norm-eps everywhere, so only 1e-6 gives the same model.
_DEEPSEEK_LATENT_NORM_EPS = 1e-6


def _deepseek_unsupported(values: dict[str, Any]) -> list[str]:
    problems = []
    for key, allowed in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc"), ("moe_layer_freq", 1)):
        if values.get(key, allowed) != allowed:
            problems.append(f"{key}={values[key]!r} (only {allowed!r})")
    if values["rms_norm_eps"] != _DEEPSEEK_LATENT_NORM_EPS:
        problems.append(f"rms_norm_eps={values['rms_norm_eps']} (only 1e-6, the eps of the MLA latent norms)")
    if not values["n_shared_experts"]:
        problems.append("n_shared_experts=0 (at least one shared expert)")
    return problems


def _deepseek_to_model(values: dict[str, Any]) -> ModelConfig:
    """Sigmoid scores, top-k inside the best groups chosen with the correction bias, gates normalised
    and scaled by routed_scaling_factor; aux-loss-free balancing and the sequence-wise loss for training."""
    moe = sigmoid_group_moe(values, **_deepseek_balance_losses(values))
    nope, rope = require(values, "qk_nope_head_dim"), require(values, "qk_rope_head_dim")
    common = common_model_fields(values)
    return ModelConfig(
        **{**common, "n_kv_heads": common["n_heads"], "head_dim": nope + rope},
        n_dense_layers=min(values["first_k_dense_replace"], common["n_layers"]),
        ffn_dim=require(values, "intermediate_size"),
        attention="mla",
        q_lora_rank=values.get("q_lora_rank") or 0,
        kv_lora_rank=require(values, "kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=require(values, "v_head_dim"),
        moe=moe,
    )


def _deepseek_balance_losses(values: dict[str, Any]) -> dict[str, float]:
    """DeepSeek's `aux_loss_alpha` weighs the sequence-wise loss (`seq_aux: true`, V3) or the batch one."""
    alpha = values.get("aux_loss_alpha", 1e-4)
    if values.get("seq_aux", True):
        return {"seq_aux_coef": alpha, "aux_coef": 0.0}
    return {"seq_aux_coef": 0.0, "aux_coef": alpha}


def _deepseek_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    moe = cfg.moe
    common = common_hf_fields(cfg, "deepseek_v3", DEEPSEEK_V3.hf_class)
    del common["head_dim"], common["router_aux_loss_coef"]  # derived by transformers / not used
    return {
        **common,
        **sigmoid_group_hf_fields(cfg),
        "num_key_value_heads": cfg.n_heads,
        "q_lora_rank": cfg.q_lora_rank or None,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
        "v_head_dim": cfg.v_head_dim,
        "rope_interleave": True,
        "seq_aux": not moe.aux_coef,
        "aux_loss_alpha": moe.aux_coef or moe.seq_aux_coef,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "num_nextn_predict_layers": cfg.mtp_depth,
    }


def _deepseek_misfits(cfg: ModelConfig) -> list[str]:
    problems = sigmoid_group_misfits(cfg)
    if cfg.norm_eps != _DEEPSEEK_LATENT_NORM_EPS:
        problems.append(f"norm-eps={cfg.norm_eps} (needs 1e-6)")
    if cfg.mtp_depth > 1:
        problems.append(f"mtp-depth={cfg.mtp_depth} (needs 0 or 1: one multi-token-prediction layer)")
    if cfg.mtp_depth and cfg.n_dense_layers >= cfg.n_layers:
        problems.append(f"n-dense-layers={cfg.n_dense_layers} with mtp-depth (DeepSeek's MTP layer is MoE)")
    return problems


# config.json fields this architecture maps or checks, beyond the common ones.
_FIELDS = frozenset(
    {
        "intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_local_experts",
        "n_shared_experts", "routed_scaling_factor", "norm_topk_prob", "n_group", "topk_group",
        "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
        "qk_head_dim", "v_head_dim", "rope_interleave", "scoring_func", "topk_method", "moe_layer_freq",
        "seq_aux", "aux_loss_alpha", "ep_size", "pretraining_tp", "num_nextn_predict_layers", "num_mtp_layers",
    }
)  # fmt: skip

DEEPSEEK_V3 = Architecture(
    model_type="deepseek_v3",
    hf_class="DeepseekV3ForCausalLM",
    fields=_FIELDS,
    defaults={
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
        "n_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "norm_topk_prob": True,
        "n_group": 8,
        "topk_group": 4,
        "first_k_dense_replace": 3,
    },
    moe_block="mlp",
    expert_projections=("gate_proj", "up_proj", "down_proj"),
    to_model=_deepseek_to_model,
    unsupported=_deepseek_unsupported,
    to_hf=_deepseek_to_hf,
    misfits=_deepseek_misfits,
    correction_bias=True,
)
