"""Run a function on N local processes joined in one gloo group, as torchrun would (env:// rendezvous
on loopback). For CPU benchmarks and tests of the distributed code; real runs use torchrun.

The processes come from a fork server that imported torch and moeforge once (where the platform has
one): a spawned interpreter spends seconds of CPU importing them, which on a small machine makes
the process start-ups a large part of the distributed tests' time, while a fork of the warm server
starts at once (docs/benchmarks/source-figures.md). The server only imports modules (no thread pool, no process group
exists in it), so forking it is safe. A forked child does not inherit the caller's *current*
environment, working directory, import path or standard output and error (the server keeps those
of its start), so they travel with each call and are restored first, as a spawned child would see
them (the output matters: a test capturing the caller's stderr must see the workers' lines).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import multiprocessing.reduction
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.multiprocessing as mp

from moeforge.config import ParallelConfig
from moeforge.parallel.process_group import init_distributed, leave_process_group


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


FORK_SERVER_PRELOAD = ("moeforge.train.trainer", "moeforge.parallel.spawn")
"""imported once by the fork server: everything a trainer, a benchmark or a test worker needs"""


class _InheritedFd:
    """A file descriptor of the caller that each child receives a duplicate of: pickled while
    multiprocessing starts a child, it becomes multiprocessing's own fd-passing wrapper."""

    def __init__(self, fd: int):
        self.fd = fd

    def __reduce__(self) -> tuple:
        return _ReceivedFd, (multiprocessing.reduction.DupFd(self.fd),)


class _ReceivedFd:
    def __init__(self, dup: object):
        self.dup = dup

    def install_as(self, target: int) -> None:
        """Make `target` (1 or 2) this descriptor, as the child's standard stream."""
        received = self.dup.detach()
        os.dup2(received, target)
        os.close(received)


class _CallerState(NamedTuple):
    """What a spawned child would have inherited from the caller at the time of the call."""

    environ: dict[str, str]
    cwd: str
    sys_path: list[str]
    stdout: _InheritedFd | None
    """the caller's descriptor 1 (a `_ReceivedFd` once in the child); None where the child inherits
    it anyway (a spawned child)"""
    stderr: _InheritedFd | None

    @classmethod
    def now(cls, forked_from_server: bool) -> _CallerState:
        streams = (_InheritedFd(1), _InheritedFd(2)) if forked_from_server else (None, None)
        return cls(dict(os.environ), os.getcwd(), list(sys.path), *streams)

    def restore(self) -> None:
        """In the child, before anything else runs."""
        os.environ.clear()
        os.environ.update(self.environ)
        os.chdir(self.cwd)
        sys.path[:] = self.sys_path
        if self.stdout is not None and self.stderr is not None:
            sys.stdout.flush()
            sys.stderr.flush()
            self.stdout.install_as(1)
            self.stderr.install_as(2)


def start_method() -> str:
    """'forkserver' with moeforge preloaded where the platform has it, else 'spawn'."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return "spawn"
    multiprocessing.set_forkserver_preload(list(FORK_SERVER_PRELOAD))  # used when the server starts
    return "forkserver"


def _entry(
    rank: int,
    world_size: int,
    port: int,
    threads: int,
    timeout_s: float,
    caller: _CallerState,
    fn: Callable,
    args: tuple,
) -> None:
    caller.restore()
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(threads)
    init_distributed("cpu", timeout_s)
    fn(rank, *args)  # an exception propagates: torch.multiprocessing reports it to the parent
    leave_process_group(0)


def run_on_processes(
    world_size: int, fn: Callable, *args, threads: int = 1, timeout_s: float = ParallelConfig.timeout_s
) -> None:
    """Call fn(rank, *args) on `world_size` spawned processes of `threads` threads each, every wait on a
    peer bounded by `timeout_s`; raises if any of them fails. `fn` must be importable (defined at
    module level)."""
    method = start_method()
    caller = _CallerState.now(forked_from_server=method == "forkserver")
    context = mp.start_processes(
        _entry,
        args=(world_size, free_port(), threads, timeout_s, caller, fn, args),
        nprocs=world_size,
        start_method=method,
        join=False,
    )
    _join_reporting_the_cause(context, grace_s=FAILURE_GRACE_S)


FAILURE_GRACE_S = 5.0
"""after one process fails, how long the others may take to end by themselves before they are killed"""


def _join_reporting_the_cause(context: mp.ProcessContext, grace_s: float) -> None:
    """Wait for every process; when one fails, give the others `grace_s` to end by themselves (a peer
    of a dead rank gets a connection reset at once), kill those still running, then raise as torch's
    join does, naming the process that failed first in cause: one that died without raising (killed,
    `os._exit`) before one that raised, which usually only lost that peer. torch's own join names
    whichever failed process it looks at first, so under load a killed rank was reported as its
    peer's "connection reset"."""
    deadline = None
    while any(process.is_alive() for process in context.processes):
        failed = any(process.exitcode not in (None, 0) for process in context.processes)
        if failed and deadline is None:
            deadline = time.monotonic() + grace_s
        if deadline is not None and time.monotonic() > deadline:
            break
        multiprocessing.connection.wait([p.sentinel for p in context.processes if p.is_alive()], timeout=0.5)
    failed = [i for i, process in enumerate(context.processes) if process.exitcode not in (None, 0)]
    if not failed:
        context.join()
        return
    raised = [i for i in failed if os.access(context.error_files[i], os.R_OK)]
    cause = next((i for i in failed if i not in raised), failed[0])
    for process in context.processes:  # those still running after the grace: stopped
        if process.is_alive():
            process.kill()
        process.join()
    _raise_failure(context, cause)


def _raise_failure(context: mp.ProcessContext, index: int) -> None:
    """torch's exception for process `index`: its traceback when it raised, else its exit."""
    process = context.processes[index]
    if os.access(context.error_files[index], os.R_OK):
        with open(context.error_files[index], "rb") as stream:
            trace = pickle.load(stream)
        raise mp.ProcessRaisedException(
            f"\n\n-- Process {index:d} terminated with the following error:\n{trace}", index, process.pid
        )
    code = process.exitcode
    if code < 0:
        name = signal.Signals(-code).name
        raise mp.ProcessExitedException(
            f"process {index:d} terminated with signal {name}", index, process.pid, code, name
        )
    raise mp.ProcessExitedException(f"process {index:d} terminated with exit code {code:d}", index, process.pid, code)
