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


STEPS_AHEAD = 1
"""steps the child is asked for beyond the one whose outputs are being delivered"""


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
        self._stats, self._has_work = EngineStats(), False  # as of the child's answer received last
        self._steps_outstanding = 0  # steps asked for whose answers have not arrived
        self._early_steps: deque[dict] = deque()  # step answers that came before an awaited "added"
        ready = self._next("ready")  # the model loaded (and its step compiled): its limits
        self.max_seq_len: int = ready["max_seq_len"]
        self.lookahead: int = ready["lookahead"]

    def add_request(self, request_id: str, prompt_tokens: list[int], params: SamplingParams) -> None:
        self._send(("add", request_id, prompt_tokens, params))
        self._next("added")

    def abort(self, request_id: str) -> None:
        self._send(("abort", request_id))  # no answer: the child applies it before its next step

    def step(self) -> list[RequestOutput]:
        """The next step's outputs. While the child has work it is asked for the steps after this
        one (`STEPS_AHEAD`) before these outputs are returned, so that it computes while they are
        delivered and written; a paused `AsyncEngine` stops asking."""
        if not self._early_steps and self._steps_outstanding == 0:
            self._ask_step()
        outputs = self._next("stepped")["outputs"]
        while self._has_work and self._steps_outstanding < STEPS_AHEAD:
            self._ask_step()
        return outputs

    def _ask_step(self) -> None:
        self._send(("step",))
        self._steps_outstanding += 1

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
            if isinstance(payload, dict) and "stats" in payload:
                # the child answers in the order it works, so the answer received last tells its
                # state now (an answer kept for later must not overwrite it)
                self._stats, self._has_work = payload["stats"], payload["has_work"]
            if got == "stepped":
                self._steps_outstanding -= 1
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
        limits = {"max_seq_len": engine.max_seq_len, "lookahead": engine.lookahead}
        conn.send(("ready", {**limits, "stats": engine.stats(), "has_work": engine.has_work}))
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
            conn.send(("added", {"stats": engine.stats(), "has_work": engine.has_work}))
        elif kind == "step":
            outputs = engine.step()
            conn.send(("stepped", {"outputs": outputs, "stats": engine.stats(), "has_work": engine.has_work}))
