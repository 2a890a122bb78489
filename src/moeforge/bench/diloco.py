"""`moeforge bench diloco`: data parallelism vs DiLoCo vs Streaming DiLoCo (fp32 and quantised), same
model, same tokens, on 2 replicas of one process each.

Every method trains the same initial model (same seed) on the same global batches (each of the two
ranks reads its half of every batch, as in data parallelism) for the same number of steps:
- data parallel: `diloco.replicas 1` on 2 ranks, gradients averaged every step;
- DiLoCo: 2 replicas that average their outer gradients every H steps, one fragment, no overlap;
- Streaming DiLoCo: P fragments at staggered steps, each exchange overlapped with tau inner steps and
  mixed in with alpha, in fp32 and in each codec asked for (error feedback at its default).
The runs go to OUT/<method> (the ordinary run directories, metrics.jsonl included); the table is
read back from them: validation loss, its gap to data parallelism, the bytes each replica sent (the
trainer's own count; data parallelism as 4 bytes x parameters x steps, its fp32 gradient per step),
and the bandwidth each method would need to keep a given compute utilisation u:

    per sync interval of k steps (step time T), one exchange of B bytes, of which tau*T hides behind
    the next inner steps: wall = k*T + max(0, B/W - tau*T), u = k*T / wall, so
    W(u) = B / (tau*T + k*T*(1 - u)/u)   (tau <= k; a longer overlap counts as k)

with B the largest single exchange (data parallelism: B = 4 x parameters, k = 1, tau = 0). It is
given for the step time measured here and for a reference model (bytes scaled by its parameter count,
a step time assumed), as in Streaming DiLoCo's Table 1 (bandwidth to reach a compute utilisation).

Every method is trained by `moeforge.train.trainer.Trainer`, as `moeforge train` trains.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from moeforge.config import Config, ConfigError, load_config
from moeforge.diloco.codecs import CODECS
from moeforge.parallel.process_group import init_distributed, launched_distributed
from moeforge.parallel.spawn import run_on_processes
from moeforge.plan.comm import bandwidth_for_utilisation
from moeforge.run import read_metrics
from moeforge.train.trainer import Trainer

REPLICAS = 2
"""DiLoCo replicas, each one process (data parallelism: the same 2 processes)"""
PER_METHOD_KEYS = (
    "diloco.replicas",
    "diloco.sync-every",
    "diloco.fragments",
    "diloco.overlap-steps",
    "diloco.mix",
    "diloco.quantize",
    "train.steps",
    "train.eval-every",
    "train.log-every",
    "train.checkpoint-every",
    "train.progress",
    "train.report",
)
"""config fields the bench sets itself; a --section.field override may not name them"""


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
    codecs: tuple[str, ...] = ("fp4-e3m0",)
    """the quantised Streaming DiLoCo rows (the fp32 row is always run)"""
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
        lossy = [codec for codec in CODECS if codec != "none"]
        for codec in self.codecs:
            if codec not in lossy or self.codecs.count(codec) > 1:
                raise ConfigError(
                    f"--codecs: got {codec!r}; allowed: a comma-separated list of distinct " + ", ".join(lossy)
                )
        for key, _ in self.overrides:
            if key in PER_METHOD_KEYS:
                raise ConfigError(f"--{key}: set by the bench per method; use its own flags (see --help)")
        for method in methods(self):
            method_config(self, method, REPLICAS)  # a mistake in a flag is one line, before any process


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    """the table's label"""
    slug: str
    """its run directory under OUT"""
    diloco: dict[str, str]
    """the --diloco.* values of the run"""
    sync_interval: int
    """k: steps between two exchanges (the bandwidth formula)"""
    overlap: int
    """tau: steps an exchange may take before it is waited for"""


def methods(settings: DilocoBenchSettings) -> list[Method]:
    """Data parallelism first (the baseline), then DiLoCo, then Streaming DiLoCo in fp32 and each codec."""
    h, p, tau = settings.sync_every, settings.fragments, settings.overlap_steps
    replicas = {"replicas": str(REPLICAS), "sync-every": str(h)}
    streaming = {**replicas, "fragments": str(p), "overlap-steps": str(tau), "mix": str(settings.mix)}
    rows = [
        Method("data parallel", "dp", {"replicas": "1"}, 1, 0),
        Method(
            f"DiLoCo H={h}",
            "diloco",
            {**replicas, "fragments": "1", "overlap-steps": "0", "quantize": "none"},
            h,
            0,
        ),
    ]
    for codec in ("none", *settings.codecs):
        label = "fp32" if codec == "none" else codec
        rows.append(
            Method(
                f"Streaming P={p} {label}",
                f"streaming-{label}",
                {**streaming, "quantize": codec},
                h // p,
                tau,
            )
        )
    return rows


def method_config(settings: DilocoBenchSettings, method: Method, world_size: int) -> Config:
    overrides = dict(settings.overrides)
    overrides.update(
        {
            "train.steps": str(settings.steps),
            "train.eval-every": str(settings.eval_every),
            "train.log-every": "1",  # every step's training loss, for the curves
            "train.checkpoint-every": str(settings.steps),  # only the final checkpoint
            "train.progress": "false",
            "train.report": "false",
        }
    )
    overrides.update({f"diloco.{key}": value for key, value in method.diloco.items()})
    return load_config(settings.preset, None, overrides, world_size=world_size)


# ----------------------------------------------------------------------------------------------
# Running the methods


def run_diloco_bench(settings: DilocoBenchSettings, out: Path | str | None = None) -> dict[str, Any] | None:
    """Train every method and read the table back; the result on rank 0 (None on the other rank of a
    torchrun launch). Runs go to `out` (which must not hold them already) or a temporary directory.

    Under torchrun it uses the launch's 2 processes; otherwise it spawns 2 gloo processes on this CPU,
    sharing its cores between them."""
    settings.validate()
    if launched_distributed():
        world = init_distributed("cuda" if torch.cuda.is_available() else "cpu")
        if world.world_size != REPLICAS:
            raise ConfigError(
                f"torchrun: got {world.world_size} processes; allowed: {REPLICAS} (one per replica)"
            )
        if out is None:
            raise ConfigError("--out: required under torchrun (every rank writes its part of the runs there)")
        _check_fresh(settings, Path(out))
        dist.barrier()  # every rank has looked before any run directory is made
        train_methods(world.rank, settings, str(out))
        return summarize(settings, Path(out)) if world.is_main else None
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(out) if out is not None else Path(tmp)
        _check_fresh(settings, root)
        threads = max(1, (os.cpu_count() or 1) // REPLICAS)
        run_on_processes(REPLICAS, train_methods, settings, str(root), threads=threads)
        return summarize(settings, root)


def _check_fresh(settings: DilocoBenchSettings, root: Path) -> None:
    """A run directory left from before would be resumed, not retrained: refuse it."""
    for method in methods(settings):
        if (root / method.slug).exists():
            raise ConfigError(f"--out: {str(root / method.slug)!r} already exists; use a new --out")


def train_methods(rank: int, settings: DilocoBenchSettings, root: str) -> None:
    """On each of the 2 ranks: train every method, one after the other, into root/<slug>."""
    for method in methods(settings):
        cfg = method_config(settings, method, REPLICAS)
        result = Trainer(cfg, Path(root) / method.slug).fit()
        if rank == 0:
            val = f"{result.val_loss:.4f}" if result.val_loss is not None else "-"
            print(f"bench diloco: {method.name}: {result.step} steps, val loss {val}", flush=True)


# ----------------------------------------------------------------------------------------------
# The table, from the run directories


def summarize(settings: DilocoBenchSettings, root: Path) -> dict[str, Any]:
    """The result: each method's figures and curves, read from root/<slug>/metrics.jsonl."""
    rows = {
        method.slug: _run_figures(method, read_metrics(root / method.slug)) for method in methods(settings)
    }
    totals = [row["exchange"] for row in rows.values() if row["exchange"] is not None]
    dp_bytes = totals[0]["data_parallel_bytes_per_replica"]
    if any(t["data_parallel_bytes_per_replica"] != dp_bytes for t in totals):
        raise AssertionError(f"the DiLoCo runs disagree on data parallelism's bytes: {totals}")
    parameters = dp_bytes // (4 * settings.steps)
    dp = rows["dp"]
    dp.update(bytes_per_replica=dp_bytes, syncs=settings.steps, peak_sync_bytes=4 * parameters)
    # T: an inner step of DiLoCo, which exchanges nothing between syncs (its compute alone)
    step_s = rows["diloco"]["median_step_s"]
    bandwidth_at = {
        "measured": {"step_s": step_s, "params": parameters},
        "reference": {"step_s": settings.ref_step_s, "params": settings.ref_params},
    }
    for method in methods(settings):
        row = rows[method.slug]
        row["val_loss_gap_pct"] = 100 * (row["val_loss"] - dp["val_loss"]) / dp["val_loss"]
        row["ratio_to_dp"] = dp_bytes / row["bytes_per_replica"]
        row["bandwidth_gbit_s"] = {
            where: 8e-9
            * required_bandwidth(
                row["peak_sync_bytes"] * at["params"] / parameters,
                method.sync_interval,
                method.overlap,
                at["step_s"],
                settings.utilisation,
            )
            for where, at in bandwidth_at.items()
        }
    last_dp = read_metrics(root / "dp")[-1]
    return {
        "config": {
            **dataclasses.asdict(settings),
            "replicas": REPLICAS,
            "parameters": parameters,
            "tokens": last_dp["tokens_seen"],
            "bandwidth_at": bandwidth_at,
            "bandwidth_formula": "W(u) = B / (tau*T + k*T*(1-u)/u)",
        },
        "methods": [{"method": method.name, **rows[method.slug]} for method in methods(settings)],
    }


def _run_figures(method: Method, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's final validation loss, exchanges and curves."""
    syncs = [sync for record in records for sync in record.get("diloco", [])]
    evals = [(r["tokens_seen"], r["val_loss"]) for r in records if "val_loss" in r]
    step_s = [r["tokens_seen"] / r["step"] / r["tokens_per_s"] for r in records]
    errors = [sync["quant_error"] for sync in syncs]
    exchange = records[-1].get("diloco_total")
    return {
        "diloco": method.diloco,
        "val_loss": evals[-1][1],
        "final_train_loss": records[-1]["lm_loss"],
        "bytes_per_replica": exchange["bytes_per_replica"] if exchange else None,
        "syncs": len(syncs),
        "peak_sync_bytes": max((sync["bytes_per_replica"] for sync in syncs), default=None),
        "mean_quant_error": statistics.fmean(errors) if errors else None,
        "wait_s": sum(sync["wait_s"] for sync in syncs),
        "median_step_s": statistics.median(step_s),
        "exchange": exchange,
        "val_curve": evals,
        "train_curve": [(r["tokens_seen"], r["lm_loss"]) for r in records],
    }


def required_bandwidth(
    sync_bytes: float, interval: int, overlap: int, step_s: float, utilisation: float
) -> float:
    """Bytes/s a replica's link needs so that exchanges of `sync_bytes` every `interval` steps of
    `step_s`, each hidden behind `overlap` steps, leave compute busy a fraction `utilisation`. An
    overlap longer than the interval hides no more: the link must still carry one exchange per
    interval, so it counts as `interval` steps."""
    hidden_s = min(overlap, interval) * step_s
    return bandwidth_for_utilisation(sync_bytes, 1 / interval, hidden_s, step_s, utilisation)


# ----------------------------------------------------------------------------------------------
# Output


def format_table(result: dict[str, Any]) -> str:
    cfg = result["config"]
    at = cfg["bandwidth_at"]
    u = f"{cfg['utilisation']:.0%}"
    lines = [
        (
            f"{cfg['preset']} preset ({cfg['parameters'] / 1e6:.2f}M parameters), {cfg['replicas']} replicas x 1 "
            f"process, {cfg['steps']} steps, {cfg['tokens'] / 1e6:.2f}M tokens for every method; "
            f"H={cfg['sync_every']}, P={cfg['fragments']}, tau={cfg['overlap_steps']}, alpha={cfg['mix']}"
        ),
        "",
        f"{'method':<24}{'val loss':>9}{'vs DP':>9}{'MB/replica':>12}{'DP/this':>9}{'syncs':>7}"
        f"{'peak MB':>9}{'q error':>9}{'Gbit/s ' + u + ' here':>17}{'Gbit/s ' + u + ' ref':>16}",
    ]
    for row in result["methods"]:
        error = f"{row['mean_quant_error']:.3f}" if row["mean_quant_error"] else "-"
        bandwidth = row["bandwidth_gbit_s"]
        lines.append(
            f"{row['method']:<24}{row['val_loss']:>9.4f}{row['val_loss_gap_pct']:>+8.2f}%"
            f"{row['bytes_per_replica'] / 1e6:>12.1f}{row['ratio_to_dp']:>8.1f}x{row['syncs']:>7}"
            f"{row['peak_sync_bytes'] / 1e6:>9.2f}{error:>9}"
            f"{bandwidth['measured']:>17.4f}{bandwidth['reference']:>16.2f}"
        )
    lines += [
        "",
        f"bandwidth a replica needs for {u} compute utilisation, {cfg['bandwidth_formula']}: B = the largest "
        "exchange,",
        "k = steps between exchanges, tau = steps it overlaps; here: "
        f"T = {at['measured']['step_s']:.3f} s (median DiLoCo inner step on this machine); "
        f"ref: {at['reference']['params'] / 1e9:g}B parameters (bytes scaled), T = {at['reference']['step_s']:g} s "
        "(assumed)",
    ]
    return "\n".join(lines)


def write_plot(result: dict[str, Any], path: Path | str) -> Path:
    """Validation loss and training loss (a running mean over 10 steps) against tokens, per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (val_ax, train_ax) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in result["methods"]:
        tokens, val = zip(*row["val_curve"])
        val_ax.plot([t / 1e6 for t in tokens], val, marker="o", label=row["method"])
        tokens, loss = zip(*row["train_curve"])
        train_ax.plot([t / 1e6 for t in tokens], _running_mean(loss, 10), label=row["method"], linewidth=1)
    cfg = result["config"]
    val_ax.set_title(f"validation loss ({cfg['preset']}, {cfg['replicas']} replicas)")
    train_ax.set_title("training loss, mean of 10 steps (DiLoCo: replica 0)")
    for ax in (val_ax, train_ax):
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _running_mean(values: tuple[float, ...], window: int) -> list[float]:
    means, total = [], 0.0
    for i, value in enumerate(values):
        total += value - (values[i - window] if i >= window else 0.0)
        means.append(total / min(i + 1, window))
    return means
