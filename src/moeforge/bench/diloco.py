"""`moeforge bench diloco`: data parallelism vs DiLoCo vs Streaming DiLoCo (fp32 and lossy outer
gradients), same model, same tokens, on 2 replicas of one process each.

Every method trains the same initial model (same seed) on the same global batches (each of the two
ranks reads its half of every batch, as in data parallelism) for the same number of steps:
- data parallel: `diloco.replicas 1` on 2 ranks, gradients averaged every step;
- DiLoCo: 2 replicas that average their outer gradients every H steps, one fragment, no overlap
  (left out with `plain=False`);
- Streaming DiLoCo: P fragments at staggered steps, each exchange overlapped with tau inner steps and
  mixed in with alpha, in fp32 and in each lossy variant asked for: a value codec, optionally top-k
  sparsified, with or without error feedback (`Variant`).
The grid repeats every method for each inner optimizer and each seed (the seed draws the initial
model and the batches alike for every method of that seed). The runs go to
OUT/<optimizer>/seed<seed>/<method> (ordinary run directories, metrics.jsonl included); the tables
are read back from them by `bench/diloco_results.py`.

A long grid can be stopped and started again with the same `--out` and the same settings: each run
resumes as `moeforge train` resumes (a finished one returns at once); other settings are refused.

Every method is trained by `moeforge.train.trainer.Trainer`, as `moeforge train` trains.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist

from moeforge.config import Config, ConfigError, load_config
from moeforge.diloco.codecs import CODECS
from moeforge.parallel.process_group import init_distributed, launched_distributed
from moeforge.parallel.spawn import run_on_processes
from moeforge.train.trainer import Trainer

REPLICAS = 2
"""DiLoCo replicas, each one process (data parallelism: the same 2 processes)"""
OPTIMIZERS = ("adamw", "muon")
"""inner optimizers the grid may compare"""
SETTINGS_FILE = "bench-settings.json"
"""the settings a grid under OUT was started with: a rerun with the same ones resumes it"""
PER_METHOD_KEYS = (
    "diloco.replicas",
    "diloco.outer",
    "diloco.sync-every",
    "diloco.fragments",
    "diloco.overlap-steps",
    "diloco.mix",
    "diloco.quantize",
    "diloco.error-feedback",
    "diloco.topk-fraction",
    "train.optimizer",
    "train.seed",
    "train.steps",
    "train.eval-every",
    "train.log-every",
    "train.checkpoint-every",
    "train.progress",
    "train.report",
)
"""config fields the bench sets itself; a --section.field override may not name them"""
VARIANT_SYNTAX = "[topF+]CODEC[+ef][+sparseloco]"
SPARSELOCO_OUTER_LR = 1.0
"""outer lr of a +sparseloco variant: SparseLoCo's paper's"""


@dataclasses.dataclass(frozen=True)
class Variant:
    """A lossy Streaming DiLoCo row: `codec` on the values, top-k sparsified first when
    `topk_fraction` < 1, with error feedback or without, under DiLoCo's Nesterov outer step or
    SparseLoCo's (`sparseloco`: its decayed accumulator as the error feedback, outer lr 1, the
    paper's). Written `[topF+]CODEC[+ef][+sparseloco]`: `fp4-e3m0`, `fp4-e3m0+ef`, `int2+ef`,
    `top0.02+int2+ef`, `top0.02+int2+ef+sparseloco`."""

    codec: str
    error_feedback: bool = False
    topk_fraction: float = 1.0
    sparseloco: bool = False

    @property
    def label(self) -> str:
        sparse = [f"top{self.topk_fraction:g}"] if self.topk_fraction < 1 else []
        feedback = ["ef"] if self.error_feedback else []
        return "+".join([*sparse, self.codec, *feedback, *(["sparseloco"] if self.sparseloco else [])])

    @property
    def diloco(self) -> dict[str, str]:
        """Its --diloco.* values."""
        values = {
            "quantize": self.codec,
            "error-feedback": str(self.error_feedback).lower(),
            "topk-fraction": repr(self.topk_fraction),
        }
        if self.sparseloco:
            values.update({"outer": "sparseloco", "outer-lr": repr(SPARSELOCO_OUTER_LR)})
        return values


def parse_variant(text: str) -> Variant:
    """`[topF+]CODEC[+ef][+sparseloco]` -> Variant; a one-line --codecs error otherwise."""
    parts = text.split("+")
    sparse = parts[0].startswith("top")
    fraction = _fraction(parts.pop(0)[3:]) if sparse else 1.0
    sparseloco = _pop_last(parts, "sparseloco")
    feedback = _pop_last(parts, "ef")
    valid = len(parts) == 1 and parts[0] in CODECS and fraction is not None and (parts[0] != "none" or sparse)
    if not valid or (sparseloco and not feedback):
        lossy = ", ".join(codec for codec in CODECS if codec != "none")
        raise ConfigError(
            f"--codecs: got {text!r}; allowed: a comma-separated list of distinct {VARIANT_SYNTAX} with CODEC "
            f"one of {lossy} (none only after topF), F in (0, 1), sparseloco only with ef"
        )
    return Variant(parts[0], feedback, fraction, sparseloco)


def _pop_last(parts: list[str], word: str) -> bool:
    """Whether `parts` ends with `word`, removing it."""
    if parts and parts[-1] == word:
        parts.pop()
        return True
    return False


def _fraction(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if 0 < value < 1 else None


@dataclasses.dataclass(frozen=True)
class DilocoBenchSettings:
    preset: str = "tiny"
    steps: int = 300
    sync_every: int = 20
    """H, for DiLoCo and Streaming DiLoCo alike"""
    fragments: int = 2
    """P of Streaming DiLoCo"""
    overlap_steps: int = 1
    """tau of Streaming DiLoCo"""
    mix: float = 0.5
    """alpha of Streaming DiLoCo"""
    codecs: tuple[str, ...] = ("fp4-e3m0+ef",)
    """the lossy Streaming DiLoCo rows, as `Variant`s are written (the fp32 row is always run)"""
    plain: bool = True
    """run plain DiLoCo (one fragment, no overlap) too"""
    optimizers: tuple[str, ...] = ("adamw",)
    """inner optimizers: every method is run with each"""
    seeds: tuple[int, ...] = (0,)
    """train.seed of each repetition of the grid"""
    muon_lr: float | None = 1e-2
    """train.lr of the Muon runs (None: the preset's, as AdamW's): on `tiny` Muon's best is 1e-2 where
    AdamW's is the preset's 3e-3 (docs/training.md, Muon)"""
    eval_every: int = 50
    utilisation: float = 0.9
    """u of the bandwidth columns"""
    ref_params: float = 1e9
    ref_step_s: float = 1.0
    """the reference model of the second bandwidth column: its parameters and assumed step time"""
    overrides: tuple[tuple[str, str], ...] = ()
    """--section.field VALUE pairs applied to every method (e.g. smaller dims)"""

    def validate(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"--steps: got {self.steps}; allowed: an integer >= 1")
        if self.eval_every < 1:
            raise ConfigError(f"--eval-every: got {self.eval_every}; allowed: an integer >= 1")
        if not 0 < self.utilisation < 1:
            raise ConfigError(f"--utilisation: got {self.utilisation}; allowed: a number in (0, 1)")
        if self.ref_params <= 0 or self.ref_step_s <= 0:
            raise ConfigError(
                f"--ref-params, --ref-step-s: got {self.ref_params}, {self.ref_step_s}; allowed: numbers > 0"
            )
        labels = [parse_variant(text).label for text in self.codecs]
        for text, label in zip(self.codecs, labels, strict=True):
            if labels.count(label) > 1:
                raise ConfigError(
                    f"--codecs: got {text!r} twice; allowed: a comma-separated list of distinct {VARIANT_SYNTAX}"
                )
        known = all(optimizer in OPTIMIZERS for optimizer in self.optimizers)
        if not self.optimizers or not known or len(set(self.optimizers)) != len(self.optimizers):
            raise ConfigError(
                f"--optimizers: got {','.join(self.optimizers)!r}; allowed: distinct names of {', '.join(OPTIMIZERS)}"
            )
        if self.muon_lr is not None and not self.muon_lr > 0:
            raise ConfigError(f"--muon-lr: got {self.muon_lr}; allowed: a number > 0")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ConfigError(f"--seeds: got {list(self.seeds)}; allowed: distinct integers >= 0, at least one")
        for key, _ in self.overrides:
            if key in PER_METHOD_KEYS:
                raise ConfigError(f"--{key}: set by the bench per method; use its own flags (see --help)")
        for run in runs(self):
            run_config(self, run, REPLICAS)  # a mistake in a flag is one line, before any process


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    """the table's label"""
    slug: str
    """its run directory's name"""
    diloco: dict[str, str]
    """the --diloco.* values of the run"""
    sync_interval: int
    """k: steps between two exchanges (the bandwidth formula)"""
    overlap: int
    """tau: steps an exchange may take before it is waited for"""
    fragments: int = 1
    """P: an exchange carries 1/P of the model"""


def methods(settings: DilocoBenchSettings) -> list[Method]:
    """Data parallelism first (the baseline), then DiLoCo, then Streaming DiLoCo in fp32 and each variant."""
    h, p, tau = settings.sync_every, settings.fragments, settings.overlap_steps
    replicas = {"replicas": str(REPLICAS), "sync-every": str(h)}
    streaming = {**replicas, "fragments": str(p), "overlap-steps": str(tau), "mix": str(settings.mix)}
    rows = [Method("data parallel", "dp", {"replicas": "1"}, 1, 0)]
    if settings.plain:
        plain = {**replicas, "fragments": "1", "overlap-steps": "0", "quantize": "none"}
        rows.append(Method(f"DiLoCo H={h}", "diloco", plain, h, 0))
    for variant in (Variant("none"), *map(parse_variant, settings.codecs)):
        label = "fp32" if variant.codec == "none" and variant.topk_fraction == 1 else variant.label
        rows.append(
            Method(f"Streaming P={p} {label}", f"streaming-{label}", {**streaming, **variant.diloco}, h // p, tau, p)
        )
    return rows


@dataclasses.dataclass(frozen=True)
class Run:
    """One method trained with one inner optimizer from one seed."""

    method: Method
    optimizer: str
    seed: int

    @property
    def path(self) -> str:
        """Its run directory under OUT."""
        return f"{self.optimizer}/seed{self.seed}/{self.method.slug}"


def runs(settings: DilocoBenchSettings) -> list[Run]:
    """Every run of the grid: for each optimizer and seed, every method (data parallelism first)."""
    return [
        Run(method, optimizer, seed)
        for optimizer in settings.optimizers
        for seed in settings.seeds
        for method in methods(settings)
    ]


def run_config(settings: DilocoBenchSettings, run: Run, world_size: int) -> Config:
    overrides = dict(settings.overrides)
    overrides.update(
        {
            "train.optimizer": run.optimizer,
            "train.seed": str(run.seed),
            "train.steps": str(settings.steps),
            "train.eval-every": str(settings.eval_every),
            "train.log-every": "1",  # every step's training loss, for the curves
            "train.checkpoint-every": str(settings.steps),  # only the final checkpoint
            "train.progress": "false",
            "train.report": "false",
        }
    )
    if run.optimizer == "muon" and settings.muon_lr is not None:
        overrides["train.lr"] = repr(settings.muon_lr)
    overrides.update({f"diloco.{key}": value for key, value in run.method.diloco.items()})
    return load_config(settings.preset, None, overrides, world_size=world_size)


# ----------------------------------------------------------------------------------------------
# Running the grid


def run_diloco_bench(settings: DilocoBenchSettings, out: Path | str | None = None) -> dict | None:
    """Train every run and read the tables back; the result on rank 0 (None on the other rank of a
    torchrun launch). Runs go to `out` (a grid started there with the same settings is resumed) or a
    temporary directory.

    Under torchrun it uses the launch's 2 processes; otherwise it spawns 2 gloo processes on this CPU,
    sharing its cores between them."""
    from moeforge.bench.diloco_results import summarize

    settings.validate()
    if launched_distributed():
        world = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
        if world.world_size != REPLICAS:
            raise ConfigError(
                f"torchrun: got {world.world_size} processes; allowed: {REPLICAS} (one per replica)"
            )
        if out is None:
            raise ConfigError("--out: required under torchrun (every rank writes its part of the runs there)")
        _claim(settings, Path(out), world.is_main)
        dist.barrier()  # the settings are recorded before any run directory is made
        train_runs(world.rank, settings, str(out))
        return summarize(settings, Path(out)) if world.is_main else None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out) if out is not None else Path(tmp)
        _claim(settings, root, True)
        threads = max(1, (os.cpu_count() or 1) // REPLICAS)
        run_on_processes(REPLICAS, train_runs, settings, str(root), threads=threads)
        return summarize(settings, root)


def _claim(settings: DilocoBenchSettings, root: Path, write: bool) -> None:
    """Record the settings in `root`, or check them against those a grid there was started with:
    a run directory left from other settings would be resumed, not retrained."""
    record = root / SETTINGS_FILE
    mine = json.loads(json.dumps(dataclasses.asdict(settings)))
    if record.is_file():
        if json.loads(record.read_text()) != mine:
            raise ConfigError(f"--out: {str(root)!r} holds a grid of other settings ({record.name}); use a new --out")
        return
    if root.is_dir() and any(root.iterdir()):
        raise ConfigError(f"--out: {str(root)!r} is not empty and holds no {SETTINGS_FILE}; use a new --out")
    if write:
        root.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(mine, indent=1) + "\n")


def train_runs(rank: int, settings: DilocoBenchSettings, root: str) -> None:
    """On each of the 2 ranks: train every run, one after the other, into root/<run.path>; rank 0
    says each one's end on stderr (stdout is the table, or the --json)."""
    for run in runs(settings):
        cfg = run_config(settings, run, REPLICAS)
        result = Trainer(cfg, Path(root) / run.path).fit()
        if rank == 0:
            val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
            print(
                f"bench diloco: {run.method.name}, {run.optimizer}, seed {run.seed}: {result.step} steps, "
                f"val loss {val}",
                file=sys.stderr,
                flush=True,
            )
