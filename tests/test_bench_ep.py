"""`bench ep` on 2 spawned gloo processes, tiny shape: structure, ratios and traffic bounds."""

import dataclasses
import json

import pytest

from moeforge.bench.ep import EpBenchSettings, format_table, run_ep_bench
from moeforge.config import ConfigError

TINY = EpBenchSettings(ep=2, dim=32, ffn_dim=16, n_experts=8, top_k=3, tokens=128, repeats=2, warmup=1)


def test_bench_ep_tiny_on_two_processes():
    result = run_ep_bench(TINY)
    json.dumps(result)
    assert result["config"]["ep_nodes"] == 2 and result["config"]["topk_nodes"] == 1
    assert set(result["cases_ms"]) == {"ep=1", "ep=2"}
    assert result["cases_ms"]["ep=1"]["vs_ep1"] == pytest.approx(1.0)
    for phases in result["cases_ms"].values():
        assert all(phases[p] > 0 for p in ("router", "dispatch", "experts", "combine", "forward_backward"))
        # per repeat, the slowest rank's forward is at least its slowest rank's time in any one phase
        assert all(phases["forward"] >= phases[p] for p in ("router", "dispatch", "experts", "combine"))

    unlimited, limited = result["traffic"].values()
    # with 2 nodes a token has at most one other node to reach, and with M=1 it reaches one node
    # in all: its own (no row off-node) or the other one (one row)
    assert 0 < limited["rows_off_node_per_token"] < unlimited["rows_off_node_per_token"] <= 1
    for t in (unlimited, limited):
        # one row per (token, node) never sends more than one row per (token, expert)
        assert t["rows_off_node_per_token"] <= t["per_expert_rows_off_node_per_token"] <= TINY.top_k
    assert result["node_limited_vs_unlimited"] == pytest.approx(
        unlimited["bytes_off_node_per_token"] / limited["bytes_off_node_per_token"]
    )
    overlap = result["overlap"]
    for case in ("whole", "halves"):
        assert 0 < overlap[case]["exposed_forward_ms"] <= overlap[case]["exposed_ms"] < overlap[case]["step_ms"]
    assert overlap["hidden_fraction"] == pytest.approx(
        1 - overlap["halves"]["exposed_ms"] / overlap["whole"]["exposed_ms"]
    )
    table = format_table(result)
    assert "ep=2" in table and "node-limited M=1" in table and "hidden fraction" in table


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"ep": 1}, r"^--ep: got 1; allowed: an integer >= 2 dividing --experts=8$"),
        ({"ep_nodes": 3}, r"^--ep-nodes: got 3; allowed: a divisor of --ep=2$"),
        ({"topk_nodes": 3}, r"^--topk-nodes: got 3; allowed: an integer in \[1, 2\]$"),
        ({"tokens": 0}, r"^--tokens: got 0; allowed: at least 1$"),
        ({"tokens": 4}, r"^--tokens: got 4; allowed: at least 8 \(the overlap case cuts them into 8 sequences\)$"),
    ],
)
def test_bench_ep_rejects_bad_settings(change, message):
    with pytest.raises(ConfigError, match=message):
        run_ep_bench(dataclasses.replace(TINY, **change))
