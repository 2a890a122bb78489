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
  gloo processes in fp32 (`moeforge.train.trainer.Trainer`, handed in by the caller: bench sits
  beside train in the layers and may not import it); a step's time is the slowest rank's
  `train_step`, and the figure is the median after the warm-up steps.
- **The comparison.** The planner plans the same layout (fp32 matmuls, activations, all-to-all rows
  and FSDP traffic; the run's batch and micro-batch) on the measured cluster; the table shows both
  step times, their ratio, what the planner says bounds the step, the planned step's parts, and
  the ratio of the earlier model (matmul FLOPs and communication bytes only) for comparison.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from moeforge.config import Config, ConfigError, MoEConfig, available_presets, load_config
from moeforge.model.moe import MoE
from moeforge.parallel.parallelize import apply_expert_parallel
from moeforge.parallel.spawn import run_on_processes
from moeforge.plan import Cluster, Plan, TrainingShape, layout_from_config, plan_layout
from moeforge.plan.layout import moeforge_attention_kernel
from moeforge.plan.gemm_shapes import micro_batch_gemms
from moeforge.plan.op_counts import count_operators


class Steps(Protocol):
    def train_step(self) -> dict[str, Any]: ...


TrainerFactory = Callable[[Config, str], Steps]
"""(run config, run directory) -> a trainer, e.g. `moeforge.train.trainer.Trainer`"""

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


def run_plan_bench(settings: PlanBenchSettings, trainer: TrainerFactory) -> dict[str, Any]:
    """Measure the machine, run the layouts with `trainer` (a module-level class or function, so
    that spawned processes can import it), plan them on the measured clusters; a JSON-ready dict."""
    settings.validate()
    load_before = os.getloadavg()
    worlds = sorted({LAYOUTS[name].processes for name in settings.layouts})
    measured: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            out = Path(tmp) / f"world{world}.json"
            run_on_processes(world, _spawned_worker, settings, trainer, str(out), threads=1)
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


def _spawned_worker(rank: int, settings: PlanBenchSettings, trainer: TrainerFactory, out: str) -> None:
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
                before["model_gemm_flops"] = _slowest(model_gemm_flops(cfg, settings.repeats), min)
                machine = machine or before
                run = time_training(trainer, cfg, settings)
                after = _slowest(gemm_flops(settings.gemm_size, 1)[0], min)  # one repeat: a drift check
                runs[f"{preset}/{name}"] = {**run, "machine": before, "gemm_flops_after": after}
    if rank == 0:
        Path(out).write_text(json.dumps({"machine": machine, "runs": runs}))


# ----------------------------------------------------------------------------------------------
# The machine


def measure_machine(settings: PlanBenchSettings) -> dict[str, Any]:
    """This world's devices: GEMM FLOP/s and copy bandwidth of the slowest process while all of them
    work at once, and gloo's collectives over all of them (point to point: ranks 0 and 1)."""
    world = dist.get_world_size()
    best, median = gemm_flops(settings.gemm_size, settings.repeats)
    result = {
        "processes": world,
        "threads_per_process": torch.get_num_threads(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "gemm_flops": _slowest(best, min),
        "gemm_flops_median": _slowest(median, min),
        "copy_bandwidth": _slowest(copy_bandwidth(settings.copy_mib << 20, settings.repeats), min),
        "operator_seconds": _slowest(operator_seconds(settings.operator_chain, settings.repeats), max),
    }
    if world > 1:
        result["all_reduce"] = [all_reduce_figures(n, settings.repeats) for n in settings.comm_bytes]
        result["point_to_point"] = [point_to_point_figures(n, settings.repeats) for n in settings.comm_bytes]
        result["all_to_all"] = [all_to_all_figures(settings.comm_bytes[0], settings.repeats)]
        result["sync"] = sync_figures(settings.sync_segments_ms, settings.sync_iterations)
        result["fsdp_unit_seconds"] = _slowest(fsdp_unit_seconds(settings.fsdp_units, settings.repeats), max)
        result["ep_dispatch_seconds"] = _slowest(ep_dispatch_seconds(settings.repeats), max)
    return result


def _slowest(value: float, pick: Any) -> float:
    """`pick` (min or max) of `value` over the ranks."""
    return pick(_over_ranks(value))


def _over_ranks(value: float) -> list[float]:
    """`value` of every rank."""
    values = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(values, torch.tensor([value], dtype=torch.float64))
    return [float(v) for v in values]


def _seconds(fn: Any, repeats: int, together: bool = False, clock: Any = time.perf_counter) -> list[float]:
    """Seconds of `repeats` timed calls of `fn` after an untimed one, every process starting
    together; `together`: until every process has finished (what P devices that share cores each
    reach while all of them work, not what one reaches while the others wait for the CPU);
    `clock`: wall time, or `time.process_time` for this process's CPU time (every thread's)."""
    fn()
    samples = []
    for _ in range(repeats):
        dist.barrier()
        start = clock()
        fn()
        if together:
            dist.barrier()
        samples.append(clock() - start)
    return samples


def _best_seconds(fn: Any, repeats: int, together: bool = False) -> float:
    return min(_seconds(fn, repeats, together))


def gemm_flops(n: int, repeats: int) -> tuple[float, float]:
    """FLOP/s of an n x n by n x n fp32 matmul (2 n^3 FLOPs) on each process while all of them
    multiply: the best and the median of `repeats`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    samples = _seconds(lambda: torch.mm(a, b, out=out), repeats, together=True)
    return 2 * n**3 / min(samples), 2 * n**3 / statistics.median(samples)


def model_gemm_flops(cfg: Config, repeats: int) -> float:
    """FLOP/s of this run's own GEMMs (`plan.gemm_shapes`: one micro-batch's products, each with its
    two backward products, every call) on each process while all of them multiply, best of
    `repeats`: the rate the run's matmuls can reach here, which small shapes keep well under the
    n^3 GEMM's. Every call multiplies operands of its own, as in a training step, where an operand
    was last touched many kernels ago and comes from memory, not from the cache (the same operands
    again and again run faster than the step's matmuls do: docs/plan-step-time.md)."""
    model = cfg.model
    tokens = micro_batch_size(cfg, dist.get_world_size()) * cfg.train.seq_len
    gemms = micro_batch_gemms(model, list(range(-1, model.n_layers + 1)), tokens, cfg.train.seq_len, cfg.parallel.ep,
                              moeforge_attention_kernel(model, "cpu"))
    operands = [
        (torch.randn(g.m, g.k), torch.randn(g.k, g.n), torch.randn(g.m, g.n)) for g in gemms for _ in range(g.calls)
    ]

    def forward_and_backward_products() -> None:
        for a, b, grad in operands:
            torch.mm(a, b)
            torch.mm(grad, b.t())
            torch.mm(a.t(), grad)

    seconds = _best_seconds(forward_and_backward_products, repeats, together=True)
    return sum(g.training_flops for g in gemms) / seconds


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """Bytes/s a copy of `nbytes` moves (read + write) on each process while all of them copy, best
    of `repeats`."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), repeats, together=True)


def operator_seconds(chain: int, repeats: int) -> float:
    """Host seconds per operator on each process while all of them run it: a chain of `chain` tiny
    multiply-adds on a 4-element tensor that requires grad, its sum and the backward, timed (best
    of `repeats`) and divided by the aten operators it dispatches (`plan.op_counts`, as the planner
    counts a step's). The kernels do next to nothing, so this is the dispatcher, autograd's
    recording and the Python around one operator."""
    x = torch.ones(4, requires_grad=True)

    def forward_backward() -> None:
        y = x
        for _ in range(chain):
            y = y * 1.0001 + 0.5
        y.sum().backward()

    operators = count_operators(forward_backward)
    return _best_seconds(forward_backward, repeats, together=True) / operators


def all_to_all_figures(nbytes: int, repeats: int) -> dict[str, float]:
    """An all-to-all of `nbytes` to each rank (`all_to_all_single`, as the expert-parallel
    dispatcher sends): seconds (slowest rank, best repeat)."""
    world = dist.get_world_size()
    send = torch.zeros(world * max(1, nbytes // 4))
    recv = torch.empty_like(send)
    seconds = _slowest(_best_seconds(lambda: dist.all_to_all_single(recv, send), repeats), max)
    return {"bytes": nbytes, "seconds": seconds}


def all_reduce_figures(nbytes: int, repeats: int) -> dict[str, float]:
    """An all-reduce of `nbytes` over the world: seconds (slowest rank, best repeat) and the bus
    bandwidth, the bytes through each rank's link per second (2 (n-1)/n x size, as `plan.comm`)."""
    buffer = torch.zeros(max(1, nbytes // 4))
    seconds = _slowest(_best_seconds(lambda: dist.all_reduce(buffer), repeats), max)
    world = dist.get_world_size()
    return {"bytes": nbytes, "seconds": seconds, "bus_bandwidth": 2 * (world - 1) / world * nbytes / seconds}


def point_to_point_figures(nbytes: int, repeats: int) -> dict[str, float]:
    """Rank 0 and 1 bounce `nbytes` back and forth: one-way seconds (half the best round trip) and
    bandwidth; the other ranks wait."""
    rank = dist.get_rank()
    buffer = torch.zeros(max(1, nbytes // 4))

    def round_trip() -> None:
        if rank == 0:
            dist.send(buffer, 1)
            dist.recv(buffer, 1)
        elif rank == 1:
            dist.recv(buffer, 0)
            dist.send(buffer, 0)

    one_way = _slowest(_best_seconds(round_trip, repeats) / 2, max)
    return {"bytes": nbytes, "seconds": one_way, "bandwidth": nbytes / one_way}


def sync_figures(segments_ms: tuple[float, ...], iterations: int) -> dict[str, Any]:
    """How long a process waits for its peers at a blocking collective: every process runs a segment
    of work (a model-sized GEMM, [2048, 256] x [256, 256], repeated to about each of `segments_ms`
    while all of them multiply), then a one-element all-reduce, `iterations` times; its wait is the
    time in the all-reduce beyond the all-reduce's own latency (measured alone first). Per segment
    length: the mean work and wait over iterations and ranks. `sync_wait` and `sync_skew` are the
    least-squares line wait = sync_wait + sync_skew x work through those points (each >= 0)."""
    a, b, out = torch.randn(2048, 256), torch.randn(256, 256), torch.empty(2048, 256)
    tiny = torch.zeros(1)
    gemm_s = _slowest(statistics.median(_seconds(lambda: torch.mm(a, b, out=out), 10, together=True)), max)
    latency = _slowest(statistics.median(_seconds(lambda: dist.all_reduce(tiny), 20)), max)
    points = []
    for segment_ms in segments_ms:
        repeat = max(1, round(segment_ms / 1e3 / gemm_s))
        work, wait = [], []
        dist.barrier()
        for iteration in range(iterations + 2):
            start = time.perf_counter()
            for _ in range(repeat):
                torch.mm(a, b, out=out)
            middle = time.perf_counter()
            dist.all_reduce(tiny)
            if iteration >= 2:  # the first two settle the processes
                work.append(middle - start)
                wait.append(max(0.0, time.perf_counter() - middle - latency))
        points.append({
            "gemms": repeat,
            "work_s": _mean_over_ranks(statistics.mean(work)),
            "wait_s": _mean_over_ranks(statistics.mean(wait)),
        })
    intercept, slope = wait_line([(p["work_s"], p["wait_s"]) for p in points])
    return {"segments": points, "latency_s": latency, "sync_wait": intercept, "sync_skew": slope}


def host_seconds_beyond(with_fn: Any, without_fn: Any, collective_fn: Any, collectives: int, repeats: int) -> float:
    """Host seconds `with_fn` spends beyond `without_fn`, net of its `collectives` (each counted as one
    `collective_fn`): measured as this process's CPU time, so that none of the time it sleeps waiting
    for a peer at a gloo collective counts (that wait is `sync_figures`' fact, not this one), then
    scaled to wall seconds by the share of a core the process gets while every process runs
    `without_fn` (wall over CPU seconds: ~1 with a core each, ~2 with two processes per core).
    Medians of `repeats` (at least 5) calls, every process starting together; >= 0."""
    samples = max(5, repeats)
    cpu_with = statistics.median(_seconds(with_fn, samples, clock=time.process_time))
    cpu_without = statistics.median(_seconds(without_fn, samples, clock=time.process_time))
    wall_without = statistics.median(_seconds(without_fn, samples))
    cpu_collective = statistics.median(_seconds(collective_fn, samples, clock=time.process_time))
    extra = cpu_with - cpu_without - collectives * cpu_collective
    return max(0.0, extra * wall_without / cpu_without)


def fsdp_unit_seconds(units: int, repeats: int, width: int = 64) -> float:
    """FSDP2's host seconds per unit and micro-batch beyond its collectives (copy-in/copy-out, hooks,
    its streams' bookkeeping): the forward and backward of `units` tiny [width, width] linear
    layers, each an FSDP2 unit over all ranks (plus the root), against the same model unsharded,
    net of its 3 collectives per unit (2 for the root), over the units and the root."""
    torch.manual_seed(0)
    plain = torch.nn.Sequential(*[torch.nn.Linear(width, width, bias=False) for _ in range(units)])
    sharded = copy.deepcopy(plain)
    for layer in sharded:
        fully_shard(layer)
    fully_shard(sharded)
    x = torch.randn(8, width)
    shard = torch.zeros(width * width // dist.get_world_size())
    gathered = torch.empty(width * width)

    def step(model: torch.nn.Module) -> Any:
        return lambda: model(x).sum().backward()

    def collective() -> None:
        dist.all_gather_into_tensor(gathered, shard)

    return host_seconds_beyond(step(sharded), step(plain), collective, 3 * units + 2, repeats) / (units + 1)


def ep_dispatch_seconds(repeats: int, dim: int = 16, tokens: int = 32) -> float:
    """The expert-parallel dispatcher's host seconds per MoE layer and micro-batch beyond its
    exchanges (split sizes to the host, the autograd functions around each exchange, the
    permutations): the forward and backward of a tiny MoE layer with its experts over all ranks
    (the all-to-all dispatcher) against the same layer with every expert local, net of its 7
    all-to-alls (4 forward, 3 backward)."""
    world = dist.get_world_size()
    torch.manual_seed(0)
    cfg = MoEConfig(dim=dim, n_experts=2 * world, top_k=2, expert_ffn_dim=dim, n_shared_experts=0)
    local = MoE(cfg).train()
    spread = copy.deepcopy(local)
    apply_expert_parallel(spread, init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))["ep"])
    x = torch.randn(1, tokens, dim)
    send = torch.zeros(world * tokens * dim)
    recv = torch.empty_like(send)

    def step(layer: MoE) -> Any:
        return lambda: layer(x)[0].sum().backward()

    def exchange() -> None:
        dist.all_to_all_single(recv, send)

    return host_seconds_beyond(step(spread), step(local), exchange, 7, repeats)


def wait_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (work, wait) points, each clamped at 0
    (with the other refitted: a line through the origin, or the mean wait)."""
    n = len(points)
    mean_x = sum(x for x, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    spread = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / spread if spread else 0.0
    intercept = mean_y - slope * mean_x
    if slope < 0:
        return max(0.0, mean_y), 0.0
    if intercept < 0:
        through_origin = sum(x * y for x, y in points) / sum(x * x for x, _ in points)
        return 0.0, max(0.0, through_origin)
    return intercept, slope


def _mean_over_ranks(value: float) -> float:
    return statistics.mean(_over_ranks(value))


def machine_cluster(machine: dict[str, Any], processes: int) -> Cluster:
    """The planner's cluster of `processes` devices measured as `machine` (`measure_machine`): the
    GEMM rate as the FP32 peak, the run's own GEMMs' rate over it (`model_gemm_flops`, when measured)
    as the FP32 efficiency, the copy bandwidth as the memory and elementwise bandwidth, the
    operator microbenchmark as the launch overhead, the largest all-reduce's bus bandwidth as the
    link, the smallest all-reduce's and all-to-all's seconds as the latencies, the waits for peers
    at a collective (`sync_figures`), FSDP2's host work per unit (`fsdp_unit_seconds`) and the EP
    dispatcher's per MoE layer (`ep_dispatch_seconds`); gloo's collectives."""
    reduce = machine.get("all_reduce", [])
    link = max((f["bus_bandwidth"] for f in reduce), default=0.0)
    latency = min(reduce, key=lambda f: f["bytes"])["seconds"] if reduce else 0.0
    a2a = machine.get("all_to_all", [])
    a2a_latency = min(a2a, key=lambda f: f["bytes"])["seconds"] if a2a else 0.0
    model_gemms = machine.get("model_gemm_flops", machine["gemm_flops"])
    return Cluster(
        name=f"cpu-{processes}",
        gpus_per_node=processes,
        peak_fp32_flops=machine["gemm_flops"],
        fp32_efficiency=min(1.0, model_gemms / machine["gemm_flops"]),
        hbm_bytes=float(machine["memory_bytes"] // processes),
        hbm_bandwidth=machine["copy_bandwidth"],
        nvlink_bandwidth=link,
        nvlink_efficiency=1.0 if link else 0.0,
        elementwise_bandwidth=machine["copy_bandwidth"],
        operator_overhead=machine.get("operator_seconds", 0.0),
        collective_latency=latency,
        all_to_all_latency=a2a_latency,
        sync_wait=machine.get("sync", {}).get("sync_wait", 0.0),
        sync_skew=machine.get("sync", {}).get("sync_skew", 0.0),
        fsdp_unit_overhead=machine.get("fsdp_unit_seconds", 0.0),
        ep_dispatch_overhead=machine.get("ep_dispatch_seconds", 0.0),
        collective_backend="gloo",
    ).validate()


def without_overheads(cluster: Cluster) -> Cluster:
    """`cluster` as the planner saw it before it counted memory-bound work, operator launches and
    latencies, with every matmul at the n^3 GEMM's rate and the collectives as NCCL's: matmul FLOPs
    and communication bytes only (the earlier model, for comparison)."""
    return dataclasses.replace(
        cluster,
        collective_backend="nccl",
        fp32_efficiency=1.0,
        elementwise_bandwidth=0.0,
        operator_overhead=0.0,
        collective_latency=0.0,
        all_to_all_latency=0.0,
        sync_wait=0.0,
        sync_skew=0.0,
        fsdp_unit_overhead=0.0,
        ep_dispatch_overhead=0.0,
    )


def cluster_toml(cluster: Cluster) -> str:
    """`cluster` as a TOML file `moeforge plan --cluster FILE` reads back (`plan.load_cluster`)."""
    lines = [f"# measured by `moeforge bench plan`: {cluster.gpus_per_node} processes of this machine"]
    for f in dataclasses.fields(cluster):
        value = getattr(cluster, f.name)
        lines.append(f"{f.name} = {json.dumps(value) if isinstance(value, str) else repr(value)}")
    return "\n".join(lines) + "\n"


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


def time_training(make_trainer: TrainerFactory, cfg: Config, settings: PlanBenchSettings) -> dict[str, Any]:
    """Seconds of each `train_step` (the slowest rank's), warm-up steps first."""
    with tempfile.TemporaryDirectory() as out:
        trainer = make_trainer(cfg, out)
        seconds = []
        for _ in range(settings.warmup + settings.steps):
            dist.barrier()
            start = time.perf_counter()
            trainer.train_step()
            seconds.append(_slowest(time.perf_counter() - start, max))
        matmul_s, profiled_s = profiled_matmul_seconds(trainer)
    timed = seconds[settings.warmup :]
    return {
        "step_s": seconds,
        "median_step_s": statistics.median(timed),
        "profiled_matmul_s": matmul_s,
        "profiled_step_s": profiled_s,
    }


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm")


def profiled_matmul_seconds(trainer: Steps) -> tuple[float, float]:
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
