"""GET /metrics: the server and its engine in Prometheus' text format, written by prometheus_client.

Each scrape reads the engine's counters as of its last step (`AsyncEngine.stats`), so it never
waits for a forward pass. Counters end in `_total` and only grow; rates (requests/s, tokens/s over
any window) are Prometheus' `rate()` of them. Two figures are also given as gauges for a human
reading the page: generated tokens per second over the last ten seconds, and the speculation
acceptance rate (accepted / drafted tokens since start).
"""

from __future__ import annotations

from collections.abc import Iterator

from collections import Counter

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from moeforge.serve.async_engine import AsyncEngine

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
"""paths counted under their own label; any other is counted as 'other' (bounded label values)"""


class ServerMetrics:
    """The registry of one server: HTTP answers by path and status, and the engine's figures."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.responses: Counter[tuple[str, str]] = Counter()
        """(path, status) -> answers; only the event loop's thread counts and scrapes"""
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine, self.responses))

    def count(self, path: str, status: int) -> None:
        label = path if path in ROUTES else ("/v1/models" if path.startswith("/v1/models/") else "other")
        self.responses[label, str(status)] += 1

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    """The HTTP answers counted so far and the engine's `EngineStats`, at scrape time."""

    def __init__(self, engine: AsyncEngine, responses: Counter[tuple[str, str]]) -> None:
        self._engine = engine
        self._responses = responses

    def collect(self) -> Iterator[Metric]:
        answered = CounterMetricFamily(
            "moeforge_http_requests",
            "HTTP requests answered, by path and status code (499: the client left first)",
            labels=["path", "status"],
        )
        for (path, status), n in sorted(self._responses.items()):
            answered.add_metric([path, status], n)
        yield answered
        stats = self._engine.stats()
        gauges = {
            "queue_length": ("requests waiting for a place in the running batch", stats.waiting),
            "running_requests": ("requests in the running batch", stats.running),
            "cache_blocks_used": ("KV cache blocks held by requests", stats.cache_blocks_used),
            "cache_blocks_total": ("KV cache blocks in all", stats.cache_blocks_total),
            "tokens_per_second": ("generated tokens per second over the last 10 s", self._engine.tokens_per_s()),
            "speculative_acceptance_rate": (
                "accepted / drafted speculative tokens since start (0 before any draft)",
                stats.accepted_tokens / stats.drafted_tokens if stats.drafted_tokens else 0.0,
            ),
            "requests_in_flight": ("requests submitted and not finished", self._engine.in_flight),
        }
        counters = {
            "requests_finished": ("requests the engine finished", stats.requests_finished),
            "prompt_tokens": ("prompt tokens received", stats.prompt_tokens),
            "generated_tokens": ("tokens generated", stats.generated_tokens),
            "engine_steps": ("forward passes of the running batch", stats.steps),
            "preemptions": ("requests preempted (their cache freed, recomputed later)", stats.preemptions),
            "prefix_hit_tokens": ("prompt tokens taken from cached blocks of earlier requests", stats.prefix_hit_tokens),
            "speculative_drafted_tokens": ("tokens drafted by the MTP modules", stats.drafted_tokens),
            "speculative_accepted_tokens": ("drafted tokens the model accepted", stats.accepted_tokens),
            "speculative_verify_rounds": ("forwards that verified drafts", stats.verify_rounds),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"moeforge_{name}", doc, value=value)
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(f"moeforge_{name}", doc, value=value)
