"""`moeforge bench ep`: one MoE layer with every expert on every rank (ep=1) vs experts spread over ep ranks.

Both cases run in the same group of processes (gloo processes spawned on this machine, or the group of
a torchrun launch), interleaved, each rank with its own tokens:
- ep=1: every rank holds all experts and routes its tokens locally (experts replicated, data parallel);
- ep=N: each rank holds E/N experts and tokens travel by all-to-all (`AllToAllDispatcher`).
Each rank computes the same expected expert FLOPs in both, so the ratio is the price of moving tokens
instead of holding every expert. The forward is timed phase by phase (router, dispatch, experts,
combine) and forward+backward as a whole; a figure is the slowest rank's, best of the repeats.

Traffic: the rows the dispatcher sends off-rank and off-node (ranks split into ep-nodes contiguous
blocks), with routing not limited and limited to M nodes (groups = nodes, topk-groups = M), next to
what a dispatcher sending one row per (token, expert) would send.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from moeforge.bench.moe import (
    check_bench_sizes,
    forward_backward_step,
    resolve_dtype,
    seeded_layer,
    synchronize,
)
from moeforge.config import ConfigError, MoEConfig
from moeforge.model.moe.layer import MoE
from moeforge.parallel.process_group import init_distributed, launched_distributed
from moeforge.parallel.parallelize import apply_expert_parallel
from moeforge.parallel.spawn import run_on_processes

PHASES = ("router", "dispatch", "experts", "combine", "forward", "forward_backward")


@dataclasses.dataclass(frozen=True)
class EpBenchSettings:
    ep: int = 2
    ep_nodes: int = 0
    """0 = ep (every rank its own node: the case with the most off-node traffic)"""
    topk_nodes: int = 0
    """M; 0 = half the nodes (DeepSeek-V3: 4 of 8)"""
    dim: int = 512
    ffn_dim: int = 256
    n_experts: int = 32
    top_k: int = 4
    tokens: int = 2048
    """per rank"""
    repeats: int = 5
    warmup: int = 2
    dtype: str = "fp32"
    seed: int = 0

    def resolved(self) -> EpBenchSettings:
        nodes = self.ep_nodes or self.ep
        return dataclasses.replace(self, ep_nodes=nodes, topk_nodes=self.topk_nodes or max(1, nodes // 2))

    def validate(self) -> None:
        check_bench_sizes(tokens=self.tokens, repeats=self.repeats)
        resolve_dtype(self.dtype)
        if self.ep < 2 or self.n_experts % self.ep:
            raise ConfigError(
                f"--ep: got {self.ep}; allowed: an integer >= 2 dividing --experts={self.n_experts}"
            )
        if self.ep % self.ep_nodes:
            raise ConfigError(f"--ep-nodes: got {self.ep_nodes}; allowed: a divisor of --ep={self.ep}")
        if not 1 <= self.topk_nodes <= self.ep_nodes:
            raise ConfigError(
                f"--topk-nodes: got {self.topk_nodes}; allowed: an integer in [1, {self.ep_nodes}]"
            )
        self.routing(limited=True).validate(prefix="bench")

    def routing(self, limited: bool) -> MoEConfig:
        groups = (self.ep_nodes, self.topk_nodes) if limited else (1, 1)
        return MoEConfig(
            dim=self.dim,
            n_experts=self.n_experts,
            top_k=self.top_k,
            expert_ffn_dim=self.ffn_dim,
            n_shared_experts=0,
            n_groups=groups[0],
            topk_groups=groups[1],
        )


def run_ep_bench(settings: EpBenchSettings) -> dict[str, Any] | None:
    """Run the benchmark; the result on rank 0 (None on other ranks of a torchrun launch).

    Under torchrun it uses the launch's processes (NCCL on GPUs); otherwise it spawns `ep` gloo
    processes on this CPU, sharing its cores between them."""
    settings = settings.resolved()
    settings.validate()
    if launched_distributed():
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        world = init_distributed(device.type)
        if world.world_size != settings.ep:
            raise ConfigError(f"--ep: got {settings.ep}; allowed: the launch's world size {world.world_size}")
        result = measure(settings, device)
        return result if world.is_main else None
    threads = max(1, (os.cpu_count() or 1) // settings.ep)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        run_on_processes(settings.ep, _spawned_worker, settings, str(out), threads=threads)
        return json.loads(out.read_text())


def _spawned_worker(rank: int, settings: EpBenchSettings, out: str) -> None:
    result = measure(settings, torch.device("cpu"))
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def measure(settings: EpBenchSettings, device: torch.device) -> dict[str, Any]:
    """Time ep=1 vs ep=N and count the traffic, inside an initialised process group of `ep` ranks."""
    rank, ep = dist.get_rank(), dist.get_world_size()
    dtype = resolve_dtype(settings.dtype)
    ep_mesh = init_device_mesh(device.type, (ep,), mesh_dim_names=("ep",))["ep"]
    timed_routing = settings.routing(limited=settings.ep_nodes > 1)
    replicated = seeded_layer(timed_routing, settings.seed, device, dtype)
    spread = seeded_layer(timed_routing, settings.seed, device, dtype)
    apply_expert_parallel(spread, ep_mesh)
    torch.manual_seed(settings.seed + 1 + rank)
    x = torch.randn(1, settings.tokens, settings.dim, device=device, dtype=dtype)

    cases = {"ep=1": replicated, f"ep={ep}": spread}
    times = time_cases(cases, x, settings.repeats, settings.warmup, device)
    baseline = times["ep=1"]["forward_backward"]
    figures = {
        name: {**phases, "vs_ep1": baseline / phases["forward_backward"]} for name, phases in times.items()
    }
    traffic = {
        label: count_traffic(settings, settings.routing(limited), x, ep_mesh, device, dtype)
        for label, limited in (("unlimited", False), (f"node-limited M={settings.topk_nodes}", True))
    }
    return {
        "config": {
            **dataclasses.asdict(settings),
            "device": str(device),
            "backend": dist.get_backend(),
            "threads_per_rank": torch.get_num_threads(),
            "timed_routing": "node-limited" if settings.ep_nodes > 1 else "unlimited",
        },
        "cases_ms": figures,
        "traffic": traffic,
        "node_limited_vs_unlimited": _ratio(traffic, "bytes_off_node_per_token"),
        "per_rank_vs_per_expert": {
            label: t["per_expert_bytes_off_node_per_token"] / max(t["bytes_off_node_per_token"], 1e-12)
            for label, t in traffic.items()
        },
    }


def time_cases(
    cases: dict[str, MoE], x: torch.Tensor, repeats: int, warmup: int, device: torch.device
) -> dict[str, dict[str, float]]:
    """{case: {phase: ms}}: per repeat the slowest rank's time, then the best repeat."""
    steps = {name: forward_backward_step(layer, (x,)) for name, layer in cases.items()}
    tokens = x.view(-1, x.shape[-1])
    samples: dict[str, list[torch.Tensor]] = {name: [] for name in cases}
    for repeat in range(warmup + repeats):
        for name, layer in cases.items():
            dist.barrier()
            phases = forward_phases(layer, tokens, device)
            dist.barrier()
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            phases.append(time.perf_counter() - start)
            if repeat >= warmup:
                samples[name].append(torch.tensor(phases, dtype=torch.float64))
    result = {}
    for name, rows in samples.items():
        slowest = torch.stack(rows).to(device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        best = slowest.min(dim=0).values.cpu()
        result[name] = {phase: float(best[i]) * 1e3 for i, phase in enumerate(PHASES)}
    return result


def forward_phases(layer: MoE, tokens: torch.Tensor, device: torch.device) -> list[float]:
    """Seconds of router, dispatch, experts, combine and their sum, for one forward of `layer`."""
    marks = [time.perf_counter()]

    def mark() -> None:
        synchronize(device)
        marks.append(time.perf_counter())

    routing = layer.route(tokens)
    mark()
    x_sorted, tokens_per_expert, state = layer.dispatch(tokens, routing)
    mark()
    expert_out = layer.compute_experts(x_sorted, tokens_per_expert)
    mark()
    layer.combine(expert_out, state, tokens)
    mark()
    phases = [b - a for a, b in zip(marks, marks[1:])]
    return [*phases, marks[-1] - marks[0]]


def count_traffic(
    settings: EpBenchSettings,
    routing: MoEConfig,
    x: torch.Tensor,
    ep_mesh: DeviceMesh,
    device: torch.device,
    dtype: torch.dtype,
) -> dict[str, float]:
    """Rows and bytes per token that leave the rank and the node, dispatch and combine together,
    summed over every rank: this dispatcher (one row per token and destination rank) vs one row per
    (token, expert)."""
    layer = seeded_layer(routing, settings.seed, device, dtype)
    apply_expert_parallel(layer, ep_mesh)
    tokens = x.view(-1, x.shape[-1])
    with torch.no_grad():
        routing = layer.route(tokens)
        _, _, state = layer.dispatch(tokens, routing)
    expert_indices = routing.expert_indices
    rank, ep = dist.get_rank(), dist.get_world_size()
    ranks_per_node = ep // settings.ep_nodes
    splits = state.send_splits
    dest_rank = torch.div(expert_indices, settings.n_experts // ep, rounding_mode="floor")
    counts = torch.tensor(
        [
            tokens.shape[0],
            sum(n for r, n in enumerate(splits) if r != rank),
            sum(n for r, n in enumerate(splits) if r // ranks_per_node != rank // ranks_per_node),
            int((dest_rank != rank).sum()),
            int((dest_rank // ranks_per_node != rank // ranks_per_node).sum()),
        ],
        dtype=torch.float64,
        device=device,
    )
    dist.all_reduce(counts)
    n_tokens, off_rank, off_node, per_expert_off_rank, per_expert_off_node = counts.tolist()
    row_bytes = 2 * settings.dim * dtype.itemsize  # the row out (dispatch) and back (combine)
    routing_bytes = settings.top_k * (4 + 4)  # each row's gates and local expert ids, both fp32
    return {
        "rows_off_rank_per_token": off_rank / n_tokens,
        "rows_off_node_per_token": off_node / n_tokens,
        "bytes_off_node_per_token": off_node * (row_bytes + routing_bytes) / n_tokens,
        "per_expert_rows_off_node_per_token": per_expert_off_node / n_tokens,
        "per_expert_bytes_off_node_per_token": per_expert_off_node * row_bytes / n_tokens,
        "per_expert_rows_off_rank_per_token": per_expert_off_rank / n_tokens,
    }


def _ratio(traffic: dict[str, dict[str, float]], key: str) -> float:
    unlimited, limited = traffic.values()
    return unlimited[key] / max(limited[key], 1e-12)


def format_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        (
            f"MoE layer, {cfg['tokens']} tokens per rank x {cfg['ep']} ranks, top-{cfg['top_k']} of "
            f"{cfg['n_experts']} experts, dim {cfg['dim']}, ffn {cfg['ffn_dim']}, {cfg['dtype']} on "
            f"{cfg['device']} ({cfg['backend']}, {cfg['threads_per_rank']} threads per rank)"
        ),
        (
            f"timed routing: {cfg['timed_routing']} (ep-nodes={cfg['ep_nodes']}, topk-nodes={cfg['topk_nodes']}); "
            f"slowest rank, best of {cfg['repeats']} repeats"
        ),
        "",
        f"{'case':<8}"
        + "".join(f"{h:>12}" for h in ("router ms", "dispatch ms", "experts ms", "combine ms"))
        + f"{'forward ms':>12}{'fwd+bwd ms':>12}{'vs ep=1':>9}",
    ]
    for name, fig in result["cases_ms"].items():
        lines.append(f"{name:<8}" + "".join(f"{fig[p]:>12.1f}" for p in PHASES) + f"{fig['vs_ep1']:>9.2f}")
    lines += [
        "",
        f"traffic per token leaving its node (one of {cfg['ep_nodes']}), dispatch + combine, mean over every rank's tokens:",
        f"{'routing':<20}{'rows, per expert':>18}{'rows, per rank':>16}{'KB, per expert':>16}{'KB, per rank':>14}",
    ]
    for label, t in result["traffic"].items():
        lines.append(
            f"{label:<20}{t['per_expert_rows_off_node_per_token']:>18.2f}{t['rows_off_node_per_token']:>16.2f}"
            f"{t['per_expert_bytes_off_node_per_token'] / 1e3:>16.2f}{t['bytes_off_node_per_token'] / 1e3:>14.2f}"
        )
    per_rank = result["per_rank_vs_per_expert"]
    lines += [
        "",
        f"node-limited routing sends {result['node_limited_vs_unlimited']:.2f}x fewer bytes off-node than unlimited;",
        "one row per (token, destination rank) instead of per (token, expert): "
        + ", ".join(f"{ratio:.2f}x fewer ({label})" for label, ratio in per_rank.items()),
    ]
    return "\n".join(lines)
