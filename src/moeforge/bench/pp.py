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
side by side than alone: docs/pipeline-bench.md), the second ratio is the schedule's own efficiency.

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
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle
from torch.distributed.tensor import DTensor

from moeforge.config import ConfigError, ModelConfig, load_config
from moeforge.model.moe import MoE
from moeforge.model.transformer import ModelOutput, Transformer
from moeforge.parallel.expert_parallel import AllToAllDispatcher, RecordedExchange
from moeforge.parallel.overlap import ForwardBackwardSpans, overlap_forward_and_backward
from moeforge.parallel.parallelize import apply_expert_parallel, sum_across_ranks
from moeforge.parallel.pipeline import SCHEDULES, Pipeline, build_pipeline
from moeforge.parallel.spawn import run_on_processes
from moeforge.plan.layout import Layout
from moeforge.plan.pipeline import activations_in_flight, bubble_time

PLANNER_SCHEDULE = {"1f1b": "1f1b", "interleaved-1f1b": "interleaved", "zbv": "zbv", "dualpipev": "dualpipev"}
"""`parallel.pp-schedule` name -> the planner's `Layout.pp_schedule`"""


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


# ---- timestamps ------------------------------------------------------------------------------


class Interval(NamedTuple):
    """One compute action: `kind` F, loss, B (full backward), I (backward for inputs), W (for weights)."""

    kind: str
    stage: int
    start: float
    end: float


def busy_seconds(intervals: Iterable[Interval], start: float, end: float) -> float:
    """Length of the union of the intervals clipped to [start, end]."""
    busy, reached = 0.0, start
    for interval in sorted(intervals, key=lambda i: i.start):
        lo, hi = max(interval.start, reached), min(interval.end, end)
        if hi > lo:
            busy += hi - lo
            reached = hi
    return busy


def idle_fraction(intervals: Iterable[Interval], start: float, end: float) -> float:
    """1 - busy / wall over the step [start, end]: the share of the step spent outside compute."""
    return 1.0 - busy_seconds(intervals, start, end) / (end - start)


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


def chunk_seconds(intervals: Iterable[Interval]) -> dict[str, float]:
    """Mean seconds of one chunk on one micro-batch: forward (the loss added to the forwards),
    backward_input (input-only backwards, else full ones) and backward_weight (0 without W)."""
    total: dict[str, float] = {}
    count: dict[str, int] = {}
    for interval in intervals:
        total[interval.kind] = total.get(interval.kind, 0.0) + interval.end - interval.start
        count[interval.kind] = count.get(interval.kind, 0) + 1
    backward = "I" if "I" in count else "B"
    return {
        "forward": (total["F"] + total.get("loss", 0.0)) / count["F"],
        "backward_input": total[backward] / count[backward],
        "backward_weight": total["W"] / count["W"] if "W" in count else 0.0,
    }


# ---- expert all-to-all ----------------------------------------------------------------------

Segment = tuple[float, float]
"""[start, end) in perf_counter seconds"""

FORWARD_KINDS, BACKWARD_KINDS = ("F", "loss"), ("B", "I", "W")
"""the action kinds run by the thread that waits on forward exchanges, and on backward ones (the
same thread but when DualPipeV's overlap runs an F&B action's backward on a second one)"""


class ExchangeWait(NamedTuple):
    """One direction of one expert all-to-all: issued, then waited on by the thread of `direction`."""

    direction: str
    """forward (the tokens' way) or backward (their gradients' way)"""
    issued: float
    wait_began: float
    wait_ended: float


def exchange_waits(recorded: Iterable[RecordedExchange]) -> list[ExchangeWait]:
    """Both directions of every recorded exchange (the backward one once backward has reached it)."""
    waits = []
    for exchange in recorded:
        t = exchange.times
        waits.append(ExchangeWait("forward", t.issued, t.wait_began, t.wait_ended))
        if t.grad_issued is not None and t.grad_wait_began is not None and t.grad_wait_ended is not None:
            waits.append(ExchangeWait("backward", t.grad_issued, t.grad_wait_began, t.grad_wait_ended))
    return waits


def merged(segments: Iterable[Segment]) -> list[Segment]:
    """The union of the segments as disjoint sorted ones (empty ones dropped)."""
    union: list[Segment] = []
    for lo, hi in sorted(s for s in segments if s[1] > s[0]):
        if union and lo <= union[-1][1]:
            union[-1] = (union[-1][0], max(union[-1][1], hi))
        else:
            union.append((lo, hi))
    return union


def intersected(a: list[Segment], b: list[Segment]) -> list[Segment]:
    """a ∩ b, both disjoint and sorted (as `merged` gives them)."""
    return merged((max(x[0], y[0]), min(x[1], y[1])) for x in a for y in b)


def subtracted(a: list[Segment], b: list[Segment]) -> list[Segment]:
    """a minus b, both disjoint and sorted."""
    rest = a
    for lo, hi in b:
        rest = merged(piece for s in rest for piece in ((s[0], min(s[1], lo)), (max(s[0], hi), s[1])))
    return rest


def seconds_of(segments: Iterable[Segment]) -> float:
    return sum(hi - lo for lo, hi in merged(segments))


def thread_compute(
    intervals: Iterable[Interval], waits: Iterable[ExchangeWait], direction: str
) -> list[Segment]:
    """When the thread of `direction` computed: its actions minus its waits on all-to-alls."""
    kinds = FORWARD_KINDS if direction == "forward" else BACKWARD_KINDS
    actions = merged((i.start, i.end) for i in intervals if i.kind in kinds)
    return subtracted(
        actions, merged((w.wait_began, w.wait_ended) for w in waits if w.direction == direction)
    )


def exposed_all_to_all_seconds(
    intervals: Iterable[Interval], waits: Iterable[ExchangeWait], start: float, end: float
) -> float:
    """Seconds of the step [start, end] in which a thread of the rank waited on an all-to-all and
    no thread computed: the all-to-all time the rank lived through. One thread (no overlap): the
    sum of its waits."""
    intervals, waits = list(intervals), list(waits)
    compute = merged(
        thread_compute(intervals, waits, "forward") + thread_compute(intervals, waits, "backward")
    )
    waiting = merged((w.wait_began, w.wait_ended) for w in waits)
    return seconds_of(intersected(subtracted(waiting, compute), [(start, end)]))


def waited_seconds(waits: Iterable[ExchangeWait]) -> float:
    """Seconds the threads spent in waits on all-to-alls, summed over threads."""
    return sum(w.wait_ended - w.wait_began for w in waits)


def in_flight_under_compute(
    span: ForwardBackwardSpans, intervals: Iterable[Interval], waits: Iterable[ExchangeWait]
) -> tuple[float, float]:
    """(seconds in which an all-to-all of one direction, issued inside this overlapped F&B action,
    was in flight (issue to end of its wait) while the other direction's thread computed, seconds
    in flight in all): the first is > 0 when the overlap is real."""
    intervals, waits = list(intervals), list(waits)
    under, in_flight = 0.0, 0.0
    for direction, own, other in (
        ("forward", span.forward, span.backward),
        ("backward", span.backward, span.forward),
    ):
        flying = merged(
            (w.issued, w.wait_ended)
            for w in waits
            if w.direction == direction and own[0] <= w.issued and w.wait_ended <= own[1]
        )
        other_direction = "backward" if direction == "forward" else "forward"
        computing = intersected(thread_compute(intervals, waits, other_direction), [other])
        under += seconds_of(intersected(flying, computing))
        in_flight += seconds_of(flying)
    return under, in_flight


def hidden_fraction(exposed_off: float, exposed_on: float) -> float:
    """1 - exposed with the overlap / exposed without: the share of the all-to-all time it hides."""
    return 1.0 - exposed_on / exposed_off if exposed_off > 0 else 0.0


# ---- the formulas ----------------------------------------------------------------------------


def planner_layout(schedule: str, pp: int) -> Layout:
    """The planner's Layout of a `parallel.pp-schedule` at `pp` ranks (stages per rank as run here)."""
    return Layout(pp=pp, pp_schedule=PLANNER_SCHEDULE[schedule], pp_virtual=SCHEDULES[schedule][1])


def formula_bubble(
    schedule: str, pp: int, n_micro: int, forward: float, backward_input: float, backward_weight: float
) -> dict[str, float]:
    """The planner's bubble for chunk times F, I, W (one chunk, one micro-batch), in seconds and as
    a fraction of the step it implies: bubble / (bubble + n_micro * v * (F + I + W)), v chunks per rank."""
    layout = planner_layout(schedule, pp)
    chunks = layout.chunks_per_rank()
    bubble = bubble_time(layout, forward * chunks, backward_input * chunks, backward_weight * chunks)
    compute = n_micro * chunks * (forward + backward_input + backward_weight)
    return {"bubble_s": bubble, "idle_fraction": bubble / (bubble + compute)}


# ---- saved activations -----------------------------------------------------------------------


class _Saved:
    """A tensor autograd saved for backward; tells the meter when autograd lets it go."""

    def __init__(self, tensor: torch.Tensor, meter: SavedActivationMeter, key: int):
        self.tensor, self.meter, self.key = tensor, meter, key

    def __del__(self):
        self.meter.release(self.key)


class SavedActivationMeter:
    """Bytes of the storages autograd holds saved for backward: alive now, at the peak, and packed
    in all. A storage saved by several ops counts once; the `skipped` tensors' storages (parameters,
    buffers) never count. Use `hooks()` as a context manager around the forwards."""

    def __init__(self, skipped: Iterable[torch.Tensor]):
        self.skipped = {t.untyped_storage().data_ptr() for t in skipped}
        self.references: dict[int, list[int]] = {}  # storage address -> [bytes, saved references]
        self.live_bytes = self.peak_bytes = self.packed_bytes = 0

    def hooks(self) -> torch.autograd.graph.saved_tensors_hooks:
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)

    def pack(self, tensor: torch.Tensor) -> _Saved | torch.Tensor:
        storage = tensor.untyped_storage()
        key = storage.data_ptr()
        if key in self.skipped or storage.nbytes() == 0:
            return tensor
        if key not in self.references:
            self.references[key] = [storage.nbytes(), 0]
            self.live_bytes += storage.nbytes()
            self.packed_bytes += storage.nbytes()
            self.peak_bytes = max(self.peak_bytes, self.live_bytes)
        self.references[key][1] += 1
        return _Saved(tensor, self, key)

    @staticmethod
    def unpack(saved: _Saved | torch.Tensor) -> torch.Tensor:
        return saved.tensor if isinstance(saved, _Saved) else saved

    def release(self, key: int) -> None:
        entry = self.references[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.live_bytes -= entry[0]
            del self.references[key]


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


def schedule_summary(
    settings: PpBenchSettings, schedule: str, ranks: list[dict[str, Any]], baseline_s: float, beside_s: float
) -> dict[str, Any]:
    """One schedule's figures from every rank's: the step time of the slowest rank per repeat, the
    median idle fraction per rank, the formula on the chunk times averaged over the ranks, and the
    efficiency against the baseline step alone (`baseline_s`) and beside pp - 1 others (`beside_s`);
    under expert parallelism the all-to-all times per rank, and DualPipeV's overlap."""
    chunk = {key: statistics.mean(r["chunk_s"][key] for r in ranks) for key in ranks[0]["chunk_s"]}
    formula = formula_bubble(schedule, settings.pp, settings.microbatches, **chunk)
    layout = planner_layout(schedule, settings.pp)
    steps = slowest_rank_steps(ranks)
    summary = {
        "step_s": steps,
        "idle_fraction": [statistics.median(r["idle_fraction"]) for r in ranks],
        "formula": formula,
        "chunk_s": chunk,
        "actions": sorted({kind for r in ranks for kind in r["actions"]}),
        "saved_peak_bytes": [r["saved_peak_bytes"] for r in ranks],
        "held_micro_batches": [r["saved_peak_bytes"] / r["saved_bytes_per_micro_batch"] for r in ranks],
        "formula_held_micro_batches": [
            activations_in_flight(layout, settings.microbatches, rank // settings.ep)
            for rank in range(len(ranks))
        ],
        "stages": [r["stages"] for r in ranks],
        "efficiency": baseline_s / settings.pp / steps["median"],
        "efficiency_beside": beside_s / settings.pp / steps["median"],
    }
    if settings.ep > 1:
        summary["all_to_all"] = all_to_all_summary(ranks)
    if all("overlap" in r for r in ranks):
        summary["overlap"] = overlap_summary(ranks, steps, summary["all_to_all"])
    return summary


def slowest_rank_steps(ranks: list[dict[str, Any]]) -> dict[str, float]:
    """Per repeat the slowest rank's step: the best and the median over the repeats."""
    steps = [max(walls) for walls in zip(*(r["step_s"] for r in ranks))]
    return {"best": min(steps), "median": statistics.median(steps)}


def all_to_all_summary(ranks: list[dict[str, Any]]) -> dict[str, list[float]]:
    """Per rank, medians over the repeats: the exposed all-to-all seconds (a thread waits, none
    computes), the threads' waits summed, and the exchanges (one per direction) of a step."""
    return {
        "exposed_s": [statistics.median(r["a2a_exposed_s"]) for r in ranks],
        "waited_s": [statistics.median(r["a2a_waited_s"]) for r in ranks],
        "exchanges_per_step": [statistics.median(r["a2a_exchanges"]) for r in ranks],
    }


def overlap_summary(
    ranks: list[dict[str, Any]], plain_steps: dict[str, float], plain_a2a: dict[str, list[float]]
) -> dict[str, Any]:
    """DualPipeV with its F&B overlap against without (`plain_*`): step times and their ratio, the
    exposed all-to-all per rank and the fraction hidden, and the evidence from timestamps: per rank
    the share of overlapped actions in which an all-to-all was in flight while the other thread
    computed, and the share of their exchanges' in-flight time the other thread's compute covered."""
    overlapped = [r["overlap"] for r in ranks]
    steps = slowest_rank_steps(overlapped)
    a2a = all_to_all_summary(overlapped)
    return {
        "step_s": steps,
        "step_ratio": steps["median"] / plain_steps["median"],
        "idle_fraction": [statistics.median(r["idle_fraction"]) for r in overlapped],
        **{f"{key}": value for key, value in a2a.items()},
        "hidden_fraction": [
            hidden_fraction(off, on) for off, on in zip(plain_a2a["exposed_s"], a2a["exposed_s"])
        ],
        "hidden_fraction_all_ranks": hidden_fraction(sum(plain_a2a["exposed_s"]), sum(a2a["exposed_s"])),
        "overlapped_actions_per_step": [statistics.median(r["overlapped_actions"]) for r in overlapped],
        "actions_with_a2a_under_compute": [
            sum(r["actions_with_a2a_under_compute"]) / max(1, sum(r["overlapped_actions"]))
            for r in overlapped
        ],
        "in_flight_under_compute": [
            sum(r["a2a_under_compute_s"]) / max(1e-12, sum(r["a2a_in_flight_s"])) for r in overlapped
        ],
    }


HEADER = [
    "schedule",
    "step s",
    "eff. alone",
    "eff. beside",
    "idle per rank",
    "formula",
    "F/I/W ms per chunk",
    "saved MiB per rank",
    "held mb (formula)",
]
A2A_HEADER = "a2a exposed ms per rank"


def format_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table, one row per schedule (and the overlap's, under --ep)."""
    cfg = result["config"]
    base = result["single_process_s"]
    ep = cfg.get("ep", 1)
    lines = [
        (
            f"pipeline schedules: pp={cfg['pp']}{f' x ep={ep}' if ep > 1 else ''} gloo processes "
            f"({cfg['threads_per_rank']} thread each, {cfg['cpus']} CPUs, torch {cfg['torch']}); "
            f"{cfg['layers']}-block MoE transformer, dim {cfg['dim']}; "
            f"{cfg['microbatches']} micro-batches of {cfg['micro_batch_size']}x{cfg['seq_len']} tokens"
            + (" per ep rank" if ep > 1 else "")
        ),
        f"step time: slowest rank, median (best) of {cfg['repeats']} after {cfg['warmup']} warm-up",
        (
            f"efficiency = T1 / pp / step, T1 = one process's step without pipeline, alone: {base['median']:.3f} s "
            f"(best {base['best']:.3f}); beside {cfg.get('processes', cfg['pp']) - 1} other(s) doing the same: "
            f"{result['single_process_beside_s']:.3f} s"
        ),
        "idle: measured per rank (1 - compute / step wall) vs the formula's bubble / (bubble + compute) on the "
        "measured chunk F, I (B when not split), W",
    ]
    if ep > 1:
        lines.append(
            f"ranks pp.ep: {' '.join(cfg['ranks'])}; a2a exposed: time a thread of the rank waits on an expert "
            "all-to-all (both directions, counts included) and no thread computes; per step, median"
        )
    if cfg["oversubscribed"]:
        lines.append(
            f"NOTE: {cfg.get('processes', cfg['pp'])} processes on {cfg['cpus']} CPUs: they take turns on the cores, "
            "so idle time and step time measure the OS scheduler as much as the schedule"
        )
    header = HEADER + ([A2A_HEADER] if ep > 1 else [])
    rows = [header]
    for name, s in result["schedules"].items():
        rows.append(_schedule_row(name, s, ep))
        if "overlap" in s:
            o = s["overlap"]
            overlap_row = {**s, "step_s": o["step_s"], "idle_fraction": o["idle_fraction"]}
            overlap_row["all_to_all"] = {"exposed_s": o["exposed_s"]}
            rows.append(_schedule_row(f"{name} +overlap", overlap_row, ep, with_chunks=False))
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines.append("")
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
    for name, s in result["schedules"].items():
        if "overlap" in s:
            lines += ["", *_overlap_lines(name, s, cfg["ranks"])]
    if ep > 1:
        lines += [
            "",
            "Only dualpipev overlaps (its F&B actions: forward and backward on two threads, "
            "`overlap_forward_and_backward`); the other schedules run each action alone, so their exposed "
            "all-to-all time is all of it.",
        ]
    return "\n".join(lines)


def _schedule_row(name: str, s: dict[str, Any], ep: int, with_chunks: bool = True) -> list[str]:
    chunk = s["chunk_s"]
    held = zip(s["held_micro_batches"], s["formula_held_micro_batches"])
    row = [
        name,
        f"{s['step_s']['median']:.3f} ({s['step_s']['best']:.3f})",
        f"{s['efficiency']:.2f}" if with_chunks else "",
        f"{s['efficiency_beside']:.2f}" if with_chunks else "",
        " ".join(f"{i:.2f}" for i in s["idle_fraction"]),
        f"{s['formula']['idle_fraction']:.2f}" if with_chunks else "",
        "/".join(f"{chunk[k] * 1e3:.0f}" for k in ("forward", "backward_input", "backward_weight"))
        if with_chunks
        else "",
        " ".join(f"{b / 2**20:.0f}" for b in s["saved_peak_bytes"]) if with_chunks else "",
        " ".join(f"{h:.1f}({f:g})" for h, f in held) if with_chunks else "",
    ]
    if ep > 1:
        row.append(" ".join(f"{e * 1e3:.0f}" for e in s["all_to_all"]["exposed_s"]))
    return row


def _overlap_lines(name: str, s: dict[str, Any], ranks: list[str]) -> list[str]:
    """The overlap on against off, per rank."""
    o, off = s["overlap"], s["all_to_all"]
    lines = [
        (
            f"{name} F&B overlap, off (forward then backward) vs on (two threads), alternating steps: step "
            f"{s['step_s']['median']:.3f} -> {o['step_s']['median']:.3f} s (on/off {o['step_ratio']:.2f}); "
            f"hidden fraction over all ranks {o['hidden_fraction_all_ranks']:.2f}"
        ),
        (
            f"{'rank':<6}{'exposed ms off':>15}{'on':>7}{'hidden':>8}{'waited ms off':>15}{'on':>7}"
            f"{'F&B actions':>13}{'a2a under other thread':>24}{'in flight covered':>19}"
        ),
    ]
    for i, rank in enumerate(ranks):
        lines.append(
            f"{rank:<6}{off['exposed_s'][i] * 1e3:>15.0f}{o['exposed_s'][i] * 1e3:>7.0f}{o['hidden_fraction'][i]:>8.2f}"
            f"{off['waited_s'][i] * 1e3:>15.0f}{o['waited_s'][i] * 1e3:>7.0f}"
            f"{o['overlapped_actions_per_step'][i]:>13g}{o['actions_with_a2a_under_compute'][i]:>24.2f}"
            f"{o['in_flight_under_compute'][i]:>19.2f}"
        )
    lines.append(
        "a2a under other thread: share of F&B actions in which an all-to-all of one direction was in flight while "
        "the other direction's thread computed; in flight covered: share of those exchanges' in-flight time it did"
    )
    return lines
