"""Checksums of every file a checkpoint wrote, recorded in its meta.json and verified before a
resume: a corrupted, truncated or missing shard is named, never loaded.

The files are shared out over the ranks by position in the sorted listing (rank r hashes files r,
r + W, ...), so hashing a large checkpoint costs each rank 1/W of it; with no process group one
process does all. Each entry is the file's size and SHA-256 (`sha256sum` checks it by hand).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch.distributed as dist

_CHUNK = 1 << 20


def file_digest(path: Path) -> dict[str, Any]:
    """{"bytes": size, "sha256": hex digest} of one file."""
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return {"bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def record_checksums(directory: Path, skip: str) -> dict[str, dict[str, Any]] | None:
    """The digests of every file in a just-written checkpoint `directory` but `skip` (meta.json),
    on rank 0; None on the other ranks. A collective: call it on every rank."""
    names = sorted(p.name for p in directory.iterdir() if p.is_file() and p.name != skip)
    mine = {name: file_digest(directory / name) for name in _my_share(names)}
    parts = _gather_on_rank_0(mine)
    if parts is None:
        return None
    return dict(sorted(item for part in parts for item in part.items()))


def verify_checksums(directory: Path, recorded: dict[str, dict[str, Any]]) -> list[str]:
    """What is wrong with the files of `directory` against `recorded`, one line a file (empty: all
    good); the same list on every rank. A collective: call it on every rank."""
    mine = [
        problem
        for name in _my_share(sorted(recorded))
        if (problem := _check(directory / name, recorded[name]))
    ]
    if not dist.is_initialized():
        return mine
    everyone: list[list[str]] = [[] for _ in range(dist.get_world_size())]
    dist.all_gather_object(everyone, mine)
    return sorted(problem for part in everyone for problem in part)


def _check(path: Path, expected: dict[str, Any]) -> str | None:
    if not path.is_file():
        return f"{path.name}: missing"
    size = path.stat().st_size
    if size != expected["bytes"]:
        return f"{path.name}: {size} bytes, {expected['bytes']} written (truncated or overwritten)"
    if file_digest(path)["sha256"] != expected["sha256"]:
        return f"{path.name}: its SHA-256 differs from the one recorded when it was written (corrupted)"
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
