"""What both generation endpoints do between parsing a body and shaping the answer: check the model
name, turn the body's fields into `SamplingParams`, submit the `n` choices to the engine together,
then either collect every output (while watching for the client to leave) or stream them as
server-sent events. The endpoint modules (completions.py, chat.py) only say how prompts are made and
how a chunk or a response looks.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse

from moeforge.data.tokenizer import Tokenizer
from moeforge.serve.api_errors import APIError, api_error, bad_field
from moeforge.serve.async_engine import AsyncEngine, EngineFailed, EngineUnavailable, OutputStream, Submission
from moeforge.serve.chat_template import ChatTemplate
from moeforge.serve.choice import ChoiceState, Delta
from moeforge.serve.protocol import GenerationFields
from moeforge.serve.requests import EngineConfig, EngineFull, RequestError, RequestOutput, SamplingParams

DONE = "data: [DONE]\n\n"
ENGINE_ERRORS = (EngineFailed, EngineUnavailable)
"""what an output stream may raise while it runs"""


@dataclass
class Served:
    """The model behind the API and what the handlers need to know of it."""

    engine: AsyncEngine
    tokenizer: Tokenizer
    model_name: str
    max_context: int
    """prompt + generated tokens one request may hold (`request_capacity`)"""
    chat_template: ChatTemplate
    created: int = field(default_factory=lambda: int(time.time()))
    """when the server started (the model card's `created`)"""


class EngineLimits(Protocol):
    """What `request_capacity` reads of an engine (`Engine`, or `RemoteEngine` in front of one)."""

    config: EngineConfig

    @property
    def max_seq_len(self) -> int: ...

    @property
    def lookahead(self) -> int: ...


def request_capacity(engine: EngineLimits) -> int:
    """The most positions (prompt + generated tokens) one request may take: the model's context, or
    the whole cache when that is smaller, less the drafts speculation verifies past the end."""
    config = engine.config
    return min(engine.max_seq_len, config.cache_blocks * config.block_size) - engine.lookahead


@dataclass
class Answer:
    """One API request in flight: its id, its choices (one per engine request) and their prompts."""

    id: str
    choices: list[ChoiceState]
    prompts: list[list[int]]
    submissions: list[Submission]
    rename: dict[str, str] = field(default_factory=dict)
    """engine field -> the body's field, for errors"""
    created: int = field(default_factory=lambda: int(time.time()))

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(c.generated for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def check_model(served: Served, name: str | None) -> None:
    if name is not None and name != served.model_name:
        raise APIError(
            404,
            f"model: {name!r} is not served here; allowed: {served.model_name!r}",
            param="model",
            code="model_not_found",
        )


def end_ids(served: Served, body: GenerationFields) -> tuple[int, ...]:
    """Tokens that end an answer without being part of its text: the end-of-text token, unless ignored."""
    eos = served.tokenizer.eos_id
    return () if body.ignore_eos or eos is None else (eos,)


def sampling_params(
    served: Served,
    body: GenerationFields,
    choice: int,
    max_tokens: int,
    logprobs: int | None,
    prompt_logprobs: bool = False,
    rename: dict[str, str] | None = None,
) -> SamplingParams:
    """The engine's parameters for choice `choice` (0..n-1) of `body`: its seed is `seed + choice`, so
    that the n choices differ and each is reproducible. Ranges are checked by `SamplingParams`; a
    value out of range is a 400 naming the body's field (`rename`: engine name -> body name)."""
    vocab = served.tokenizer.vocab_size
    if body.top_k is not None and body.top_k > vocab:
        raise bad_field(
            "top_k", f"got {body.top_k}; allowed: 0 to the vocabulary size {vocab} (0 = every token)"
        )
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=body.top_k or 0,
            seed=None if body.seed is None else body.seed + choice,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            ignore_eos=body.ignore_eos,
        )
    except RequestError as err:
        raise api_error(err, rename) from None


def check_tokens(served: Served, tokens: Sequence[int], field_name: str) -> list[int]:
    """Token ids a client sent: each in the vocabulary, at least one."""
    if not tokens:
        raise bad_field(field_name, "empty; allowed: at least one token")
    vocab = served.tokenizer.vocab_size
    bad = next((t for t in tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise bad_field(field_name, f"token id {bad}; allowed: 0 to {vocab - 1}")
    return list(tokens)


async def submit(served: Served, answer: Answer) -> OutputStream:
    """Every choice into the engine at once, or an `APIError` (400 naming the field, 429, 503, 500)."""
    limit = served.engine.max_waiting
    if len(answer.submissions) > limit:  # a 429 would never clear
        raise bad_field(
            "n", f"{len(answer.submissions)} choices (prompts x n); allowed: at most --max-waiting {limit}"
        )
    try:
        return await served.engine.submit(answer.submissions)
    except (RequestError, EngineFull, *ENGINE_ERRORS) as err:
        raise api_error(err, answer.rename) from None


def _advance(
    stream: OutputStream, by_id: dict[str, ChoiceState], output: RequestOutput
) -> tuple[ChoiceState, Delta]:
    """`output` into its choice; a choice that reached a stop string is aborted in the engine."""
    choice = by_id[output.request_id]
    delta = choice.update(output)
    if delta.stop_string:
        stream.abort(choice.request_id)
    return choice, delta


async def collect(request: Request, answer: Answer, stream: OutputStream) -> None:
    """Run every choice to its end; a client that disconnects meanwhile aborts them all (their cache
    blocks are freed at once, not when the answer nobody reads is complete)."""
    by_id = {c.request_id: c for c in answer.choices}

    async def run() -> None:
        with stream:
            async for output in stream:
                _advance(stream, by_id, output)

    work = asyncio.ensure_future(run())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()  # its stream closes: the engine aborts the requests
            await asyncio.wait({work})
    if work.cancelled():
        raise APIError(499, "the client closed the connection", kind="client_closed")
    try:
        work.result()
    except ENGINE_ERRORS as err:
        raise api_error(err) from None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
"""no proxy may hold events back (X-Accel-Buffering: nginx)"""


class EventStream(StreamingResponse):
    """Server-sent events whose requests are aborted however the response ends: done, client gone
    (Starlette cancels the body), or cancelled before its first event (when the body generator never
    started and so never reached its own cleanup)."""

    def __init__(self, events: AsyncIterator[str], stream: OutputStream) -> None:
        super().__init__(events, media_type="text/event-stream", headers=SSE_HEADERS)
        self._stream = stream

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._stream.close()


def event_stream(
    answer: Answer,
    stream: OutputStream,
    opening: list[dict],
    chunk: Callable[[ChoiceState, Delta], dict | None],
    closing: Callable[[], list[dict]],
) -> EventStream:
    """The streamed answer: `opening`, a chunk per output that says something (`chunk` returns None
    for one that does not), `closing()`, then `[DONE]`."""
    return EventStream(_events(answer, stream, opening, chunk, closing), stream)


async def _events(
    answer: Answer,
    stream: OutputStream,
    opening: list[dict],
    chunk: Callable[[ChoiceState, Delta], dict | None],
    closing: Callable[[], list[dict]],
) -> AsyncIterator[str]:
    """An engine failure mid-stream is an error event (the 200 is already sent). A client that
    disconnects cancels this generator, which closes the stream: its requests are aborted."""
    by_id = {c.request_id: c for c in answer.choices}
    try:
        with stream:
            for body in opening:
                yield _event(body)
            async for output in stream:
                body = chunk(*_advance(stream, by_id, output))
                if body is not None:
                    yield _event(body)
            for body in closing():
                yield _event(body)
    except ENGINE_ERRORS as err:
        yield api_error(err).event()
    yield DONE


def _event(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
