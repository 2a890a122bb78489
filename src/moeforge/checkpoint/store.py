"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of a run directory:

    OUT/checkpoints/step_000100/      one complete checkpoint: DCP shards + meta.json + meta.sha256
    OUT/checkpoints/step_000200.tmp/  being written; never read, removed on the next save
    OUT/checkpoints/step_000300.corrupt/  failed its checks on resume: set aside, kept for a person

Tensors (model incl. router biases, optimizer, RNG) go through DCP, so the same code saves sharded
DTensors from many ranks and plain tensors from one process. Replicas whose parameters differ
(DiLoCo) save their model and optimizer under `replica_<r>.`, next to trees every replica holds
alike (`ReplicaCheckpoint`): the top-level `model.` is then the replicas' common model. Everything small and not a tensor
(step, config, data position, scheduler) goes to `meta.json`, written last by rank 0 with its own
SHA-256 in `meta.sha256` (meta.py): a directory is renamed from `.tmp` to its final name only after
every rank finished, so a directory without `.tmp` is always complete and a killed run resumes from
the newest one. meta.json records the size and SHA-256 of every other file (checksums.py); a resume
verifies them, meta.json itself and the paths DCP's `.metadata` names, and falls back to the newest
checkpoint that passes, setting the bad one aside (discovery.py; discovery and retention skip it).

A failure to write (a full disk, a read-only directory) is one line naming the directory and the
reason, on every rank, and leaves the previous checkpoint as it was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import CheckpointException
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from moeforge.durable import fsync_directory
from moeforge.errors import first_line
from moeforge.safe_paths import PathRefused
from moeforge.checkpoint.checksums import record_checksums
from moeforge.checkpoint.discovery import (
    barrier,
    is_rank0,
    latest_checkpoint,
    list_checkpoints,
    on_rank0,
    step_path,
)
from moeforge.checkpoint.meta import (
    META_FILE,
    META_HASH_FILE,
    CheckpointError,
    CheckpointMeta,
    read_meta,
    write_meta,
)
from moeforge.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpointError
from moeforge.parallel.hsdp_reads import (
    broadcast_shards,
    broadcast_verdict,
    is_first_replica,
    replicated,
)
from moeforge.parallel.sharded_load import local_shard

if TYPE_CHECKING:
    from moeforge.parallel.mesh import ParallelMesh



@dataclass(frozen=True)
class LoadStats:
    """Bytes of tensor data (not file sizes) that loading a checkpoint moved on one rank, or summed
    over all ranks: read from storage, and received over the network from another replica."""

    read_bytes: int = 0
    received_bytes: int = 0
    replicas: int = 1

    def summed_over_ranks(self, device: torch.device) -> LoadStats:
        """The totals over every rank (a collective: call it on all of them; `device` suits the backend)."""
        if not dist.is_initialized():
            return self
        totals = torch.tensor([self.read_bytes, self.received_bytes], dtype=torch.int64, device=device)
        dist.all_reduce(totals)
        return LoadStats(int(totals[0]), int(totals[1]), self.replicas)

    def describe(self) -> str:
        """'read 12.3 MB from storage (replica 0 of 2), 12.3 MB sent to the other replicas'."""
        read = f"read {self.read_bytes / 1e6:.1f} MB from storage"
        if self.replicas == 1:
            return read
        return f"{read} (replica 0 of {self.replicas}), {self.received_bytes / 1e6:.1f} MB sent to the other replicas"


@dataclass
class ReplicaCheckpoint:
    """How a rank whose replica trains its own parameters (DiLoCo) saves and loads.

    Its model and optimizer go under `replica_<index>.`, with `own`: tensor trees of this replica's
    alone (e.g. {"diloco": its error-feedback residuals}), loaded in place; `shared` holds tensor
    trees that are the same on every replica (e.g. {"model": the common parameters, "diloco": the
    outer state}), saved once at the top level and loaded in place. `load_inner` False loads only
    `shared`: the checkpoint holds nothing for this replica."""

    index: int
    shared: dict[str, Any]
    load_inner: bool = True
    own: dict[str, Any] = dataclasses.field(default_factory=dict)


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns on every save/load without a process group; one process is a supported layout here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


OPTIMIZER_BY_NAME = StateDictOptions(flatten_optimizer_state_dict=True)
"""How optimizer state is saved: every entry, hyper-parameters included, under its parameter's name
(`optim.param_groups.<fqn>.lr`). Ranks that hold different parameters (pipeline stages) then write
different keys. The positional layout torch uses by default (`optim.param_groups.0.lr`, with the
group's parameter names in `optim.param_groups.0.params`) gives every stage the same keys: DCP keeps
one stage's copy, and the others load groups naming none of their parameters (AdamW's `betas` lost)."""

_POSITIONAL = StateDictOptions(flatten_optimizer_state_dict=False)
"""torch's default layout, in which checkpoints of format 1 (meta.py) hold their optimizer state"""


def _tensor_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    replica: ReplicaCheckpoint | None = None,
    options: StateDictOptions = OPTIMIZER_BY_NAME,
) -> dict[str, Any]:
    if replica is not None:
        state = {**replica.shared, "rng": {"cpu": torch.get_rng_state()}}
        if replica.load_inner:
            state[_replica_key(replica)] = {**_tensor_state(model, optimizer, options=options), **replica.own}
        return state
    if optimizer is None:
        model_sd, _ = get_state_dict(model, optimizers=[])
        return {"model": model_sd}
    model_sd, optim_sd = get_state_dict(model, optimizer, options=options)
    return {"model": model_sd, "optim": optim_sd, "rng": {"cpu": torch.get_rng_state()}}


def _optimizer_options(meta: CheckpointMeta) -> StateDictOptions:
    """The layout a checkpoint holds its optimizer state in: by name since format 2, positional before."""
    return OPTIMIZER_BY_NAME if meta.format >= 2 else _POSITIONAL


def _replica_key(replica: ReplicaCheckpoint) -> str:
    return f"replica_{replica.index}"


def save_checkpoint(
    run_dir: Path | str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: dict[str, Any],
    extra: dict[str, Any],
    keep: int,
    replica: ReplicaCheckpoint | None = None,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` complete ones.

    With `optimizer` None only the model is saved (an imported model): it loads for generation and
    export, and a training run can start from its weights but not resume its optimizer. With
    `replica`, the model and optimizer go under that replica's name, beside its shared trees.
    """
    final = step_path(run_dir, step)
    tmp = final.with_suffix(".tmp")
    previous = latest_checkpoint(run_dir)
    state = _tensor_state(model, optimizer, replica)
    try:
        on_rank0(lambda: _fresh_directory(tmp))
        with _single_process_is_intended():
            dcp.save(state, checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
        barrier()
        files = record_checksums(tmp, skip={META_FILE, META_HASH_FILE})
        meta = {"step": step, "config": config, "extra": extra, "files": files}
        on_rank0(lambda: _publish(tmp, final, meta, run_dir, keep))
    except (OSError, CheckpointException) as err:
        raise _save_error(err, final, previous, _nbytes(state)) from None
    return final


def _fresh_directory(path: Path) -> None:
    """An empty directory at `path` (and its parents), whatever was there."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)


def _publish(tmp: Path, final: Path, meta: dict[str, Any], run_dir: Path | str, keep: int) -> None:
    """Rank 0's last steps of a save: meta.json and meta.sha256 (meta.py), the atomic rename of the
    `.tmp` directory made durable, then retention of the newest `keep` checkpoints."""
    write_meta(tmp, meta)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_directory(final.parent)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def _save_error(err: BaseException, final: Path, previous: Path | None, nbytes: int) -> CheckpointError:
    """The one line for a save that failed on some rank (the `.tmp` directory is removed): the
    first rank's reason, "no space left on device" named as such, and what to do."""
    if isinstance(err, CheckpointException):  # DCP's wrapper of every rank's failure
        err = next(iter(err.failures.values()))[0]
    directory = final.parent
    free = _free_bytes(directory)
    if is_rank0():
        shutil.rmtree(final.with_suffix(".tmp"), ignore_errors=True)
    kept = f"the previous checkpoint {str(previous)!r} is intact" if previous else "no earlier checkpoint exists"
    if _out_of_space(err, free, nbytes):
        reason = f"no space left on device ({free / 1e6:.1f} MB free, {nbytes / 1e6:.1f} MB of tensors to write)"
        advice = f"free space in {str(directory)!r} (or lower train.keep-checkpoints) and rerun to resume"
    else:
        reason = first_line(err)
        advice = f"make {str(directory)!r} writable and rerun to resume"
    return CheckpointError(f"could not write checkpoint {final.name}: {reason}; {kept} — {advice}")


def _out_of_space(err: BaseException, free: int | None, nbytes: int) -> bool:
    """Whether a save failed for want of space: an OSError ENOSPC, or anything else (torch's zip
    writer reports a short write as "[enforce fail at inline_container.cc] unexpected pos", losing the
    OSError) while less space is free than the tensors need."""
    if isinstance(err, OSError):
        return err.errno == errno.ENOSPC
    return free is not None and free < nbytes


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    mesh: ParallelMesh | None = None,
    replica: ReplicaCheckpoint | None = None,
) -> CheckpointMeta:
    """Load a checkpoint into `model` (and `optimizer`, RNG) in place; returns its metadata, whose
    `load_stats` says how many bytes of tensor data this rank read from storage or received.

    With `replica`, the model and optimizer come from that replica's names (unless its `load_inner`
    is False) and its shared trees are filled in place.

    With a `mesh` whose dp_replicate > 1 (HSDP), rank (r, s) holds the same shards as rank (0, s), so
    only replica 0 reads, its dp_shard ranks coordinating among themselves, and sends the shards to the
    other replicas over dp_replicate: storage serves the checkpoint once instead of R times.
    """
    meta = read_meta(path)
    options = _optimizer_options(meta)
    state = _tensor_state(model, optimizer, replica, options)
    if not replicated(mesh):
        _raise_unless_fits(path, _read_from_storage(state, path, process_group=None))
        stats = LoadStats(read_bytes=_nbytes(state))
    else:
        stats = _read_on_first_replica_and_broadcast(state, path, mesh)
    if replica is not None:
        if replica.load_inner:
            inner = state[_replica_key(replica)]
            set_state_dict(
                model, optimizer, model_state_dict=inner["model"], optim_state_dict=inner["optim"], options=options
            )
        torch.set_rng_state(state["rng"]["cpu"])
    elif optimizer is None:
        set_state_dict(model, optimizers=[], model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=options
        )
        torch.set_rng_state(state["rng"]["cpu"])
    return dataclasses.replace(meta, load_stats=stats)


def _read_from_storage(
    state: dict[str, Any], path: Path, process_group: dist.ProcessGroup | None
) -> str | None:
    """Fill `state` in place with DCP, unpickling nothing but plain data (safe_load.py); None, or the
    first line of why the checkpoint cannot be loaded into this model."""
    reader = SafeFileSystemReader(path)
    try:
        reader.read_metadata()  # vetted here, where a refusal keeps its reason (DCP would rewrap it)
        with _single_process_is_intended():
            dcp.load(
                state,
                storage_reader=reader,
                planner=SafeLoadPlanner(),
                process_group=process_group,
                no_dist=not dist.is_initialized(),
            )
    except CheckpointException as err:  # DCP wraps each rank's failure
        return _load_failure(next(iter(err.failures.values()))[0])
    except (RuntimeError, KeyError, ValueError, OSError, UnsafeCheckpointError) as err:
        return _load_failure(err)
    return None


def _load_failure(err: BaseException) -> str:
    if isinstance(err, UnsafeCheckpointError | PathRefused):
        return f"it is not safe to load: {first_line(err)}"
    return f"it does not fit this model: {first_line(err)}"


def _raise_unless_fits(path: Path, error: str | None) -> None:
    if error is not None:
        raise CheckpointError(f"checkpoint {str(path)!r}: {error}")


def _read_on_first_replica_and_broadcast(state: dict[str, Any], path: Path, mesh: ParallelMesh) -> LoadStats:
    """Replica 0 fills `state` from storage; every other replica copies it from its replica-0 peer
    (parallel/hsdp_reads.py).

    The small leaves travel with replica 0's verdict, pickled: the non-tensors (optimizer
    hyper-parameters) and the tensors not on the mesh's device (optimizer step counts and RNG state
    on the CPU next to a CUDA model, which an NCCL group cannot broadcast); all others are broadcast
    in place, shard by shard."""
    first = is_first_replica(mesh)
    error = _read_from_storage(state, path, mesh["dp_shard"].get_group()) if first else None
    slots = list(_leaf_slots(state))
    pickled = [(c, k) for c, k in slots if not _on_device(c[k], mesh.device_type)]
    error, values = broadcast_verdict(mesh, error, [c[k] for c, k in pickled])
    _raise_unless_fits(path, error)
    for (container, key), value in zip(pickled, values, strict=True):
        container[key] = value
    broadcast_shards(mesh, [c[k] for c, k in slots if _on_device(c[k], mesh.device_type)])
    nbytes = _nbytes(state)
    replicas = mesh["dp_replicate"].size()
    if first:
        return LoadStats(read_bytes=nbytes, replicas=replicas)
    return LoadStats(received_bytes=nbytes, replicas=replicas)


def _leaf_slots(tree: dict | list) -> Iterator[tuple[dict | list, Any]]:
    """(container, key) of every leaf of a nested dict/list state dict, in the same order on every rank."""
    for key, value in tree.items() if isinstance(tree, dict) else enumerate(tree):
        if isinstance(value, dict | list):
            yield from _leaf_slots(value)
        else:
            yield tree, key


def _on_device(value: Any, device_type: str) -> bool:
    return isinstance(value, torch.Tensor) and value.device.type == device_type


def _nbytes(state: dict[str, Any]) -> int:
    """Bytes of this rank's part of every tensor in `state`."""
    return sum(local_shard(c[k]).nbytes for c, k in _leaf_slots(state) if isinstance(c[k], torch.Tensor))
