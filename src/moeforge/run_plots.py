"""`moeforge report RUN_DIR`: PNG plots of a run, drawn from its metrics.jsonl with matplotlib.

- losses.png: the training loss and its LM part, validation loss, multi-token-prediction losses (when
  logged) and the balance losses, against the optimizer step;
- expert_load.png: one heatmap per MoE layer, experts x logged steps, each cell the tokens an expert
  received relative to the mean (1 = its fair share, 0 = idle);
- max_violation.png: max/mean - 1 of every MoE layer against the step (0 = perfectly balanced).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np

from moeforge.errors import MoeforgeError
from moeforge.run import METRICS_FILE, REPORT_DIR, read_metrics, read_run_config

LOSS_LABEL = "cross-entropy (nats/token)"


class ReportError(MoeforgeError, ValueError):
    """A report that cannot be drawn: no metrics, or matplotlib missing."""


def write_report(run_dir: Path | str, out_dir: Path | str | None = None) -> list[Path]:
    """Draw the report of `run_dir` into `out_dir` (default RUN_DIR/report); returns the PNGs written."""
    run_dir = Path(run_dir)
    if not (run_dir / METRICS_FILE).is_file():
        raise ReportError(f"{run_dir}: no {METRICS_FILE}; expected a moeforge run directory")
    records = read_metrics(run_dir)
    if not records:
        raise ReportError(f"{run_dir / METRICS_FILE}: no records yet")
    plt = _pyplot()
    out = Path(out_dir) if out_dir is not None else run_dir / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    written = [_save(plt, plot_losses(plt, records), out / "losses.png")]
    if any(record.get("load") for record in records):
        first_block = _first_moe_block(run_dir)
        written.append(_save(plt, plot_expert_load(plt, records, first_block), out / "expert_load.png"))
        written.append(_save(plt, plot_max_violation(plt, records, first_block), out / "max_violation.png"))
    return written


def report_after_training(run_dir: Path | str) -> Path | None:
    """The end-of-run report of `moeforge train`: its directory, or None with a one-line notice when it
    cannot be drawn (matplotlib missing); a finished run never fails because of its plots."""
    try:
        written = write_report(run_dir)
    except ReportError as err:
        print(f"moeforge: report skipped: {err}", file=sys.stderr)
        return None
    return written[0].parent


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise ReportError("matplotlib is not installed (pip install 'moeforge[report]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def _first_moe_block(run_dir: Path) -> int:
    """Index of the first MoE block (after the dense ones), from the run's config.json when present."""
    config = read_run_config(run_dir) or {}
    return config.get("model", {}).get("n_dense_layers", 0)


# ----------------------------------------------------------------------------------------------
# Series from the records


def series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a top-level number, skipping the records that lack it."""
    points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
    return [s for s, _ in points], [v for _, v in points]


def aux_names(records: list[dict[str, Any]]) -> list[str]:
    return sorted({name for r in records for name in (r.get("aux") or {})})


def mtp_keys(records: list[dict[str, Any]]) -> list[str]:
    """The multi-token-prediction losses logged: `mtp_loss` (lambda/D * sum of CE) and `mtp/K` (the
    cross-entropy of depth K); the weight `mtp_lambda` is not a loss."""
    keys = {k for r in records for k, v in r.items() if k.startswith("mtp") and isinstance(v, (int, float))}
    return sorted(keys - {"mtp_lambda"})


def mtp_label(key: str) -> str:
    if key.startswith("mtp/"):
        return f"depth {key[4:]} cross-entropy"
    return "weighted MTP loss (added to the loss)" if key == "mtp_loss" else key


def load_matrix(records: list[dict[str, Any]], layer: int) -> tuple[list[int], np.ndarray]:
    """(steps, [experts, steps] tokens per expert / mean tokens per expert) of one MoE layer."""
    steps, columns = [], []
    for record in records:
        load = record.get("load") or []
        if layer < len(load):
            counts = np.asarray(load[layer]["tokens_per_expert"], dtype=np.float64)
            mean = counts.mean()
            columns.append(counts / mean if mean > 0 else counts)
            steps.append(record["step"])
    return steps, np.stack(columns, axis=1)


def n_moe_layers(records: list[dict[str, Any]]) -> int:
    return max(len(r.get("load") or []) for r in records)


def _edges(steps: list[int]) -> np.ndarray:
    """Cell edges around each step for a heatmap whose columns are the (unevenly spaced) logged steps."""
    x = np.asarray(steps, dtype=np.float64)
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


# ----------------------------------------------------------------------------------------------
# Figures


def plot_losses(plt: Any, records: list[dict[str, Any]]) -> Any:
    mtp = mtp_keys(records)
    aux = aux_names(records)
    has_balance = bool(aux) or any(r.get("aux_loss") for r in records)
    panels = 1 + bool(mtp) + has_balance
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    ax = axes.pop(0)
    for key, label, style in (
        ("loss", "train loss (total: LM + balance + MTP)", "-"),
        ("lm_loss", "train LM loss", "-"),
        ("val_loss", "validation loss", "o--"),
    ):
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, style, label=label, markersize=4)
    _decorate(ax, "Language-model loss", LOSS_LABEL)
    if mtp:
        ax = axes.pop(0)
        for key in mtp:
            ax.plot(*series(records, key), label=mtp_label(key))
        _decorate(ax, "Multi-token prediction", LOSS_LABEL)
    if has_balance:
        ax = axes.pop(0)
        ax.plot(*series(records, "aux_loss"), label="aux_loss (sum)")
        for name in aux:
            points = [(r["step"], r["aux"][name]) for r in records if name in (r.get("aux") or {})]
            ax.plot([s for s, _ in points], [v for _, v in points], "--", label=name)
        _decorate(ax, "Balance losses (added to the loss)", "loss value")
    fig.suptitle("Training losses")
    fig.tight_layout()
    return fig


def _decorate(ax: Any, title: str, ylabel: str) -> None:
    ax.set_title(title)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot_expert_load(plt: Any, records: list[dict[str, Any]], first_block: int = 0) -> Any:
    """One panel per MoE layer: experts (rows) x logged steps (columns), load relative to the mean."""
    from matplotlib.colors import TwoSlopeNorm

    n_layers = n_moe_layers(records)
    matrices = [load_matrix(records, layer) for layer in range(n_layers)]
    vmax = max(2.0, max(float(m.max()) for _, m in matrices))
    norm = TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=vmax)
    cols = min(n_layers, 4)
    rows = math.ceil(n_layers / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols + 1.2, 3.4 * rows + 0.6), squeeze=False, layout="constrained"
    )
    for layer, (steps, matrix) in enumerate(matrices):
        ax = axes[layer // cols][layer % cols]
        experts = np.arange(matrix.shape[0] + 1) - 0.5
        mesh = ax.pcolormesh(_edges(steps), experts, matrix, cmap="RdBu_r", norm=norm, shading="flat")
        ax.set_title(f"MoE layer {layer} (block {first_block + layer})")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("expert")
    for extra in range(n_layers, rows * cols):
        axes[extra // cols][extra % cols].axis("off")
    fig.suptitle("Expert load: tokens routed to each expert / mean per expert (1 = balanced, 0 = idle)")
    fig.colorbar(mesh, ax=axes.ravel().tolist(), label="load / mean load")
    return fig


def plot_max_violation(plt: Any, records: list[dict[str, Any]], first_block: int = 0) -> Any:
    n_layers = n_moe_layers(records)
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, n_layers))
    for layer in range(n_layers):
        points = [(r["step"], r["load"][layer]["max_violation"]) for r in records if layer < len(r.get("load") or [])]
        label = f"MoE layer {layer} (block {first_block + layer})"
        ax.plot([s for s, _ in points], [v for _, v in points], color=colors[layer], label=label)
    ax.set_title("Max violation per MoE layer (0 = perfectly balanced)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("max load / mean load - 1")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=max(1, math.ceil(n_layers / 10)))
    fig.tight_layout()
    return fig
