"""Run the app under uvicorn until SIGTERM or Ctrl-C, and leave gracefully.

The first SIGTERM (or SIGINT) drains: new requests are answered 503 with `Retry-After` (so a load
balancer sends them elsewhere) and /health turns 503, while every request already taken runs to its
end and its answer is sent, streams included; then uvicorn closes its sockets and the process exits
0. A second signal stops at once (running requests get an error).

uvicorn's own handling would close the listening socket on the first signal (new clients get
"connection refused", not a 503) and re-raise the signal after a clean exit, so the process would
die of SIGTERM instead of exiting 0; `DrainingServer` replaces both.
"""

from __future__ import annotations

import asyncio
import errno
import socket
import sys
from types import FrameType

import uvicorn

from moeforge.errors import MoeforgeError, print_line
from moeforge.serve.async_engine import AsyncEngine


class ServeError(MoeforgeError):
    """The server cannot start: one line naming the flag."""


class DrainingServer(uvicorn.Server):
    """uvicorn's server, drained on the first signal; prints `serving NAME on http://HOST:PORT` once
    it listens (the port it got when asked for port 0)."""

    def __init__(
        self, config: uvicorn.Config, engine: AsyncEngine, model_name: str, drain_timeout_s: float | None = None
    ) -> None:
        super().__init__(config)
        self._engine = engine
        self._model_name = model_name
        self._drain_timeout_s = drain_timeout_s
        self._signalled = False
        self._drain: asyncio.Task | None = None
        self.port: int | None = None
        """the port it listens on, set once it does: what to wait for before connecting (uvicorn's
        `started` comes true a moment before)"""

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and not self.should_exit:
            self.port = self.servers[0].sockets[0].getsockname()[1]
            host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
            print_line(f"serving {self._model_name} on http://{host}:{self.port}", sys.stdout)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """From the signal handler: only flags (the event loop acts on them in `on_tick`)."""
        if self._signalled:
            self.should_exit = self.force_exit = True
        self._signalled = True

    async def on_tick(self, counter: int) -> bool:
        if self._signalled and self._drain is None:
            print_line("moeforge serve: draining (a second signal stops at once)")
            self._drain = asyncio.create_task(self._drain_then_exit())
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        """Wait for the requests in flight, at most `drain_timeout_s`; past it, stop as a second
        signal would (open connections closed, exit code 1), saying how many were cut."""
        try:
            await asyncio.wait_for(self._engine.drain(), self._drain_timeout_s)
        except TimeoutError:
            running = self._engine.in_flight
            print_line(
                f"moeforge serve: {running} request(s) still running after --drain-timeout "
                f"{self._drain_timeout_s:g} s: stopping without them"
            )
            self.force_exit = True
        self.should_exit = True


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or a one-line error naming the flag."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        flag = "--host" if isinstance(err, socket.gaierror) or err.errno == errno.EADDRNOTAVAIL else "--port"
        raise ServeError(f"{flag}: cannot listen on {host}:{port}: {err.strerror or err}") from None


def server_config(app, host: str, port: int) -> uvicorn.Config:
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="on")


def run_server(
    app, engine: AsyncEngine, model_name: str, host: str, port: int, drain_timeout_s: float | None = None
) -> int:
    """Serve `app` on host:port until drained; the exit code (0 after a drain, 1 when forced: a second
    signal, or requests still running after `drain_timeout_s`)."""
    sock = listen(host, port)
    server = DrainingServer(server_config(app, host, port), engine, model_name, drain_timeout_s)
    server.run(sockets=[sock])
    return 1 if server.force_exit else 0
