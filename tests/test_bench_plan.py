"""`bench plan`: the measured machine as a planner cluster, the table's structure (no real timings
are asserted: performance is what the benchmark prints, not what a test checks), and on a fake clock
the measured step, the ratios and the machine's rates following injected costs."""

import dataclasses
import json
import time

import pytest

from moeforge.bench.machine_cluster import (
    cluster_toml,
    ep_dispatch_seconds,
    fsdp_unit_seconds,
    host_seconds_beyond,
    machine_cluster,
    sync_figures,
    wait_line,
    without_overheads,
)
from moeforge.bench.plan import LAYOUTS, PlanBenchSettings, bench_config, format_table, plan_run, run_plan_bench
from moeforge.config import ConfigError
from moeforge.plan import load_cluster

MACHINE = {
    "processes": 2,
    "threads_per_process": 1,
    "memory_bytes": 24e9,
    "gemm_flops": 100e9,
    "gemm_flops_median": 90e9,
    "copy_bandwidth": 10e9,
    "all_reduce": [
        {"bytes": 4, "seconds": 1e-4, "bus_bandwidth": 4e4},
        {"bytes": 1 << 20, "seconds": 2e-3, "bus_bandwidth": 0.5e9},
    ],
    "point_to_point": [{"bytes": 4, "seconds": 1e-4, "bandwidth": 4e4}],
}
SMALL = PlanBenchSettings(
    presets=("tiny",),
    layouts=("single",),
    steps=1,
    warmup=0,
    seq_len=32,
    global_batch_size=4,
    gemm_size=128,
    copy_mib=1,
    comm_bytes=(4, 4096),
    repeats=1,
)


def test_measured_cluster_round_trips_through_the_planner(tmp_path):
    cluster = machine_cluster(MACHINE, 2)
    assert (cluster.name, cluster.gpus_per_node) == ("cpu-2", 2)
    assert cluster.achieved_flops("fp32") == MACHINE["gemm_flops"]
    assert cluster.achieved_nvlink == 0.5e9  # the largest message's bus bandwidth
    path = tmp_path / "cpu-2.toml"
    path.write_text(cluster_toml(cluster))
    assert load_cluster(str(path)) == cluster

    # one process: every FLOP of the step at the measured GEMM rate, plus the memory-bound bytes and
    # the optimizer at the copy bandwidth (MACHINE has no operator figure: no launches are charged)
    single = plan_run(bench_config(SMALL, "tiny", LAYOUTS["single"]), machine_cluster(MACHINE, 1), 1)
    assert single.compute_s == pytest.approx(single.flops_per_token * single.tokens_per_step / 100e9)
    assert single.memory_bound_s > 0 and single.optimizer_s > 0 and single.operator_launch_s == 0
    assert single.step_s == pytest.approx(single.compute_s + single.memory_bound_s + single.optimizer_s)
    # without those terms (the earlier model), the step is its FLOPs alone
    matmul_only = plan_run(
        bench_config(SMALL, "tiny", LAYOUTS["single"]), without_overheads(machine_cluster(MACHINE, 1)), 1
    )
    assert matmul_only.step_s == pytest.approx(single.compute_s)
    assert matmul_only.mfu == pytest.approx(1.0)
    # two processes with ep 2: the traffic at the measured link bandwidth
    ep2 = plan_run(bench_config(SMALL, "tiny", LAYOUTS["ep2"]), cluster, 2)
    comm = ep2.communication
    assert comm.all_to_all_nvlink_bytes > 0 and comm.data_parallel_bytes > 0
    # and each collective at the smallest all-reduce's seconds (MACHINE has no all-to-all figure)
    assert comm.all_to_all_s == pytest.approx(comm.all_to_all_nvlink_bytes / 0.5e9)
    assert comm.data_parallel_calls > 0
    assert comm.data_parallel_s == pytest.approx(
        comm.data_parallel_bytes / 0.5e9 + comm.data_parallel_calls * 1e-4
    )


def test_waiting_for_peers_is_charged_at_each_collective_and_on_the_work_between():
    """sync-wait per blocking collective, sync-skew of the busy time between them; one process waits
    for nobody; the earlier model (`without_overheads`) has no waits."""
    machine = {**MACHINE, "sync": {"sync_wait": 2e-3, "sync_skew": 0.1}}
    cluster = machine_cluster(machine, 2)
    assert (cluster.sync_wait, cluster.sync_skew) == (2e-3, 0.1)
    ep2 = plan_run(bench_config(SMALL, "tiny", LAYOUTS["ep2"]), cluster, 2)
    comm = ep2.communication
    calls = comm.all_to_all_calls + comm.data_parallel_calls + comm.step_calls
    busy = ep2.compute_s + ep2.memory_bound_s + ep2.operator_launch_s
    assert calls > 0 and ep2.waiting_s == pytest.approx(calls * 2e-3 + 0.1 * busy)
    no_waits = plan_run(bench_config(SMALL, "tiny", LAYOUTS["ep2"]), machine_cluster(MACHINE, 2), 2)
    assert ep2.step_s - no_waits.step_s == pytest.approx(ep2.waiting_s)
    single = plan_run(bench_config(SMALL, "tiny", LAYOUTS["single"]), machine_cluster(machine, 1), 1)
    assert single.waiting_s == 0
    assert without_overheads(cluster).sync_wait == without_overheads(cluster).sync_skew == 0


def test_fsdp_host_work_is_charged_per_communicating_unit():
    """fsdp-unit-overhead per FSDP2 unit that communicates and micro-batch: tiny's blocks and root
    over two ranks (FSDP2 layout); none for one process; the earlier model has none."""
    machine = {**MACHINE, "fsdp_unit_seconds": 3e-3}
    cluster = machine_cluster(machine, 2)
    assert cluster.fsdp_unit_overhead == 3e-3
    cfg = bench_config(SMALL, "tiny", LAYOUTS["fsdp2"])
    fsdp2 = plan_run(cfg, cluster, 2)
    units = cfg.model.n_layers + cfg.model.mtp_depth + 1  # the blocks (main and MTP) and the root
    assert fsdp2.host_work_s == pytest.approx(fsdp2.micro_batches * units * 3e-3)
    without = plan_run(cfg, machine_cluster(MACHINE, 2), 2)
    assert fsdp2.step_s - without.step_s == pytest.approx(fsdp2.host_work_s)
    single = plan_run(bench_config(SMALL, "tiny", LAYOUTS["single"]), machine_cluster(machine, 1), 1)
    assert single.host_work_s == 0 and without_overheads(cluster).fsdp_unit_overhead == 0


def test_ep_dispatcher_host_work_is_charged_per_moe_layer():
    """ep-dispatch-overhead per MoE layer and micro-batch under EP (tiny's MoE blocks, the MTP block's
    included), on top of FSDP's host work; nothing without EP."""
    machine = {**MACHINE, "ep_dispatch_seconds": 2e-3}
    cluster = machine_cluster(machine, 2)
    assert cluster.ep_dispatch_overhead == 2e-3
    cfg = bench_config(SMALL, "tiny", LAYOUTS["ep2"])
    ep2 = plan_run(cfg, cluster, 2)
    without = plan_run(cfg, machine_cluster(MACHINE, 2), 2)
    model = cfg.model
    moe_layers = sum(model.is_moe_layer(b) for b in range(model.n_layers)) + model.mtp_depth
    assert ep2.host_work_s - without.host_work_s == pytest.approx(ep2.micro_batches * moe_layers * 2e-3)
    assert ep2.step_s - without.step_s == pytest.approx(ep2.micro_batches * moe_layers * 2e-3)
    fsdp2 = bench_config(SMALL, "tiny", LAYOUTS["fsdp2"])
    assert plan_run(fsdp2, cluster, 2).step_s == pytest.approx(plan_run(fsdp2, machine_cluster(MACHINE, 2), 2).step_s)


def test_wait_line_hand_examples():
    assert wait_line([(1.0, 2.0), (3.0, 4.0)]) == pytest.approx((1.0, 1.0))
    assert wait_line([(1.0, 3.0), (2.0, 3.0), (3.0, 3.0)]) == pytest.approx((3.0, 0.0))
    assert wait_line([(1.0, 4.0), (3.0, 2.0)]) == pytest.approx((3.0, 0.0))  # falling: the mean, flat
    # the line through (1, 0) and (3, 4) has intercept -2: through the origin instead, 12/10
    assert wait_line([(1.0, 0.0), (3.0, 4.0)]) == pytest.approx((0.0, 1.2))


def _sync_worker(rank: int, out: str) -> None:
    from pathlib import Path

    figures = sync_figures((1.0, 3.0), 3)
    figures["fsdp_unit_seconds"] = fsdp_unit_seconds(2, 1)
    figures["ep_dispatch_seconds"] = ep_dispatch_seconds(1)

    def burn(seconds: float) -> None:
        start = time.process_time()
        while time.process_time() - start < seconds:
            pass

    def with_sleep_and_more_work() -> None:
        burn(0.01)
        time.sleep(0.3)  # a sleeping process (as one waiting at a gloo collective) spends no host time
        burn(0.02)

    figures["host_beyond"] = host_seconds_beyond(with_sleep_and_more_work, lambda: burn(0.01), lambda: None, 0, 5)
    if rank == 0:
        Path(out).write_text(json.dumps(figures))


def test_sync_fsdp_and_ep_microbenchmarks_on_two_processes(tmp_path):
    from moeforge.parallel.spawn import run_on_processes

    run_on_processes(2, _sync_worker, str(tmp_path / "sync.json"))
    figures = json.loads((tmp_path / "sync.json").read_text())
    first, second = figures["segments"]
    assert all(p["work_s"] > 0 and p["wait_s"] >= 0 for p in (first, second))
    assert 1 <= first["gemms"] <= second["gemms"]  # the longer segment multiplies no less
    assert figures["sync_wait"] >= 0 and figures["sync_skew"] >= 0 and figures["latency_s"] > 0
    assert figures["fsdp_unit_seconds"] >= 0 and figures["ep_dispatch_seconds"] >= 0
    # 20 ms more CPU work (at least 20 ms of wall time), not the 300 ms asleep
    assert 0.018 <= figures["host_beyond"] < 0.2


def test_the_runs_own_gemm_rate_is_the_clusters_fp32_efficiency():
    """The matmuls of a plan run at the rate measured on the run's own GEMM shapes; the earlier model
    (`without_overheads`) at the n^3 GEMM's."""
    cluster = machine_cluster({**MACHINE, "model_gemm_flops": 40e9}, 1)
    assert cluster.fp32_efficiency == pytest.approx(0.4)
    run = bench_config(SMALL, "tiny", LAYOUTS["single"])
    plan = plan_run(run, cluster, 1)
    assert plan.compute_s == pytest.approx(plan.flops_per_token * plan.tokens_per_step / 40e9)
    assert without_overheads(cluster).fp32_efficiency == 1.0


def test_bench_plan_table_structure():
    result = run_plan_bench(SMALL)
    json.dumps(result)
    assert set(result["machine"]) == {"1"} and set(result["clusters"]) == {"cpu-1"}
    assert result["machine"]["1"]["gemm_flops"] >= result["machine"]["1"]["gemm_flops_median"] > 0
    assert result["rows"][0]["machine"]["model_gemm_flops"] > 0
    assert [(row["preset"], row["layout"], row["processes"]) for row in result["rows"]] == [
        ("tiny", "single", 1)
    ]
    for row in result["rows"]:
        assert len(row["step_s_samples"]) == SMALL.warmup + SMALL.steps
        assert row["planned_over_measured"] == pytest.approx(row["planned_step_s"] / row["measured_step_s"])
        assert row["within_tolerance"] == (abs(row["planned_over_measured"] - 1) <= 0.30)
        assert 0 < row["profiled_matmul_s"] < row["profiled_step_s"]
    lines = format_table(result).splitlines()
    assert any(line.startswith("cpu-1 ") for line in lines)
    assert sum(line.startswith("tiny ") for line in lines) == 1


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"layouts": ("ep8",)}, r"^--layouts: 'ep8' is not one of single, fsdp2, ep2, fsdp4-ep2, hsdp2x2$"),
        ({"presets": ("nope",)}, r"^--presets: 'nope' is not one of "),
        ({"steps": 0}, r"^--steps: got 0; allowed: an integer >= 1$"),
    ],
)
def test_bench_plan_rejects_bad_settings(change, message):
    with pytest.raises(ConfigError, match=message):
        run_plan_bench(dataclasses.replace(SMALL, **change))


# ---- the figures follow injected costs (a fake clock, a simulated second rank) ------------------


class _Clock:
    now = 0.0

    @classmethod
    def perf_counter(cls) -> float:
        return cls.now


OWN_STEPS = (100.0, 100.0, 1.0, 3.0, 2.0, 7.0)
"""this rank's training steps in units of the injected cost: 2 warm-up steps, 3 timed, the profiled one"""
PEER_SCALE = (1.0, 1.0, 4.0, 0.5, 1.25)
"""the other rank's steps over this rank's: slowest per step 100, 100, 4, 3, 2.5: the median timed
step is 3 (this rank's median is 2, the mean of the slowest 19/6)"""


class _CostedTrainer:
    """In the Trainer's place: step i advances the fake clock by OWN_STEPS[i] x `cost`."""

    cost = 1.0

    def __init__(self, cfg, out):
        self.steps = 0

    def train_step(self):
        _Clock.now += OWN_STEPS[self.steps] * self.cost
        self.steps += 1


def _time_training_at(monkeypatch, cost: float) -> dict:
    from moeforge.bench import plan as bench_plan

    peer = iter(PEER_SCALE)
    monkeypatch.setattr(bench_plan, "time", _Clock)
    monkeypatch.setattr(bench_plan, "dist", type("OneRank", (), {"barrier": staticmethod(lambda: None)}))
    monkeypatch.setattr(bench_plan, "slowest_of_ranks", lambda value, pick: pick(value, value * next(peer)))
    monkeypatch.setattr(_CostedTrainer, "cost", cost)
    monkeypatch.setattr(bench_plan, "Trainer", _CostedTrainer)
    settings = dataclasses.replace(SMALL, warmup=2, steps=3)
    return bench_plan.time_training(bench_config(settings, "tiny", LAYOUTS["single"]), settings)


def test_the_measured_step_and_the_ratios_follow_the_injected_step_costs(monkeypatch):
    """The slowest rank's step, median of the timed ones: 3 x the cost; planned/measured, the earlier
    model's and the achieved FLOP/s divide by it, so they fall as the step grows, and a case is within
    the tolerance exactly when the injected cost puts the ratio within 30%."""
    from moeforge.bench.plan import comparison_row

    cfg = bench_config(SMALL, "tiny", LAYOUTS["single"])
    cluster = machine_cluster(MACHINE, 1)
    plan = plan_run(cfg, cluster, 1)
    rows = []
    for ratio in (1.25, 0.6):  # planned / measured: within 30%, and not
        cost = plan.step_s / ratio / 3.0
        run = _time_training_at(monkeypatch, cost)
        assert run["step_s"] == pytest.approx([cost * 100, cost * 100, cost * 4, cost * 3, cost * 2.5])
        assert run["median_step_s"] == pytest.approx(3 * cost)
        assert run["profiled_step_s"] == pytest.approx(7 * cost)  # one more step, under the profiler
        run.update(machine=MACHINE, gemm_flops_after=80e9)
        row = comparison_row("single", "tiny", run, plan, cluster, matmul_only_s=0.5 * plan.step_s)
        assert row["measured_step_s"] == pytest.approx(3 * cost)
        assert row["planned_over_measured"] == pytest.approx(ratio)
        assert row["within_tolerance"] == (ratio == 1.25)
        assert row["matmul_only_over_measured"] == pytest.approx(0.5 * ratio)
        flops = plan.flops_per_token * cfg.train.global_batch_size * cfg.train.seq_len
        assert row["achieved_flops_per_device"] == pytest.approx(flops / (3 * cost))
        assert row["gemm_drift"] == pytest.approx(80e9 / MACHINE["gemm_flops"])
        rows.append(row)
    result = {
        "config": {**dataclasses.asdict(SMALL), "cores": 2, "torch": "x", "load_average_before": [0.0] * 3,
                   "load_average_after": [0.0] * 3},
        "machine": {"1": MACHINE}, "rows": rows,
    }  # fmt: skip
    table = [line.split() for line in format_table(result).splitlines() if line.startswith("tiny ")]
    # preset, layout, processes, measured s, planned s, planned/measured, <=30%
    assert [cells[5:7] for cells in table] == [["1.25", "yes"], ["0.60", "no"]]
    assert [cells[-1] for cells in table] == ["0.80", "0.80"]  # GEMM after / before


def test_the_machines_gemm_rate_is_its_best_and_median_timed_matmul(monkeypatch):
    """A scripted clock: after an untimed one, the matmuls take 3, 1, 2, 10 and 4 s: best 1 s, median
    3 s (the mean would be 4); copies 2 and 0.5 s: 2 x bytes over the best."""
    from moeforge.bench import machine_cluster as measured

    durations = iter([3.0, 1.0, 2.0, 10.0, 4.0, 2.0, 0.5])

    class ScriptedClock:
        """Each timed call's start reads 0, its end the next duration."""

        started = False

        @classmethod
        def perf_counter(cls) -> float:
            cls.started = not cls.started
            return 0.0 if cls.started else next(durations)

    monkeypatch.setattr(measured, "time", ScriptedClock)
    monkeypatch.setattr(measured, "dist", type("OneRank", (), {"barrier": staticmethod(lambda: None)}))
    assert measured.gemm_flops(8, 5) == pytest.approx((2 * 8**3 / 1.0, 2 * 8**3 / 3.0))
    assert measured.copy_bandwidth(1024, 2) == pytest.approx(2 * 1024 / 0.5)
