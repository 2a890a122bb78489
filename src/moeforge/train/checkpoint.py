"""Sharded checkpoints with torch.distributed.checkpoint (DCP), written atomically.

Layout of a run directory:

    OUT/checkpoints/step_000100/      one complete checkpoint: DCP shards + meta.json
    OUT/checkpoints/step_000200.tmp/  being written; never read, removed on the next save

Tensors (model incl. router biases, optimizer, RNG) go through DCP, so the same code saves sharded
DTensors from many ranks and plain tensors from one process. Everything small and not a tensor
(step, config, data position, scheduler) goes to `meta.json`, written last by rank 0: a directory is
renamed from `.tmp` to its final name only after every rank finished, so a directory without `.tmp`
is always complete and a killed run resumes from the newest one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

META_FILE = "meta.json"
PREFIX = "step_"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, or from an incompatible model."""


@dataclass
class CheckpointMeta:
    step: int
    config: dict[str, Any]
    extra: dict[str, Any]


def checkpoint_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "checkpoints"


def step_path(run_dir: Path | str, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"{PREFIX}{step:06d}"


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob(f"{PREFIX}*") if p.is_dir() and p.suffix != ".tmp" and (p / META_FILE).is_file()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint directory itself, or a run directory (its newest checkpoint)."""
    path = Path(path)
    if (path / META_FILE).is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise CheckpointError(f"--checkpoint: no complete checkpoint in {str(path)!r}")
    return found


def read_meta(path: Path) -> CheckpointMeta:
    data = json.loads((path / META_FILE).read_text())
    return CheckpointMeta(step=data["step"], config=data["config"], extra=data.get("extra", {}))


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def _single_process_is_intended():
    """DCP warns on every save/load without a process group; one process is a supported layout here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _tensor_state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    if optimizer is None:
        model_sd, _ = get_state_dict(model, optimizers=[])
        return {"model": model_sd}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd, "rng": {"cpu": torch.get_rng_state()}}


def save_checkpoint(
    run_dir: Path | str,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    config: dict[str, Any],
    extra: dict[str, Any],
    keep: int,
) -> Path:
    """Write checkpoint `step` atomically and keep only the newest `keep` complete ones.

    With `optimizer` None only the model is saved (an imported model): it loads for generation and
    export, and a training run can start from its weights but not resume its optimizer.
    """
    final = step_path(run_dir, step)
    tmp = final.with_suffix(".tmp")
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    with _single_process_is_intended():
        dcp.save(_tensor_state(model, optimizer), checkpoint_id=str(tmp), no_dist=not dist.is_initialized())
    _barrier()
    if _is_rank0():
        meta = {"step": step, "config": config, "extra": extra}
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in list_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> CheckpointMeta:
    """Load a checkpoint into `model` (and `optimizer`, RNG) in place; returns its metadata."""
    state = _tensor_state(model, optimizer)
    try:
        with _single_process_is_intended():
            dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    except (RuntimeError, KeyError, ValueError) as err:
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit this model: {first_line}") from None
    if optimizer is None:
        set_state_dict(model, optimizers=[], model_state_dict=state["model"], optim_state_dict={})
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        torch.set_rng_state(state["rng"]["cpu"])
    return read_meta(path)
