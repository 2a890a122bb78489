"""Faults: a worker killed under torchrun is survived by a restart that resumes from the newest
checkpoint, with one line from the survivor; a stalled peer is an error within parallel.timeout-s."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.multiprocessing import ProcessRaisedException

from conftest import SMALL
from moeforge.cli.arguments import parse_overrides
from moeforge.config import load_config
from moeforge.diloco.exchange import receive, start_exchange
from moeforge.diloco.wire import WireFormat
from moeforge.parallel.process_group import agree_on_generation, peer_failure
from moeforge.parallel.spawn import free_port, run_on_processes
from moeforge.run import read_metrics
from moeforge.train.trainer import Trainer

STEPS, CHECKPOINT_EVERY = 40, 10
EP = ("--parallel.ep", "2")
LAYOUTS = {
    "ep 2": EP,
    "pp 2": ("--parallel.pp", "2", "--train.micro-batch-size", "2"),
    # an exchange is in flight at the checkpoint of step 10 (fragment 0 sent at step 8 lands at 11)
    "diloco 2": ("--diloco.replicas", "2", "--diloco.sync-every", "4", "--diloco.fragments", "2",
                 "--diloco.overlap-steps", "3"),
}  # fmt: skip


def train_flags(layout: tuple[str, ...]) -> list[str]:
    """`moeforge train`'s options of these runs."""
    flags = [part for key, value in SMALL.items() for part in (f"--{key}", value)]
    return [*flags, *layout, "--train.steps", str(STEPS), "--train.checkpoint-every", str(CHECKPOINT_EVERY)]


def torchrun_train(out: Path, max_restarts: int, layout: tuple[str, ...] = EP) -> list[str]:
    """The fault-tolerant launch of the README: c10d rendezvous on a free port, --max-restarts."""
    return [
        sys.executable, "-m", "torch.distributed.run", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
        "--nnodes", "1", "--nproc-per-node", "2", "--max-restarts", str(max_restarts),
        "-m", "moeforge", "train", "--out", str(out), *train_flags(layout),
    ]  # fmt: skip


def train_uninterrupted(rank: int, out: str, layout: tuple[str, ...]) -> None:
    """One rank of the same training as `torchrun_train`'s, on workers forked from the warm server (no
    launcher, no restart, no interpreter to start): what `moeforge train` runs, with the same options
    and one thread a rank, as torchrun gives its workers."""
    cfg = load_config(overrides=parse_overrides(train_flags(layout)), world_size=2)
    Trainer(cfg, Path(out)).fit()


def launch(out: Path, max_restarts: int, layout: tuple[str, ...] = EP) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        torchrun_train(out, max_restarts, layout),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 240) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, (
            f"the run ended before {path} appeared:\n{process.communicate()[1][-3000:]}"
        )
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout_s} s"
        time.sleep(0.02)


def worker_pid(launcher: subprocess.Popen, rank: int) -> int:
    """The pid of the torchrun worker with RANK=`rank` (a child of the launcher)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            environ = (entry / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if parent == launcher.pid and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {launcher.pid}")


def losses(run_dir: Path) -> list[float]:
    return [record["loss"] for record in read_metrics(run_dir)]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_killed_worker_is_restarted_and_the_run_ends_like_an_uninterrupted_one(tmp_path, layout):
    run_on_processes(2, train_uninterrupted, str(tmp_path / "reference"), LAYOUTS[layout])
    run = launch(tmp_path / "run", max_restarts=1, layout=LAYOUTS[layout])
    wait_for(tmp_path / "run" / "checkpoints" / f"step_{CHECKPOINT_EVERY:06d}", run)
    os.kill(worker_pid(run, rank=1), signal.SIGKILL)
    out, err = run.communicate(timeout=300)

    assert run.returncode == 0, err[-3000:]
    assert "resumed from step" in out + err
    survivor_lines = [
        line for line in err.splitlines() if line.startswith("moeforge train: rank 0: error: lost")
    ]
    assert len(survivor_lines) == 1, err[-3000:]
    assert "Traceback" not in err.split("resumed from step")[0].replace("torch.distributed.elastic", "")
    # metrics.jsonl is cut back to the checkpoint on resume: every step equals the uninterrupted run
    assert losses(tmp_path / "run") == losses(tmp_path / "reference")
    assert len(losses(tmp_path / "run")) == STEPS


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds torchrun's workers through /proc")
def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step_with_a_checkpoint(tmp_path):
    run = launch(tmp_path / "run", max_restarts=0)
    wait_for(tmp_path / "run" / "checkpoints" / f"step_{CHECKPOINT_EVERY:06d}", run)
    os.kill(worker_pid(run, rank=1), signal.SIGTERM)
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    saved = [line for line in out.splitlines() if ": saved " in line]
    assert len(saved) == 2 and any(line.startswith("SIGTERM: saved") for line in saved), (
        out
    )  # one line a rank
    step = int(saved[0].rsplit("at step ", 1)[1].split(";")[0])
    assert CHECKPOINT_EVERY <= step < STEPS
    assert f"step_{step:06d}" in saved[0] and f"step_{step:06d}" in saved[1]  # both ranks, the same step
    assert [record["step"] for record in read_metrics(tmp_path / "run")][-1] == step


@pytest.mark.slow
def test_a_user_error_under_torchrun_is_one_line_per_rank(tmp_path):
    """Rank 1 starts 3 s after rank 0 (`late_rank_one`): rank 0 finds the mistake first and waits for
    its peer to report it too, so torchrun does not stop rank 1 before its line (it did under load)."""
    command = torchrun_train(tmp_path / "run", max_restarts=0) + ["--model.moe.top-k", "99"]
    command[command.index("moeforge")] = "late_rank_one"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("moeforge train: rank ")]
    assert sorted(line.split(":")[1] for line in ours) == [" rank 0", " rank 1"], result.stderr[-3000:]
    assert all("error: model.moe.top-k: got 99; allowed: " in line for line in ours)


TIMEOUT_S = 2.0


def all_reduce_while_rank_1_stalls(rank: int) -> None:
    if rank == 1:
        time.sleep(60)  # stops answering (the parent ends it once rank 0 has failed)
    started = time.monotonic()
    try:
        dist.all_reduce(torch.ones(4))
    except RuntimeError as err:
        raise AssertionError(
            f"failed after {time.monotonic() - started:.1f} s: {peer_failure(err, TIMEOUT_S)}"
        )
    raise AssertionError("the all-reduce finished without rank 1")


def test_a_stalled_peer_is_an_error_within_the_timeout_not_a_hang():
    started = time.monotonic()
    with pytest.raises(
        ProcessRaisedException, match="a peer did not answer within parallel.timeout-s=2"
    ) as raised:
        run_on_processes(2, all_reduce_while_rank_1_stalls, timeout_s=TIMEOUT_S)
    waited = float(re.search(r"failed after ([\d.]+) s", str(raised.value))[1])
    assert TIMEOUT_S * 0.9 <= waited < TIMEOUT_S * 5
    assert time.monotonic() - started < 50  # well before the stalled rank would have woken up


def diloco_exchange_while_rank_1_stalls(rank: int) -> None:
    """Rank 0 sends a DiLoCo exchange and computes while it is in flight; its peer never answers, so
    gloo's timeout closes the connection in the background and the next collective finds it closed."""
    if rank == 1:
        time.sleep(60)
    exchange, _ = start_exchange(0, 4, 5, torch.ones(64), torch.zeros(4), WireFormat("none"), dist.group.WORLD)
    time.sleep(TIMEOUT_S * 2)  # the inner steps between the send and the landing
    with pytest.raises(RuntimeError) as first:
        receive(exchange, WireFormat("none"))
    with pytest.raises(RuntimeError) as second:
        dist.all_reduce(torch.ones(4))
    lines = [peer_failure(err.value) for err in (first, second)]
    raise AssertionError(" | ".join(str(line) for line in lines))


def test_a_stalled_diloco_peer_is_one_line_naming_the_timeout():
    """Both failures, the exchange's own and the next collective's ('Application timeout caused pair
    closure', which has no source path), are the one line the command line prints for a lost peer."""
    with pytest.raises(ProcessRaisedException) as raised:
        run_on_processes(2, diloco_exchange_while_rank_1_stalls, timeout_s=TIMEOUT_S)
    message = str(raised.value).strip().splitlines()[-1]
    lines = message.removeprefix("AssertionError: ").split(" | ")
    assert len(lines) == 2 and all(
        line.startswith("a peer did not answer within parallel.timeout-s=2: it hangs or is gone (") for line in lines
    ), message
    assert lines[1].endswith("(Application timeout caused pair closure)")


def test_the_first_rendezvous_waits_no_longer_than_the_timeout():
    store = dist.TCPStore(
        "127.0.0.1", free_port(), 2, is_master=True, timeout=timedelta(seconds=5), wait_for_workers=False
    )
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^rank 0: ranks 1 did not join within parallel.timeout-s=0.5$"):
        agree_on_generation(store, rank=0, world_size=2, timeout_s=0.5)
    assert time.monotonic() - started < 3
