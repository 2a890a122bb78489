"""Elastic sharded checkpoints: save on one mesh, resume on another; a crash keeps the last one."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import small_config
from moeforge.parallel.spawn import run_on_processes
from moeforge import checkpoint as ckpt
from moeforge.run import read_metrics
from moeforge.train.trainer import Trainer

BASE = {"train__steps": "6", "train__checkpoint_every": "3", "model__moe__aux_coef": "0.01"}


def parallel_options(**parallel: str) -> dict[str, str]:
    return {**BASE, **{f"parallel__{key}": value for key, value in parallel.items()}}


def train(rank: int, world_size: int, options: dict, out_dir: str, until_step: int | None) -> None:
    trainer = Trainer(small_config(world_size=world_size, **options), out_dir)
    trainer.fit(until_step=until_step)
    biases = torch.stack([layer.router.expert_bias for layer in trainer.model.moe_layers()])
    gathered = [torch.empty_like(biases) for _ in range(world_size)]
    dist.all_gather(gathered, biases)
    assert all(torch.equal(g, gathered[0]) for g in gathered), "router biases differ between ranks"


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


# The two runs below are built once per session, in fixed directories of the session's temp dir:
# test_checkpoint_replica_read.py uses them too, and a module-scoped fixture would run them again.


@pytest.fixture(scope="module")
def saved_on_four_processes(tmp_path_factory):
    """Steps 1-3 on 4 processes (dp_replicate=2, dp_shard=2, ep=2): checkpoint step_000003."""
    out = tmp_path_factory.getbasetemp() / "saved_on_four_processes"
    if ckpt.latest_checkpoint(out) is None:
        run_on_processes(4, train, 4, parallel_options(dp_replicate="2", dp_shard="2", ep="2"), str(out), 3)
    return out


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.getbasetemp() / "uninterrupted"
    if not out.is_dir() or len(losses(out)) != int(BASE["train__steps"]):
        Trainer(small_config(**BASE), out).fit()
    return losses(out)


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_resume_four_process_checkpoint_on_two_processes(saved_on_four_processes, uninterrupted, tmp_path):
    run = copy_run(saved_on_four_processes, tmp_path / "run")
    run_on_processes(2, train, 2, parallel_options(ep="2"), str(run), None)
    assert losses(run) == pytest.approx(uninterrupted, rel=1e-5)


@pytest.mark.slow
def test_resume_four_process_checkpoint_on_one_process(saved_on_four_processes, uninterrupted, tmp_path):
    run = copy_run(saved_on_four_processes, tmp_path / "run")
    trainer = Trainer(small_config(**BASE), run)
    trainer.fit()
    assert losses(run) == pytest.approx(uninterrupted, rel=1e-5)
    assert trainer.optimizer.state_dict()["state"][0]["step"].item() == 6  # optimizer state came along


def crash_rank1_while_saving_step_6(rank: int, world_size: int, out_dir: str) -> None:
    original_save = dcp.save

    def save_or_die(state, checkpoint_id, **kw):
        if rank == 1 and checkpoint_id.endswith("step_000006.tmp"):
            os._exit(17)  # a hard crash halfway through writing a checkpoint
        return original_save(state, checkpoint_id=checkpoint_id, **kw)

    dcp.save = save_or_die
    train(rank, world_size, parallel_options(ep="2"), out_dir, None)


def test_a_killed_rank_leaves_the_last_complete_checkpoint_loadable(tmp_path):
    with pytest.raises(mp.ProcessExitedException):
        run_on_processes(2, crash_rank1_while_saving_step_6, 2, str(tmp_path))
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000003"
    assert (ckpt.checkpoint_dir(tmp_path) / "step_000006.tmp").is_dir()
    trainer = Trainer(small_config(**BASE), tmp_path)
    assert trainer.resume_if_possible() and trainer.step == 3
    trainer.fit()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000006"
