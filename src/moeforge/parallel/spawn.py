"""Run a function on N local processes joined in one gloo group, as torchrun would (env:// rendezvous
on loopback). For CPU benchmarks and tests of the distributed code; real runs use torchrun."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import torch
import torch.multiprocessing as mp

from moeforge.config import ParallelConfig
from moeforge.parallel.process_group import init_distributed, leave_process_group


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(
    rank: int, world_size: int, port: int, threads: int, timeout_s: float, fn: Callable, args: tuple
) -> None:
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
    mp.start_processes(
        _entry,
        args=(world_size, free_port(), threads, timeout_s, fn, args),
        nprocs=world_size,
        start_method="spawn",
    )
