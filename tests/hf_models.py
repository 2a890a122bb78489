"""Tiny random Hugging Face checkpoints written with `transformers` (a test-only dependency), shared
by the interop tests and the distributed loading tests."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeforge.interop.hf import weight_files

transformers = pytest.importorskip("transformers")

VOCAB = 256  # the byte tokenizer's, so that the embedded corpus can fine-tune these models


QWEN3 = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "moe_intermediate_size": 16,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "num_experts": 8,
    "num_experts_per_tok": 2, "norm_topk_prob": True, "mlp_only_layers": [0], "max_position_embeddings": 128,
    "rope_theta": 5000.0, "rms_norm_eps": 1e-6, "initializer_range": 0.1,
}  # fmt: skip
MIXTRAL = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 128,
    "rope_theta": 1e6, "initializer_range": 0.1,
}  # fmt: skip
DEEPSEEK_V3 = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
    "num_hidden_layers": 3, "num_attention_heads": 4, "n_routed_experts": 8, "n_shared_experts": 1,
    "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2, "first_k_dense_replace": 1, "q_lora_rank": 16,
    "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "routed_scaling_factor": 2.5,
    "max_position_embeddings": 128, "initializer_range": 0.1,
}  # fmt: skip


GLM4_MOE = {
    "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
    "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 4, "topk_group": 2,
    "first_k_dense_replace": 1, "routed_scaling_factor": 2.5, "use_qk_norm": True, "partial_rotary_factor": 1.0,
    "num_mtp_layers": 0, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "initializer_range": 0.1,
}  # fmt: skip


def glm4_moe_config(**overrides):
    return transformers.Glm4MoeConfig(**{**GLM4_MOE, **overrides})


def qwen3_config(**overrides):
    return transformers.Qwen3MoeConfig(**{**QWEN3, **overrides})


def mixtral_config(**overrides):
    return transformers.MixtralConfig(**{**MIXTRAL, **overrides})


def deepseek_v3_config(**overrides):
    return transformers.DeepseekV3Config(**{**DEEPSEEK_V3, **overrides})


def save_hf_model(config, path, dtype=torch.float32, **save_kwargs):
    """A random model with random DeepSeek correction biases (zero at init), so that they matter."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.uniform_(-0.1, 0.1)
    model.save_pretrained(path, **save_kwargs)
    return model


def save_deepseek_with_mtp(path, **overrides):
    """A DeepSeek-V3 checkpoint with its multi-token-prediction layer stored as DeepSeek stores it: layer
    `num_hidden_layers` holds a decoder layer's tensors plus enorm, hnorm, eh_proj, shared_head.norm and
    copies of the embedding and head. The decoder layer comes from a `transformers` model one layer
    deeper, which is returned (its last layer runs as the MTP block), with the MTP-only tensors."""
    config = deepseek_v3_config(**overrides)
    n, dim = config.num_hidden_layers, config.hidden_size
    deeper = save_hf_model(deepseek_v3_config(**{**overrides, "num_hidden_layers": n + 1}), path)
    generator = torch.Generator().manual_seed(2)
    mtp = {
        f"model.layers.{n}.{name}.weight": 1 + 0.2 * torch.randn(dim, generator=generator)
        for name in ("enorm", "hnorm", "shared_head.norm")
    }
    mtp[f"model.layers.{n}.eh_proj.weight"] = 0.1 * torch.randn(dim, 2 * dim, generator=generator)
    mtp[f"model.layers.{n}.embed_tokens.weight"] = deeper.model.embed_tokens.weight.detach().clone()
    mtp[f"model.layers.{n}.shared_head.head.weight"] = deeper.lm_head.weight.detach().clone()
    save_file(mtp, str(path / "mtp.safetensors"))
    edit_config(path, num_hidden_layers=n, num_nextn_predict_layers=1)
    return deeper, mtp


def edit_config(path, **changes):
    file = path / "config.json"
    config = json.loads(file.read_text())
    config.update(changes)
    file.write_text(json.dumps(config))


def read_tensors(path):
    tensors = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as shard:
            tensors.update({name: shard.get_tensor(name) for name in shard.keys()})  # noqa: SIM118
    return tensors
