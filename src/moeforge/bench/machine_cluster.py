"""This machine measured as the planner sees a cluster, for `moeforge bench plan` (bench/plan.py).

Every figure is taken on all of the world's processes at once, each process one "device" of one
thread, since the P devices of the cluster "cpu-P" share the machine's cores and memory: the fp32
GEMM rate (a large square matmul, and the run's own GEMM shapes), the copy bandwidth, the host
seconds of one tiny operator, gloo's all-reduce, point-to-point and all-to-all, the wait for peers
at a blocking collective, and the host work of an FSDP unit and of an expert-parallel dispatch.
`machine_cluster` turns them into a `Cluster`, `cluster_toml` into a cluster file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from moeforge.config import Config, MoEConfig
from moeforge.model.moe import MoE
from moeforge.parallel.parallelize import apply_expert_parallel
from moeforge.plan import Cluster
from moeforge.plan.gemm_shapes import micro_batch_gemms
from moeforge.plan.layout import moeforge_attention_kernel
from moeforge.plan.op_counts import count_operators

if TYPE_CHECKING:
    from moeforge.bench.plan import PlanBenchSettings


def measure_machine(settings: PlanBenchSettings) -> dict[str, Any]:
    """This world's devices: GEMM FLOP/s and copy bandwidth of the slowest process while all of them
    work at once, and gloo's collectives over all of them (point to point: ranks 0 and 1)."""
    world = dist.get_world_size()
    best, median = gemm_flops(settings.gemm_size, settings.repeats)
    result = {
        "processes": world,
        "threads_per_process": torch.get_num_threads(),
        "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "gemm_flops": slowest_of_ranks(best, min),
        "gemm_flops_median": slowest_of_ranks(median, min),
        "copy_bandwidth": slowest_of_ranks(copy_bandwidth(settings.copy_mib << 20, settings.repeats), min),
        "operator_seconds": slowest_of_ranks(operator_seconds(settings.operator_chain, settings.repeats), max),
    }
    if world > 1:
        result["all_reduce"] = [all_reduce_figures(n, settings.repeats) for n in settings.comm_bytes]
        result["point_to_point"] = [point_to_point_figures(n, settings.repeats) for n in settings.comm_bytes]
        result["all_to_all"] = [all_to_all_figures(settings.comm_bytes[0], settings.repeats)]
        result["sync"] = sync_figures(settings.sync_segments_ms, settings.sync_iterations)
        result["fsdp_unit_seconds"] = slowest_of_ranks(fsdp_unit_seconds(settings.fsdp_units, settings.repeats), max)
        result["ep_dispatch_seconds"] = slowest_of_ranks(ep_dispatch_seconds(settings.repeats), max)
    return result


def slowest_of_ranks(value: float, pick: Any) -> float:
    """`pick` (min or max) of `value` over the ranks."""
    return pick(_over_ranks(value))


def _over_ranks(value: float) -> list[float]:
    """`value` of every rank."""
    values = [torch.zeros(1, dtype=torch.float64) for _ in range(dist.get_world_size())]
    dist.all_gather(values, torch.tensor([value], dtype=torch.float64))
    return [float(v) for v in values]


def _seconds(fn: Any, repeats: int, together: bool = False, clock: Any = None) -> list[float]:
    """Seconds of `repeats` timed calls of `fn` after an untimed one, every process starting
    together; `together`: until every process has finished (what P devices that share cores each
    reach while all of them work, not what one reaches while the others wait for the CPU);
    `clock`: wall time (None: `time.perf_counter`, looked up at the call), or `time.process_time`
    for this process's CPU time (every thread's)."""
    clock = clock or time.perf_counter
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


def model_gemm_flops(cfg: Config, micro_batch: int, repeats: int) -> float:
    """FLOP/s of this run's own GEMMs (`plan.gemm_shapes`: one micro-batch's products, each with its
    two backward products, every call; `micro_batch` sequences) on each process while all of them multiply, best of
    `repeats`: the rate the run's matmuls can reach here, which small shapes keep well under the
    n^3 GEMM's. Every call multiplies operands of its own, as in a training step, where an operand
    was last touched many kernels ago and comes from memory, not from the cache (the same operands
    again and again run faster than the step's matmuls do: docs/benchmarks/plan.md)."""
    model = cfg.model
    tokens = micro_batch * cfg.train.seq_len
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
    seconds = slowest_of_ranks(_best_seconds(lambda: dist.all_to_all_single(recv, send), repeats), max)
    return {"bytes": nbytes, "seconds": seconds}


def all_reduce_figures(nbytes: int, repeats: int) -> dict[str, float]:
    """An all-reduce of `nbytes` over the world: seconds (slowest rank, best repeat) and the bus
    bandwidth, the bytes through each rank's link per second (2 (n-1)/n x size, as `plan.comm`)."""
    buffer = torch.zeros(max(1, nbytes // 4))
    seconds = slowest_of_ranks(_best_seconds(lambda: dist.all_reduce(buffer), repeats), max)
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

    one_way = slowest_of_ranks(_best_seconds(round_trip, repeats) / 2, max)
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
    gemm_s = slowest_of_ranks(statistics.median(_seconds(lambda: torch.mm(a, b, out=out), 10, together=True)), max)
    latency = slowest_of_ranks(statistics.median(_seconds(lambda: dist.all_reduce(tiny), 20)), max)
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
