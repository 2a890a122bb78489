"""Which checkpoints a run has, and which of them are good.

A `step_N` directory under RUN_DIR/checkpoints/ is complete (store.py renames it from `step_N.tmp`
only once written); it is good when `verify_checkpoint` finds nothing wrong: meta.json passes its
checks (meta.py), every file matches its recorded size and SHA-256 (checksums.py), and every path
DCP's `.metadata` names is a regular file inside it (safe_load.py). A resume takes the newest good
one and sets each newer bad one aside as `step_N.corrupt`, with one line; `checkpoint verify` prints
the same verdicts. Also here: running a step on rank 0 alone with its failure shared by every rank.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from moeforge.run import CHECKPOINTS_DIR
from moeforge.safe_paths import PathRefused
from moeforge.checkpoint.checksums import verify_checksums
from moeforge.checkpoint.meta import META_FILE, CheckpointError, MetaError, read_meta
from moeforge.errors import first_line
from moeforge.checkpoint.safe_load import SafeFileSystemReader, UnsafeCheckpointError

PREFIX = "step_"
_COMPLETE_NAME = re.compile(rf"{PREFIX}\d+")
CORRUPT_SUFFIX = ".corrupt"
T = TypeVar("T")


def checkpoint_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def step_path(run_dir: Path | str, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"{PREFIX}{step:06d}"


def list_checkpoints(run_dir: Path | str) -> list[Path]:
    """Complete checkpoints of a run, oldest first: every `step_N` directory, since one is renamed to
    that name only once written (one whose meta.json has gone missing since fails `verify_checkpoint`)."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    done = [p for p in root.glob(f"{PREFIX}*") if _COMPLETE_NAME.fullmatch(p.name) and p.is_dir()]
    return sorted(done, key=lambda p: int(p.name[len(PREFIX) :]))


def checkpoints_in(path: Path | str) -> list[Path]:
    """`path` itself when it is one checkpoint (one holding a meta.json, or a `checkpoints/step_N`
    directory), else the checkpoints of the run directory `path`, oldest first."""
    path = Path(path)
    named = path.parent.name == CHECKPOINTS_DIR and _COMPLETE_NAME.fullmatch(path.name)
    if named or (path / META_FILE).is_file():
        return [path]
    return list_checkpoints(path)


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def resolve_checkpoint(path: Path | str) -> Path:
    """A checkpoint directory itself, or a run directory (its newest checkpoint)."""
    found = checkpoints_in(path)
    if not found:
        raise CheckpointError(f"--checkpoint: no complete checkpoint in {str(path)!r}")
    return found[-1]


def verify_checkpoint(path: Path) -> list[str]:
    """What is wrong with checkpoint `path`, one line a bad file; empty when meta.json passes its
    checks (meta.py), every file matches the checksum it recorded (or it recorded none), and every
    path DCP's `.metadata` names is a regular file inside the checkpoint. What a resume acts on and
    `checkpoint verify` prints. The same on every rank: call it on all of them."""
    try:
        meta = read_meta(path)
    except MetaError as err:
        return [f"{META_FILE}: {err.reason}"]
    problems = verify_checksums(path, meta.files, path / META_FILE) if meta.files is not None else []
    if problems:
        return problems
    problem = on_rank0(lambda: _metadata_problem(path))  # read once, as DCP does
    return [problem] if problem else []


def _metadata_problem(path: Path) -> str | None:
    """What is wrong with the `.metadata` of checkpoint `path` (safe_load.py), or None."""
    try:
        SafeFileSystemReader(path).read_metadata()
    except (PathRefused, UnsafeCheckpointError) as err:
        return first_line(err)
    except (OSError, ValueError, EOFError, pickle.UnpicklingError) as err:  # legacy: no checksums
        return f".metadata: unreadable ({first_line(err)})"
    return None


def newest_good_checkpoint(run_dir: Path | str, warn: Callable[[str], None]) -> Path | None:
    """The newest checkpoint of a run that passes `verify_checkpoint`. Each newer one that fails is
    set aside as `step_N.corrupt` (never deleted), with one line to `warn` naming its bad file. A
    collective: call it on every rank."""
    for path in reversed(list_checkpoints(run_dir)):
        problems = verify_checkpoint(path)
        if not problems:
            return path
        bad = f"checkpoint {str(path)!r} is bad: {problems[0]}"
        aside = on_rank0(lambda path=path, bad=bad: set_aside(path, bad))
        if is_rank0():
            warn(f"{bad}; set aside as {aside.name}, trying the one before")
    return None


def set_aside(path: Path, why: str = "") -> Path:
    """Rename a bad checkpoint to step_N.corrupt (step_N.corrupt.2, ... if taken) and return the new
    path; a one-line `CheckpointError` starting with `why` when the directory cannot be renamed."""
    aside, copy = path.with_name(path.name + CORRUPT_SUFFIX), 1
    while aside.exists():
        copy += 1
        aside = path.with_name(f"{path.name}{CORRUPT_SUFFIX}.{copy}")
    try:
        path.rename(aside)
    except OSError as err:
        raise CheckpointError(
            f"{why + '; ' if why else ''}could not set it aside as {aside.name} in {str(path.parent)!r} "
            f"({err.strerror or first_line(err)}): make the directory writable and rerun"
        ) from None
    return aside


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def on_rank0(action: Callable[[], T]) -> T:
    """`action()` run on rank 0 only, its result returned on every rank. When it raises an OSError
    or a CheckpointError, every rank raises it (the others would otherwise wait for rank 0 forever).
    A collective: call it on every rank."""
    if not dist.is_initialized():
        return action()
    shared: list[Any] = [None, None]  # [failure, result]
    if dist.get_rank() == 0:
        try:
            shared[1] = action()
        except (OSError, CheckpointError) as err:
            shared[0] = err
    dist.broadcast_object_list(shared, src=0)
    if shared[0] is not None:
        raise shared[0]
    return shared[1]
