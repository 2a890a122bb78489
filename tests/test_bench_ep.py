"""`bench ep` on 2 spawned gloo processes, tiny shape: structure, ratios and traffic bounds."""

import dataclasses
import json

import pytest
import torch
from torch.distributed import ReduceOp

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


class _PeerRank:
    """`torch.distributed` as bench/ep.py uses it, with a second rank simulated at the all-reduce:
    its seconds are this rank's times PEER_SCALE, repeat by repeat (so the slowest rank differs
    from repeat to repeat, and a warm-up repeat that got into the rows would not broadcast)."""

    ReduceOp = ReduceOp
    PEER_SCALE = torch.tensor([4.0, 1.5, 0.375], dtype=torch.float64)

    @staticmethod
    def barrier() -> None:
        pass

    @classmethod
    def all_reduce(cls, tensor: torch.Tensor, op=ReduceOp.SUM) -> None:
        assert op == ReduceOp.MAX
        peer = tensor * cls.PEER_SCALE.reshape(-1, *[1] * (tensor.dim() - 1))
        tensor.copy_(torch.maximum(tensor, peer))


REPEAT_FACTORS = (100.0, 1.0, 2.0, 4.0)
"""each repeat's costs x this: one warm-up repeat (dropped), then 3 timed ones; with the peer's,
the slowest rank per repeat is x 4, x 3, x 4: the best repeat x 3 (median 4, mean 11/3; the best of
each rank, then the slowest: 1.5)"""
BEST = 3.0


class _CostedLayer:
    """In an MoE layer's place: each phase advances the fake clock by its cost in this case, times
    the repeat's factor (a repeat starts with the router)."""

    def __init__(self, clock: list[float], costs: dict[str, float]):
        self.clock, self.costs, self.repeat = clock, costs, -1

    def spend(self, phase: str) -> None:
        self.clock[0] += self.costs[phase] * REPEAT_FACTORS[self.repeat]

    def route(self, tokens):
        self.repeat += 1
        self.spend("router")

    def dispatch(self, tokens, routing):
        self.spend("dispatch")
        return None, None, None

    def compute_experts(self, x_sorted, tokens_per_expert):
        self.spend("experts")

    def combine(self, expert_out, state, tokens):
        self.spend("combine")


def test_the_phases_and_ratios_follow_the_injected_costs_of_each_case(monkeypatch):
    """The clock is fake: every phase of each case costs a known number of seconds (ep=2 pays more in
    dispatch and combine), forward+backward its own; each figure must be that cost, the slowest
    rank's in the best repeat, and vs ep=1 the ratio of the two cases' forward+backward costs."""
    from moeforge.bench import ep as bench_ep

    clock = [0.0]
    fake_time = type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])})
    monkeypatch.setattr(bench_ep, "time", fake_time)
    monkeypatch.setattr(bench_ep, "dist", _PeerRank)
    monkeypatch.setattr(
        bench_ep, "forward_backward_step", lambda layer, inputs: lambda: layer.spend("forward_backward")
    )
    costs = {
        "ep=1": {"router": 1.0, "dispatch": 2.0, "experts": 3.0, "combine": 4.0, "forward_backward": 20.0},
        "ep=2": {"router": 1.0, "dispatch": 5.0, "experts": 3.0, "combine": 6.0, "forward_backward": 25.0},
    }
    cases = {name: _CostedLayer(clock, c) for name, c in costs.items()}
    times = bench_ep.time_cases(cases, torch.zeros(1, 4, 8), repeats=3, warmup=1, device=torch.device("cpu"))
    figures = bench_ep.versus_ep1(times)
    for name, c in costs.items():
        expected = {**c, "forward": c["router"] + c["dispatch"] + c["experts"] + c["combine"]}
        expected_ms = {phase: 1e3 * BEST * s for phase, s in expected.items()}
        assert figures[name] == pytest.approx({**expected_ms, "vs_ep1": 20.0 / c["forward_backward"]})
    assert figures["ep=2"]["vs_ep1"] == pytest.approx(0.8)

    # the overlap case: this rank's (step, exposed, exposed forward) seconds per repeat, whole and halves
    rows = {"whole": (10.0, 4.0, 1.5), "halves": (9.0, 1.0, 0.5)}
    samples = {
        name: [torch.tensor(row, dtype=torch.float64) * f for f in REPEAT_FACTORS[1:]]
        for name, row in rows.items()
    }
    overlap = bench_ep.overlap_figures(samples, torch.device("cpu"))
    keys = ("step_ms", "exposed_ms", "exposed_forward_ms")
    assert overlap["whole"] == pytest.approx(dict(zip(keys, (30e3, 12e3, 4.5e3))))
    assert overlap["halves"] == pytest.approx(dict(zip(keys, (27e3, 3e3, 1.5e3))))
    assert overlap["hidden_fraction"] == pytest.approx(1 - 1.0 / 4.0)

    # the table prints those ratios: vs ep=1 per case, the hidden fraction and the step halves / whole
    result = {
        "config": {**dataclasses.asdict(TINY.resolved()), "device": "cpu", "backend": "gloo",
                   "threads_per_rank": 1, "timed_routing": "node-limited"},
        "cases_ms": figures,
        "traffic": {},
        "node_limited_vs_unlimited": 1.0,
        "per_rank_vs_per_expert": {},
        "overlap": {"sequences": 8, "seq_len": 16, "blocks": 2, **overlap},
    }  # fmt: skip
    lines = format_table(result).splitlines()
    assert next(line for line in lines if line.startswith("ep=2")).endswith(" 0.80")
    assert "= 0.75; step halves/whole = 0.90" in format_table(result)
