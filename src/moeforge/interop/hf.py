"""Hugging Face safetensors checkpoints <-> moeforge models: Qwen3-MoE, Mixtral and DeepSeek-V3.

Local directories only (config.json + *.safetensors, optionally sharded with an index); nothing is
downloaded. A config.json is mapped field by field onto a `ModelConfig`; a field this module does not
know, or a value moeforge cannot represent (rope scaling, attention biases, sliding windows, FP8
quantization, ...), is a one-line `HFInteropError` naming it, never a silently different model.

Weights are read one tensor at a time from memory-mapped shards (memory stays near the model plus one
tensor) and written shard by shard. Where a Hugging Face tensor sits inside a moeforge tensor:

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

Mixtral names the MoE block `block_sparse_moe` and its expert projections w1 (gate), w3 (up), w2
(down). RoPE is the rotate-half layout on both sides, except DeepSeek's interleaved RoPE rows, which
are permuted on import (`_mla_layout`). Import then export reproduces every tensor bit for bit
(`to_hf(..., dtype=)` the stored dtype). DeepSeek's multi-token-prediction layers are skipped, as
`transformers` skips them.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from moeforge.config import ConfigError, ModelConfig, MoEConfig
from moeforge.model.transformer import Transformer

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class HFInteropError(ValueError):
    """A Hugging Face checkpoint moeforge cannot read or a model it cannot write: one line, naming why."""


# ----------------------------------------------------------------------------------------------
# config.json <-> ModelConfig

# Fields that describe the run, the tokenizer or the file, not the function the model computes.
_IGNORED_FIELDS = frozenset(
    {
        "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
        "auto_map", "use_cache", "bos_token_id", "eos_token_id", "pad_token_id", "output_router_logits",
        "tokenizer_class", "output_attentions", "output_hidden_states", "return_dict",
    }
)

# Fields every architecture here maps or checks.
_COMMON_FIELDS = frozenset(
    {
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_theta", "rope_parameters", "rope_scaling",
        "tie_word_embeddings", "initializer_range", "hidden_act", "attention_bias", "attention_dropout",
        "num_experts_per_tok", "router_aux_loss_coef",
    }
)


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


def read_hf_config(path: Path | str) -> dict[str, Any]:
    file = Path(path) / CONFIG_FILE
    if not file.is_file():
        raise HFInteropError(f"{path}: no {CONFIG_FILE}; expected a Hugging Face model directory")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise HFInteropError(f"{file}: not valid JSON: {err}") from None


def hf_model_config(path: Path | str) -> ModelConfig:
    """The moeforge `ModelConfig` of a Hugging Face model directory (its config.json)."""
    hf = read_hf_config(path)
    where = Path(path) / CONFIG_FILE
    arch = architecture_of(hf, where)
    unknown = sorted(set(hf) - _IGNORED_FIELDS - _COMMON_FIELDS - arch.fields)
    if unknown:
        raise HFInteropError(f"{where}: unsupported config field(s) for {arch.model_type}: {', '.join(unknown)}")
    values = {**arch.defaults, **hf}
    try:
        problems = _common_unsupported(values) + arch.unsupported(values)
        if problems:
            raise HFInteropError(f"unsupported: {'; '.join(problems)}")
        cfg = arch.to_model(values)
    except HFInteropError as err:
        raise HFInteropError(f"{where}: {err}") from None
    try:
        cfg.validate()
    except ConfigError as err:
        raise HFInteropError(f"{where}: gives an invalid moeforge model: {err}") from None
    return cfg


def architecture_of(hf: dict[str, Any], where: Path | str) -> Architecture:
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        allowed = " | ".join(repr(name) for name in ARCHITECTURES)
        raise HFInteropError(f"{where}: model_type: got {model_type!r}; allowed: {allowed}")
    return ARCHITECTURES[model_type]


def _require(values: dict[str, Any], key: str) -> Any:
    value = values.get(key)
    if value is None:
        raise HFInteropError(f"missing field {key!r}")
    return value


def _common_unsupported(values: dict[str, Any]) -> list[str]:
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
    extra_rope = {k: v for k, v in rope.items() if k != "rope_theta" and not (k == "rope_type" and v == "default")}
    if extra_rope:
        problems.append(f"rope_parameters={rope} (plain RoPE only)")
    return problems


def _rope_theta(values: dict[str, Any]) -> float:
    rope = values.get("rope_parameters") or {}
    return float(rope.get("rope_theta", values["rope_theta"]))


def _common_model_fields(values: dict[str, Any]) -> dict[str, Any]:
    n_heads = _require(values, "num_attention_heads")
    return {
        "vocab_size": _require(values, "vocab_size"),
        "dim": _require(values, "hidden_size"),
        "n_layers": _require(values, "num_hidden_layers"),
        "n_heads": n_heads,
        "n_kv_heads": values.get("num_key_value_heads") or n_heads,
        "head_dim": values.get("head_dim") or 0,
        "max_seq_len": values["max_position_embeddings"],
        "rope_theta": _rope_theta(values),
        "norm_eps": values["rms_norm_eps"],
        "tie_embeddings": bool(values["tie_word_embeddings"]),
        "init_std": values.get("initializer_range", 0.02),
    }


def _common_hf_fields(cfg: ModelConfig, arch: str, hf_class: str) -> dict[str, Any]:
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


def _softmax_moe(values: dict[str, Any], n_experts: int, expert_ffn_dim: int, route_norm: bool) -> MoEConfig:
    """Softmax routing without a balancing bias (the formats have none to store it), with the classic
    batch aux loss at the checkpoint's own `router_aux_loss_coef` for fine-tuning."""
    return MoEConfig(
        n_experts=n_experts,
        top_k=_require(values, "num_experts_per_tok"),
        expert_ffn_dim=expert_ffn_dim,
        n_shared_experts=0,
        score_func="softmax",
        route_norm=route_norm,
        bias_update_rate=0.0,
        seq_aux_coef=0.0,
        aux_coef=values.get("router_aux_loss_coef") or 0.0,
    )


def _softmax_misfits(cfg: ModelConfig) -> list[str]:
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


# Qwen3-MoE ------------------------------------------------------------------------------------


def _qwen3_dense_layers(values: dict[str, Any]) -> list[int]:
    """Layers with a dense MLP: those listed in mlp_only_layers and those off the sparse step."""
    step = values["decoder_sparse_step"] or 1
    listed = set(values["mlp_only_layers"] or [])
    n_layers = _require(values, "num_hidden_layers")
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
    moe = _softmax_moe(values, n_experts, _require(values, "moe_intermediate_size"), bool(values["norm_topk_prob"]))
    return ModelConfig(
        **_common_model_fields(values),
        n_dense_layers=len(_qwen3_dense_layers(values)),
        ffn_dim=_require(values, "intermediate_size"),
        qk_norm=True,
        moe=moe,
    )


def _qwen3_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **_common_hf_fields(cfg, "qwen3_moe", QWEN3_MOE.hf_class),
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
    problems = _softmax_misfits(cfg)
    if not cfg.qk_norm:
        problems.append("qk-norm=false (Qwen3 normalises query and key heads)")
    return problems


QWEN3_MOE = Architecture(
    model_type="qwen3_moe",
    hf_class="Qwen3MoeForCausalLM",
    fields=frozenset(
        {
            "intermediate_size", "moe_intermediate_size", "num_experts", "num_local_experts", "norm_topk_prob",
            "decoder_sparse_step", "mlp_only_layers", "use_sliding_window", "sliding_window", "max_window_layers",
        }
    ),
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


# Mixtral --------------------------------------------------------------------------------------


def _mixtral_unsupported(values: dict[str, Any]) -> list[str]:
    if values.get("sliding_window") is not None:
        return [f"sliding_window={values['sliding_window']} (full causal attention only)"]
    return []


def _mixtral_to_model(values: dict[str, Any]) -> ModelConfig:
    """Mixtral: softmax over all experts, top-k, renormalised over the k (= top-k-then-softmax)."""
    expert_ffn_dim = _require(values, "intermediate_size")
    moe = _softmax_moe(values, _require(values, "num_local_experts"), expert_ffn_dim, route_norm=True)
    moe.jitter = float(values.get("router_jitter_noise") or 0.0)
    return ModelConfig(**_common_model_fields(values), n_dense_layers=0, ffn_dim=expert_ffn_dim, moe=moe)


def _mixtral_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        **_common_hf_fields(cfg, "mixtral", MIXTRAL.hf_class),
        "intermediate_size": cfg.moe.expert_ffn_dim,
        "num_local_experts": cfg.moe.n_experts,
        "router_jitter_noise": cfg.moe.jitter,
        "sliding_window": None,
    }


def _mixtral_misfits(cfg: ModelConfig) -> list[str]:
    problems = _softmax_misfits(cfg)
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


# DeepSeek-V3 ----------------------------------------------------------------------------------

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
    moe = MoEConfig(
        n_experts=_require(values, "n_routed_experts"),
        top_k=_require(values, "num_experts_per_tok"),
        expert_ffn_dim=_require(values, "moe_intermediate_size"),
        n_shared_experts=values["n_shared_experts"],
        score_func="sigmoid",
        route_norm=bool(values["norm_topk_prob"]),
        route_scale=float(values["routed_scaling_factor"]),
        n_groups=values["n_group"] or 1,
        topk_groups=values["topk_group"] or 1,
        **_deepseek_balance_losses(values),
    )
    nope, rope = _require(values, "qk_nope_head_dim"), _require(values, "qk_rope_head_dim")
    common = _common_model_fields(values)
    return ModelConfig(
        **{**common, "n_kv_heads": common["n_heads"], "head_dim": nope + rope},
        n_dense_layers=min(values["first_k_dense_replace"], common["n_layers"]),
        ffn_dim=_require(values, "intermediate_size"),
        attention="mla",
        q_lora_rank=values.get("q_lora_rank") or 0,
        kv_lora_rank=_require(values, "kv_lora_rank"),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rope,
        v_head_dim=_require(values, "v_head_dim"),
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
    common = _common_hf_fields(cfg, "deepseek_v3", DEEPSEEK_V3.hf_class)
    del common["head_dim"], common["router_aux_loss_coef"]  # derived by transformers / not used
    return {
        **common,
        "num_key_value_heads": cfg.n_heads,
        "intermediate_size": cfg.ffn_dim,
        "moe_intermediate_size": moe.expert_ffn_dim,
        "n_routed_experts": moe.n_experts,
        "n_shared_experts": moe.n_shared_experts,
        "routed_scaling_factor": moe.route_scale,
        "norm_topk_prob": moe.route_norm,
        "n_group": moe.n_groups,
        "topk_group": moe.topk_groups,
        "first_k_dense_replace": cfg.n_dense_layers,
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
        "num_nextn_predict_layers": 0,
    }


def _deepseek_misfits(cfg: ModelConfig) -> list[str]:
    moe = cfg.moe
    problems = []
    if moe.score_func != "sigmoid":
        problems.append(f"moe.score-func={moe.score_func!r} (needs 'sigmoid')")
    if not moe.n_shared_experts:
        problems.append("moe.n-shared-experts=0 (needs >= 1)")
    if cfg.norm_eps != _DEEPSEEK_LATENT_NORM_EPS:
        problems.append(f"norm-eps={cfg.norm_eps} (needs 1e-6)")
    if cfg.mtp_depth:
        problems.append(f"mtp-depth={cfg.mtp_depth} (multi-token prediction modules are not exported)")
    return problems


DEEPSEEK_V3 = Architecture(
    model_type="deepseek_v3",
    hf_class="DeepseekV3ForCausalLM",
    fields=frozenset(
        {
            "intermediate_size", "moe_intermediate_size", "n_routed_experts", "num_local_experts",
            "n_shared_experts", "routed_scaling_factor", "norm_topk_prob", "n_group", "topk_group",
            "first_k_dense_replace", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
            "qk_head_dim", "v_head_dim", "rope_interleave", "scoring_func", "topk_method", "moe_layer_freq",
            "seq_aux", "aux_loss_alpha", "ep_size", "pretraining_tp", "num_nextn_predict_layers", "num_mtp_layers",
        }
    ),
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

ARCHITECTURES: dict[str, Architecture] = {arch.model_type: arch for arch in (QWEN3_MOE, MIXTRAL, DEEPSEEK_V3)}


def export_architecture(cfg: ModelConfig) -> Architecture:
    """The Hugging Face architecture a moeforge model is written as: DeepSeek-V3 with MLA, Qwen3-MoE
    when it normalises query/key heads, Mixtral otherwise; an error listing what does not fit."""
    arch = DEEPSEEK_V3 if cfg.attention == "mla" else QWEN3_MOE if cfg.qk_norm else MIXTRAL
    problems = arch.misfits(cfg)
    if problems:
        raise HFInteropError(f"to_hf: this model does not fit the {arch.model_type} format: {'; '.join(problems)}")
    return arch


# ----------------------------------------------------------------------------------------------
# Where each Hugging Face tensor lives in a moeforge model


@dataclass(frozen=True)
class Slot:
    """One Hugging Face tensor = `state[param][index]`, transposed when `transpose`."""

    param: str
    index: tuple[Any, ...] = ()
    transpose: bool = False
    rows: tuple[int, ...] | None = None
    """moeforge row r holds Hugging Face row rows[r] (a permutation: DeepSeek's interleaved RoPE)"""
    fp32: bool = False
    """stored in fp32 whatever the checkpoint's precision (`transformers` keeps the correction bias so)"""


def tensor_layout(cfg: ModelConfig, arch: Architecture, hf_config: dict[str, Any]) -> dict[str, Slot]:
    """Every tensor of the Hugging Face checkpoint of `cfg`, by name, with its place in moeforge."""
    layout = {"model.embed_tokens.weight": Slot("tok_embeddings.weight"), "model.norm.weight": Slot("norm.weight")}
    if not cfg.tie_embeddings:
        layout["lm_head.weight"] = Slot("output.weight")
    for i in range(cfg.n_layers):
        layout.update(_layer_layout(cfg, arch, hf_config, i))
    return layout


def _layer_layout(cfg: ModelConfig, arch: Architecture, hf_config: dict[str, Any], i: int) -> dict[str, Slot]:
    hf, ours = f"model.layers.{i}.", f"layers.{i}."
    layout = {
        f"{hf}input_layernorm.weight": Slot(f"{ours}attention_norm.weight"),
        f"{hf}post_attention_layernorm.weight": Slot(f"{ours}ffn_norm.weight"),
    }
    if cfg.attention == "mla":
        interleaved = hf_config.get("rope_interleave", True)
        layout.update(_mla_layout(cfg, f"{hf}self_attn.", f"{ours}attention.", interleaved))
    else:
        layout.update(_attention_layout(cfg, f"{hf}self_attn.", f"{ours}attention."))
    if cfg.is_moe_layer(i):
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
        layout[f"{expert}{gate}.weight"] = Slot(f"{ours}experts.w13", (e, slice(None), slice(0, hidden)), True)
        layout[f"{expert}{up}.weight"] = Slot(f"{ours}experts.w13", (e, slice(None), slice(hidden, 2 * hidden)), True)
        layout[f"{expert}{down}.weight"] = Slot(f"{ours}experts.w2", (e,), True)
    if moe.n_shared_experts:
        layout.update(_swiglu_layout(f"{hf}shared_experts.", f"{ours}shared_experts.", moe.n_shared_experts * hidden))
    if arch.correction_bias:
        layout[f"{hf}gate.e_score_correction_bias"] = Slot(f"{ours}router.expert_bias", fp32=True)
    return layout


def _view(state: dict[str, torch.Tensor], slot: Slot) -> torch.Tensor:
    """The part of a moeforge tensor that holds one Hugging Face tensor, in the Hugging Face layout."""
    view = state[slot.param][slot.index]
    return view.T if slot.transpose else view


# ----------------------------------------------------------------------------------------------
# Import


def from_hf(path: Path | str, progress: bool = True) -> Transformer:
    """A moeforge `Transformer` (fp32, eval mode) with the weights of a local Hugging Face checkpoint."""
    model = Transformer(hf_model_config(path))
    load_hf_weights(model, path, progress)
    return model.eval()


@torch.no_grad()
def load_hf_weights(model: Transformer, path: Path | str, progress: bool = True) -> None:
    """Copy the tensors of a Hugging Face checkpoint into `model`, one tensor at a time.

    `model.cfg` must have the checkpoint's shapes (e.g. built from `hf_model_config(path)`); every
    tensor of the checkpoint must find its place and every place must be filled.
    """
    path = Path(path)
    hf_config = read_hf_config(path)
    arch = architecture_of(hf_config, path / CONFIG_FILE)
    layout = tensor_layout(model.cfg, arch, hf_config)
    state = model.state_dict(keep_vars=True)
    seen: set[str] = set()
    skipped_mtp = 0
    with tqdm(total=len(layout), desc="import", unit="tensor", disable=not progress) as bar:
        for file in weight_files(path):
            with safe_open(str(file), framework="pt") as shard:
                for name in shard.keys():  # noqa: SIM118 -- safe_open is not a mapping
                    if _is_mtp_tensor(name, model.cfg, hf_config):
                        skipped_mtp += 1
                        continue
                    if _skippable(name, model.cfg):
                        continue
                    if name not in layout:
                        raise HFInteropError(f"{file.name}: tensor {name!r} has no place in this {arch.model_type} model")
                    if name in seen:
                        raise HFInteropError(f"{file.name}: tensor {name!r} appears in more than one shard")
                    _place(state, layout[name], name, shard.get_tensor(name))
                    seen.add(name)
                    bar.update(1)
    missing = [name for name in layout if name not in seen]
    if missing:
        raise HFInteropError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]!r}")
    if skipped_mtp:
        warnings.warn(
            f"skipped the {skipped_mtp} tensors of the multi-token-prediction layer(s) "
            f"model.layers.{model.cfg.n_layers}.* (as transformers does): the main model is imported",
            stacklevel=2,
        )


def _skippable(name: str, cfg: ModelConfig) -> bool:
    """Tensors that are not model state: cached RoPE frequencies, and the head of a tied model."""
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


def _is_mtp_tensor(name: str, cfg: ModelConfig, hf_config: dict[str, Any]) -> bool:
    """A tensor of DeepSeek's multi-token-prediction layers, stored as layers after the last one."""
    n_mtp = hf_config.get("num_nextn_predict_layers") or hf_config.get("num_mtp_layers") or 0
    prefix = "model.layers."
    if not n_mtp or not name.startswith(prefix):
        return False
    layer = int(name[len(prefix) :].split(".", 1)[0])
    return cfg.n_layers <= layer < cfg.n_layers + n_mtp


def _place(state: dict[str, torch.Tensor], slot: Slot, name: str, value: torch.Tensor) -> None:
    target = _view(state, slot)
    if value.shape != target.shape:
        raise HFInteropError(
            f"tensor {name!r}: shape {list(value.shape)} does not fit this model (expected {list(target.shape)})"
        )
    target.copy_(value[list(slot.rows)] if slot.rows is not None else value)


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint: those its index names, else every *.safetensors file."""
    index = path / INDEX_FILE
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        files = [path / name for name in names]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise HFInteropError(f"{index}: names shard {absent[0]!r}, which does not exist")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HFInteropError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not read)")
    return files


# ----------------------------------------------------------------------------------------------
# Export


@torch.no_grad()
def to_hf(
    model: Transformer,
    path: Path | str,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write `model` as a Hugging Face checkpoint directory (config.json + safetensors shards).

    `dtype`: the stored precision (default: the model's). The architecture is the one whose format can
    hold the model (`export_architecture`); anything the format has no place for (e.g. a non-zero
    aux-loss-free bias with softmax routing) is an error, not dropped.
    """
    path = Path(path)
    cfg = model.cfg
    arch = export_architecture(cfg)
    dtype = dtype or model.tok_embeddings.weight.dtype
    if dtype not in DTYPE_NAMES:
        raise HFInteropError(f"to_hf: dtype {dtype} is not one of {', '.join(DTYPE_NAMES.values())}")
    if path.is_dir() and any(path.glob("*.safetensors")):
        raise HFInteropError(f"to_hf: {path} already holds *.safetensors files; choose an empty directory")
    hf_config = {**arch.to_hf(cfg), "torch_dtype": DTYPE_NAMES[dtype]}
    layout = tensor_layout(cfg, arch, hf_config)
    state = model.state_dict(keep_vars=True)
    _check_nothing_dropped(state, layout, cfg, arch)
    path.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(layout, state, dtype, max_shard_bytes)
    weight_map = {}
    with tqdm(total=len(layout), desc="export", unit="tensor", disable=not progress) as bar:
        for k, names in enumerate(shards):
            file = "model.safetensors" if len(shards) == 1 else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {name: _hf_tensor(state, layout[name], dtype) for name in names}
            save_file(tensors, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
            bar.update(len(names))
    if len(shards) > 1:
        total = sum(_nbytes(state, slot, dtype) for slot in layout.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))
    (path / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
    return path


def _hf_tensor(state: dict[str, torch.Tensor], slot: Slot, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous tensor in the Hugging Face layout and precision, for one slot."""
    tensor = _view(state, slot)
    if slot.rows is not None:
        tensor = tensor[torch.tensor(slot.rows).argsort()]
    return tensor.to(_slot_dtype(slot, dtype), memory_format=torch.contiguous_format, copy=True)


def _slot_dtype(slot: Slot, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if slot.fp32 else dtype


def _nbytes(state: dict[str, torch.Tensor], slot: Slot, dtype: torch.dtype) -> int:
    return _view(state, slot).numel() * _slot_dtype(slot, dtype).itemsize


def _check_nothing_dropped(
    state: dict[str, torch.Tensor], layout: dict[str, Slot], cfg: ModelConfig, arch: Architecture
) -> None:
    """Every moeforge tensor the format has no place for must be redundant: the tied head, or zeros."""
    placed = {slot.param for slot in layout.values()}
    for name, tensor in state.items():
        if name in placed or (cfg.tie_embeddings and name == "output.weight"):
            continue
        if torch.count_nonzero(tensor):
            raise HFInteropError(
                f"to_hf: {name} is non-zero and the {arch.model_type} format has no place for it"
                + (" (train with model.moe.bias-update-rate 0)" if name.endswith("expert_bias") else "")
            )


def _plan_shards(
    layout: dict[str, Slot], state: dict[str, torch.Tensor], dtype: torch.dtype, max_bytes: int
) -> list[list[str]]:
    """Tensor names grouped into shards of at most `max_bytes` each (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, slot in layout.items():
        nbytes = _nbytes(state, slot, dtype)
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards
