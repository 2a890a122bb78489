"""A checkpoint's meta.json, and meta.sha256 that vouches for it.

meta.json holds everything small that is not a tensor: the step, the config, the data position and
scheduler (`extra`), and the size and SHA-256 of every other file (checksums.py). Its own SHA-256
goes to meta.sha256 beside it, in `sha256sum` format (`sha256sum -c meta.sha256` checks it by hand):
a damaged meta.json cannot vouch for itself.

Write order (`write_meta`, then the caller): meta.json written and fsynced; meta.sha256 written and
fsynced; the directory fsynced; then the `.tmp` directory renamed to its final name and the parent
fsynced. A directory with a final name therefore holds both, complete.

What the hash catches: accidental and partial edits (a truncated or bit-flipped meta.json, a hand
edit of `sequences_consumed` or `last_epoch` in valid JSON, `"files": null`). Not a forger: the hash
is not signed, so whoever edits meta.json can write its new hash too. Every field is also checked
for its type, whatever the hash says.

Formats: meta.json records `"format": 2` since meta.sha256 exists (and optimizer state is saved by
parameter name, store.py); a format-2 checkpoint without meta.sha256 is damaged. Checkpoints written
before have no "format" (format 1) and no hash file: they are accepted as legacy, their meta.json
parsed and checked field by field but not hash-checked, and `checkpoint verify` says so. A
checkpoint whose meta.json is missing, unreadable, altered or incomplete is bad like one with a
damaged shard (store.py: named, set aside, the one before used).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moeforge.durable import fsync_directory, write_synced
from moeforge.errors import RunFailure, first_line
from moeforge.safe_paths import FileMissing, PathRefused, read_inside

if TYPE_CHECKING:
    from moeforge.checkpoint.store import LoadStats

META_FILE = "meta.json"
META_HASH_FILE = "meta.sha256"
FORMAT = 2
"""2: meta.sha256 written beside meta.json, optimizer state saved by parameter name (store.py);
1 (no "format" key): no meta.sha256, optimizer state in torch's positional layout"""
MAX_META_BYTES = 64 << 20
"""a bound on meta.json (its config and one entry per file are a few kB, 100 kB for 1000 ranks)"""
_HASH_LINE = re.compile(rf"([0-9a-f]{{64}})  {re.escape(META_FILE)}\n?")


class CheckpointError(RunFailure, RuntimeError):
    """A checkpoint that cannot be used: missing, incomplete, or from an incompatible model."""


class MetaError(CheckpointError):
    """meta.json of a checkpoint is missing, unreadable, altered or incomplete: `file: reason`."""

    def __init__(self, file: Path, reason: str) -> None:
        self.file, self.reason = file, reason
        super().__init__(f"{file}: {reason}")


@dataclass
class CheckpointMeta:
    step: int
    config: dict[str, Any]
    extra: dict[str, Any]
    files: dict[str, dict[str, Any]] | None = None
    """size and SHA-256 of every other file; None in checkpoints written before they were recorded"""
    load_stats: LoadStats | None = None  # set by load_checkpoint; None when only meta.json was read
    format: int = FORMAT


def write_meta(directory: Path, meta: dict[str, Any]) -> None:
    """meta.json (with the format) and meta.sha256 in `directory`, each fsynced, in that order, then
    the directory itself (module docstring)."""
    data = json.dumps({**meta, "format": FORMAT}, indent=1).encode()
    write_synced(directory / META_FILE, data)
    write_synced(directory / META_HASH_FILE, f"{hashlib.sha256(data).hexdigest()}  {META_FILE}\n".encode())
    fsync_directory(directory)


def read_meta(path: Path) -> CheckpointMeta:
    """The meta.json of checkpoint `path`, checked against meta.sha256 and field by field; a one-line
    `MetaError` naming it when it is missing, unreadable, altered or incomplete."""
    file = path / META_FILE
    try:
        raw = read_inside(path, META_FILE, path, MAX_META_BYTES)
    except PathRefused as err:
        raise MetaError(file, err.reason) from None
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError) as err:
        raise MetaError(file, f"unreadable ({first_line(err)})") from None
    recorded = _recorded_hash(path)
    if recorded is not None and hashlib.sha256(raw).hexdigest() != recorded:
        raise MetaError(file, f"its SHA-256 differs from the one in {META_HASH_FILE} (edited or damaged)")
    meta = _checked_fields(data, file)
    if recorded is None and meta.format >= 2:
        raise MetaError(file, f"{META_HASH_FILE} is missing; a format-{meta.format} checkpoint always has one")
    return meta


def _recorded_hash(path: Path) -> str | None:
    """The SHA-256 meta.sha256 records for meta.json; None when there is no meta.sha256."""
    try:
        text = read_inside(path, META_HASH_FILE, path, 4096).decode("ascii", errors="replace")
    except FileMissing:
        return None
    except PathRefused as err:
        raise MetaError(path / META_HASH_FILE, err.reason) from None
    match = _HASH_LINE.fullmatch(text)
    if match is None:
        raise MetaError(path / META_HASH_FILE, f"unreadable (expected '<sha256>  {META_FILE}')")
    return match.group(1)


def _checked_fields(data: Any, file: Path) -> CheckpointMeta:
    """`data` as a `CheckpointMeta`, each field of the type it was written with."""
    if not isinstance(data, dict):
        raise MetaError(file, f"holds {json.dumps(data)[:40]}, not a JSON object")
    data = {"extra": {}, **data}  # an absent extra reads as {}, as it always has
    version = data.get("format", 1)
    if not _is_count(version) or not 1 <= version <= FORMAT:
        raise MetaError(file, f"format {version!r}; this moeforge reads formats 1 to {FORMAT}")
    for name, check, allowed in (
        ("step", _is_count, "an integer >= 0"),
        ("config", lambda v: isinstance(v, dict), "an object"),
        ("extra", lambda v: isinstance(v, dict), "an object"),
    ):
        if not check(data.get(name)):
            raise MetaError(file, f"field {name!r} is {json.dumps(data.get(name))[:40]}; allowed: {allowed}")
    files = data.get("files")
    if (files is not None or version >= 2) and not _are_file_entries(files):
        raise MetaError(
            file, f"field 'files' is {json.dumps(files)[:40]}; allowed: {{name: {{\"bytes\", \"sha256\"}}}}"
        )
    return CheckpointMeta(data["step"], data["config"], data["extra"], files, format=version)


def _are_file_entries(files: Any) -> bool:
    return isinstance(files, dict) and all(
        isinstance(entry, dict)
        and _is_count(entry.get("bytes"))
        and isinstance(entry.get("sha256"), str)
        and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) is not None
        for entry in files.values()
    )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
