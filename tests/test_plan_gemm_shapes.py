"""`plan.gemm_shapes`: the GEMMs one micro-batch multiplies, against the products a real forward of the
model dispatches (counted under a TorchDispatchMode) and against the planner's FLOP count."""

import dataclasses

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moeforge.config import load_config
from moeforge.model.transformer import Transformer
from moeforge.plan.block_flops import flops_per_token_by_block
from moeforge.plan.gemm_shapes import Gemm, micro_batch_gemms
from moeforge.plan.layout import moeforge_attention_kernel


class ForwardMatmulFlops(TorchDispatchMode):
    """Adds up 2*m*k*n of every matrix product dispatched (attention's included)."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "_grouped_mm"):
            a, b = (args[1], args[2]) if name == "addmm" else (args[0], args[1])
            self.flops += 2 * a.shape[0] * a.shape[-1] * b.shape[-1]
        elif name in ("bmm", "baddbmm"):
            a, b = (args[1], args[2]) if name == "baddbmm" else (args[0], args[1])
            self.flops += 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        elif name.startswith("_scaled_dot_product") or name == "scaled_dot_product_attention":
            q, k, v = args[:3]
            batch_heads = q.shape[0] * q.shape[1]
            self.flops += 2 * batch_heads * q.shape[2] * k.shape[2] * (q.shape[3] + v.shape[3])
        return func(*args, **kwargs)


@pytest.mark.parametrize("preset", ["tiny", "deepseek-v3-tiny"])
def test_gemms_of_a_micro_batch_are_the_products_a_real_forward_runs(preset):
    """Exactly, without MTP (an MTP module of depth k runs S-k positions; the planner counts S); on
    the CPU, where MLA pads its values to the query width."""
    cfg = dataclasses.replace(load_config(preset).model, mtp_depth=0)
    batch, seq = 2, 64
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq))
    counter = ForwardMatmulFlops()
    with torch.no_grad(), counter:
        model(tokens)
    kernel = moeforge_attention_kernel(cfg, "cpu")
    gemms = micro_batch_gemms(cfg, list(range(-1, cfg.n_layers + 1)), batch * seq, seq, attention_kernel=kernel)
    assert sum(g.training_flops for g in gemms) / 3 == counter.flops


@pytest.mark.parametrize("preset", ["tiny", "deepseek-v3-tiny"])
def test_gemm_flops_are_the_planners_matmul_and_attention_flops(preset):
    """Up to the norms and rotary embeddings, which the planner's count includes and no GEMM does."""
    cfg = load_config(preset).model
    tokens, seq = 512, 256
    planned = sum(f.matmul + f.attention for f in flops_per_token_by_block(cfg, seq).values())
    for ep in (1, 2, 4):
        gemms = micro_batch_gemms(cfg, list(range(-1, cfg.n_layers + 1)), tokens, seq, ep)
        assert sum(g.training_flops for g in gemms) / tokens == pytest.approx(planned, rel=3e-3)


def test_expert_gemms_follow_expert_parallelism():
    """E/ep local experts, each receiving the rows every rank of the ep group sends it."""
    cfg = load_config("tiny").model
    moe = cfg.moe
    last = [cfg.n_layers - 1]
    gemms = micro_batch_gemms(cfg, last, 512, 256, ep=2)
    rows = 2 * 512 * moe.top_k // moe.n_experts
    local = moe.n_experts // 2
    assert Gemm(rows, cfg.dim, 2 * moe.expert_ffn_dim, local) in gemms
    assert Gemm(rows, moe.expert_ffn_dim, cfg.dim, local) in gemms
