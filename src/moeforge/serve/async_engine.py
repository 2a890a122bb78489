"""The engine behind an asyncio server: one thread owns the synchronous `Engine` and steps it; request
handlers on the event loop submit to it and read their outputs from an asyncio queue.

The engine is not thread-safe, and its forward passes would block the event loop, so every engine
call happens on one dedicated thread. That thread loops: take the commands queued for it (add a group
of requests, abort some), run one `step()` while anything is running or waiting, hand each output to
the event loop that is waiting for it (`loop.call_soon_threadsafe` onto that request's queue), and
sleep on a condition when there is nothing to do.

A consumer that stops reading (a client that disconnects: `CancelledError` or `GeneratorExit` in the
handler) closes its `OutputStream`, which aborts its unfinished requests: the engine frees their cache
blocks before its next step. An exception inside the engine fails every request in flight and every
later one with `EngineFailed` (the API answers 500) instead of leaving them waiting forever; the
engine's state after an unexpected exception is not trusted, so the thread stops there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import traceback
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from moeforge.errors import MoeforgeError, first_line
from moeforge.serve.requests import EngineFull, EngineStats, RequestError, RequestOutput, SamplingParams

TOKEN_RATE_WINDOW_S = 10.0
"""generated tokens per second are averaged over this many seconds"""


class EngineUnavailable(MoeforgeError):
    """The server takes no new requests: it is draining before it exits (the API answers 503)."""


class EngineFailed(MoeforgeError):
    """The engine thread stopped on an unexpected exception (the API answers 500)."""


class StepEngine(Protocol):
    """What `AsyncEngine` needs of the engine (`moeforge.serve.engine.Engine`)."""

    def add_request(self, request_id: str, prompt_tokens: list[int], params: SamplingParams) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def step(self) -> list[RequestOutput]: ...

    @property
    def has_work(self) -> bool: ...

    def stats(self) -> EngineStats: ...


Submission = tuple[str, list[int], SamplingParams]
"""(request id, prompt tokens, sampling parameters): one engine request"""


@dataclass
class _Route:
    """Where the outputs of a request go: a queue read on the event loop `loop`."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def send(self, item: RequestOutput | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is waiting any more
            pass


@dataclass
class _Add:
    requests: list[Submission]
    loop: asyncio.AbstractEventLoop
    accepted: asyncio.Future

    def settle(self, error: BaseException | None) -> None:
        try:
            self.loop.call_soon_threadsafe(_settle, self.accepted, error)
        except RuntimeError:
            pass


@dataclass
class _Abort:
    request_ids: list[str]


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, output in items:
        queue.put_nowait(output)


def _settle(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # the submitter was cancelled meanwhile (and aborts what was added)
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


class AsyncEngine:
    """A thread that owns `engine`; `submit`/`generate` from coroutines. `max_waiting` bounds the
    requests queued in the engine and not yet running (`EngineFull` past it)."""

    def __init__(self, engine: StepEngine, max_waiting: int) -> None:
        self._engine = engine
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._inbox: list[_Add | _Abort] = []
        self._routes: dict[str, _Route] = {}
        self._paused = False
        self._draining = False
        self._stopping = False
        self._failure: EngineFailed | None = None
        self._stats = dataclasses.replace(engine.stats())
        self._rate = _TokenRate(TOKEN_RATE_WINDOW_S)
        self._thread = threading.Thread(target=self._run, name="moeforge-engine", daemon=True)

    # --- the event loop's side ---

    def start(self) -> None:
        self._thread.start()

    async def submit(self, requests: Sequence[Submission]) -> OutputStream:
        """Queue `requests` together (all or none: the `n` choices of one API request); returns once
        the engine took them. Raises `RequestError` (a prompt or `max_tokens` the engine cannot hold),
        `EngineFull`, `EngineUnavailable` (draining) or `EngineFailed`."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        ids = [request_id for request_id, _, _ in requests]
        add = _Add(list(requests), loop, loop.create_future())
        with self._cond:
            self._check_open()
            if len(set(ids)) < len(ids) or any(request_id in self._routes for request_id in ids):
                raise RequestError("request_id", f"one of {ids} is already in flight; allowed: new ids")
            route = _Route(loop, queue)
            self._routes.update({request_id: route for request_id in ids})
            self._inbox.append(add)
            self._cond.notify()
        try:
            await add.accepted
        except BaseException:  # refused, or the submitter cancelled: nothing of the group stays
            self.abort(ids)
            raise
        return OutputStream(self, ids, queue)

    async def generate(
        self, request_id: str, prompt_tokens: list[int], params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """One request's outputs as the engine makes them; errors as `submit`. Leaving the loop early
        (or being cancelled) aborts the request."""
        with await self.submit([(request_id, prompt_tokens, params)]) as stream:
            async for output in stream:
                yield output

    def abort(self, request_ids: Sequence[str]) -> None:
        """Stop `request_ids` (unknown or finished ones are ignored): no more outputs are delivered,
        and the engine frees their blocks before its next step."""
        with self._cond:
            for request_id in request_ids:
                self._routes.pop(request_id, None)
            self._inbox.append(_Abort(list(request_ids)))
            self._cond.notify()

    def pause(self) -> None:
        """Hold the engine between steps: requests are still taken (and refused when the queue is
        full) and aborts still free blocks, but nothing runs until `resume` (maintenance; tests)."""
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify()

    def stats(self) -> EngineStats:
        """The engine's counters as of its last step (or command)."""
        with self._cond:
            return dataclasses.replace(self._stats)

    def tokens_per_s(self) -> float:
        """Generated tokens per second over the last TOKEN_RATE_WINDOW_S seconds."""
        with self._cond:
            return self._rate.per_s(time.monotonic())

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished or aborted."""
        with self._cond:
            return len(self._routes)

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def failure(self) -> EngineFailed | None:
        return self._failure

    async def drain(self, poll_s: float = 0.02) -> None:
        """Refuse new requests (`EngineUnavailable`) and return once every request in flight has
        finished: the first half of a graceful shutdown (a paused engine drains once resumed)."""
        with self._cond:
            self._draining = True
        while self.in_flight and self._failure is None:
            await asyncio.sleep(poll_s)

    def stop(self) -> None:
        """Stop the thread after its current step; requests still in flight fail with
        `EngineUnavailable`."""
        with self._cond:
            self._stopping = True
            self._draining = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join()
        self._fail_everything(EngineUnavailable("the server stopped before the request finished"))

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._draining:
            raise EngineUnavailable("the server is shutting down and takes no new requests")

    # --- the engine thread's side ---

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                self._loop()
        except BaseException as err:  # noqa: BLE001 -- a bug in the engine: fail loudly, never hang
            traceback.print_exc()
            self._fail_everything(
                EngineFailed(f"the engine stopped: {type(err).__name__}: {first_line(err)}")
            )

    def _loop(self) -> None:
        busy = False
        while True:
            with self._cond:
                while not (self._inbox or self._stopping or (busy and not self._paused)):
                    self._cond.wait()
                if self._stopping:
                    return
                inbox, self._inbox = self._inbox, []
                paused = self._paused
            for command in inbox:
                self._apply(command)
            if not paused and self._engine.has_work:
                self._deliver(self._engine.step())
            busy = self._engine.has_work
            self._publish()

    def _apply(self, command: _Add | _Abort) -> None:
        if isinstance(command, _Abort):
            for request_id in command.request_ids:
                self._engine.abort(request_id)
            return
        try:
            self._add(command.requests)
        except (RequestError, EngineFull) as err:
            command.settle(err)
        except BaseException as err:
            command.settle(EngineFailed(f"the engine stopped: {type(err).__name__}: {first_line(err)}"))
            raise
        else:
            command.settle(None)

    def _add(self, requests: list[Submission]) -> None:
        """Every request of the group into the engine, or none (those added are aborted again)."""
        waiting = self._engine.stats().waiting
        if waiting + len(requests) > self.max_waiting:
            raise EngineFull(
                f"{waiting} requests are waiting and {len(requests)} more would pass --max-waiting "
                f"{self.max_waiting}; retry later"
            )
        added = []
        try:
            for request_id, prompt_tokens, params in requests:
                self._engine.add_request(request_id, prompt_tokens, params)
                added.append(request_id)
        except RequestError:
            for request_id in added:
                self._engine.abort(request_id)
            raise

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs to their queues: one wake-up of each event loop per step, not per output."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        with self._cond:
            for output in outputs:
                route = self._routes.get(output.request_id)
                if route is None:  # aborted meanwhile
                    continue
                if output.finished:
                    del self._routes[output.request_id]
                by_loop.setdefault(route.loop, []).append((route.queue, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    def _publish(self) -> None:
        stats = self._engine.stats()
        with self._cond:
            self._stats = dataclasses.replace(stats)
            self._rate.record(time.monotonic(), stats.generated_tokens)

    def _fail_everything(self, error: MoeforgeError) -> None:
        """`error` to every request in flight and every submission not yet taken; later submissions
        raise it too when it is an `EngineFailed`."""
        with self._cond:
            if isinstance(error, EngineFailed):
                self._failure = error
            routes, self._routes = self._routes, {}
            inbox, self._inbox = self._inbox, []
        for add in (command for command in inbox if isinstance(command, _Add)):
            add.settle(error)
        for route in {id(route): route for route in routes.values()}.values():
            route.send(error)


class OutputStream:
    """The outputs of requests submitted together, in the order the engine makes them. Closing it
    (leaving its `with` block) aborts the requests not finished, so a consumer that goes away frees
    their cache blocks; an `EngineFailed` or `EngineUnavailable` arrives as an exception."""

    def __init__(self, engine: AsyncEngine, request_ids: list[str], queue: asyncio.Queue) -> None:
        self._engine = engine
        self._queue = queue
        self._arrived: deque[RequestOutput | BaseException] = deque()
        self._unfinished = dict.fromkeys(request_ids)

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> RequestOutput:
        """The next output; the outputs of one request that queued up while the consumer was busy
        come merged into one (one event for the client instead of several in a burst)."""
        while self._unfinished:
            item = await self._next_arrived()
            if isinstance(item, BaseException):
                self._unfinished.clear()  # nothing more will come
                raise item
            if item.request_id not in self._unfinished:  # aborted by the consumer, output already sent
                continue
            while not item.finished and self._arrived and _same_request(self._arrived[0], item):
                item = merged(item, self._arrived.popleft())
            if item.finished:
                del self._unfinished[item.request_id]
            return item
        raise StopAsyncIteration

    async def _next_arrived(self) -> RequestOutput | BaseException:
        if not self._arrived:
            self._arrived.append(await self._queue.get())
        while not self._queue.empty():
            self._arrived.append(self._queue.get_nowait())
        return self._arrived.popleft()

    def abort(self, request_id: str) -> None:
        """Stop one request of the group (its answer is complete, e.g. at a stop string)."""
        if request_id in self._unfinished:
            del self._unfinished[request_id]
            self._engine.abort([request_id])

    def close(self) -> None:
        if self._unfinished:
            self._engine.abort(list(self._unfinished))
            self._unfinished.clear()

    def __enter__(self) -> OutputStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _same_request(item: RequestOutput | BaseException, output: RequestOutput) -> bool:
    return isinstance(item, RequestOutput) and item.request_id == output.request_id


def merged(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """Two consecutive outputs of one request as one: the tokens and log-probabilities of both, the
    prompt's log-probabilities (sent once, with the first) and the second's finish reason."""
    logprobs = None if first.logprobs is None else first.logprobs + (then.logprobs or [])
    return RequestOutput(
        first.request_id,
        first.new_tokens + then.new_tokens,
        logprobs,
        first.prompt_logprobs if first.prompt_logprobs is not None else then.prompt_logprobs,
        then.finish_reason,
    )


class _TokenRate:
    """Tokens per second from (time, cumulative tokens) samples of the last `window_s` seconds."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._samples: deque[tuple[float, int]] = deque()

    def record(self, now: float, total: int) -> None:
        self._samples.append((now, total))
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window_s:
            self._samples.popleft()

    def per_s(self, now: float) -> float:
        if len(self._samples) < 2:
            return 0.0
        (start, first), (_, last) = self._samples[0], self._samples[-1]
        return (last - first) / max(now - start, 1e-9)
