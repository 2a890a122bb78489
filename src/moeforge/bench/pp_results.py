"""`moeforge bench pp`'s result: every rank's figures summed up per schedule, next to the planner's
formulas (bubble, activations in flight), and the plain-text table of it (bench/pp.py runs the ranks).
"""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Any

from moeforge.bench.pp_timeline import hidden_fraction
from moeforge.parallel.pipeline import SCHEDULES
from moeforge.plan.layout import Layout
from moeforge.plan.pipeline import activations_in_flight, bubble_time

if TYPE_CHECKING:
    from moeforge.bench.pp import PpBenchSettings

PLANNER_SCHEDULE = {"1f1b": "1f1b", "interleaved-1f1b": "interleaved", "zbv": "zbv", "dualpipev": "dualpipev"}
"""`parallel.pp-schedule` name -> the planner's `Layout.pp_schedule`"""


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


# ---- the schedules over all ranks ------------------------------------------------------------


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
