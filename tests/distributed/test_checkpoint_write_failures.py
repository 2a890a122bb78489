"""A checkpoints directory rank 0 cannot write: every rank stops with the same one line, none waits
for rank 0 until the timeout (it did: rank 0 raised before the barrier the others sat in)."""

from __future__ import annotations

import errno
import time
from pathlib import Path

import pytest
import torch.distributed as dist

from conftest import small_config
from moeforge import checkpoint as ckpt
from moeforge.model.transformer import Transformer
from moeforge.parallel.spawn import run_on_processes

TIMEOUT_S = 60.0


def refuse(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


def fail_on_rank_0(rank: int, run_dir: str) -> None:
    cfg = small_config(world_size=2)
    model = Transformer(cfg.model)
    ckpt.save_checkpoint(run_dir, 1, model, None, cfg.to_dict(), {}, keep=2)
    if rank == 0:
        (ckpt.step_path(run_dir, 1) / ckpt.META_FILE).unlink()  # a bad checkpoint to set aside
    dist.barrier()
    original_mkdir, original_rename = Path.mkdir, Path.rename
    if rank == 0:
        Path.mkdir, Path.rename = refuse, refuse  # what a read-only directory does to rank 0 (root ignores chmod)
    started = time.monotonic()
    try:
        for attempt, expected in (
            (lambda: ckpt.save_checkpoint(run_dir, 2, model, None, cfg.to_dict(), {}, keep=2), "could not write checkpoint step_000002: [Errno 13] Permission denied; "),
            (lambda: ckpt.newest_good_checkpoint(run_dir, warn=print), "is bad: meta.json: missing; could not set it aside as step_000001.corrupt in "),
        ):  # fmt: skip
            with pytest.raises(ckpt.CheckpointError, match=expected.replace("[", r"\[").replace("]", r"\]")):
                attempt()
    finally:
        Path.mkdir, Path.rename = original_mkdir, original_rename
    assert time.monotonic() - started < TIMEOUT_S / 2, "a rank waited for rank 0"
    assert ckpt.latest_checkpoint(run_dir) == ckpt.step_path(run_dir, 1)


def test_a_directory_rank_0_cannot_write_stops_every_rank_with_one_line(tmp_path):
    run_on_processes(2, fail_on_rank_0, str(tmp_path / "run"), timeout_s=TIMEOUT_S)
