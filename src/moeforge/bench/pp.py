"""`moeforge bench pp`: each pipeline schedule on gloo processes, its measured bubble next to the formula's.

For every schedule (1F1B, interleaved 1F1B, zero-bubble V, DualPipeV) the same MoE transformer runs
the same micro-batches through `moeforge.parallel.pipeline.build_pipeline` on `pp` spawned gloo
processes. Per rank and per step:

- every compute action is timed: the stages' `forward_one_chunk` (F), `backward_one_chunk` (B for a
  full backward, I for input-only) and `backward_weight_one_chunk` (W), and the last stage's loss
  (head + cross-entropy, counted with the forward). DualPipeV's overlapped F&B actions run their F
  and their B one after the other, each timed as such; what lies between them is a wait;
- the idle fraction is 1 - (time inside those actions) / (wall time of `schedule.step`): the rank
  waiting on p2p, i.e. the bubble as the rank lived it;
- the formula's bubble is the planner's (`moeforge.plan.pipeline.bubble_time`) on the mean F, I, W
  of one chunk and one micro-batch measured in the same steps (a full backward counts as I, W = 0);
- activation memory is the peak of the bytes autograd holds saved for backward (parameters and
  buffers excluded), counted by `saved_tensors_hooks` in one extra untimed step, and in units of
  one micro-batch's saved bytes of the rank's chunks next to the planner's in-flight count.

The baseline is one process running the same model on the same micro-batches without pipelining
(loss / n_micro per micro-batch, as the trainer), with the threads of one rank: the ideal pipelined
step is its time / pp, and efficiency = ideal / measured step. It is timed twice: alone (in the
calling process), and on every rank at once before the schedules ("beside"): where pp processes do
not get pp times the compute of one (on a small or shared CPU, single-thread processes run slower
side by side than alone: docs/benchmarks/pp.md), the second ratio is the schedule's own efficiency.

With fewer cores than processes, the processes take turns on the cores, so the figures measure
the OS scheduler at least as much as the schedule.

`--ep N` (N > 1): pp x N processes on a ("pp", "ep") mesh; every MoE layer's experts are spread over
the ep group (`apply_expert_parallel`) and each ep rank reads its own micro-batches. The
dispatchers record every exchange (`AllToAllDispatcher.recorder`: issue, start and end of the wait,
forward and backward), and per rank and step:

- exposed all-to-all: the time in which a thread of the rank waits on an expert all-to-all (counts,
  rows, routing, combine; forward or backward) and no thread of the rank computes, where a thread
  computes inside its actions outside its own waits. One thread: the sum of its waits;
- DualPipeV runs twice, alternating step by step: its F&B actions one after the other, and with
  `overlap_forward_and_backward` (the backward on a second thread). Hidden fraction = 1 - exposed
  (on) / exposed (off). The evidence that the overlap is real: per F&B action, the time in which an
  exchange of one direction was in flight (issue to end of wait) while the other direction's
  thread computed; the share of actions where it is > 0, and of the in-flight time it covers.

The other schedules have no overlap: their exposed time is all of their waits. pp x ep processes
share the cores with each other and with gloo's threads; the overlapped run adds a thread.

This module runs the ranks and records their steps; bench/pp_timeline.py turns a rank's timestamps
into its figures, bench/saved_activations.py counts the saved bytes, and bench/pp_results.py sums
up the ranks per schedule, computes the formula columns and draws the table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle
from torch.distributed.tensor import DTensor

from moeforge.bench.pp_results import schedule_summary
from moeforge.bench.pp_timeline import (
    Interval,
    chunk_seconds,
    exchange_waits,
    exposed_all_to_all_seconds,
    idle_fraction,
    in_flight_under_compute,
    waited_seconds,
)
from moeforge.bench.saved_activations import SavedActivationMeter
from moeforge.config import ConfigError, ModelConfig, load_config
from moeforge.model.moe import MoE
from moeforge.model.transformer import ModelOutput, Transformer
from moeforge.parallel.expert_parallel import AllToAllDispatcher, RecordedExchange
from moeforge.parallel.overlap import ForwardBackwardSpans, overlap_forward_and_backward
from moeforge.parallel.parallelize import apply_expert_parallel, sum_across_ranks
from moeforge.parallel.pipeline import SCHEDULES, Pipeline, build_pipeline
from moeforge.parallel.spawn import run_on_processes


@dataclasses.dataclass(frozen=True)
class PpBenchSettings:
    pp: int = 2
    """pipeline ranks"""
    ep: int = 1
    """expert-parallel ranks per pipeline rank (pp x ep processes); > 1 times the expert all-to-alls"""
    schedules: tuple[str, ...] = tuple(SCHEDULES)
    microbatches: int = 8
    """micro-batches per step"""
    micro_batch_size: int = 2
    """sequences per micro-batch"""
    seq_len: int = 256
    dim: int = 256
    layers: int = 8
    """transformer blocks (the V schedules need 2 x pp stages, one block each at least)"""
    repeats: int = 4
    warmup: int = 1
    seed: int = 0

    def validate(self) -> None:
        if self.pp < 2:
            raise ConfigError(f"--pp: got {self.pp}; allowed: an integer >= 2")
        n_experts = self.model_config().moe.n_experts
        if self.ep < 1 or n_experts % self.ep:
            raise ConfigError(
                f"--ep: got {self.ep}; allowed: an integer >= 1 dividing the {n_experts} experts"
            )
        unknown = [s for s in self.schedules if s not in SCHEDULES]
        if unknown or not self.schedules:
            raise ConfigError(
                f"--schedules: got {','.join(self.schedules)!r}; allowed: comma-separated {', '.join(SCHEDULES)}"
            )
        if self.microbatches < 2 * self.pp or self.microbatches % self.pp:
            raise ConfigError(
                f"--microbatches: got {self.microbatches}; allowed: a multiple of --pp={self.pp} that is at "
                f"least {2 * self.pp} (DualPipeV needs one per stage)"
            )
        if self.layers < 2 * self.pp:
            raise ConfigError(
                f"--layers: got {self.layers}; allowed: at least {2 * self.pp} (2 stages per rank)"
            )
        for flag, value, least in (
            ("micro-batch-size", self.micro_batch_size, 1),
            ("seq-len", self.seq_len, 1),
            ("repeats", self.repeats, 1),
            ("warmup", self.warmup, 0),
        ):
            if value < least:
                raise ConfigError(f"--{flag}: got {value}; allowed: at least {least}")
        self.model_config()

    def model_config(self) -> ModelConfig:
        """The tiny preset (MoE with a shared expert, sequence-wise aux loss) at `dim` and `layers`."""
        overrides = {
            "model.dim": str(self.dim),
            "model.n-layers": str(self.layers),
            "model.max-seq-len": str(self.seq_len),
            "train.seq-len": str(self.seq_len),
        }
        try:
            return load_config("tiny", overrides=overrides).model
        except ConfigError as error:
            raise ConfigError(f"--dim/--layers: {error}") from None


def next_token_loss(out: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits [B, S, vocab] against targets [B, S] (the pipeline adds the
    balance losses by hook; the single-process baseline adds them itself)."""
    return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())


def bench_batch(settings: PpBenchSettings, ep_rank: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and targets [microbatches * micro_batch_size, seq_len], the same on every pp rank; each
    ep rank its own (data parallel outside the experts)."""
    rows = settings.microbatches * settings.micro_batch_size
    vocab = settings.model_config().vocab_size
    generator = torch.Generator().manual_seed(settings.seed + 1 + ep_rank)
    tokens = torch.randint(0, vocab, (rows, settings.seq_len + 1), generator=generator)
    return tokens[:, :-1], tokens[:, 1:]


def bench_model(settings: PpBenchSettings) -> Transformer:
    torch.manual_seed(settings.seed)
    return Transformer(settings.model_config())


# ---- recording a step -----------------------------------------------------------------------


def stages_of_schedule(schedule: PipelineScheduleSingle | PipelineScheduleMulti) -> list[PipelineStage]:
    """The stages a torch schedule runs on this rank (torch keeps them as `_stage` or `_stages`)."""
    return list(schedule._stages) if isinstance(schedule, PipelineScheduleMulti) else [schedule._stage]


ACTION_KINDS: dict[str, Callable[[dict[str, Any]], str]] = {
    "forward_one_chunk": lambda kwargs: "F",
    "backward_one_chunk": lambda kwargs: "B" if kwargs.get("full_backward", True) else "I",
    "backward_weight_one_chunk": lambda kwargs: "W",
}
"""PipelineStage compute method -> the action kind of a call, from its keyword arguments"""


def record_actions(pipe: Pipeline, intervals: list[Interval]) -> None:
    """Wrap this rank's stages' compute methods and the schedule's loss so that each call appends
    its Interval to `intervals` (instance attributes: the torch classes stay untouched)."""
    for stage in stages_of_schedule(pipe.schedule):
        for name, kind in ACTION_KINDS.items():
            setattr(stage, name, _timed(getattr(stage, name), intervals, stage.stage_index, kind))
    last = next((s for s in stages_of_schedule(pipe.schedule) if s.is_last), None)
    if last is not None:
        # torch computes the loss outside forward_one_chunk (schedules.py `_maybe_compute_loss`)
        loss_of = pipe.schedule._maybe_compute_loss
        pipe.schedule._maybe_compute_loss = _timed(loss_of, intervals, last.stage_index, lambda kw: "loss")


def _timed(method: Callable, intervals: list[Interval], stage: int, kind: Callable[[dict], str]) -> Callable:
    @functools.wraps(method)
    def timed(*args, **kwargs):
        start = time.perf_counter()
        result = method(*args, **kwargs)
        intervals.append(Interval(kind(kwargs), stage, start, time.perf_counter()))
        return result

    return timed


# ---- one rank --------------------------------------------------------------------------------


@dataclasses.dataclass
class TimedPipeline:
    """One rank's pipeline of a schedule with what a step records: its compute actions, its
    expert exchanges (under expert parallelism) and its overlapped F&B actions (overlap on)."""

    pipe: Pipeline
    args: list[torch.Tensor]
    target: torch.Tensor | None
    intervals: list[Interval] = dataclasses.field(default_factory=list)
    exchanges: list[RecordedExchange] | None = None
    spans: list[ForwardBackwardSpans] | None = None

    def step(self) -> tuple[float, float]:
        """One `schedule.step` after a barrier; its start and end (perf_counter)."""
        for param in self.pipe.parameters():
            param.grad = None
        self.pipe.moe_stats.clear()
        for record in (self.intervals, self.exchanges, self.spans):
            if record is not None:
                record.clear()
        dist.barrier()
        start = time.perf_counter()
        self.pipe.schedule.step(*self.args, target=self.target)
        return start, time.perf_counter()

    def figures(self, start: float, end: float) -> dict[str, Any]:
        """What the step that ran over [start, end] recorded, in seconds."""
        figures: dict[str, Any] = {
            "step_s": end - start,
            "idle_fraction": idle_fraction(self.intervals, start, end),
            "chunk_s": chunk_seconds(self.intervals),
        }
        waits = exchange_waits(self.exchanges or [])
        if self.exchanges is not None:
            figures["a2a_exposed_s"] = exposed_all_to_all_seconds(self.intervals, waits, start, end)
            figures["a2a_waited_s"] = waited_seconds(waits)
            figures["a2a_exchanges"] = len(waits)
        if self.spans is not None:
            under = [in_flight_under_compute(span, self.intervals, waits) for span in self.spans]
            figures["overlapped_actions"] = len(under)
            figures["actions_with_a2a_under_compute"] = sum(u > 0 for u, _ in under)
            figures["a2a_in_flight_s"] = sum(f for _, f in under)
            figures["a2a_under_compute_s"] = sum(u for u, _ in under)
        return figures


def timed_pipeline(
    settings: PpBenchSettings, schedule: str, mesh: DeviceMesh | None, overlap: bool = False
) -> TimedPipeline:
    """This rank's pipeline of `schedule` on the bench model, experts spread over `mesh["ep"]`
    (the pipeline over `mesh["pp"]`) when given, with DualPipeV's F&B overlap when `overlap`."""
    model = bench_model(settings)
    ep_rank, group = 0, None
    if mesh is not None:
        ep_group, ep_rank, group = mesh["ep"].get_group(), mesh["ep"].get_local_rank(), mesh["pp"].get_group()
        for layer in model.moe_layers():
            apply_expert_parallel(layer, mesh["ep"])
            layer.sum_over_data_parallel = functools.partial(sum_across_ranks, group=ep_group)
    pipe = build_pipeline(
        model,
        schedule,
        settings.microbatches,
        settings.micro_batch_size,
        settings.seq_len,
        next_token_loss,
        group,
    )
    inputs, targets = bench_batch(settings, ep_rank)
    timed = TimedPipeline(pipe, [inputs] if pipe.has_first else [], targets if pipe.has_last else None)
    record_actions(pipe, timed.intervals)
    if mesh is not None:
        timed.exchanges = []
        for chunk in pipe.chunks:
            for layer in (m for m in chunk.modules() if isinstance(m, MoE)):
                assert isinstance(layer.dispatcher, AllToAllDispatcher)
                layer.dispatcher.recorder = timed.exchanges
    if overlap:
        timed.spans = []
        overlap_forward_and_backward(pipe, timed.spans)
    return timed


def measure_schedule(
    settings: PpBenchSettings, schedule: str, mesh: DeviceMesh | None = None
) -> dict[str, Any]:
    """This rank's figures for `schedule`: per timed step the wall time, the idle fraction, the
    chunk times and (under expert parallelism) the all-to-all times; the saved-activation peak of
    one extra step. DualPipeV under expert parallelism runs twice, without and with its F&B
    overlap, alternating step by step; the overlapped run's figures go under "overlap"."""
    runs = {"plain": timed_pipeline(settings, schedule, mesh)}
    if mesh is not None and schedule == "dualpipev":
        runs["overlap"] = timed_pipeline(settings, schedule, mesh, overlap=True)
    plain = runs["plain"]
    pipe = plain.pipe
    kept = [p.to_local() if isinstance(p, DTensor) else p for p in pipe.parameters()]
    meter = SavedActivationMeter([*kept, *(b for c in pipe.chunks for b in c.buffers())])
    with meter.hooks():
        plain.step()
    steps: dict[str, list[dict[str, Any]]] = {name: [] for name in runs}
    for repeat in range(settings.warmup + settings.repeats):
        order = list(runs) if repeat % 2 == 0 else list(reversed(runs))  # neither always goes first
        for name in order:
            start, end = runs[name].step()
            if repeat >= settings.warmup:
                steps[name].append(runs[name].figures(start, end))
    result = {
        "stages": pipe.stages,
        **per_repeat(steps["plain"]),
        "actions": sorted({i.kind for i in plain.intervals}),
        "saved_peak_bytes": meter.peak_bytes,
        "saved_bytes_per_micro_batch": meter.packed_bytes / settings.microbatches,
    }
    if "overlap" in steps:
        result["overlap"] = per_repeat(steps["overlap"])
    return result


def per_repeat(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The steps' figures as lists over the repeats, the chunk times averaged."""
    figures: dict[str, Any] = {key: [s[key] for s in steps] for key in steps[0] if key != "chunk_s"}
    figures["chunk_s"] = {
        key: statistics.mean(s["chunk_s"][key] for s in steps) for key in steps[0]["chunk_s"]
    }
    return figures


def _spawned_worker(rank: int, settings: PpBenchSettings, out: str) -> None:
    """The single-process baseline on every rank at once, then every schedule in turn; rank 0
    writes all ranks' figures to `out` as JSON."""
    mesh = None
    if settings.ep > 1:
        mesh = init_device_mesh("cpu", (settings.pp, settings.ep), mesh_dim_names=("pp", "ep"))
    dist.barrier()
    figures = {"beside_s": time_single_process(settings, torch.get_num_threads())}
    figures |= {schedule: measure_schedule(settings, schedule, mesh) for schedule in settings.schedules}
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, figures)
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))


def time_single_process(settings: PpBenchSettings, threads: int) -> list[float]:
    """Seconds per step of the unpipelined baseline: each micro-batch forward and backward of
    (loss + balance losses) / n_micro in one process of `threads` threads; warm-up steps dropped."""
    model = bench_model(settings)
    inputs, targets = bench_batch(settings)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    seconds = []
    try:
        for repeat in range(settings.warmup + settings.repeats):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            for x, y in zip(
                inputs.split(settings.micro_batch_size), targets.split(settings.micro_batch_size)
            ):
                out = model(x)
                ((next_token_loss(out, y) + out.balance_loss) / settings.microbatches).backward()
            if repeat >= settings.warmup:
                seconds.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(previous)
    return seconds


# ---- all ranks -------------------------------------------------------------------------------


def run_pp_bench(settings: PpBenchSettings) -> dict[str, Any]:
    """Spawn pp x ep gloo processes, run every schedule on them, time the single-process baseline
    in this process; a JSON-ready dict of the results."""
    settings.validate()
    world = settings.pp * settings.ep
    threads = max(1, (os.cpu_count() or 1) // world)
    baseline = time_single_process(settings, threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        run_on_processes(world, _spawned_worker, settings, str(out), threads=threads)
        ranks = json.loads(out.read_text())
    baseline_s = statistics.median(baseline)
    beside_s = statistics.median(statistics.median(rank["beside_s"]) for rank in ranks)
    return {
        "config": {
            **dataclasses.asdict(settings),
            "processes": world,
            "ranks": [
                f"{r // settings.ep}.{r % settings.ep}" if settings.ep > 1 else str(r) for r in range(world)
            ],
            "threads_per_rank": threads,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "backend": "gloo",
            "oversubscribed": world * threads > (os.cpu_count() or 1),
        },
        "single_process_s": {"best": min(baseline), "median": baseline_s},
        "single_process_beside_s": beside_s,
        "schedules": {
            schedule: schedule_summary(
                settings, schedule, [rank[schedule] for rank in ranks], baseline_s, beside_s
            )
            for schedule in settings.schedules
        },
    }
