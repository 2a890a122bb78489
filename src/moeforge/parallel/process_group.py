"""Joining and leaving the group of processes: the two moments where a distributed run is most
fragile, made deterministic.

Joining (`init_distributed`). torchrun's agent keeps one TCPStore for the whole job, across
restarts, so a restarted group that reads the keys of the attempt before it connects to dead
addresses (gloo: connection refused, or a silent hang in `init_process_group`). Each attempt
therefore works under a key prefix of its own: a generation number that rank 0 draws from the
store and hands to every other rank (`agree_on_generation`). Per-node restart counts would not do:
each node's agent counts its own restarts. Every wait, the first rendezvous included, is bounded by
the timeout.

Leaving (`leave_process_group`). torch keeps process groups alive after `destroy_process_group()`
(DTensor's sharding cache holds DeviceMeshes, and a DeviceMesh holds its groups), so gloo's worker
threads live on into interpreter shutdown. A worker that drops the last reference to a finished
collective frees Python-owned tensors, which needs the GIL; during finalisation that ends in
`std::terminate`, a SIGABRT after a run that succeeded. A process that joined therefore leaves
without finalising: a barrier (no peer still waits on it), destroy, flush, `os._exit`; and the rank
that may host the store (rank 0 outside torchrun) goes last, once every other rank has left it.
"""

from __future__ import annotations

import os
import re
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from moeforge.config import ParallelConfig
from moeforge.errors import RunFailure, print_line

_POLL_S = 0.005


@dataclass(frozen=True)
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched_distributed() -> bool:
    """True under torchrun (or any launcher setting WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str, timeout_s: float = ParallelConfig.timeout_s) -> World:
    """Join the process group the environment describes (torchrun's, or `spawn`'s): NCCL on CUDA,
    gloo on CPU, under this attempt's own key prefix, every wait bounded by `timeout_s`."""
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
        store.set_timeout(timeout)
        generation = agree_on_generation(store, rank, world_size, timeout_s)
        backend = "nccl" if device_type == "cuda" else "gloo"
        attempt_store = dist.PrefixStore(f"moeforge/generation_{generation}/", store)
        dist.init_process_group(
            backend, store=attempt_store, rank=rank, world_size=world_size, timeout=timeout
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def agree_on_generation(store: dist.Store, rank: int, world_size: int, timeout_s: float) -> int:
    """A number every rank of this attempt agrees on and no earlier attempt on `store` used.

    Each rank other than 0 announces itself under a nonce of its own and waits for rank 0's answer
    to that nonce; rank 0 draws the next generation and answers every announcement it finds until
    each rank has acknowledged its answer. An announcement left by a process of an earlier attempt
    (all of them are dead when torchrun starts the next) is either acknowledged already, and then
    not answered, or answered but never acknowledged: it cannot end the wait."""
    if rank != 0:
        nonce = uuid.uuid4().hex
        store.set(f"moeforge/hello/{rank}", nonce)
        store.wait([f"moeforge/welcome/{nonce}"], timedelta(seconds=timeout_s))
        generation = int(store.get(f"moeforge/welcome/{nonce}"))
        store.set(f"moeforge/ack/{nonce}", "1")
        return generation
    generation = store.add("moeforge/generation", 1)
    answered: dict[int, set[str]] = {peer: set() for peer in range(1, world_size)}
    """the nonces this rank 0 answered, per peer still to acknowledge one"""
    deadline = time.monotonic() + timeout_s
    while answered:
        for peer, nonces in list(answered.items()):
            if store.check([f"moeforge/hello/{peer}"]):
                nonce = store.get(f"moeforge/hello/{peer}").decode()
                if nonce not in nonces and not store.check([f"moeforge/ack/{nonce}"]):
                    store.set(f"moeforge/welcome/{nonce}", str(generation))
                    nonces.add(nonce)
            if any(store.check([f"moeforge/ack/{nonce}"]) for nonce in nonces):
                del answered[peer]
        if answered and time.monotonic() > deadline:
            missing = ", ".join(str(peer) for peer in sorted(answered))
            raise JoinTimeout(f"rank 0: ranks {missing} did not join within parallel.timeout-s={timeout_s:g}")
        time.sleep(_POLL_S if answered else 0)
    return generation


USER_ERROR_WAIT_S = 20.0
"""how long a rank that stops on a user error waits for its peers to report theirs"""


def wait_for_peers_to_report(timeout_s: float = USER_ERROR_WAIT_S) -> None:
    """Before a launched rank exits on a user error found before joining (a config mistake: every
    rank makes it alike): count itself in the launch's store and wait, at most `timeout_s`, until
    every rank has. torchrun SIGTERMs the other ranks as soon as one exits, so without this wait a
    rank still importing torch would be stopped before it printed its own one line. A rank whose
    peers never report (an error of its own) leaves after the timeout; no store to meet at, at once."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    launch = os.environ.get("TORCHELASTIC_RUN_ID", ""), os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    key = "moeforge/user_error/{}/{}".format(*launch)
    deadline = time.monotonic() + timeout_s
    try:
        store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
        reported = store.add(key, 1)
        while reported < world_size and time.monotonic() < deadline:
            time.sleep(10 * _POLL_S)
            reported = store.add(key, 0)
    except (RuntimeError, ValueError, OSError):  # no store to meet at: leave as before
        return


class JoinTimeout(RunFailure, TimeoutError):
    """Some ranks did not join within parallel.timeout-s: one line naming them."""


def leave_process_group(exit_code: int = 0) -> NoReturn:
    """End this process after a distributed run (module docstring: why not a normal exit).

    With `exit_code` 0 every rank first meets the others at a barrier, so that no peer still waits
    on it; a rank that fails leaves at once, and the launcher stops the rest."""
    store = dist.distributed_c10d._get_default_store()  # the store this process joined through
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if exit_code == 0:
        try:
            dist.barrier()
        except RuntimeError as err:
            print_line(f"rank {rank}: a peer left before the end of the run: {_first_line(err)}")
            exit_code = 1
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    if exit_code == 0:
        _leave_store_host_last(store, rank, world_size)
    os._exit(exit_code)


def _leave_store_host_last(store: dist.Store, rank: int, world_size: int) -> None:
    """Rank 0 may host the store the others still talk to: it waits until each of them has left."""
    left = store.add("moeforge/left", 1)
    if rank != 0:
        return
    deadline = time.monotonic() + store.timeout.total_seconds()
    while left < world_size and time.monotonic() < deadline:
        time.sleep(_POLL_S)
        left = store.add("moeforge/left", 0)


_PEER_ADDRESS = re.compile(r"\[([^\]]+)\]:(\d+)")


def peer_failure(err: BaseException, timeout_s: float | None = None) -> str | None:
    """What went wrong, in one line, when `err` comes from a peer that died, hung or cannot be
    reached (a collective or store operation failed); None for any other error, which is a bug and
    keeps its traceback. Gloo names the peer by its address, not its rank."""
    text = str(err)
    if not (isinstance(err, dist.DistError) or "gloo/transport" in text or _PAIR_CLOSED in text):
        return None
    address = _PEER_ADDRESS.search(text)
    peer = f"the peer at {address[1]}:{address[2]}" if address else "a peer"
    if "Timed out" in text or "timeout" in text.lower():
        timeout_s = timeout_s or _group_timeout_s()
        limit = f" within parallel.timeout-s={timeout_s:g}" if timeout_s else ""
        return f"{peer} did not answer{limit}: it hangs or is gone ({_reason(text)})"
    return f"lost {peer}: it died or cannot be reached ({_reason(text)})"


_PAIR_CLOSED = "Application timeout caused pair closure"
"""gloo's words, without its usual source path, for a collective on a connection that an earlier
operation's timeout closed (a DiLoCo exchange in flight whose peer stalled, then the next collective)"""


def _group_timeout_s() -> float | None:
    """The default process group's timeout (parallel.timeout-s when moeforge made the group), or None."""
    if not dist.is_initialized():
        return None
    try:
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        return backend.options._timeout.total_seconds()
    except (AttributeError, RuntimeError):  # another backend, or none for the CPU
        return None


def _reason(text: str) -> str:
    """'[.../pair.cc:537] Read error [127.0.0.1]:31643: Connection reset by peer. This is ...' ->
    'Read error: Connection reset by peer'."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    line = re.sub(r"^\[[^\]]*\]\s*", "", first)
    return _PEER_ADDRESS.sub("", line).replace(" :", ":").split(". ")[0].strip()


def _first_line(err: BaseException) -> str:
    return _reason(str(err)) or type(err).__name__
