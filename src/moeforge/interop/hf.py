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
are permuted on import (`_mla_layout`). DeepSeek-V3's multi-token-prediction layer, stored as layer
`num_hidden_layers`, becomes moeforge's MTP module (`_mtp_layout`). Import then export reproduces
every tensor bit for bit (`to_hf(..., dtype=)` the stored dtype).

An expert-parallel (or FSDP) run loads after `parallelize`: each process reads only the slices of
the tensors that land in its own shards, so a rank never reads the experts of another
(`load_hf_weights`).
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
from tqdm import tqdm

from moeforge.config import ConfigError, ModelConfig, MoEConfig
from moeforge.errors import MoeforgeError
from moeforge.model.transformer import Transformer
from moeforge.parallel.mesh import ParallelMesh
from moeforge.parallel.replicas import broadcast_shards, broadcast_verdict, is_first_replica, replicated

CONFIG_FILE = "config.json"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class HFInteropError(MoeforgeError, ValueError):
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
        cfg.mtp_depth = _imported_mtp_depth(Path(path), values, cfg.n_layers)
    except HFInteropError as err:
        raise HFInteropError(f"{where}: {err}") from None
    try:
        cfg.validate()
    except ConfigError as err:
        raise HFInteropError(f"{where}: gives an invalid moeforge model: {err}") from None
    return cfg


def _imported_mtp_depth(path: Path, values: dict[str, Any], n_layers: int) -> int:
    """The multi-token-prediction layers a checkpoint declares, or 0 when it stores none of them
    (`transformers` saves DeepSeek-V3 without them, keeping num_nextn_predict_layers, default 1).

    One layer only: DeepSeek-V3 has one, and how a second would read the first's output (before or
    after its shared_head.norm) is not defined by the format; moeforge's modules pass it normalised.
    """
    declared = _declared_mtp_layers(values)
    stored = _stored_mtp_layers(_stored_tensor_names(path), n_layers, declared) if declared else 0
    if stored > 1:
        raise HFInteropError(
            f"unsupported: num_nextn_predict_layers={declared} (one multi-token-prediction layer only)"
        )
    return stored


def _stored_tensor_names(path: Path) -> set[str]:
    """The tensor names of a checkpoint, from its index or its shards' headers (none for a bare config)."""
    index = path / INDEX_FILE
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    return {name for file in sorted(path.glob("*.safetensors")) for name in _tensor_names(file)}


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
        "num_nextn_predict_layers": cfg.mtp_depth,
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
    if cfg.mtp_depth > 1:
        problems.append(f"mtp-depth={cfg.mtp_depth} (needs 0 or 1: one multi-token-prediction layer)")
    if cfg.mtp_depth and cfg.n_dense_layers >= cfg.n_layers:
        problems.append(f"n-dense-layers={cfg.n_dense_layers} with mtp-depth (DeepSeek's MTP layer is MoE)")
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
    layout = {"model.embed_tokens.weight": Slot("tok_embeddings.weight"), "model.norm.weight": Slot("norm.weight")}
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
def load_hf_weights(
    model: Transformer, path: Path | str, progress: bool = True, mesh: ParallelMesh | None = None
) -> dict[str, int]:
    """Copy a Hugging Face checkpoint into `model`, whole or sharded by `parallelize`, in place.

    Each process reads from the memory-mapped shards, one tensor at a time, only the slices that land
    in its own part of each parameter (`local_part`). A plain model is all local: every tensor is read
    whole. After `parallelize`, a process reads of the routed experts only the E/ep it owns (of those,
    the ones FSDP gives it over efsdp) and never touches the others; of every other parameter, the
    rows FSDP gives it; buffers (the router's correction bias) in full. Memory beyond the model's own
    shards: one tensor's slice (plus, for DeepSeek's permuted RoPE rows, the rows around it). This is
    what loading costs; a caller that builds the whole model on every rank before `parallelize` (as
    the trainer does) still holds it whole until then.

    `model.cfg` must have the checkpoint's shapes (e.g. built from `hf_model_config(path)`); every
    tensor of the checkpoint must find its place and every place must be filled, except that DeepSeek's
    multi-token-prediction layers beyond `model.cfg.mtp_depth` are skipped with a warning, and MTP
    modules the checkpoint stores no layer for keep their initialisation.

    With the `mesh` of an HSDP run (dp_replicate > 1), only replica 0 reads; the other replicas
    receive their shards from it (parallel/replicas.py).

    Returns the bytes this process read from each tensor it read any part of.
    """
    path = Path(path)
    cfg = model.cfg
    hf_config = read_hf_config(path)
    arch = architecture_of(hf_config, path / CONFIG_FILE)
    names = {file: _tensor_names(file) for file in weight_files(path)}
    declared = _declared_mtp_layers(hf_config)
    stored_mtp = _stored_mtp_layers(itertools.chain(*names.values()), cfg.n_layers, declared)
    mtp_layers = min(cfg.mtp_depth, stored_mtp)
    layout = tensor_layout(cfg, arch, hf_config, mtp_layers)
    skipped_layers = range(cfg.n_layers + mtp_layers, cfg.n_layers + declared)
    located = _locate(path, names, layout, cfg, arch, skipped_layers)
    state = model.state_dict(keep_vars=True)
    if not replicated(mesh):
        return _read_local_parts(state, located, layout, progress)
    read, error = {}, None
    if is_first_replica(mesh):
        try:
            read = _read_local_parts(state, located, layout, progress)
        except HFInteropError as err:
            error = str(err)
    error, _ = broadcast_verdict(mesh, error, [])
    if error is not None:
        raise HFInteropError(error)
    broadcast_shards(mesh, state.values())
    return read


def _read_local_parts(
    state: dict[str, torch.Tensor], located: dict[str, Path], layout: dict[str, Slot], progress: bool
) -> dict[str, int]:
    """Copy into each tensor of `state` the slices of the located tensors that land in its local part;
    the bytes read per tensor."""
    parts = {name: local_part(tensor) for name, tensor in state.items()}
    read: dict[str, int] = {}
    in_order = sorted(located, key=lambda name: layout[name].duplicate)  # copies after what they repeat
    with tqdm(total=len(layout), desc="import", unit="tensor", disable=not progress) as bar:
        for file, group in itertools.groupby(in_order, key=located.__getitem__):
            with safe_open(str(file), framework="pt") as shard:
                for name in group:
                    slot = layout[name]
                    nbytes = _load_tensor(shard.get_slice(name), name, slot, parts[slot.param])
                    if nbytes:
                        read[name] = nbytes
                    bar.update(1)
    return read


def _tensor_names(file: Path) -> list[str]:
    with safe_open(str(file), framework="pt") as shard:
        return list(shard.keys())  # noqa: SIM118 -- safe_open is not a mapping


def _locate(
    path: Path,
    names: dict[Path, list[str]],
    layout: dict[str, Slot],
    cfg: ModelConfig,
    arch: Architecture,
    skipped_layers: range,
) -> dict[str, Path]:
    """The file of every tensor in `layout`, checked from the shards' headers before any data is read:
    no tensor without a place, none twice, none missing; MTP layers in `skipped_layers` are skipped."""
    located: dict[str, Path] = {}
    skipped = 0
    for file, file_names in names.items():
        for name in file_names:
            if _layer_index(name) in skipped_layers:
                skipped += 1
            elif _skippable(name, cfg):
                continue
            elif name not in layout:
                raise HFInteropError(
                    f"{file.name}: tensor {name!r} has no place in this {arch.model_type} model"
                )
            elif name in located:
                raise HFInteropError(f"{file.name}: tensor {name!r} appears in more than one shard")
            else:
                located[name] = file
    missing = [name for name in layout if name not in located]
    if missing:
        raise HFInteropError(f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]!r}")
    if skipped:
        warnings.warn(
            f"skipped the {skipped} tensors of the multi-token-prediction layer(s) from "
            f"model.layers.{skipped_layers.start} on (model.mtp-depth={cfg.mtp_depth}): the rest is imported",
            stacklevel=3,
        )
    return located


def _skippable(name: str, cfg: ModelConfig) -> bool:
    """Tensors that are not model state: cached RoPE frequencies, and the head of a tied model."""
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


def _layer_index(name: str) -> int | None:
    """i of a tensor `model.layers.{i}.*`, else None."""
    prefix = "model.layers."
    return int(name[len(prefix) :].split(".", 1)[0]) if name.startswith(prefix) else None


def _declared_mtp_layers(hf_config: dict[str, Any]) -> int:
    return hf_config.get("num_nextn_predict_layers") or hf_config.get("num_mtp_layers") or 0


def _stored_mtp_layers(names: Iterable[str], n_layers: int, declared: int) -> int:
    """How many of the `declared` MTP layers (stored as layers n_layers, n_layers + 1, ...) have tensors."""
    return len({_layer_index(name) for name in names} & set(range(n_layers, n_layers + declared)))


@dataclass(frozen=True)
class LocalPart:
    """The block of a tensor this process holds: `tensor` is full[o0 : o0 + n0, o1 : o1 + n1, ...]
    for (o0, o1, ...) = `offset` and (n0, n1, ...) = `tensor.shape`."""

    tensor: torch.Tensor
    offset: tuple[int, ...]
    full_shape: tuple[int, ...]


def local_part(tensor: torch.Tensor) -> LocalPart:
    """All of a plain tensor; of a DTensor (experts `Shard(0)` over ep, FSDP2 shards, HSDP replicas)
    the one block its placements give this rank, located as torch.distributed.checkpoint locates it."""
    if not isinstance(tensor, DTensor):
        return LocalPart(tensor, (0,) * tensor.dim(), tuple(tensor.shape))
    _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    return LocalPart(tensor.to_local(), tuple(offset), tuple(tensor.shape))


def _load_tensor(stored: Any, name: str, slot: Slot, part: LocalPart) -> int:
    """Copy the slice of one stored tensor that lands in `part` (for a duplicate: check it equals what
    is there); the bytes read, 0 when none of it lands there."""
    box = _slot_box(slot, part.full_shape)
    expected = [stop - start for start, stop, kept in box if kept]
    expected = expected[::-1] if slot.transpose else expected
    if list(stored.get_shape()) != expected:
        raise HFInteropError(
            f"tensor {name!r}: shape {list(stored.get_shape())} does not fit this model (expected {expected})"
        )
    overlap = _overlap(box, part)
    if overlap is None:
        return 0
    local_index, ranges = overlap
    target = part.tensor[local_index]
    if slot.transpose:
        target, ranges = target.T, ranges[::-1]
    value, nbytes = _read_ranges(stored, ranges, slot)
    if not slot.duplicate:
        target.copy_(value)
    elif not torch.equal(target, value.to(target)):
        raise HFInteropError(
            f"tensor {name!r} differs from the {slot.param} it repeats (moeforge shares one copy)"
        )
    return nbytes


def _slot_box(slot: Slot, shape: tuple[int, ...]) -> list[tuple[int, int, bool]]:
    """[start, stop) of `slot` in each dim of its moeforge tensor, and whether the Hugging Face tensor
    has that dim (an integer index, e.g. one expert, drops it)."""
    index = (*slot.index, *[slice(None)] * (len(shape) - len(slot.index)))
    box = []
    for i, size in zip(index, shape):
        if isinstance(i, int):
            box.append((i, i + 1, False))
        else:
            start, stop, _ = i.indices(size)
            box.append((start, stop, True))
    return box


def _overlap(
    box: list[tuple[int, int, bool]], part: LocalPart
) -> tuple[tuple[Any, ...], list[tuple[int, int]]] | None:
    """Where a slot's box meets this process's part: the index into the local tensor, and the
    [start, stop) ranges of the slot's dims that land there; None when they do not meet."""
    local_index: list[Any] = []
    ranges = []
    for (start, stop, kept), offset, size in zip(box, part.offset, part.tensor.shape):
        low, high = max(start, offset), min(stop, offset + size)
        if low >= high:
            return None
        local_index.append(slice(low - offset, high - offset) if kept else low - offset)
        if kept:
            ranges.append((low - start, high - start))
    return tuple(local_index), ranges


def _read_ranges(stored: Any, ranges: list[tuple[int, int]], slot: Slot) -> tuple[torch.Tensor, int]:
    """The part of a stored tensor at `ranges` (its dims, with permuted rows/columns in moeforge's
    order) and the bytes read: along a permuted dim the covering slice is read, then reordered."""
    slices, picks = [], []
    for dim, (start, stop) in enumerate(ranges):
        order = slot.order(dim)
        if order is None:
            slices.append(slice(start, stop))
            picks.append(None)
        else:
            wanted = torch.tensor(order[start:stop])
            first = int(wanted.min())
            slices.append(slice(first, int(wanted.max()) + 1))
            picks.append(wanted - first)
    block = stored[tuple(slices)]
    nbytes = block.numel() * block.element_size()
    for dim, pick in enumerate(picks):
        if pick is not None:
            block = block.index_select(dim, pick)
    return block, nbytes


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
    layout = tensor_layout(cfg, arch, hf_config, cfg.mtp_depth)
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
    if slot.columns is not None:
        tensor = tensor[:, torch.tensor(slot.columns).argsort()]
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
