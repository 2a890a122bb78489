"""The load `moeforge bench serve` puts on a server: prompts of a known token count, N concurrent
streaming clients over loopback, and a scrape of /metrics.

Each client takes the next request of a fixed list, sends it (`POST /v1/completions`, `stream:
true`, usage requested in a closing chunk), stamps every server-sent event as it arrives, and takes
the next; so at most N requests are in flight and each is sent once. The run is bounded in count
(the list) and in time: at `max_seconds` the clients still waiting are cancelled and their requests
are recorded as unfinished.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from moeforge.bench.serve_measure import RequestTrace
from moeforge.data.tokenizer import Tokenizer
from moeforge.errors import MoeforgeError, first_line

Clock = Callable[[], float]
WORDS = (
    "the of and to in is that for it as was with be by on not this are or from at which but have an they you were "
    "there one all we their been has when who will more no if out so said what up its about into than them can only "
    "other new some could time these two may then do first any my now such like our over even most made after also "
    "did many before must through back years where much your way well down should because each just those people "
    "how too little state good very make world still own see work long get here between both life being under never "
    "day same another know while last might great old year off come since against go came right used take three"
).split()


class ServeBenchError(MoeforgeError):
    """The benchmark cannot run as asked, or our own server failed: one line."""


@dataclass
class StreamEvent:
    """One server-sent event of a streamed completion."""

    text: str = ""
    completion_tokens: int | None = None
    prompt_tokens: int | None = None
    error: str | None = None


def fixed_length_prompts(tokenizer: Tokenizer, tokens: int, count: int, seed: int) -> list[str]:
    """`count` texts of random common words, each exactly `tokens` tokens long for `tokenizer` (cut
    to length, kept only when the cut text encodes back to the same tokens)."""
    rng = random.Random(seed)
    prompts = []
    for _ in range(count):
        for _attempt in range(100):
            words: list[str] = []
            while len(tokenizer.encode(" ".join(words))) < tokens:
                words.append(rng.choice(WORDS))
            ids = tokenizer.encode(" ".join(words))[:tokens]
            text = tokenizer.decode(ids)
            if tokenizer.encode(text) == ids:
                prompts.append(text)
                break
        else:
            raise ServeBenchError(f"--prompt-tokens: no text of exactly {tokens} tokens found for this tokenizer")
    return prompts


def parse_event(line: str) -> StreamEvent | None:
    """A `data: {...}` line of a completions stream as a `StreamEvent`; None for anything else
    (blank lines, comments, `data: [DONE]`)."""
    if not line.startswith("data:"):
        return None
    payload = line[len("data:") :].strip()
    if payload == "[DONE]":
        return None
    try:
        data = json.loads(payload)
    except ValueError:
        return StreamEvent(error=f"not JSON: {payload[:80]!r}")
    if not isinstance(data, dict):
        return StreamEvent(error=f"not a JSON object: {payload[:80]!r}")
    if "error" in data:
        error = data["error"]
        return StreamEvent(error=str(error.get("message", error) if isinstance(error, dict) else error))
    usage = data.get("usage") or {}
    return StreamEvent(
        text="".join(choice.get("text") or "" for choice in data.get("choices") or []),
        completion_tokens=usage.get("completion_tokens"),
        prompt_tokens=usage.get("prompt_tokens"),
    )


async def stream_request(client: httpx.AsyncClient, url: str, body: dict, trace: RequestTrace, clock: Clock) -> None:
    """Send one streamed completion and fill `trace` as its events arrive (an HTTP error status, an
    error event or a broken connection go to `trace.error`)."""
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                detail = (await response.aread()).decode(errors="replace")
                trace.error = f"HTTP {response.status_code}: {detail[:160]}"
                return
            pending = ""
            async for data in response.aiter_text():
                arrived = clock()
                *lines, pending = (pending + data).split("\n")
                events = [event for event in map(parse_event, lines) if event is not None]
                if any(event.text for event in events):
                    trace.chunks.append(arrived)  # one arrival, however many events it carried
                for event in events:
                    if event.error is not None:
                        trace.error = event.error
                        return
                    trace.text += event.text
                    if event.completion_tokens is not None:
                        trace.output_tokens, trace.prompt_tokens = event.completion_tokens, event.prompt_tokens
    except httpx.HTTPError as err:
        trace.error = f"{type(err).__name__}: {first_line(err)}"
    else:
        trace.finished = trace.error is None


async def run_clients(
    send: Callable[[RequestTrace], Awaitable[None]],
    requests: int,
    clients: int,
    max_seconds: float,
    clock: Clock = time.perf_counter,
) -> list[RequestTrace]:
    """Requests 0..requests-1 sent by `clients` concurrent clients, each taking the next one when its
    last is done; `send(trace)` sends request `trace.index` and fills its trace. After `max_seconds`
    the requests still running are cancelled and marked unfinished. The traces of the requests sent."""
    indices = iter(range(requests))  # shared: each request is taken by one client
    traces: list[RequestTrace] = []

    async def client() -> None:
        for index in indices:
            trace = RequestTrace(index, clock())
            traces.append(trace)
            await send(trace)

    tasks = [asyncio.create_task(client()) for _ in range(min(clients, requests))]
    _, running = await asyncio.wait(tasks, timeout=max_seconds)
    for task in running:
        task.cancel()
    await asyncio.gather(*running, return_exceptions=True)
    for trace in traces:
        if not trace.finished and trace.error is None:
            trace.error = f"not finished within --max-seconds {max_seconds:g}"
    return sorted(traces, key=lambda t: t.index)


async def timed_run(
    base_url: str, warm_up_bodies: list[dict], bodies: list[dict], clients: int, max_seconds: float
) -> list[RequestTrace]:
    """Untimed warm-up requests, one per client and all at once (the server's first batch, its
    connections and whatever it sets up on first use are not timed), then every body sent by
    `clients` clients. The warm-ups' prompts are none of the timed ones, so that a server that reuses
    cached prompt prefixes gains nothing."""
    url = f"{base_url}/v1/completions"
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=clients + 1)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(max_seconds)) as client:
        warm_ups = [RequestTrace(-1 - i, time.perf_counter()) for i in range(len(warm_up_bodies))]
        await asyncio.gather(
            *(stream_request(client, url, body, trace, time.perf_counter) for body, trace in zip(warm_up_bodies, warm_ups))
        )
        failed = next((trace for trace in warm_ups if not trace.completed), None)
        if failed is not None:
            raise ServeBenchError(f"a warm-up request failed: {failed.error or 'no text streamed'}")

        async def send(trace: RequestTrace) -> None:
            await stream_request(client, url, bodies[trace.index], trace, time.perf_counter)

        return await run_clients(send, len(bodies), clients, max_seconds)


def scrape_metrics(base_url: str) -> dict[str, float]:
    """GET /metrics: every unlabelled sample by name (counters keep their `_total` suffix)."""
    response = httpx.get(f"{base_url}/metrics", timeout=30)
    response.raise_for_status()
    return {
        sample.name: sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if not sample.labels
    }
