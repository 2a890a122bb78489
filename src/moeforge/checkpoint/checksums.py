"""Checksums of every file a checkpoint wrote, recorded in its meta.json and verified before a
resume: a corrupted, truncated or missing shard is named, never loaded.

The files are shared out over the ranks by position in the sorted listing (rank r hashes files r,
r + W, ...), so hashing a large checkpoint costs each rank 1/W of it; with no process group one
process does all. Each entry is the file's size and SHA-256 (`sha256sum` checks it by hand). A name
in meta.json is opened only as a regular file inside the checkpoint (moeforge.safe_paths), and read
no further than its recorded size.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Collection
from pathlib import Path
from typing import Any, BinaryIO

import torch.distributed as dist

from moeforge.safe_paths import PathRefused, open_inside

_CHUNK = 1 << 20


def stream_digest(stream: BinaryIO, nbytes: int) -> str | None:
    """The SHA-256 hex digest of the next `nbytes` of `stream` (never reading further); None when
    the stream ends first."""
    digest = hashlib.sha256()
    while nbytes > 0:
        chunk = stream.read(min(_CHUNK, nbytes))
        if not chunk:
            return None
        digest.update(chunk)
        nbytes -= len(chunk)
    return digest.hexdigest()


def file_digest(directory: Path, name: str, source: Path | str) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of the file `name` inside `directory` (named by `source`)."""
    with open_inside(directory, name, source) as stream:
        size = os.fstat(stream.fileno()).st_size
        return {"bytes": size, "sha256": stream_digest(stream, size)}


def record_checksums(directory: Path, skip: Collection[str]) -> dict[str, dict[str, Any]] | None:
    """The digests of every file in a just-written checkpoint `directory` but those in `skip` (the
    metadata files), on rank 0; None on the other ranks. A collective: call it on every rank."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name not in skip)
    mine = {name: file_digest(directory, name, directory) for name in _my_share(names)}
    parts = _gather_on_rank_0(mine)
    if parts is None:
        return None
    return dict(sorted(item for part in parts for item in part.items()))


def verify_checksums(directory: Path, recorded: dict[str, dict[str, Any]], source: Path) -> list[str]:
    """What is wrong with the files of `directory` against `recorded` (read from `source`), one line
    a file (empty: all good); the same list on every rank. A collective: call it on every rank."""
    mine = [
        problem
        for name in _my_share(sorted(recorded))
        if (problem := _check(directory, name, recorded[name], source))
    ]
    if not dist.is_initialized():
        return mine
    everyone: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    return sorted(problem for part in everyone for problem in part)


def _check(directory: Path, name: str, expected: dict[str, Any], source: Path) -> str | None:
    """What is wrong with one recorded file, or None."""
    try:
        with open_inside(directory, name, source) as stream:
            size = os.fstat(stream.fileno()).st_size
            if size != expected["bytes"]:
                return f"{name}: {size} bytes, {expected['bytes']} written (truncated or overwritten)"
            if stream_digest(stream, size) != expected["sha256"]:
                return f"{name}: its SHA-256 differs from the one recorded when it was written (corrupted)"
    except PathRefused as err:
        return f"{name}: {err.reason}"
    return None


def _my_share(names: list[str]) -> list[str]:
    if not dist.is_initialized():
        return names
    return names[dist.get_rank() :: dist.get_world_size()]


def _gather_on_rank_0(mine: dict[str, Any]) -> list[dict[str, Any]] | None:
    if not dist.is_initialized():
        return [mine]
    parts: list[dict[str, Any]] | None = (
        [{} for _ in range(dist.get_world_size())] if dist.get_rank() == 0 else None
    )
    dist.gather_object(mine, parts, dst=0)
    return parts
