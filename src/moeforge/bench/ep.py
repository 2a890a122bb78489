"""`moeforge bench ep`: one MoE layer with every expert on every rank (ep=1) vs experts spread over ep ranks.

Both cases run in the same group of processes (gloo processes spawned on this machine, or the group of
a torchrun launch), interleaved, each rank with its own tokens:
- ep=1: every rank holds all experts and routes its tokens locally (experts replicated, data parallel);
- ep=N: each rank holds E/N experts and tokens travel by all-to-all (`AllToAllDispatcher`).
Each rank computes the same expected expert FLOPs in both, so the ratio is the price of moving tokens
instead of holding every expert. The forward is timed phase by phase (router, dispatch, experts,
combine) and forward+backward as a whole; a figure is the slowest rank's, best of the repeats.

Overlap (`--parallel.ep-overlap`): a small transformer of MoE blocks of the same layer (one shared
expert, attention before it) runs forward+backward with the micro-batch whole (`parts=1`: each
exchange waited on as soon as it is issued) and in two halves taking turns (`parts=2`: one half's
exchange in flight while the other computes), interleaved in the same run. The exposed all-to-all
time is what the calling thread spends blocked in the waits (forward and backward, from the
exchanges' timestamps); hidden fraction = 1 - exposed(2 halves) / exposed(whole).

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
from moeforge.config import ConfigError, ModelConfig, MoEConfig
from moeforge.model.moe.layer import MoE
from moeforge.model.transformer import Transformer
from moeforge.parallel.overlap import OverlapTimeline, overlapped_forward
from moeforge.parallel.process_group import init_distributed, launched_distributed
from moeforge.parallel.parallelize import apply_expert_parallel
from moeforge.parallel.spawn import run_on_processes

PHASES = ("router", "dispatch", "experts", "combine", "forward", "forward_backward")
OVERLAP_BLOCKS = 2
OVERLAP_SEQUENCES = 8
"""the overlap model's depth (all MoE blocks) and the sequences each rank's tokens are cut into"""


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
        if self.tokens < OVERLAP_SEQUENCES:
            raise ConfigError(
                f"--tokens: got {self.tokens}; allowed: at least {OVERLAP_SEQUENCES} (the overlap case "
                f"cuts them into {OVERLAP_SEQUENCES} sequences)"
            )
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
    figures = versus_ep1(time_cases(cases, x, settings.repeats, settings.warmup, device))
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
        "overlap": time_overlap(settings, timed_routing, ep_mesh, device, dtype),
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
        best = slowest_rank_best_repeat(rows, device)
        result[name] = {phase: float(best[i]) * 1e3 for i, phase in enumerate(PHASES)}
    return result


def slowest_rank_best_repeat(rows: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """rows[repeat] [figures] of this rank -> [figures]: per repeat the slowest rank's (all-reduce
    MAX), then per figure the best repeat."""
    slowest = torch.stack(rows).to(device)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return slowest.min(dim=0).values.cpu()


def versus_ep1(times: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """`time_cases`' figures with each case's speed-up over ep=1 in forward+backward, `vs_ep1`."""
    baseline = times["ep=1"]["forward_backward"]
    return {
        name: {**phases, "vs_ep1": baseline / phases["forward_backward"]} for name, phases in times.items()
    }


def overlap_model(settings: EpBenchSettings, routing: MoEConfig, device: torch.device, dtype: torch.dtype) -> Transformer:
    """`OVERLAP_BLOCKS` MoE blocks of the timed layer with one shared expert, heads of width 64 (or
    one head), the same weights on every rank."""
    heads = max(1, settings.dim // 64)
    cfg = ModelConfig(
        dim=settings.dim,
        n_layers=OVERLAP_BLOCKS,
        n_dense_layers=0,
        n_heads=heads,
        n_kv_heads=heads,
        ffn_dim=settings.ffn_dim,
        max_seq_len=settings.tokens // OVERLAP_SEQUENCES,
        moe=dataclasses.replace(routing, n_shared_experts=1),
    )
    torch.manual_seed(settings.seed)
    return Transformer(cfg).to(device, dtype).train()


def time_overlap(
    settings: EpBenchSettings, routing: MoEConfig, ep_mesh: DeviceMesh, device: torch.device, dtype: torch.dtype
) -> dict[str, Any]:
    """{whole, halves: {step_ms, exposed_ms, exposed_forward_ms}} (slowest rank, best repeat) and
    the hidden fraction 1 - exposed(halves) / exposed(whole)."""
    model = overlap_model(settings, routing, device, dtype)
    for layer in model.moe_layers():
        apply_expert_parallel(layer, ep_mesh)
    torch.manual_seed(settings.seed + 1 + dist.get_rank())
    seq = settings.tokens // OVERLAP_SEQUENCES
    tokens = torch.randint(0, model.cfg.vocab_size, (OVERLAP_SEQUENCES, seq), device=device)
    samples: dict[str, list[torch.Tensor]] = {"whole": [], "halves": []}
    for repeat in range(settings.warmup + settings.repeats):
        for name, parts in (("whole", 1), ("halves", 2)):
            dist.barrier()
            seconds = _overlapped_step_seconds(model, tokens, parts, device)
            if repeat >= settings.warmup:
                samples[name].append(torch.tensor(seconds, dtype=torch.float64))
    figures = overlap_figures(samples, device)
    return {"sequences": OVERLAP_SEQUENCES, "seq_len": seq, "blocks": OVERLAP_BLOCKS, **figures}


def overlap_figures(samples: dict[str, list[torch.Tensor]], device: torch.device) -> dict[str, Any]:
    """{whole, halves: {step_ms, exposed_ms, exposed_forward_ms}} from this rank's seconds per repeat
    (`_overlapped_step_seconds`), slowest rank and best repeat, and the hidden fraction."""
    figures: dict[str, Any] = {}
    for name, rows in samples.items():
        best = slowest_rank_best_repeat(rows, device) * 1e3
        figures[name] = dict(zip(("step_ms", "exposed_ms", "exposed_forward_ms"), best.tolist()))
    exposed = figures["halves"]["exposed_ms"], figures["whole"]["exposed_ms"]
    figures["hidden_fraction"] = 1.0 - exposed[0] / max(exposed[1], 1e-12)
    return figures


def _overlapped_step_seconds(model: Transformer, tokens: torch.Tensor, parts: int, device: torch.device) -> list[float]:
    """(forward+backward, exposed all-to-all of both, exposed all-to-all of the forward) seconds."""
    model.zero_grad(set_to_none=True)
    timeline = OverlapTimeline()
    synchronize(device)
    start = time.perf_counter()
    out = overlapped_forward(model, tokens, parts=parts, timeline=timeline)
    forward_exposed = timeline.exposed_seconds()
    out.logits.float().square().mean().backward()
    synchronize(device)
    return [time.perf_counter() - start, timeline.exposed_seconds(), forward_exposed]


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
    overlap = result["overlap"]
    lines += [
        "",
        (
            f"all-to-all hidden under compute ({overlap['blocks']} MoE blocks + 1 shared expert, "
            f"{overlap['sequences']} sequences of {overlap['seq_len']} per rank, forward+backward):"
        ),
        f"{'micro-batch':<22}{'step ms':>10}{'exposed a2a ms':>16}{'of which fwd':>14}",
    ]
    for name, label in (("whole", "whole"), ("halves", "2 halves in turns")):
        fig = overlap[name]
        lines.append(
            f"{label:<22}{fig['step_ms']:>10.1f}{fig['exposed_ms']:>16.2f}{fig['exposed_forward_ms']:>14.2f}"
        )
    lines.append(
        f"hidden fraction 1 - exposed(halves)/exposed(whole) = {overlap['hidden_fraction']:.2f}; "
        f"step halves/whole = {overlap['halves']['step_ms'] / overlap['whole']['step_ms']:.2f}"
    )
    per_rank = result["per_rank_vs_per_expert"]
    lines += [
        "",
        f"node-limited routing sends {result['node_limited_vs_unlimited']:.2f}x fewer bytes off-node than unlimited;",
        "one row per (token, destination rank) instead of per (token, expert): "
        + ", ".join(f"{ratio:.2f}x fewer ({label})" for label, ratio in per_rank.items()),
    ]
    return "\n".join(lines)
