"""Multi-head latent attention against a naive per-head reference, its compressed cache, its sizes."""

import math

import pytest
import torch
from test_transformer import assert_cached_decoding_equals_full_forward, tiny_model_config

from moeforge.config import ConfigError, load_config
from moeforge.model.attention import MultiHeadLatentAttention, apply_rope
from moeforge.model.flops import kv_cache_bytes_per_token, kv_cache_comparison, parameter_counts
from moeforge.model.transformer import Transformer

MLA = {"attention": "mla", "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 6}


def mla_config(q_lora_rank=0, **kw):
    return tiny_model_config(q_lora_rank=q_lora_rank, **{**MLA, **kw})


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def naive_mla(attn, x, cos, sin, eps):
    """DeepSeek-V3 eqs. 1-11 written out: latents, per-head keys/values, one explicit matmul per head."""
    b, s, _ = x.shape
    nope, rope, vdim, rank = attn.nope_dim, attn.rope_dim, attn.v_dim, attn.kv_lora_rank
    if attn.q_lora_rank:
        q = rms_norm(x @ attn.wq_a.weight.T, attn.q_norm.weight, eps) @ attn.wq_b.weight.T
    else:
        q = x @ attn.wq.weight.T
    q = q.view(b, s, attn.n_heads, nope + rope)
    compressed = x @ attn.wkv_a.weight.T
    latent = rms_norm(compressed[..., :rank], attn.kv_norm.weight, eps)
    shared_rope_key = apply_rope(compressed[..., rank:].unsqueeze(1), cos, sin).squeeze(1)
    kv = (latent @ attn.wkv_b.weight.T).view(b, s, attn.n_heads, nope + vdim)
    future = torch.triu(torch.ones(s, s, dtype=torch.bool), 1)
    outs = []
    for h in range(attn.n_heads):
        q_rope = apply_rope(q[:, :, h, nope:].unsqueeze(1), cos, sin).squeeze(1)
        qh = torch.cat([q[:, :, h, :nope], q_rope], -1)
        kh = torch.cat([kv[:, :, h, :nope], shared_rope_key], -1)
        scores = (qh @ kh.transpose(-1, -2) / math.sqrt(nope + rope)).masked_fill(future, float("-inf"))
        outs.append(torch.softmax(scores, -1) @ kv[:, :, h, nope:])
    return torch.cat(outs, -1) @ attn.wo.weight.T


def mla_layer(q_lora_rank):
    torch.manual_seed(0)
    model = Transformer(mla_config(q_lora_rank)).double()
    attn = model.layers[0].attention
    assert isinstance(attn, MultiHeadLatentAttention)
    return model, attn


@pytest.mark.parametrize("q_lora_rank", [0, 24])
@pytest.mark.parametrize("cached", [False, True])
def test_mla_matches_naive_per_head_reference_outputs_and_gradients(q_lora_rank, cached):
    """Without a cache MLA expands the latent for SDPA; with one it attends in latent space with the
    up-projections absorbed. Both must be the naive computation, forward and backward."""
    model, attn = mla_layer(q_lora_rank)
    seq = 10
    cos, sin = model.rope_cos[:seq].double(), model.rope_sin[:seq].double()
    x = torch.randn(2, seq, 32, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(2, seq, 32, dtype=torch.float64)
    if cached:
        attn.setup_cache(2, seq, torch.float64, "cpu")
    ours = attn(x, cos, sin)
    attn.cache = None
    reference = naive_mla(attn, x, cos, sin, model.cfg.norm_eps)
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-12)
    params = [x, *attn.parameters()]
    ours_grads = torch.autograd.grad((ours * weight).sum(), params)
    reference_grads = torch.autograd.grad((reference * weight).sum(), params)
    for got, want in zip(ours_grads, reference_grads):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_mla_cached_incremental_decoding_equals_full_forward(q_lora_rank):
    torch.manual_seed(0)
    assert_cached_decoding_equals_full_forward(Transformer(mla_config(q_lora_rank)).eval())


def test_mla_cache_holds_only_the_latent_and_the_shared_rope_key():
    cfg = mla_config()
    model = Transformer(cfg)
    per_token = model.setup_caches(batch=1, max_len=8)
    cache = model.layers[0].attention.cache
    assert cache.kv.shape == (1, 8, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert per_token == cfg.n_layers * (16 + 4) * 4 == kv_cache_bytes_per_token(cfg, element_size=4)
    gqa = tiny_model_config()
    assert Transformer(gqa).setup_caches(batch=1, max_len=8) == kv_cache_bytes_per_token(gqa, element_size=4)


def test_deepseek_v3_kv_cache_per_token_vs_gqa_and_mha():
    """DeepSeek-V2 table 1: MLA caches (d_c + d_h^R) = 576 elements per layer; MHA with the same heads
    2 x 128 heads x 160 mean head width = 40960."""
    cfg = load_config("deepseek-v3-671b").model
    sizes = kv_cache_comparison(cfg, element_size=2)
    assert sizes["mla"] == 61 * 576 * 2
    assert sizes["mha"] == 61 * 128 * (192 + 128) * 2
    assert sizes["gqa"] == 61 * 8 * (192 + 128) * 2
    assert sizes["mha"] / sizes["mla"] == pytest.approx(71.1, abs=0.1)


@pytest.mark.parametrize("q_lora_rank", [0, 24])
def test_mla_parameter_count_matches_the_built_model(q_lora_rank):
    cfg = mla_config(q_lora_rank)
    assert parameter_counts(cfg).total == sum(p.numel() for p in Transformer(cfg).parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model.attention": "mha"}, "model.attention: got 'mha'; allowed: 'gqa' | 'mla'"),
        ({"model.kv-lora-rank": "0"}, "model.kv-lora-rank: got 0; allowed: an integer >= 1"),
        ({"model.qk-rope-head-dim": "5"}, "model.qk-rope-head-dim: got 5; allowed: an even integer >= 2"),
        ({"model.q-lora-rank": "-1"}, "model.q-lora-rank: got -1; allowed: an integer >= 0 (0 = no compression)"),
    ],
)
def test_bad_mla_settings_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(preset="deepseek-v3-tiny", overrides=overrides)
    assert str(err.value) == message
