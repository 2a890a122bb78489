"""`bench pp`: the idle fraction from timestamps, the formula column, and one tiny run on 2 gloo processes."""

import json

import pytest

from moeforge.bench.pp import (
    Interval,
    PpBenchSettings,
    chunk_seconds,
    formula_bubble,
    format_table,
    idle_fraction,
    planner_layout,
    run_pp_bench,
)
from moeforge.config import ConfigError
from moeforge.plan.pipeline import bubble_time


def test_idle_fraction_counts_the_time_outside_compute():
    """Step [0, 10]: F 1-3, a wait, I 4-5 overlapping a loss 4.5-6, W 8-9 and an action running past
    the end (9.5-12, clipped): busy 2 + 2 + 1 + 0.5 = 5.5 of 10."""
    intervals = [
        Interval("F", 0, 1.0, 3.0),
        Interval("I", 0, 4.0, 5.0),
        Interval("loss", 0, 4.5, 6.0),
        Interval("W", 1, 8.0, 9.0),
        Interval("B", 1, 9.5, 12.0),
    ]
    assert idle_fraction(intervals, 0.0, 10.0) == pytest.approx(4.5 / 10)
    assert idle_fraction([], 0.0, 2.0) == 1.0


def test_chunk_seconds_adds_the_loss_to_the_forward_and_prefers_split_backwards():
    intervals = [
        Interval("F", 0, 0.0, 2.0),
        Interval("F", 1, 2.0, 6.0),
        Interval("loss", 1, 6.0, 7.0),
        Interval("B", 1, 7.0, 17.0),  # a full backward: ignored beside input-only ones
        Interval("I", 0, 17.0, 20.0),
        Interval("W", 0, 20.0, 22.0),
    ]
    assert chunk_seconds(intervals) == {"forward": 3.5, "backward_input": 3.0, "backward_weight": 2.0}
    full_only = [Interval("F", 0, 0.0, 1.0), Interval("B", 0, 1.0, 3.0)]
    assert chunk_seconds(full_only) == {"forward": 1.0, "backward_input": 2.0, "backward_weight": 0.0}


@pytest.mark.parametrize("schedule", ["1f1b", "interleaved-1f1b", "zbv", "dualpipev"])
@pytest.mark.parametrize("pp", [2, 4])
def test_formula_column_is_the_planners_bubble(schedule, pp):
    """F, I, W of one chunk; the planner takes one micro-batch through all of a rank's chunks."""
    f, b, w = 3.0, 2.0, 1.5
    layout = planner_layout(schedule, pp)
    v = layout.chunks_per_rank()
    assert v == (1 if schedule == "1f1b" else 2)
    expected = bubble_time(layout, v * f, v * b, v * w)
    got = formula_bubble(schedule, pp, 8, f, b, w)
    assert got["bubble_s"] == pytest.approx(expected)
    assert got["idle_fraction"] == pytest.approx(expected / (expected + 8 * v * (f + b + w)))


def test_formula_column_by_hand_at_two_ranks():
    """F = 3, I = 2, W = 1.5 per chunk at pp = 2 (the issue's formulas, PP counting stages for the V):
    1F1B (2-1)(F+I+W) = 6.5; interleaved with v = 2 chunks per rank the same per-chunk sum, 6.5;
    ZB-V (2-1)(F+I-2W) = 2; DualPipeV, 4 stages, (4/2-1)(F&B + B - 3W) with F&B = F+I+W and B the
    full backward I+W: 6.5 + 3.5 - 4.5 = 5.5."""
    expected = {"1f1b": 6.5, "interleaved-1f1b": 6.5, "zbv": 2.0, "dualpipev": 5.5}
    for schedule, bubble in expected.items():
        assert formula_bubble(schedule, 2, 8, 3.0, 2.0, 1.5)["bubble_s"] == pytest.approx(bubble), schedule


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"pp": 1}, r"^--pp: got 1; allowed: an integer >= 2$"),
        ({"schedules": ("gpipe",)}, r"^--schedules: got 'gpipe'; allowed: comma-separated 1f1b, "),
        ({"microbatches": 3}, r"^--microbatches: got 3; allowed: a multiple of --pp=2 that is at least 4 "),
        ({"layers": 3}, r"^--layers: got 3; allowed: at least 4 \(2 stages per rank\)$"),
        ({"repeats": 0}, r"^--repeats: got 0; allowed: at least 1$"),
    ],
)
def test_bench_pp_rejects_bad_settings(change, message):
    settings = PpBenchSettings(**change)
    with pytest.raises(ConfigError, match=message):
        settings.validate()


def test_bench_pp_tiny_run_on_two_processes():
    settings = PpBenchSettings(
        schedules=("zbv",),
        microbatches=4,
        micro_batch_size=1,
        seq_len=16,
        dim=32,
        layers=4,
        repeats=1,
        warmup=0,
    )
    result = run_pp_bench(settings)
    json.dumps(result)
    zbv = result["schedules"]["zbv"]
    assert result["single_process_s"]["median"] > 0
    assert zbv["step_s"]["best"] > 0 and zbv["efficiency"] > 0
    assert all(0 <= idle < 1 for idle in zbv["idle_fraction"]) and len(zbv["idle_fraction"]) == 2
    assert 0 <= zbv["formula"]["idle_fraction"] < 1
    assert all(t > 0 for t in zbv["chunk_s"].values())
    assert {"F", "I", "W"} <= set(zbv["actions"])
    assert zbv["stages"] == [[0, 3], [1, 2]]
    assert all(b > 0 for b in zbv["saved_peak_bytes"]) and all(h >= 1 for h in zbv["held_micro_batches"])
    assert "zbv" in format_table(result)
