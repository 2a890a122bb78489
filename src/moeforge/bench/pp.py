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
not get pp times the compute of one (this 2-vCPU machine: two single-thread processes each run ~2x
slower than one alone), the second ratio is the schedule's own efficiency.

On a 2-core CPU each of pp=2's processes has a core; pp=4 puts 4 single-thread processes on 2
cores, so its figures measure the OS scheduler at least as much as the schedule.
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
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle

from moeforge.config import ConfigError, ModelConfig, load_config
from moeforge.model.transformer import ModelOutput, Transformer
from moeforge.parallel.pipeline import SCHEDULES, Pipeline, build_pipeline
from moeforge.parallel.spawn import run_on_processes
from moeforge.plan.layout import Layout
from moeforge.plan.pipeline import activations_in_flight, bubble_time

PLANNER_SCHEDULE = {"1f1b": "1f1b", "interleaved-1f1b": "interleaved", "zbv": "zbv", "dualpipev": "dualpipev"}
"""`parallel.pp-schedule` name -> the planner's `Layout.pp_schedule`"""


@dataclasses.dataclass(frozen=True)
class PpBenchSettings:
    pp: int = 2
    """pipeline ranks (processes)"""
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


def bench_batch(settings: PpBenchSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens and targets [microbatches * micro_batch_size, seq_len], the same on every process."""
    rows = settings.microbatches * settings.micro_batch_size
    vocab = settings.model_config().vocab_size
    generator = torch.Generator().manual_seed(settings.seed + 1)
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


def schedule_stages(schedule: PipelineScheduleSingle | PipelineScheduleMulti) -> list[PipelineStage]:
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
    for stage in schedule_stages(pipe.schedule):
        for name, kind in ACTION_KINDS.items():
            setattr(stage, name, _timed(getattr(stage, name), intervals, stage.stage_index, kind))
    last = next((s for s in schedule_stages(pipe.schedule) if s.is_last), None)
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


def measure_schedule(settings: PpBenchSettings, schedule: str) -> dict[str, Any]:
    """This rank's figures for `schedule`: per timed step the wall time, the idle fraction and the
    chunk times; the saved-activation peak of one extra step."""
    pipe = build_pipeline(
        bench_model(settings),
        schedule,
        settings.microbatches,
        settings.micro_batch_size,
        settings.seq_len,
        next_token_loss,
    )
    inputs, targets = bench_batch(settings)
    args = [inputs] if pipe.has_first else []
    target = targets if pipe.has_last else None
    intervals: list[Interval] = []
    record_actions(pipe, intervals)

    def step() -> tuple[float, float]:
        for param in pipe.parameters():
            param.grad = None
        pipe.moe_stats.clear()
        intervals.clear()
        dist.barrier()
        start = time.perf_counter()
        pipe.schedule.step(*args, target=target)
        return start, time.perf_counter()

    meter = SavedActivationMeter([*pipe.parameters(), *(b for c in pipe.chunks for b in c.buffers())])
    with meter.hooks():
        step()
    walls, idles, chunks = [], [], []
    for repeat in range(settings.warmup + settings.repeats):
        start, end = step()
        if repeat >= settings.warmup:
            walls.append(end - start)
            idles.append(idle_fraction(intervals, start, end))
            chunks.append(chunk_seconds(intervals))
    per_micro_batch = meter.packed_bytes / settings.microbatches
    return {
        "stages": pipe.stages,
        "step_s": walls,
        "idle_fraction": idles,
        "chunk_s": {key: statistics.mean(c[key] for c in chunks) for key in chunks[0]},
        "actions": sorted({i.kind for i in intervals}),
        "saved_peak_bytes": meter.peak_bytes,
        "saved_bytes_per_micro_batch": per_micro_batch,
    }


def _spawned_worker(rank: int, settings: PpBenchSettings, out: str) -> None:
    """The single-process baseline on every rank at once, then every schedule in turn; rank 0
    writes all ranks' figures to `out` as JSON."""
    dist.barrier()
    figures = {"beside_s": time_single_process(settings, torch.get_num_threads())}
    figures |= {schedule: measure_schedule(settings, schedule) for schedule in settings.schedules}
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
    """Spawn `pp` gloo processes, run every schedule on them, time the single-process baseline in
    this process; a JSON-ready dict of the results."""
    settings.validate()
    threads = max(1, (os.cpu_count() or 1) // settings.pp)
    baseline = time_single_process(settings, threads)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ranks.json"
        run_on_processes(settings.pp, _spawned_worker, settings, str(out), threads=threads)
        ranks = json.loads(out.read_text())
    baseline_s = statistics.median(baseline)
    beside_s = statistics.median(statistics.median(rank["beside_s"]) for rank in ranks)
    return {
        "config": {
            **dataclasses.asdict(settings),
            "threads_per_rank": threads,
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "backend": "gloo",
            "oversubscribed": settings.pp * threads > (os.cpu_count() or 1),
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
    efficiency against the baseline step alone (`baseline_s`) and beside pp - 1 others (`beside_s`)."""
    steps = [max(walls) for walls in zip(*(r["step_s"] for r in ranks))]
    chunk = {key: statistics.mean(r["chunk_s"][key] for r in ranks) for key in ranks[0]["chunk_s"]}
    formula = formula_bubble(schedule, settings.pp, settings.microbatches, **chunk)
    layout = planner_layout(schedule, settings.pp)
    median_step = statistics.median(steps)
    return {
        "step_s": {"best": min(steps), "median": median_step},
        "idle_fraction": [statistics.median(r["idle_fraction"]) for r in ranks],
        "formula": formula,
        "chunk_s": chunk,
        "actions": sorted({kind for r in ranks for kind in r["actions"]}),
        "saved_peak_bytes": [r["saved_peak_bytes"] for r in ranks],
        "held_micro_batches": [r["saved_peak_bytes"] / r["saved_bytes_per_micro_batch"] for r in ranks],
        "formula_held_micro_batches": [
            activations_in_flight(layout, settings.microbatches, rank) for rank in range(settings.pp)
        ],
        "stages": [r["stages"] for r in ranks],
        "efficiency": baseline_s / settings.pp / median_step,
        "efficiency_beside": beside_s / settings.pp / median_step,
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


def format_table(result: dict[str, Any]) -> str:
    """The result as a plain-text table, one row per schedule."""
    cfg = result["config"]
    base = result["single_process_s"]
    lines = [
        (
            f"pipeline schedules: pp={cfg['pp']} gloo processes ({cfg['threads_per_rank']} thread each, "
            f"{cfg['cpus']} CPUs, torch {cfg['torch']}); {cfg['layers']}-block MoE transformer, dim {cfg['dim']}; "
            f"{cfg['microbatches']} micro-batches of {cfg['micro_batch_size']}x{cfg['seq_len']} tokens"
        ),
        f"step time: slowest rank, median (best) of {cfg['repeats']} after {cfg['warmup']} warm-up",
        (
            f"efficiency = T1 / pp / step, T1 = one process's step without pipeline, alone: {base['median']:.3f} s "
            f"(best {base['best']:.3f}); beside {cfg['pp'] - 1} other(s) doing the same: "
            f"{result['single_process_beside_s']:.3f} s"
        ),
        "idle: measured per rank (1 - compute / step wall) vs the formula's bubble / (bubble + compute) on the "
        "measured chunk F, I (B when not split), W",
    ]
    if cfg["oversubscribed"]:
        lines.append(
            f"NOTE: {cfg['pp']} processes on {cfg['cpus']} CPUs: they take turns on the cores, so idle time and "
            "step time measure the OS scheduler as much as the schedule"
        )
    rows = [HEADER]
    for name, s in result["schedules"].items():
        chunk = s["chunk_s"]
        held = zip(s["held_micro_batches"], s["formula_held_micro_batches"])
        rows.append(
            [
                name,
                f"{s['step_s']['median']:.3f} ({s['step_s']['best']:.3f})",
                f"{s['efficiency']:.2f}",
                f"{s['efficiency_beside']:.2f}",
                " ".join(f"{i:.2f}" for i in s["idle_fraction"]),
                f"{s['formula']['idle_fraction']:.2f}",
                "/".join(f"{chunk[k] * 1e3:.0f}" for k in ("forward", "backward_input", "backward_weight")),
                " ".join(f"{b / 2**20:.0f}" for b in s["saved_peak_bytes"]),
                " ".join(f"{h:.1f}({f:g})" for h, f in held),
            ]
        )
    widths = [max(len(row[c]) for row in rows) for c in range(len(HEADER))]
    lines.append("")
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [cell.rjust(width) for cell, width in zip(row[1:], widths[1:])]
        lines.append("  ".join(cells))
    return "\n".join(lines)
