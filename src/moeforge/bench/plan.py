"""`moeforge bench plan`: the planner's step time against real training steps on this CPU.

First this machine is measured as a planner `Cluster`, then the trainer runs, and only then are the
two compared; no constant is fitted to the runs.

- **The cluster.** A "device" is one gloo process of one thread; a layout of P processes runs on
  the cluster "cpu-P": one node of P devices that share the machine's cores and memory (4 devices
  on fewer cores take turns). One thread each, also for a single process: a multi-threaded process
  collapses when other work holds a core (OpenMP's threads wait for each other). Its facts are
  measured in the same P processes right before each run (the share of a shared machine that our
  processes get drifts; the GEMM rate is measured again after the run, once, to show by how
  much): the fp32 GEMM rate of one device while all P multiply at once (a large square matmul,
  best of a few), the copy bandwidth of one device while all P copy at once (a large tensor,
  read + write bytes), the host seconds of one operator while all P run a chain of tiny
  operators forward and backward, and gloo's all-reduce
  and point-to-point bandwidth and latency at a few sizes and the latency of a small all-to-all.
  The planner's FP32 peak is the GEMM rate with an efficiency of 1 (it assumes a step's matmuls
  run as fast as a large GEMM), its elementwise bandwidth the copy bandwidth, its operator
  overhead the chain's seconds per operator, its "NVLink" (the link inside a node) gloo's
  all-reduce bus bandwidth at the largest size with an efficiency of 1, its latencies those of the
  smallest all-reduce and all-to-all; there is no network (one node).
- **The runs.** For each layout (1 process; 2 processes FSDP; 2 processes EP2; 4 processes FSDP
  with EP2; 4 processes HSDP 2 x 2) and preset, the trainer runs a few real steps on the spawned
  gloo processes in fp32 (`moeforge.train.trainer.Trainer`, as `moeforge train` runs); a step's
  time is the slowest rank's `train_step`, and the figure is the median after the warm-up steps.
- **The comparison.** The planner plans the same layout (fp32 matmuls, activations, all-to-all rows
  and FSDP traffic; the run's batch and micro-batch) on the measured cluster; the table shows both
  step times, their ratio, what the planner says bounds the step, the planned step's parts, and
  the ratio of the earlier model (matmul FLOPs and communication bytes only) for comparison.

The machine's measurements and the `Cluster` made of them are bench/machine_cluster.py's; this
module runs the layouts, plans them and compares.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moeforge.bench.machine_cluster import (
    gemm_flops,
    machine_cluster,
    measure_machine,
    model_gemm_flops,
    slowest_of_ranks,
    without_overheads,
)
from moeforge.config import Config, ConfigError, available_presets, load_config
from moeforge.parallel.spawn import run_on_processes
from moeforge.plan import Cluster, Plan, TrainingShape, layout_from_config, plan_layout
from moeforge.plan.layout import moeforge_attention_kernel
from moeforge.train.trainer import Trainer


TOLERANCE = 0.30
"""the relative error of the planned step time against the measured one under which a case counts
as planned well (the table's <=30% column)"""


@dataclasses.dataclass(frozen=True)
class BenchLayout:
    """One layout of the trainer: `processes` gloo processes, HSDP `dp_replicate` x (FSDP with `ep`)."""

    processes: int
    dp_replicate: int = 1
    ep: int = 1


LAYOUTS = {
    "single": BenchLayout(1),
    "fsdp2": BenchLayout(2),
    "ep2": BenchLayout(2, ep=2),
    "fsdp4-ep2": BenchLayout(4, ep=2),
    "hsdp2x2": BenchLayout(4, dp_replicate=2),
}


@dataclasses.dataclass(frozen=True)
class PlanBenchSettings:
    presets: tuple[str, ...] = ("tiny", "deepseek-v3-tiny")
    layouts: tuple[str, ...] = tuple(LAYOUTS)
    steps: int = 4
    """timed training steps per layout"""
    warmup: int = 2
    """untimed training steps before them"""
    seq_len: int = 0
    """0 = the preset's train.seq-len"""
    global_batch_size: int = 0
    """0 = the preset's train.global-batch-size"""
    gemm_size: int = 2048
    """n of the n x n x n fp32 matmul that measures FLOP/s"""
    copy_mib: int = 256
    """MiB of the tensor copied to measure memory bandwidth"""
    comm_bytes: tuple[int, ...] = (4, 65536, 1 << 20, 16 << 20)
    """message sizes of the gloo measurements (the smallest gives the latency)"""
    repeats: int = 5
    """repeats of each machine measurement (the best counts)"""
    operator_chain: int = 200
    """tiny operators in the chain that measures the launch overhead of one operator"""
    sync_segments_ms: tuple[float, ...] = (5.0, 20.0, 50.0)
    """lengths of the work segments between all-reduces that measure the wait for peers"""
    sync_iterations: int = 20
    """segments of each length timed"""
    fsdp_units: int = 8
    """tiny FSDP2 units in the model that measures FSDP's host work per unit"""

    def validate(self) -> None:
        for name in ("steps", "warmup", "gemm_size", "copy_mib", "repeats", "operator_chain", "sync_iterations",
                     "fsdp_units"):
            value, least = getattr(self, name), 0 if name == "warmup" else 1
            if value < least:
                raise ConfigError(f"--{name.replace('_', '-')}: got {value}; allowed: an integer >= {least}")
        for preset in self.presets:
            if preset not in available_presets():
                raise ConfigError(f"--presets: {preset!r} is not one of {', '.join(available_presets())}")
        for name in self.layouts:
            if name not in LAYOUTS:
                raise ConfigError(f"--layouts: {name!r} is not one of {', '.join(LAYOUTS)}")
        if not self.presets or not self.layouts:
            raise ConfigError("--presets/--layouts: give at least one of each")


def run_plan_bench(settings: PlanBenchSettings) -> dict[str, Any]:
    """Measure the machine, run the layouts with the trainer on spawned processes, plan them on the
    measured clusters; a JSON-ready dict."""
    settings.validate()
    load_before = os.getloadavg()
    worlds = sorted({LAYOUTS[name].processes for name in settings.layouts})
    measured: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            out = Path(tmp) / f"world{world}.json"
            run_on_processes(world, _spawned_worker, settings, str(out), threads=1)
            measured[world] = json.loads(out.read_text())
    clusters = {world: machine_cluster(measured[world]["machine"], world) for world in worlds}
    rows = []
    for name in settings.layouts:
        world = LAYOUTS[name].processes
        for preset in settings.presets:
            run = measured[world]["runs"][f"{preset}/{name}"]
            cfg = bench_config(settings, preset, LAYOUTS[name])
            # the cluster measured in the run's processes right before it
            cluster = machine_cluster(run["machine"], world)
            plan = plan_run(cfg, cluster, world)
            matmul_only = plan_run(cfg, without_overheads(cluster), world)
            rows.append(comparison_row(name, preset, run, plan, cluster, matmul_only.step_s))
    return {
        "config": {
            **dataclasses.asdict(settings),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_before": list(load_before),
            "load_average_after": list(os.getloadavg()),
        },
        "machine": {str(world): measured[world]["machine"] for world in worlds},
        "clusters": {clusters[world].name: dataclasses.asdict(clusters[world]) for world in worlds},
        "rows": rows,
    }


def _spawned_worker(rank: int, settings: PlanBenchSettings, out: str) -> None:
    """On each of the world's processes: every layout of this world size, each run measuring the
    machine right before it (on a shared machine the share our processes get drifts; the first
    measurement is the world's cluster, `--clusters-out`) and its GEMM rate again right after it."""
    machine = None
    runs = {}
    for name, layout in LAYOUTS.items():
        if name in settings.layouts and layout.processes == dist.get_world_size():
            for preset in settings.presets:
                cfg = bench_config(settings, preset, layout)
                before = measure_machine(settings)
                micro_batch = micro_batch_size(cfg, dist.get_world_size())
                before["model_gemm_flops"] = slowest_of_ranks(model_gemm_flops(cfg, micro_batch, settings.repeats), min)
                machine = machine or before
                run = time_training(cfg, settings)
                after = slowest_of_ranks(gemm_flops(settings.gemm_size, 1)[0], min)  # one repeat: a drift check
                runs[f"{preset}/{name}"] = {**run, "machine": before, "gemm_flops_after": after}
    if rank == 0:
        Path(out).write_text(json.dumps({"machine": machine, "runs": runs}))


# ----------------------------------------------------------------------------------------------
# The runs and the plans


def bench_config(settings: PlanBenchSettings, preset: str, layout: BenchLayout) -> Config:
    """The run config of `preset` under `layout`: fp32 on the CPU, no progress bar, no report."""
    overrides = {
        "parallel.dp-replicate": str(layout.dp_replicate),
        "parallel.ep": str(layout.ep),
        "train.device": "cpu",
        "train.dtype": "fp32",
        "train.progress": "false",
        "train.report": "false",
        "train.steps": str(settings.warmup + settings.steps),
    }
    if settings.seq_len:
        overrides["train.seq-len"] = str(settings.seq_len)
    if settings.global_batch_size:
        overrides["train.global-batch-size"] = str(settings.global_batch_size)
    return load_config(preset, overrides=overrides, world_size=layout.processes)


def time_training(cfg: Config, settings: PlanBenchSettings) -> dict[str, Any]:
    """Seconds of each `train_step` (the slowest rank's), warm-up steps first."""
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(cfg, out)
        seconds = []
        for _ in range(settings.warmup + settings.steps):
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step()
            seconds.append(slowest_of_ranks(time.perf_counter() - start, max))
        matmul_s, profiled_s = profiled_matmul_seconds(trainer)
    timed = seconds[settings.warmup :]
    return {
        "step_s": seconds,
        "median_step_s": statistics.median(timed),
        "profiled_matmul_s": matmul_s,
        "profiled_step_s": profiled_s,
    }


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")


def profiled_matmul_seconds(trainer: Trainer) -> tuple[float, float]:
    """One more step under torch.profiler: (seconds in matmul and attention kernels, the step's
    seconds), on this rank. Shows where the planner's compute model (only these, at the GEMM rate)
    parts from the step: how fast its matmuls really run, and how long everything else takes."""
    from torch.profiler import ProfilerActivity, profile

    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        trainer.train_step()
        step = time.perf_counter() - start
    kernels = sum(
        e.self_cpu_time_total
        for e in prof.key_averages()
        if e.key in MATMUL_OPS or "scaled_dot_product" in e.key
    )
    return kernels / 1e6, step


def micro_batch_size(cfg: Config, world: int) -> int:
    """Sequences per micro-batch of the run `cfg` on `world` processes, every one a data-parallel
    rank: train.micro-batch-size, or the whole per-rank batch."""
    return cfg.train.micro_batch_size or max(1, cfg.train.global_batch_size // world)


def plan_run(cfg: Config, cluster: Cluster, world: int) -> Plan:
    """The planner's plan of the run `cfg` on `world` devices of `cluster`: its layout, fp32
    matmuls, activations and all-to-all rows and the attention kernel of moeforge's CPU training,
    its micro-batches."""
    layout = layout_from_config(cfg)
    layout.micro_batch_size = micro_batch_size(cfg, world)
    layout.compute_dtype = "fp32"
    layout.activation_bytes = 4
    layout.dispatch_bytes = layout.combine_bytes = 4.0
    layout.attention_kernel = moeforge_attention_kernel(cfg.model, "cpu")
    layout.validate(world, cluster.gpus_per_node)
    return plan_layout(
        cfg.model, layout, cluster, TrainingShape(cfg.train.global_batch_size, cfg.train.seq_len)
    )


def comparison_row(
    name: str, preset: str, run: dict[str, Any], plan: Plan, cluster: Cluster, matmul_only_s: float
) -> dict[str, Any]:
    """One line of the table: measured and planned step time, their ratio, what bounds the step,
    the planned step's parts, and the plan of the matmul-and-bytes-only model (`matmul_only_s`)."""
    measured = run["median_step_s"]
    comm = plan.communication
    latency = (
        comm.all_to_all_calls * cluster.all_to_all_latency
        + comm.data_parallel_calls * cluster.collective_latency
        + comm.step_calls_s
    )
    flops_per_device = plan.flops_per_token * plan.tokens_per_step / plan.world_size
    return {
        "layout": name,
        "preset": preset,
        "planner_layout": plan.layout.describe(),
        "cluster": cluster.name,
        "processes": plan.world_size,
        "measured_step_s": measured,
        "step_s_samples": run["step_s"],
        "planned_step_s": plan.step_s,
        "planned_over_measured": plan.step_s / measured,
        "within_tolerance": abs(plan.step_s / measured - 1) <= TOLERANCE,
        "bound_by": plan.bound_by,
        "planned_compute_s": plan.compute_s,
        "planned_exposed_all_to_all_s": plan.exposed_all_to_all_s,
        "planned_exposed_data_parallel_s": plan.exposed_data_parallel_s,
        "planned_all_to_all_s": plan.communication.all_to_all_s,
        "planned_data_parallel_s": plan.communication.data_parallel_s,
        "achieved_flops_per_device": flops_per_device / measured,
        "profiled_matmul_s": run["profiled_matmul_s"],
        "profiled_step_s": run["profiled_step_s"],
        "gemm_flops_per_device": cluster.peak_fp32_flops,
        "planned_memory_bound_s": plan.memory_bound_s,
        "planned_operator_launch_s": plan.operator_launch_s,
        "planned_optimizer_s": plan.optimizer_s,
        "planned_latency_s": latency,
        "planned_waiting_s": plan.waiting_s,
        "planned_host_work_s": plan.host_work_s,
        "planned_operators_per_step": plan.operators_per_step,
        "collectives_per_step": comm.all_to_all_calls + comm.data_parallel_calls + comm.step_calls,
        "machine": run["machine"],
        "gemm_flops_after": run["gemm_flops_after"],
        "gemm_drift": run["gemm_flops_after"] / cluster.peak_fp32_flops,
        "matmul_only_planned_s": matmul_only_s,
        "matmul_only_over_measured": matmul_only_s / measured,
    }


def format_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    before, after = cfg["load_average_before"], cfg["load_average_after"]
    lines = [
        f"planner step time vs real Trainer steps on this CPU ({cfg['cores']} cores, torch {cfg['torch']}, "
        f"load average {before[0]:.1f} {before[1]:.1f} {before[2]:.1f} before, "
        f"{after[0]:.1f} {after[1]:.1f} {after[2]:.1f} after); "
        f"median of {cfg['steps']} steps after {cfg['warmup']} warm-up, slowest rank",
        "",
        "the machine as measured in each run's processes right before it (a device = one gloo process, cluster "
        "cpu-P for P processes; every constant of that row's cluster comes from these microbenchmarks; no layout "
        "sets any constant; --clusters-out writes each world's first):",
        f"{'run':<29}{'GEMM GFLOP/s':>13}{'(median)':>9}{'model GEMMs':>12}{'copy GB/s':>10}{'us/op':>7}"
        f"{'all-reduce GB/s':>16}{'p2p GB/s':>9}{'p2p lat. us':>12}{'all-reduce lat. us':>19}"
        f"{'all-to-all lat. us':>19}{'sync wait us':>13}{'sync skew':>10}{'FSDP unit ms':>13}{'EP layer ms':>12}",
    ]
    firsts = {f"cpu-{world}": machine for world, machine in result["machine"].items()}
    labelled = [(f"{name} (first)", machine) for name, machine in firsts.items()]
    labelled += [(f"{row['preset']}/{row['layout']}", row["machine"]) for row in result["rows"]]
    for label, machine in labelled:
        reduce, p2p, a2a = machine.get("all_reduce"), machine.get("point_to_point"), machine.get("all_to_all")
        link = (
            f"{max(f['bus_bandwidth'] for f in reduce) / 1e9:>16.2f}{max(f['bandwidth'] for f in p2p) / 1e9:>9.2f}"
            f"{p2p[0]['seconds'] * 1e6:>12.0f}{reduce[0]['seconds'] * 1e6:>19.0f}"
            + (f"{a2a[0]['seconds'] * 1e6:>19.0f}" if a2a else f"{'-':>19}")
            if reduce
            else f"{'-':>16}{'-':>9}{'-':>12}{'-':>19}{'-':>19}"
        )
        operator = machine.get("operator_seconds")
        sync = machine.get("sync")
        link += f"{sync['sync_wait'] * 1e6:>13.0f}{sync['sync_skew']:>10.3f}" if sync else f"{'-':>13}{'-':>10}"
        unit = machine.get("fsdp_unit_seconds")
        link += f"{unit * 1e3:>13.2f}" if unit is not None else f"{'-':>13}"
        dispatch = machine.get("ep_dispatch_seconds")
        link += f"{dispatch * 1e3:>12.2f}" if dispatch is not None else f"{'-':>12}"
        lines.append(
            f"{label + ' ':<29}{machine['gemm_flops'] / 1e9:>13.1f}"
            f"{machine['gemm_flops_median'] / 1e9:>9.1f}"
            + (f"{machine['model_gemm_flops'] / 1e9:>12.1f}" if "model_gemm_flops" in machine else f"{'-':>12}")
            + f"{machine['copy_bandwidth'] / 1e9:>10.2f}"
            + (f"{operator * 1e6:>7.1f}" if operator else f"{'-':>7}")
            + link
        )
    lines += [
        "",
        f"{'preset':<18}{'layout':<11}{'procs':>6}{'measured s':>12}{'planned s':>11}{'planned/meas':>14}"
        f"{'  <=30%':<8}{'bound by':<19}{'matmul s':>9}{'memory s':>9}{'launch s':>9}{'optim s':>8}"
        f"{'latency s':>10}{'wait s':>8}{'host s':>8}{'ops/step':>9}{'colls':>6}{'old/meas':>9}{'prof. matmul s':>15}{'prof. rest s':>13}"
        f"{'GEMM after/before':>18}",
    ]
    for row in result["rows"]:
        lines.append(
            f"{row['preset']:<18}{row['layout']:<11}{row['processes']:>6}{row['measured_step_s']:>12.3f}"
            f"{row['planned_step_s']:>11.3f}{row['planned_over_measured']:>14.2f}"
            f"{'  yes' if row['within_tolerance'] else '  no':<8}{row['bound_by']:<19}"
            f"{row['planned_compute_s']:>9.3f}{row['planned_memory_bound_s']:>9.3f}"
            f"{row['planned_operator_launch_s']:>9.3f}{row['planned_optimizer_s']:>8.3f}"
            f"{row['planned_latency_s']:>10.3f}{row.get('planned_waiting_s', 0.0):>8.3f}"
            f"{row.get('planned_host_work_s', 0.0):>8.3f}"
            f"{row['planned_operators_per_step']:>9.0f}"
            f"{row['collectives_per_step']:>6.0f}{row['matmul_only_over_measured']:>9.2f}"
            f"{row['profiled_matmul_s']:>15.3f}{row['profiled_step_s'] - row['profiled_matmul_s']:>13.3f}"
            f"{row['gemm_drift']:>18.2f}"
        )
    lines += [
        "",
        "model GEMMs: GFLOP/s of the run's own GEMM shapes (plan.gemm_shapes, forward and backward products), "
        "the cluster's FP32 efficiency is its ratio to the n^3 GEMM's; "
        "matmul s: the planner's matmul and attention FLOPs at that rate; memory s: the non-matmul bytes of "
        "forward and backward (plan.memory_traffic) at the copy bandwidth; launch s: the operators of forward and "
        "backward (plan.op_counts) at us/op; optim s: clipping and AdamW over the rank's shard, bytes and "
        "operators; latency s: collectives (colls per step) at the measured latencies (their bytes are in the "
        "planned step too); wait s: the waits for the slowest peer at those collectives (sync wait each, "
        "sync skew of the work between them: the machine's sync microbenchmark, work segments of 5-50 ms between "
        "one-element all-reduces); host s: FSDP2's and the EP dispatcher's host work around their collectives (FSDP "
        "unit ms per unit and micro-batch: tiny FSDP2 units fwd+bwd against the same model unsharded; EP layer ms per "
        "MoE layer and micro-batch: a tiny MoE layer with its experts over the ranks against all local; each the "
        "difference in process CPU time net of its collectives' own, scaled to wall time by a process's share of "
        "a core); "
        "ops/step: operators the planner counts per step; old/meas: the earlier model "
        "(matmul FLOPs at the n^3 GEMM rate and communication bytes only) over measured; prof. matmul s / prof. rest s: one more step "
        "under torch.profiler (rank 0, the profiler's own overhead included), its seconds in matmul and "
        "attention kernels (compare with matmul s) and in everything else (compare with the other parts); GEMM "
        "after/before: the GEMM rate measured right after the run over the one before it (how much the share of "
        "the machine our processes got moved during the run)",
    ]
    return "\n".join(lines)
