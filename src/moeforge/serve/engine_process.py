"""The engine in a process of its own (`serve --engine-process`), so that its forwards and the HTTP
server's event loop run at the same time instead of taking turns.

In one process the engine's thread and the event loop share one interpreter lock: a torch forward
holds it for most of a step, so every server-sent event waits for a step to yield, and every step for
the events being written. With the engine in a child process the event loop formats and writes the
last step's tokens while the child computes the next step (vLLM's V1 engine core is split out for the
same reason).

`RemoteEngine` is a `StepEngine` for `AsyncEngine`: each call (add a request, abort one, step) is a
message on a pipe to the child, which owns the real `Engine` and answers with the step's outputs and
its counters. Waiting for the answer releases the lock, so the event loop runs meanwhile. A request
the engine refuses comes back as the same one-line `RequestError`; a child that dies or fails makes
the next call raise, which `AsyncEngine` turns into a 500 for every request in flight.
"""

from __future__ import annotations

import multiprocessing
from collections import deque
import signal
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

from moeforge.errors import first_line
from moeforge.serve.requests import EngineConfig, EngineStats, RequestError, RequestOutput, SamplingParams


class EngineProcessFailed(RuntimeError):
    """The engine process stopped (crashed, or failed on an unexpected exception)."""


class RemoteEngine:
    """An `Engine` in a child process, behind the calls `AsyncEngine` makes (`StepEngine`)."""

    def __init__(self, checkpoint: Path, device: str, config: EngineConfig) -> None:
        context = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch state forked
        self._conn, child_conn = context.Pipe()
        self._process = context.Process(
            target=_engine_main,
            args=(child_conn, str(checkpoint), device, config),
            name="moeforge-engine",
            daemon=True,
        )
        self._process.start()
        child_conn.close()
        self.config = config
        ready = self._next("ready")  # the model loaded (and its step compiled): its limits
        self.max_seq_len: int = ready["max_seq_len"]
        self.lookahead: int = ready["lookahead"]
        self._stats: EngineStats = ready["stats"]
        self._has_work = False
        self._step_asked = False
        self._early_steps: deque[dict] = deque()  # step answers that came before an awaited "added"

    def add_request(self, request_id: str, prompt_tokens: list[int], params: SamplingParams) -> None:
        self._send(("add", request_id, prompt_tokens, params))
        self._stats = self._next("added")["stats"]
        self._has_work = True

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))  # no answer: the child applies it before its next step

    def step(self) -> list[RequestOutput]:
        """The next step's outputs. The child is asked for the step after it before these are
        returned, so that it computes while they are delivered and written (a paused `AsyncEngine`
        stops asking: at most that one step runs ahead)."""
        if not self._step_asked:
            self._send(("step",))
        answer = self._next("stepped")
        self._stats, self._has_work = answer["stats"], answer["has_work"]
        self._step_asked = self._has_work
        if self._step_asked:
            self._send(("step",))
        return answer["outputs"]

    @property
    def has_work(self) -> bool:
        return self._has_work

    def stats(self) -> EngineStats:
        return self._stats

    def close(self) -> None:
        """Stop the child and wait for it (killed after 30 s); the pipe is closed after it exits, so
        that a step it was asked for ahead can still be sent."""
        try:
            self._conn.send(("stop",))
        except (BrokenPipeError, OSError):
            pass
        self._process.join(timeout=30)
        if self._process.is_alive():
            self._process.kill()
            self._process.join()
        self._conn.close()

    def _send(self, call: tuple) -> None:
        try:
            self._conn.send(call)
        except (BrokenPipeError, OSError):
            raise self._exited() from None

    def _exited(self) -> EngineProcessFailed:
        return EngineProcessFailed(f"the engine process exited (code {self._process.exitcode})")

    def _next(self, kind: str) -> dict:
        """The payload of the next answer of `kind`; step answers that arrive first are kept."""
        if kind == "stepped" and self._early_steps:
            return self._early_steps.popleft()
        while True:
            try:
                got, payload = self._conn.recv()
            except (EOFError, OSError):
                raise EngineProcessFailed(
                    f"the engine process exited (code {self._process.exitcode})"
                ) from None
            if got == kind:
                return payload
            if got == "stepped":
                self._early_steps.append(payload)
            elif got == "request_error":
                raise payload
            elif got == "failed":
                raise EngineProcessFailed(f"the engine process failed: {payload}")


def _engine_main(conn: Connection, checkpoint: str, device: str, config: EngineConfig) -> None:
    """The child: load the model, build the engine, then answer the parent's calls until told to stop
    or its pipe closes. Signals are the parent's to handle (it drains, then stops this process)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        from moeforge.infer import load_model
        from moeforge.serve.engine import Engine

        loaded = load_model(checkpoint, device)
        try:
            engine = Engine(loaded.model, config, loaded.tokenizer.eos_id)
        except RequestError as err:
            conn.send(("request_error", err))
            return
        conn.send(
            (
                "ready",
                {"max_seq_len": engine.max_seq_len, "lookahead": engine.lookahead, "stats": engine.stats()},
            )
        )
        _serve_calls(conn, engine)
    except BaseException as err:  # noqa: BLE001 -- report, never leave the parent waiting
        traceback.print_exc()
        try:
            conn.send(("failed", f"{type(err).__name__}: {first_line(err)}"))
        except (BrokenPipeError, OSError):
            pass


def _serve_calls(conn: Connection, engine) -> None:
    while True:
        try:
            call = conn.recv()
        except EOFError:  # the parent is gone
            return
        kind = call[0]
        if kind == "stop":
            return
        if kind == "abort":
            engine.abort(call[1])
        elif kind == "add":
            try:
                engine.add_request(*call[1:])
            except RequestError as err:
                conn.send(("request_error", err))
                continue
            conn.send(("added", {"stats": engine.stats()}))
        elif kind == "step":
            outputs = engine.step()
            conn.send(("stepped", {"outputs": outputs, "stats": engine.stats(), "has_work": engine.has_work}))
