"""Reading a DCP checkpoint without letting it run code.

DCP unpickles two things: the `.metadata` file (plain `pickle.load`) and every non-tensor leaf of
the state dict (`torch.load(weights_only=False)`: optimizer hyper-parameters, here). A pickle can
name any importable callable, so a checkpoint from someone else could run code when loaded. Here the
metadata goes through an unpickler that rebuilds only DCP's own metadata records, torch sizes,
dtypes and layouts and paths, and each non-tensor leaf must load with `weights_only=True` (plain
containers, numbers, strings and tensors) before DCP sees it. Anything else is refused with an error
naming the offending global. Tensor data itself is raw bytes and never unpickled.

The files DCP reads are named by `.metadata` (each storage record's `relative_path`): before any is
read, each must be a regular file inside the checkpoint directory, symlinks resolved, and the bytes
a record reads must lie within it (moeforge.safe_paths); `.metadata` itself is read the same way,
up to `MAX_METADATA_BYTES`.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from moeforge.safe_paths import file_inside, read_inside
from moeforge.errors import first_line

MAX_METADATA_BYTES = 1 << 30
"""a bound on `.metadata` (a few kB for one process; it grows with ranks x tensors)"""

_METADATA_CLASSES = {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "ChunkStorageMetadata",
        "BytesStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
} | {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "Path"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
}
_MODULES = {
    "torch.distributed.checkpoint.metadata": dcp_metadata,
    "torch.distributed.checkpoint.filesystem": dcp_filesystem,
    "pathlib": pathlib,
}


class UnsafeCheckpointError(pickle.UnpicklingError):
    """A checkpoint asked to load something other than plain data: it is not loaded."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _METADATA_CLASSES:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f".metadata refers to {module}.{name}, which a DCP checkpoint never needs; refusing to load it"
        )


def read_dcp_metadata(stream: io.BufferedIOBase) -> Metadata:
    """Unpickle a DCP `.metadata` stream, refusing any global but DCP's own records (module docstring)."""
    metadata = _MetadataUnpickler(stream).load()
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f".metadata holds a {type(metadata).__name__}, not DCP Metadata")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with a restricted unpickler for `.metadata`, which reads no file outside the
    checkpoint directory (module docstring)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        directory = Path(self.path)
        name = Path(self._get_metadata_path(kwargs.get("rank"))).name
        data = read_inside(directory, name, directory, MAX_METADATA_BYTES)
        metadata = read_dcp_metadata(io.BytesIO(data))
        check_storage_records(metadata, directory, directory / name)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def check_storage_records(metadata: Metadata, directory: Path, source: Path) -> None:
    """Refuse (`PathRefused`, `UnsafeCheckpointError`) a storage record of `metadata` (read from
    `source`) that names a file outside `directory` or anything but a regular file, or reads bytes
    beyond the end of its file."""
    records = metadata.storage_data if metadata.storage_data is not None else {}
    if not isinstance(records, dict):
        raise UnsafeCheckpointError(f"{source}: its storage records are a {type(records).__name__}, not a dict")
    sizes: dict[str, int] = {}
    for index, record in records.items():
        fqn = getattr(index, "fqn", index)
        if not isinstance(record, dcp_filesystem._StorageInfo):
            raise UnsafeCheckpointError(f"{source}: the storage record of {fqn} is a {type(record).__name__}")
        name = record.relative_path
        if not isinstance(name, str) or name not in sizes:
            sizes[name] = file_inside(directory, name, source).stat().st_size
        if not _within(record.offset, record.length, sizes[name]):
            raise UnsafeCheckpointError(
                f"{source}: the storage record of {fqn} reads {record.length!r} bytes at "
                f"{record.offset!r} of {name!r}, which holds {sizes[name]}"
            )


def _within(offset: Any, length: Any, size: int) -> bool:
    counts = all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (offset, length))
    return counts and offset + length <= size


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, with every non-tensor leaf checked by a `weights_only` load first."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as err:
            fqn = read_item.dest_index.fqn
            raise UnsafeCheckpointError(
                f"{fqn}: {first_line(err)}; refusing to load it"
            ) from None
        super().load_bytes(read_item, io.BytesIO(data))
