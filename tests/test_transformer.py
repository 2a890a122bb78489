"""The transformer against naive references: attention, RoPE, causality, KV cache, parameter counts."""

import math

import pytest
import torch

from moeforge.config import ModelConfig, MoEConfig
from moeforge.model.attention import apply_rope, rope_tables
from moeforge.model.flops import parameter_counts
from moeforge.model.transformer import Transformer


def tiny_model_config(**kw) -> ModelConfig:
    base = dict(
        vocab_size=50, dim=32, n_layers=3, n_dense_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=64,
        moe=MoEConfig(n_experts=8, top_k=2, expert_ffn_dim=16, n_groups=2, topk_groups=1),
    )
    base.update(kw)
    cfg = ModelConfig(**base)
    cfg.validate()
    return cfg


def naive_attention(attn, x, cos, sin):
    """Per-head softmax(q k^T / sqrt(d) + causal) v with explicit loops over heads."""
    b, s, _ = x.shape
    hd = attn.head_dim
    q = (x @ attn.wq.weight.T).view(b, s, attn.n_heads, hd)
    k = (x @ attn.wk.weight.T).view(b, s, attn.n_kv_heads, hd)
    v = (x @ attn.wv.weight.T).view(b, s, attn.n_kv_heads, hd)
    group = attn.n_heads // attn.n_kv_heads
    outs = []
    for h in range(attn.n_heads):
        qh = apply_rope(q[:, :, h].unsqueeze(1), cos, sin).squeeze(1)
        kh = apply_rope(k[:, :, h // group].unsqueeze(1), cos, sin).squeeze(1)
        scores = qh @ kh.transpose(-1, -2) / math.sqrt(hd)
        scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
        outs.append(torch.softmax(scores, -1) @ v[:, :, h // group])
    return torch.cat(outs, -1) @ attn.wo.weight.T


def test_gqa_matches_naive_per_head_attention():
    torch.manual_seed(0)
    model = Transformer(tiny_model_config())
    attn = model.layers[0].attention
    x = torch.randn(2, 10, 32)
    cos, sin = model.rope_cos[:10], model.rope_sin[:10]
    torch.testing.assert_close(attn(x, cos, sin), naive_attention(attn, x, cos, sin), rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position():
    cos, sin = rope_tables(8, 32, 10000.0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(m, n):
        return float((apply_rope(q, cos[m : m + 1], sin[m : m + 1]) * apply_rope(k, cos[n : n + 1], sin[n : n + 1])).sum())

    assert score(5, 2) == pytest.approx(score(20, 17), rel=1e-5)
    assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


def test_future_tokens_do_not_change_past_logits():
    torch.manual_seed(0)
    model = Transformer(tiny_model_config()).eval()
    tokens = torch.randint(0, 50, (1, 12))
    changed = tokens.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    torch.testing.assert_close(model(tokens).logits[:, :8], model(changed).logits[:, :8])


@pytest.mark.parametrize("n_kv_heads", [1, 2, 4])
def test_kv_cache_decoding_equals_full_forward(n_kv_heads):
    torch.manual_seed(0)
    assert_cached_decoding_equals_full_forward(Transformer(tiny_model_config(n_kv_heads=n_kv_heads)).eval())


def assert_cached_decoding_equals_full_forward(model: Transformer) -> None:
    """Prefill 5 tokens, then a chunk of 4, then one token at a time: logits equal one full forward."""
    tokens = torch.randint(0, 50, (2, 16))
    full = model(tokens).logits
    model.setup_caches(batch=2, max_len=16)
    pieces = [model(tokens[:, :5], start_pos=0).logits, model(tokens[:, 5:9], start_pos=5).logits]
    pieces += [model(tokens[:, i : i + 1], start_pos=i).logits for i in range(9, 16)]
    model.clear_caches()
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-4, atol=1e-5)


MLA_SHAPES = {
    "attention": "mla", "q_lora_rank": 24, "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6,
}


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("n_dense", [0, 1, 3])
@pytest.mark.parametrize("mla", [False, True])
@pytest.mark.parametrize("mtp_depth", [0, 2])
def test_parameter_counter_matches_the_built_model(tie, n_dense, mla, mtp_depth):
    cfg = tiny_model_config(tie_embeddings=tie, n_dense_layers=n_dense, mtp_depth=mtp_depth, **(MLA_SHAPES if mla else {}))
    model = Transformer(cfg)
    counts = parameter_counts(cfg)
    assert counts.total + counts.mtp_total == sum(p.numel() for p in model.parameters())
    assert counts.mtp_total == sum(p.numel() for p in model.mtp.parameters())
    moe_layers = cfg.n_layers - n_dense
    expert = 3 * cfg.dim * cfg.moe.expert_ffn_dim
    assert counts.total - counts.active == moe_layers * (cfg.moe.n_experts - cfg.moe.top_k) * expert
    mtp_moe = mtp_depth if cfg.is_moe_layer(cfg.n_layers - 1) else 0
    assert counts.mtp_total - counts.mtp_active == mtp_moe * (cfg.moe.n_experts - cfg.moe.top_k) * expert


def test_initialisation_is_reproducible_and_scaled():
    cfg = tiny_model_config()
    torch.manual_seed(3)
    a = Transformer(cfg)
    torch.manual_seed(3)
    b = Transformer(cfg)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    wo = a.layers[0].attention.wo.weight
    assert wo.std().item() == pytest.approx(cfg.init_std / math.sqrt(2 * cfg.n_layers), rel=0.15)
