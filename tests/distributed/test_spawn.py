"""`run_on_processes`: workers forked from the preloaded server see what a spawned worker would: the
caller's environment, working directory and import path at the time of the call, and its stdout and
stderr (so that pytest's capture sees their lines)."""

import json
import os
import sys
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from moeforge.parallel import spawn
from moeforge.parallel.spawn import run_on_processes


def report(rank: int, out: str) -> None:
    Path(out, f"rank{rank}.json").write_text(
        json.dumps({"env": os.environ.get("MOEFORGE_SPAWN_PROBE"), "cwd": os.getcwd(), "path": sys.path})
    )
    print(f"rank {rank} says hello on stderr", file=sys.stderr, flush=True)


@pytest.mark.parametrize("method", ["forkserver", "spawn"])
def test_workers_see_the_callers_environment_directory_and_streams(tmp_path, monkeypatch, capfd, method):
    if method == "spawn":  # the fallback where the platform has no fork server
        monkeypatch.setattr(spawn, "start_method", lambda: "spawn")
    if method == "forkserver":  # the server starts here, before the caller's state below changes
        (tmp_path / "before").mkdir()
        run_on_processes(1, report, str(tmp_path / "before"))
    monkeypatch.setenv("MOEFORGE_SPAWN_PROBE", f"set just before the {method} call")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path / "extra"))
    run_on_processes(2, report, str(tmp_path))
    err = capfd.readouterr().err
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert seen["env"] == f"set just before the {method} call"
        assert seen["cwd"] == str(tmp_path)
        assert seen["path"][0] == str(tmp_path / "extra")
        assert f"rank {rank} says hello on stderr" in err


def rank_0_raises_then_rank_1_dies(rank: int) -> None:
    """Rank 0 raises at once (as a peer of a dead rank does on its next collective); rank 1 dies a
    second later without raising (a kill, a hard crash): the cause, though it ends last."""
    if rank == 0:
        raise RuntimeError("Connection reset by peer (stand-in)")
    time.sleep(1)
    os._exit(17)


def test_a_failure_names_the_rank_that_died_not_the_peer_that_lost_it():
    """torch's own join reported whichever failed process it saw first: under load a killed rank's
    peer, and its 'connection reset', instead of the kill (a CI failure of the checkpoint tests)."""
    with pytest.raises(mp.ProcessExitedException) as raised:
        run_on_processes(2, rank_0_raises_then_rank_1_dies)
    assert (raised.value.error_index, raised.value.exit_code) == (1, 17)
