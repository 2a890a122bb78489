"""The MoE benchmark on a tiny shape: structure, FLOP count and ratios."""

import json

import pytest
import torch

from moeforge.bench.moe import (
    SHAPES,
    bench_shapes,
    format_table,
    swiglu_gemms_step,
    run_moe_bench,
    swiglu_expert_flops,
)
from moeforge.config import ConfigError


def test_swiglu_expert_flops_hand_count():
    # 3 matmuls of 2*rows*dim*ffn FLOPs forward, x3 for forward+backward
    assert swiglu_expert_flops(rows=2, dim=3, ffn_dim=4) == 3 * 3 * 2 * 2 * 3 * 4


def test_run_moe_bench_tiny():
    result = run_moe_bench(
        dim=16, ffn_dim=8, n_experts=4, top_k=2, tokens=32, backends=("grouped", "loop"), repeats=2, warmup=1
    )
    json.dumps(result)
    assert set(result["cases"]) == {
        "gemm", "gemm/experts", "gemm/shared", "dense", "experts/grouped", "experts/loop", "layer/grouped", "layer/loop"
    }
    assert result["config"]["rows"] == 64
    assert result["expert_gflop"] == pytest.approx(swiglu_expert_flops(64, 16, 8) / 1e9)
    assert result["cases"]["dense"]["vs_dense"] == pytest.approx(1.0)
    assert result["cases"]["gemm"]["vs_gemm"] == pytest.approx(1.0)
    assert result["cases"]["experts/grouped"]["vs_experts"] == pytest.approx(1.0)
    layer = result["cases"]["layer/grouped"]
    assert layer["vs_experts"] == pytest.approx(result["cases"]["experts/grouped"]["best_ms"] / layer["best_ms"])
    for figures in result["cases"].values():
        assert figures["best_ms"] > 0 and figures["median_ms"] >= figures["best_ms"]
        assert figures["expert_gflops"] > 0
    grouped = result["cases"]["experts/grouped"]
    assert grouped["expert_gflops"] == pytest.approx(result["expert_gflop"] / (grouped["best_ms"] / 1e3))
    assert result["grouped_vs_loop"]["experts"] > 0
    assert sum(result["routing_load"]["tokens_per_expert"]) == 64
    assert result["grouped_fallback"] is None
    table = format_table(result)
    floor = result["cases"]["gemm/experts"]
    assert floor["vs_gemm"] == pytest.approx(result["cases"]["gemm"]["best_ms"] / floor["best_ms"])
    for label in ("plain GEMMs", "per-expert GEMMs (floor)", "per-expert GEMMs, one weight", "dense SwiGLU", "grouped experts alone (grouped)", "whole MoE layer (grouped)"):
        assert label in table
    assert "grouped vs loop" in table


def test_run_moe_bench_single_backend_has_no_ratio():
    result = run_moe_bench(
        dim=16, ffn_dim=8, n_experts=4, top_k=1, tokens=8, backends=("loop",), repeats=1, warmup=0
    )
    assert "grouped_vs_loop" not in result
    assert "grouped vs loop" not in format_table(result)


@pytest.mark.parametrize(
    "kwargs",
    [{"dtype": "fp16"}, {"top_k": 9}, {"backends": ("triton",)}, {"backends": ()}, {"tokens": 0}],
)
def test_run_moe_bench_rejects_bad_arguments(kwargs):
    with pytest.raises(ConfigError):
        run_moe_bench(
            **{
                "dim": 16,
                "ffn_dim": 8,
                "n_experts": 4,
                "top_k": 2,
                "tokens": 8,
                "repeats": 1,
                "warmup": 0,
                **kwargs,
            }
        )


def test_bench_shapes():
    assert bench_shapes("both") == [SHAPES["coarse"], SHAPES["fine"]]
    assert bench_shapes("fine") == [SHAPES["fine"]]
    assert bench_shapes("both", n_experts=8) == [SHAPES["coarse"] | {"n_experts": 8}]
    with pytest.raises(ConfigError, match="--shape"):
        bench_shapes("medium")


def test_run_moe_bench_peers_are_timed_or_noted():
    result = run_moe_bench(dim=16, ffn_dim=8, n_experts=4, top_k=2, tokens=16, repeats=1, warmup=0, peers=True)
    peers = [name for name in result["cases"] if name.startswith("peer/")]
    assert len(peers) + len(result["peer_notes"]) >= 3  # Qwen3-MoE, DeepSeek-V3, torchtitan
    assert any(note.startswith("torchtitan") for note in result["peer_notes"])
    table = format_table(result)
    assert all(name.removeprefix("peer/") in table for name in peers)


def test_swiglu_gemms_step_rejects_a_weight_count_that_is_neither_one_nor_per_group():
    with pytest.raises(ValueError, match="n_weights"):
        swiglu_gemms_step([2, 3], dim=4, ffn_dim=2, device=torch.device("cpu"), dtype=torch.float32, n_weights=3)


PEER_ROUTING = {  # the moeforge routing each peer's own rules amount to at these settings
    "transformers Qwen3-MoE": {"score_func": "softmax", "route_norm": True, "route_scale": 1.0},
    "transformers DeepSeek-V3": {"score_func": "sigmoid", "route_norm": True, "route_scale": 2.5},
    "torchtitan": {"score_func": "sigmoid", "route_norm": True, "route_scale": 2.5},
}


@pytest.mark.parametrize("name", list(PEER_ROUTING))
def test_a_peer_built_from_a_moeforge_layer_computes_the_same_layer(name):
    """The weight copies into the peer's layout are right: with routing rules that agree, the peer's
    output is moeforge's (torchtitan's experts run in bf16: bf16 tolerance)."""
    module = {"transformers": "transformers", "torchtitan": "torchtitan.models.common.moe"}[name.split()[0]]
    pytest.importorskip(module)
    from moeforge.bench.moe_peers import PEERS
    from moeforge.config import MoEConfig
    from moeforge.model.moe.layer import MoE

    cfg = MoEConfig(dim=32, n_experts=8, top_k=2, expert_ffn_dim=16, n_shared_experts=0, **PEER_ROUTING[name])
    torch.manual_seed(0)
    layer = MoE(cfg).eval()
    peer = PEERS[name](layer).eval()
    x = torch.randn(2, 8, 32)
    with torch.no_grad():
        expected = layer(x)[0]
        got = peer(x)
    got = got[0] if isinstance(got, tuple) else got
    tolerance = {"rtol": 2e-2, "atol": 2e-3} if name == "torchtitan" else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(got.reshape(expected.shape), expected, **tolerance)


def test_the_ratios_follow_the_measured_times_of_each_case(monkeypatch):
    """The timer is injected: every step advances a fake clock by a known cost of its own kind (the
    dense SwiGLU 2, the experts alone 3, the whole layer 5, each GEMM baseline 1 'second'), so each
    printed ratio must be the ratio of those costs, whichever case it belongs to."""
    from torch import nn

    from moeforge.bench import moe as bench_moe
    from moeforge.model.mlp import SwiGLU
    from moeforge.model.moe import MoE

    clock = [0.0]
    monkeypatch.setattr(bench_moe, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])}))

    def costing(make_step, cost_of):
        def make(*args, **kwargs):
            step = make_step(*args, **kwargs)
            cost = cost_of(*args)

            def timed() -> None:
                step()
                clock[0] += cost

            return timed

        return make

    def module_cost(module: nn.Module, inputs) -> float:
        return 2.0 if isinstance(module, SwiGLU) else 5.0 if isinstance(module, MoE) else 3.0

    monkeypatch.setattr(bench_moe, "forward_backward_step", costing(bench_moe.forward_backward_step, module_cost))
    monkeypatch.setattr(bench_moe, "swiglu_gemms_step", costing(bench_moe.swiglu_gemms_step, lambda *a: 1.0))
    result = run_moe_bench(dim=16, ffn_dim=8, n_experts=4, top_k=2, tokens=32, backends=("grouped",), repeats=2, warmup=1)
    cases = result["cases"]
    assert cases["layer/grouped"]["best_ms"] == pytest.approx(5000)
    assert cases["layer/grouped"]["vs_dense"] == pytest.approx(2 / 5)
    assert cases["layer/grouped"]["vs_experts"] == pytest.approx(3 / 5)
    assert cases["experts/grouped"]["vs_gemm"] == pytest.approx(1 / 3)
    assert cases["dense"]["expert_gflops"] == pytest.approx(result["expert_gflop"] / 2)
