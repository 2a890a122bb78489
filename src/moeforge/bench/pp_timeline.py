"""What one rank's timestamps say about a step of `moeforge bench pp` (bench/pp.py records them).

Compute actions (`Interval`: F, loss, B, I, W) give the busy and idle share of the step and the mean
chunk times; the expert all-to-alls' recorded issue and wait times (`ExchangeWait`) give the exposed
all-to-all time (a thread waits, none computes), the time waited, and how much of an exchange's
flight the other direction's thread spent computing (DualPipeV's overlap). Arithmetic on
perf_counter seconds only, so each rule is tested on a hand-made timeline.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import NamedTuple

from moeforge.parallel.expert_parallel import RecordedExchange
from moeforge.parallel.overlap import ForwardBackwardSpans


# ---- compute actions ---------------------------------------------------------------------



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
