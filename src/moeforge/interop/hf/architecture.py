"""What an architecture module declares (`Architecture`), and the config.json fields all of them share.

A config.json is mapped field by field onto a `ModelConfig`; a field an architecture does not know, or
a value moeforge cannot represent (rope scaling, attention biases, sliding windows, FP8 quantization,
...), is a one-line `HFInteropError` naming it, never a silently different model. The helpers here
map, write and check the fields every architecture has; each architecture module adds its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeforge.config import ModelConfig, MoEConfig
from moeforge.config.checks import INT64
from moeforge.config.model import MODEL_BOUNDS, MOE_BOUNDS
from moeforge.interop.hf.errors import HFInteropError

# Fields that describe the run, the tokenizer or the file, not the function the model computes.
IGNORED_FIELDS = frozenset(
    {
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
        "auto_map", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "output_router_logits",
        "tokenizer_class", "output_attentions", "output_hidden_states", "return_dict",
    }
)  # fmt: skip

# Fields every architecture here maps or checks.
COMMON_FIELDS = frozenset(
    {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
        "tie_word_embeddings", "initializer_range", "hidden_act", "attention_bias", "attention_dropout",
        "num_experts_per_tok", "router_aux_loss_coef",
    }
)  # fmt: skip


# Integer size fields of the formats, each with the moeforge field whose bounds it takes
# (`MODEL_BOUNDS`, `MOE_BOUNDS`): checked before any field is used, so that no range() or count runs
# over a num_hidden_layers of 1e18.
SIZE_FIELDS = {
    "vocab_size": "vocab_size", "hidden_size": "dim", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "head_dim": "head_dim",
    "max_position_embeddings": "max_seq_len", "intermediate_size": "ffn_dim",
    "moe_intermediate_size": "moe.expert_ffn_dim", "n_routed_experts": "moe.n_experts",
    "num_experts": "moe.n_experts", "num_local_experts": "moe.n_experts", "num_experts_per_tok": "moe.n_experts",
    "n_shared_experts": "moe.n_shared_experts", "n_group": "moe.n_experts", "topk_group": "moe.n_experts",
    "first_k_dense_replace": "n_layers", "decoder_sparse_step": "n_layers", "max_window_layers": "n_layers",
    "q_lora_rank": "q_lora_rank", "kv_lora_rank": "kv_lora_rank", "qk_nope_head_dim": "qk_nope_head_dim",
    "qk_rope_head_dim": "qk_rope_head_dim", "qk_head_dim": "head_dim", "v_head_dim": "v_head_dim",
    "num_nextn_predict_layers": "mtp_depth", "num_mtp_layers": "mtp_depth",
}  # fmt: skip

# Number fields of the formats (a float, or an integer written without a fraction).
NUMBER_FIELDS = frozenset(
    {
        "rope_theta", "rms_norm_eps", "initializer_range", "routed_scaling_factor", "router_aux_loss_coef",
        "aux_loss_alpha", "router_jitter_noise", "attention_dropout",
    }
)  # fmt: skip


# Flag fields of the formats: JSON booleans (a string "false" would read as true).
BOOL_FIELDS = frozenset(
    {"tie_word_embeddings", "norm_topk_prob", "attention_bias", "use_sliding_window", "seq_aux", "rope_interleave"}
)


def check_json_numbers(value: Any, file: Path | str, where: str = "") -> None:
    """Every number in a parsed config.json finite (Python's json reads NaN, Infinity and an
    overflowing 1e999 as floats) and every integer within int64; a one-line `HFInteropError` naming
    the file and the field (dotted for nested objects, [i] for list items) otherwise."""
    if isinstance(value, dict):
        for key, item in value.items():
            check_json_numbers(item, file, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            check_json_numbers(item, file, f"{where}[{i}]")
    elif isinstance(value, float) and not math.isfinite(value):
        raise HFInteropError(f"{file}: {where}: got {value}; allowed: a finite number")
    elif isinstance(value, int) and not INT64[0] <= value <= INT64[1]:
        raise HFInteropError(f"{file}: {where}: got {_short(value)}; allowed: an integer within int64")


def _short(value: int) -> str:
    text = str(value)
    return text if len(text) <= 24 else f"an integer of {len(text)} digits"


def check_value_types(values: dict[str, Any]) -> None:
    """The size fields present integers within moeforge's bounds for what they set (`SIZE_FIELDS`),
    the number fields numbers (`NUMBER_FIELDS`, RoPE's theta), the flags booleans (`BOOL_FIELDS`),
    rope_parameters an object and mlp_only_layers a list of integers; a one-line `HFInteropError`
    naming the field. None stands for 'not set' where the formats allow it (q_lora_rank, head_dim)."""
    for key, target in SIZE_FIELDS.items():
        value = values.get(key)
        if value is None:
            continue
        _, high = _bounds_of(target)
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if not is_int or not 0 <= value <= high:
            flag = target.replace("_", "-")
            raise HFInteropError(
                f"{key}: got {value!r}; allowed: an integer in [0, {high}] (the bound of moeforge's model.{flag})"
            )
    rope = values.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        raise HFInteropError(f"rope_parameters: got {rope!r}; allowed: an object of fields")
    numbers = {key: values.get(key) for key in NUMBER_FIELDS}
    numbers["rope_parameters.rope_theta"] = (rope or {}).get("rope_theta")
    for key, value in numbers.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise HFInteropError(f"{key}: got {value!r}; allowed: a number")
    for key in BOOL_FIELDS:
        value = values.get(key)
        if value is not None and not isinstance(value, bool):
            raise HFInteropError(f"{key}: got {value!r}; allowed: true | false")
    layers = values.get("mlp_only_layers")
    if layers is not None and not (
        isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers)
    ):
        raise HFInteropError(f"mlp_only_layers: got {layers!r}; allowed: a list of layer numbers")


def _bounds_of(target: str) -> tuple[int, int]:
    """('n_layers' -> MODEL_BOUNDS['n_layers'], 'moe.n_experts' -> MOE_BOUNDS['n_experts'])."""
    section, _, name = target.rpartition(".")
    return (MOE_BOUNDS if section == "moe" else MODEL_BOUNDS)[name]


@dataclass(frozen=True)
class Architecture:
    """How one Hugging Face architecture's config and tensor names map onto moeforge."""

    model_type: str
    hf_class: str
    fields: frozenset[str]
    """config.json fields it maps or checks, beyond the common ones"""
    defaults: dict[str, Any]
    """the `transformers` class defaults of fields a config.json may leave out"""
    moe_block: str
    """name of the MoE block inside a decoder layer"""
    expert_projections: tuple[str, str, str]
    """names of an expert's gate, up and down projections"""
    to_model: Callable[[dict[str, Any]], ModelConfig]
    unsupported: Callable[[dict[str, Any]], list[str]]
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    misfits: Callable[[ModelConfig], list[str]]
    """why a moeforge model config cannot be written in this format ([] when it can)"""
    correction_bias: bool = False
    """the router stores the balancing bias (`e_score_correction_bias`, DeepSeek-V3)"""


def require(values: dict[str, Any], key: str) -> Any:
    value = values.get(key)
    if value is None:
        raise HFInteropError(f"missing field {key!r}")
    return value


def common_unsupported(values: dict[str, Any]) -> list[str]:
    problems = []
    if values.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={values['hidden_act']!r} (SwiGLU with silu only)")
    if values.get("attention_bias"):
        problems.append("attention_bias=true (projections without bias only)")
    if values.get("attention_dropout"):
        problems.append(f"attention_dropout={values['attention_dropout']} (no dropout)")
    if values.get("rope_scaling"):
        problems.append(f"rope_scaling={values['rope_scaling']} (plain RoPE only)")
    rope = values.get("rope_parameters") or {}
    plain = {"rope_type": "default", "partial_rotary_factor": 1.0}  # (whole heads rotated)
    extra_rope = {k: v for k, v in rope.items() if k != "rope_theta" and plain.get(k, object()) != v}
    if extra_rope:
        problems.append(f"rope_parameters={rope} (plain RoPE only)")
    return problems


def _rope_theta(values: dict[str, Any]) -> float:
    rope = values.get("rope_parameters") or {}
    return float(rope.get("rope_theta", values["rope_theta"]))


def common_model_fields(values: dict[str, Any]) -> dict[str, Any]:
    n_heads = require(values, "num_attention_heads")
    return {
        "vocab_size": require(values, "vocab_size"),
        "dim": require(values, "hidden_size"),
        "n_layers": require(values, "num_hidden_layers"),
        "n_heads": n_heads,
        "n_kv_heads": values.get("num_key_value_heads") or n_heads,
        "head_dim": values.get("head_dim") or 0,
        "max_seq_len": values["max_position_embeddings"],
        "rope_theta": _rope_theta(values),
        "norm_eps": values["rms_norm_eps"],
        "tie_embeddings": bool(values["tie_word_embeddings"]),
        "init_std": values.get("initializer_range", 0.02),
    }


def common_hf_fields(cfg: ModelConfig, arch: str, hf_class: str) -> dict[str, Any]:
    return {
        "architectures": [hf_class],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.resolved_head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_experts_per_tok": cfg.moe.top_k,
        "router_aux_loss_coef": cfg.moe.aux_coef,
    }


def softmax_moe(values: dict[str, Any], n_experts: int, expert_ffn_dim: int, route_norm: bool) -> MoEConfig:
    """Softmax routing without a balancing bias (the formats have none to store it), with the classic
    batch aux loss at the checkpoint's own `router_aux_loss_coef` for fine-tuning."""
    return MoEConfig(
        n_experts=n_experts,
        top_k=require(values, "num_experts_per_tok"),
        expert_ffn_dim=expert_ffn_dim,
        n_shared_experts=0,
        score_func="softmax",
        route_norm=route_norm,
        bias_update_rate=0.0,
        seq_aux_coef=0.0,
        aux_coef=values.get("router_aux_loss_coef") or 0.0,
    )


def sigmoid_group_moe(values: dict[str, Any], **balance: float) -> MoEConfig:
    """DeepSeek-V3's routing, as DeepSeek-V3 and GLM-4.5's MoE store it: sigmoid scores, top-k inside
    the best groups chosen with the correction bias, gates normalised (`norm_topk_prob`) and scaled by
    `routed_scaling_factor`, shared experts; `balance` sets the balance-loss coefficients."""
    return MoEConfig(
        n_experts=require(values, "n_routed_experts"),
        top_k=require(values, "num_experts_per_tok"),
        expert_ffn_dim=require(values, "moe_intermediate_size"),
        n_shared_experts=values["n_shared_experts"],
        score_func="sigmoid",
        route_norm=bool(values["norm_topk_prob"]),
        route_scale=float(values["routed_scaling_factor"]),
        n_groups=values["n_group"] or 1,
        topk_groups=values["topk_group"] or 1,
        **balance,
    )


def sigmoid_group_hf_fields(cfg: ModelConfig) -> dict[str, Any]:
    """The config.json fields of `sigmoid_group_moe`'s routing, and the leading dense layers."""
    moe = cfg.moe
    return {
        "intermediate_size": cfg.ffn_dim,
        "moe_intermediate_size": moe.expert_ffn_dim,
        "n_routed_experts": moe.n_experts,
        "n_shared_experts": moe.n_shared_experts,
        "routed_scaling_factor": moe.route_scale,
        "norm_topk_prob": moe.route_norm,
        "n_group": moe.n_groups,
        "topk_group": moe.topk_groups,
        "first_k_dense_replace": cfg.n_dense_layers,
    }


def sigmoid_group_misfits(cfg: ModelConfig) -> list[str]:
    """What a format of `sigmoid_group_moe`'s routing cannot hold of a moeforge model config."""
    problems = []
    if cfg.moe.score_func != "sigmoid":
        problems.append(f"moe.score-func={cfg.moe.score_func!r} (needs 'sigmoid')")
    if not cfg.moe.n_shared_experts:
        problems.append("moe.n-shared-experts=0 (needs >= 1)")
    return problems


def softmax_misfits(cfg: ModelConfig) -> list[str]:
    """What a softmax-routed format (Qwen3-MoE, Mixtral) cannot hold of a moeforge model config."""
    moe = cfg.moe
    problems = []
    if moe.score_func != "softmax":
        problems.append(f"moe.score-func={moe.score_func!r} (needs 'softmax')")
    if moe.n_shared_experts:
        problems.append(f"moe.n-shared-experts={moe.n_shared_experts} (needs 0)")
    if moe.n_groups != 1:
        problems.append(f"moe.n-groups={moe.n_groups} (needs 1)")
    if moe.route_scale != 1.0:
        problems.append(f"moe.route-scale={moe.route_scale} (needs 1)")
    if cfg.mtp_depth:
        problems.append(f"mtp-depth={cfg.mtp_depth} (needs 0)")
    return problems
