"""HSDP resume: only replica 0 reads the checkpoint from storage, the other replicas receive it."""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import test_checkpoint_elastic as elastic
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from conftest import small_config
from moeforge.parallel.spawn import run_on_processes
from torch.distributed.checkpoint.state_dict import get_state_dict
from torch.distributed.tensor import DTensor

from moeforge.model.transformer import Transformer
from moeforge.parallel import parallelize
from moeforge import checkpoint as ckpt
from moeforge.checkpoint.store import OPTIMIZER_BY_NAME
from moeforge.train.trainer import Trainer

# The elastic tests' fixtures: the run saved at step 3 on 4 processes (dp_replicate=2, dp_shard=2, ep=2)
# and the losses of an uninterrupted run.
saved_on_four_processes = elastic.saved_on_four_processes
uninterrupted = elastic.uninterrupted

HSDP = elastic.parallel_options(dp_replicate="2", dp_shard="2", ep="2")
LOG_LINE = re.compile(
    r"resumed from step 3: read (\d+\.\d) MB from storage \(replica 0 of 2\), (\d+\.\d) MB sent to the other replicas"
)


def resume_with_replica_1_scrambled(rank: int, run_dir: str) -> None:
    trainer = Trainer(small_config(world_size=4, **HSDP), run_dir)
    on_first_replica = trainer.mesh["dp_replicate"].get_local_rank() == 0
    path = ckpt.latest_checkpoint(run_dir)
    refuses_a_model_it_does_not_fit(trainer, path)
    if not on_first_replica:
        scramble(trainer)
    log = io.StringIO()
    with recording_loads() as record, contextlib.redirect_stdout(log):
        assert trainer.resume_if_possible() and trainer.step == 3
    if on_first_replica:
        assert [dist.get_world_size(group) for group in record.storage_groups] == [2]  # its replica's dp_shard
        assert record.stats.read_bytes > 0 and record.stats.received_bytes == 0
    else:
        assert record.storage_groups == [] and record.stats.read_bytes == 0 and record.stats.received_bytes > 0
    if rank == 0:
        read, sent = LOG_LINE.fullmatch(log.getvalue().strip()).groups()
        assert read == sent
    assert_state_equals_a_plain_load(trainer, path)
    trainer.fit()


def refuses_a_model_it_does_not_fit(trainer: Trainer, path: Path) -> None:
    """Every rank raises, none is left waiting, although only replica 0 finds out by reading."""
    other = parallelize(Transformer(small_config(world_size=4, model__dim="32", **HSDP).model), trainer.mesh)
    with pytest.raises(ckpt.CheckpointError, match="does not fit this model"):
        ckpt.load_checkpoint(path, other, mesh=trainer.mesh)


def scramble(trainer: Trainer) -> None:
    """Garbage in weights, router biases, optimizer state, learning rate and RNG: only what the
    broadcast brings can repair it."""
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer)
    with torch.no_grad():
        for tensor in [*model_sd.values(), *(t for s in optim_sd["state"].values() for t in s.values())]:
            tensor.fill_(7.0)
    for group in trainer.optimizer.param_groups:
        group["lr"] = 123.0
    torch.manual_seed(999)


@dataclass
class LoadRecord:
    storage_groups: list = field(default_factory=list)
    stats: ckpt.LoadStats | None = None


@contextlib.contextmanager
def recording_loads() -> Iterator[LoadRecord]:
    """Record the process group of every storage read (dcp.load) and the stats load_checkpoint returns."""
    record = LoadRecord()
    read_from_storage, load_checkpoint = dcp.load, ckpt.load_checkpoint

    def recorded_read(state, process_group=None, **kw):
        record.storage_groups.append(process_group)
        return read_from_storage(state, process_group=process_group, **kw)

    def recorded_load(*args, **kw):
        meta = load_checkpoint(*args, **kw)
        record.stats = meta.load_stats
        return meta

    dcp.load, ckpt.load_checkpoint = recorded_read, recorded_load
    try:
        yield record
    finally:
        dcp.load, ckpt.load_checkpoint = read_from_storage, load_checkpoint


def assert_state_equals_a_plain_load(trainer: Trainer, path: Path) -> None:
    """This rank's shards, hyper-parameters and RNG equal what its own read from storage gives."""
    model_sd, optim_sd = get_state_dict(trainer.model, trainer.optimizer, options=OPTIMIZER_BY_NAME)
    resumed = {"model": model_sd, "optim": optim_sd, "rng": {"cpu": torch.get_rng_state()}}
    plain = blank_copy(resumed)
    dcp.load(plain, checkpoint_id=str(path))
    assert_same_tree(resumed, plain, "")


def blank_copy(tree: Any) -> Any:
    """The same nesting with every tensor zeroed (same shards) and every other leaf unset."""
    if isinstance(tree, dict):
        return {key: blank_copy(value) for key, value in tree.items()}
    if isinstance(tree, list):
        return [blank_copy(value) for value in tree]
    return torch.zeros_like(tree) if isinstance(tree, torch.Tensor) else "unset"


def assert_same_tree(got: Any, expected: Any, where: str) -> None:
    if isinstance(expected, dict | list):
        keys = expected.keys() if isinstance(expected, dict) else range(len(expected))
        assert len(got) == len(expected), where
        for key in keys:
            assert_same_tree(got[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, DTensor):
        assert got.placements == expected.placements and torch.equal(got.to_local(), expected.to_local()), where
    elif isinstance(expected, torch.Tensor):
        assert torch.equal(got, expected), where
    else:
        assert got == expected, where


@pytest.mark.slow
def test_hsdp_resume_reads_storage_once_and_continues_like_an_uninterrupted_run(
    saved_on_four_processes, uninterrupted, tmp_path
):
    run = elastic.copy_run(saved_on_four_processes, tmp_path / "run")
    run_on_processes(4, resume_with_replica_1_scrambled, str(run))
    assert elastic.losses(run) == pytest.approx(uninterrupted, rel=1e-5)
