"""The tables and the plot of `bench diloco`, read back from its run directories.

Per run: the final validation loss, its gap to data parallelism and to fp32 Streaming DiLoCo of the
same optimizer and seed, the bytes each replica sent (the trainer's own count; data parallelism as
4 bytes x parameters x steps, its fp32 gradient per step), the bits per parameter of a sync (every
byte of every exchange, scales, indices, router biases and the stop byte included, over the
parameters the exchanges covered: data parallelism sends 32), and the bandwidth the method would
need to keep a compute utilisation u:

    per sync interval of k steps (step time T), one exchange of B bytes, of which tau*T hides behind
    the next inner steps: wall = k*T + max(0, B/W - tau*T), u = k*T / wall, so
    W(u) = B / (tau*T + k*T*(1 - u)/u)   (tau <= k; a longer overlap counts as k)

with B the largest single exchange (data parallelism: B = 4 x parameters, k = 1, tau = 0). It is
given for the step time measured here (T: the median inner step of DiLoCo, or of fp32 Streaming
DiLoCo when plain DiLoCo is not run, of the same optimizer and seed) and for a reference model
(bytes scaled by its parameter count, a step time assumed), as in Streaming DiLoCo's Table 1.

Over the seeds: each method and optimizer's median, min and max of the losses and gaps.
"""

from __future__ import annotations

import dataclasses
import statistics
from pathlib import Path
from typing import Any

from moeforge.bench import spread
from moeforge.bench.diloco import REPLICAS, DilocoBenchSettings, Run, runs
from moeforge.plan.comm import bandwidth_for_utilisation
from moeforge.run import read_metrics

SEED_STATISTICS = ("val_loss", "val_loss_gap_pct", "gap_to_fp32_pct")
"""the figures that differ between seeds, given as median, min and max over them"""


def summarize(settings: DilocoBenchSettings, root: Path) -> dict[str, Any]:
    """The result: every run's figures and curves (`methods`), read from root/<run.path>/metrics.jsonl,
    and their statistics over the seeds (`over_seeds`)."""
    figures = {run.path: _run_figures(read_metrics(root / run.path)) for run in runs(settings)}
    totals = [row["exchange"] for row in figures.values() if row["exchange"] is not None]
    dp_bytes = totals[0]["data_parallel_bytes_per_replica"]
    if any(t["data_parallel_bytes_per_replica"] != dp_bytes for t in totals):
        raise AssertionError(f"the DiLoCo runs disagree on data parallelism's bytes: {totals}")
    parameters = dp_bytes // (4 * settings.steps)
    step_times, rows = [], []
    for optimizer in settings.optimizers:
        for seed in settings.seeds:
            group = [run for run in runs(settings) if (run.optimizer, run.seed) == (optimizer, seed)]
            step_s = _fill_group(settings, group, figures, parameters)
            step_times.append(step_s)
            rows += [{"method": run.method.name, "optimizer": run.optimizer, "seed": run.seed, **figures[run.path]}
                     for run in group]  # fmt: skip
    tokens, _ = figures[runs(settings)[0].path]["train_curve"][-1]  # data parallelism's last step
    return {
        "config": {
            **dataclasses.asdict(settings),
            "replicas": REPLICAS,
            "parameters": parameters,
            "tokens": tokens,
            "bandwidth_at": {
                "measured": {"step_s": statistics.median(step_times), "params": parameters},
                "reference": {"step_s": settings.ref_step_s, "params": settings.ref_params},
            },
            "bandwidth_formula": "W(u) = B / (tau*T + k*T*(1-u)/u)",
        },
        "methods": rows,
        "over_seeds": over_seeds(rows),
    }


def _fill_group(settings: DilocoBenchSettings, group: list[Run], figures: dict[str, dict], parameters: int) -> float:
    """Complete the figures of one optimizer and seed's runs (data parallelism first) with their gaps,
    byte ratios and bandwidths; returns the group's measured step time T."""
    by_slug = {run.method.slug: figures[run.path] for run in group}
    dp = by_slug["dp"]
    dp_bytes = 4 * parameters * settings.steps
    dp.update(bytes_per_replica=dp_bytes, syncs=settings.steps, peak_sync_bytes=4 * parameters)
    dp.update(synced_parameters=parameters * settings.steps)
    step_s = by_slug["diloco" if settings.plain else "streaming-fp32"]["median_step_s"]
    fp32 = by_slug["streaming-fp32"]["val_loss"]
    for run in group:
        row = figures[run.path]
        row["val_loss_gap_pct"] = 100 * (row["val_loss"] - dp["val_loss"]) / dp["val_loss"]
        row["gap_to_fp32_pct"] = 100 * (row["val_loss"] - fp32) / fp32
        row["ratio_to_dp"] = dp_bytes / row["bytes_per_replica"]
        row["bits_per_param_per_sync"] = 8 * row["bytes_per_replica"] / row["synced_parameters"]
        row["bandwidth_gbit_s"] = {
            where: 8e-9
            * required_bandwidth(
                row["peak_sync_bytes"] * scale_params / parameters,
                run.method.sync_interval,
                run.method.overlap,
                at_step_s,
                settings.utilisation,
            )
            for where, at_step_s, scale_params in (
                ("measured", step_s, parameters),
                ("reference", settings.ref_step_s, settings.ref_params),
            )
        }
    return step_s


def _run_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's final validation loss, exchanges and curves."""
    syncs = [sync for record in records for sync in record.get("diloco", [])]
    evals = [(r["tokens_seen"], r["val_loss"]) for r in records if "val_loss" in r]
    step_s = [r["tokens_seen"] / r["step"] / r["tokens_per_s"] for r in records]
    errors = [sync["quant_error"] for sync in syncs]
    exchange = records[-1].get("diloco_total")
    return {
        "val_loss": evals[-1][1],
        "final_train_loss": records[-1]["lm_loss"],
        "bytes_per_replica": exchange["bytes_per_replica"] if exchange else None,
        "syncs": len(syncs),
        "synced_parameters": sum(sync["parameters"] for sync in syncs),
        "peak_sync_bytes": max((sync["bytes_per_replica"] for sync in syncs), default=None),
        "mean_quant_error": statistics.fmean(errors) if errors else None,
        "wait_s": sum(sync["wait_s"] for sync in syncs),
        "median_step_s": statistics.median(step_s),
        "exchange": exchange,
        "val_curve": evals,
        "train_curve": [(r["tokens_seen"], r["lm_loss"]) for r in records],
    }


def over_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each (method, optimizer), in the order of `rows`: median, min and max over the seeds of the
    figures that move with the seed; the bytes (the same for every seed) from the first."""
    keys = list(dict.fromkeys((row["method"], row["optimizer"]) for row in rows))
    summary = []
    for method, optimizer in keys:
        mine = [row for row in rows if (row["method"], row["optimizer"]) == (method, optimizer)]
        spreads = {
            key: {**spread([row[key] for row in mine]), "values": [row[key] for row in mine]}
            for key in SEED_STATISTICS
        }
        first = mine[0]
        fixed = ("bytes_per_replica", "ratio_to_dp", "bits_per_param_per_sync", "syncs", "peak_sync_bytes")
        summary.append(
            {"method": method, "optimizer": optimizer, "seeds": [row["seed"] for row in mine], **spreads,
             **{key: first[key] for key in fixed}}
        )  # fmt: skip
    return summary


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
    """Every run, then (with more than one seed) the statistics over the seeds."""
    cfg = result["config"]
    at = cfg["bandwidth_at"]
    u = f"{cfg['utilisation']:.0%}"
    grid = len(cfg["optimizers"]) > 1 or len(cfg["seeds"]) > 1
    lines = [
        (
            f"{cfg['preset']} preset ({cfg['parameters'] / 1e6:.2f}M parameters), {cfg['replicas']} replicas x 1 "
            f"process, {cfg['steps']} steps, {cfg['tokens'] / 1e6:.2f}M tokens for every method; "
            f"H={cfg['sync_every']}, P={cfg['fragments']}, tau={cfg['overlap_steps']}, alpha={cfg['mix']}; "
            f"inner {', '.join(cfg['optimizers'])}; seeds {', '.join(map(str, cfg['seeds']))}"
        ),
        "",
        f"{'method':<30}{'opt':>6}{'seed':>5}{'val loss':>9}{'vs DP':>9}{'vs fp32':>9}{'MB/replica':>11}"
        f"{'DP/this':>9}{'bits/p':>7}{'syncs':>6}{'peak MB':>8}{'q error':>8}{'Gbit/s ' + u + ' here':>16}"
        f"{'Gbit/s ' + u + ' ref':>15}",
    ]
    for row in result["methods"]:
        error = f"{row['mean_quant_error']:.3f}" if row["mean_quant_error"] else "-"
        bandwidth = row["bandwidth_gbit_s"]
        lines.append(
            f"{row['method']:<30}{row['optimizer']:>6}{row['seed']:>5}{row['val_loss']:>9.4f}"
            f"{row['val_loss_gap_pct']:>+8.2f}%{row['gap_to_fp32_pct']:>+8.2f}%"
            f"{row['bytes_per_replica'] / 1e6:>11.1f}{row['ratio_to_dp']:>8.1f}x{row['bits_per_param_per_sync']:>7.2f}"
            f"{row['syncs']:>6}{row['peak_sync_bytes'] / 1e6:>8.2f}{error:>8}"
            f"{bandwidth['measured']:>16.4f}{bandwidth['reference']:>15.2f}"
        )
    lines += [
        "",
        f"bandwidth a replica needs for {u} compute utilisation, {cfg['bandwidth_formula']}: B = the largest "
        "exchange,",
        "k = steps between exchanges, tau = steps it overlaps; here: "
        f"T = {at['measured']['step_s']:.3f} s (median {'DiLoCo' if cfg['plain'] else 'fp32 Streaming'} inner step "
        f"on this machine); ref: {at['reference']['params'] / 1e9:g}B parameters (bytes scaled), "
        f"T = {at['reference']['step_s']:g} s (assumed); bits/p: bits per parameter of a sync",
    ]
    if grid:
        lines += ["", f"over seeds {', '.join(map(str, cfg['seeds']))}: median (min to max)", ""]
        lines.append(f"{'method':<30}{'opt':>6}{'val loss':>26}{'vs DP, %':>24}{'vs fp32, %':>24}{'bits/p':>8}")
        for row in result["over_seeds"]:
            lines.append(
                f"{row['method']:<30}{row['optimizer']:>6}{_spread(row['val_loss'], '.4f'):>26}"
                f"{_spread(row['val_loss_gap_pct'], '+.2f'):>24}{_spread(row['gap_to_fp32_pct'], '+.2f'):>24}"
                f"{row['bits_per_param_per_sync']:>8.2f}"
            )
    return "\n".join(lines)


def _spread(stats: dict[str, Any], spec: str) -> str:
    return f"{stats['median']:{spec}} ({stats['min']:{spec}} to {stats['max']:{spec}})"


def write_plot(result: dict[str, Any], path: Path | str) -> Path:
    """Left: final validation loss against the bytes a replica sent (median and min-max over the
    seeds), per method and optimizer. Right: validation loss against tokens, first seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = result["config"]
    fig, (bytes_ax, curve_ax) = plt.subplots(1, 2, figsize=(13, 5))
    markers = dict(zip(cfg["optimizers"], "os^", strict=False))
    for row in result["over_seeds"]:
        loss = row["val_loss"]
        bytes_ax.errorbar(
            row["bytes_per_replica"] / 1e6, loss["median"],
            yerr=[[loss["median"] - loss["min"]], [loss["max"] - loss["median"]]],
            marker=markers[row["optimizer"]], capsize=3, linestyle="none",
            label=f"{row['method']} ({row['optimizer']})",
        )  # fmt: skip
    bytes_ax.set_xscale("log")
    bytes_ax.set_xlabel("MB sent per replica (log)")
    bytes_ax.set_title(f"final validation loss vs bytes ({cfg['preset']}, {len(cfg['seeds'])} seed(s): median, min-max)")
    styles = dict(zip(cfg["optimizers"], ("-", "--", ":"), strict=False))
    for row in result["methods"]:
        if row["seed"] == cfg["seeds"][0]:
            tokens, val = zip(*row["val_curve"])
            curve_ax.plot([t / 1e6 for t in tokens], val, styles[row["optimizer"]], marker=".",
                          label=f"{row['method']} ({row['optimizer']})")  # fmt: skip
    curve_ax.set_xlabel("tokens (M)")
    curve_ax.set_title(f"validation loss, seed {cfg['seeds'][0]}")
    for ax in (bytes_ax, curve_ax):
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
