"""What `moeforge bench serve` computes from the arrival times of streamed tokens: no I/O here.

Each request leaves a `RequestTrace`: when it was sent, when each streamed chunk that carried text
arrived, and the token counts the server's closing usage chunk gave. From the traces of one timed run:

- output throughput: the output tokens of the completed requests over the run's wall time (from the
  first request sent to the last chunk received);
- time to first token (TTFT): first text chunk - sent, per request; p50 and p99 over the requests;
- inter-token latency (ITL): the gaps between a request's consecutive arrivals of text, pooled
  over the requests; p50 and p99. An arrival is what one read of the socket returned: servers send
  what they have ready together (several tokens of one speculation round, or several steps' worth
  when their event loop was kept waiting), and counting each server-sent event in such a burst as
  a gap of ~0 would make the percentiles describe the bursts, not the waits. So ITL is the client's
  wait between pieces of text;
- time per output token (TPOT): (last arrival - first arrival) / (output tokens - 1) per request,
  p50 and p99: the decoding rate one client sees, counted in tokens, whatever the chunking.

Percentiles interpolate linearly between the order statistics (numpy's default), so p99 of 32
requests lies between the two slowest.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class RequestTrace:
    """One streamed request as the client saw it (times in seconds on one monotonic clock)."""

    index: int
    sent: float
    chunks: list[float] = field(default_factory=list)
    """arrival time of each chunk that carried text"""
    text: str = ""
    output_tokens: int | None = None
    """completion tokens from the usage chunk (None: the server sent none)"""
    prompt_tokens: int | None = None
    finished: bool = False
    """the stream ended normally"""
    error: str | None = None

    @property
    def completed(self) -> bool:
        return self.finished and self.error is None and bool(self.chunks)

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.sent

    @property
    def tpot(self) -> float | None:
        """Seconds per output token after the first (None for a single token)."""
        tokens = self.output_tokens if self.output_tokens is not None else len(self.chunks)
        return (self.chunks[-1] - self.chunks[0]) / (tokens - 1) if tokens > 1 else None

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


@dataclass
class RunFigures:
    """One timed run of one server: the figures the table prints (times in ms)."""

    requests: int
    completed: int
    output_tokens: int
    duration_s: float
    tokens_per_s: float
    ttft_ms: dict[str, float]
    """p50, p99"""
    itl_ms: dict[str, float]
    """p50, p99"""
    tpot_ms: dict[str, float]
    """p50, p99"""
    short: int
    """completed requests that returned fewer or more tokens than asked (an end token not ignored)"""
    prompt_tokens: list[int]
    """the distinct prompt lengths the server reported"""
    first_error: str | None = None


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), linear between order statistics; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summarize(traces: list[RequestTrace], output_tokens: int) -> RunFigures:
    """The figures of one run from its traces; `output_tokens` is what each request asked for."""
    done = [t for t in traces if t.completed]
    tokens = sum(t.output_tokens if t.output_tokens is not None else len(t.chunks) for t in done)
    start = min((t.sent for t in traces), default=0.0)
    end = max((t.chunks[-1] for t in done), default=start)
    duration = end - start
    ttfts = [1e3 * t.ttft for t in done]
    gaps = [1e3 * g for t in done for g in t.gaps]
    errors = [t.error for t in traces if t.error is not None]
    return RunFigures(
        requests=len(traces),
        completed=len(done),
        output_tokens=tokens,
        duration_s=duration,
        tokens_per_s=tokens / duration if duration > 0 else 0.0,
        ttft_ms=_p50_p99(ttfts),
        itl_ms=_p50_p99(gaps),
        tpot_ms=_p50_p99([1e3 * t.tpot for t in done if t.tpot is not None]),
        short=sum(t.output_tokens != output_tokens for t in done),
        prompt_tokens=sorted({t.prompt_tokens for t in done if t.prompt_tokens is not None}),
        first_error=errors[0] if errors else None,
    )


def _p50_p99(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99)}


def same_texts(traces: list[RequestTrace], reference: list[RequestTrace]) -> int:
    """How many completed requests produced the reference's text for the same prompt (greedy
    decoding of the same weights: equal unless a near-tie of two logits went the other way)."""
    texts = {t.index: t.text for t in reference if t.completed}
    return sum(t.completed and texts.get(t.index) == t.text for t in traces)

