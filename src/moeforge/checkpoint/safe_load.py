"""Reading a DCP checkpoint without letting it run code.

DCP unpickles two things: the `.metadata` file (plain `pickle.load`) and every non-tensor leaf of
the state dict (`torch.load(weights_only=False)`: optimizer hyper-parameters, here). A pickle can
name any importable callable, so a checkpoint from someone else could run code when loaded. Here the
metadata goes through an unpickler that rebuilds only DCP's own metadata records, torch sizes,
dtypes and layouts and paths, and each non-tensor leaf must load with `weights_only=True` (plain
containers, numbers, strings and tensors) before DCP sees it. Anything else is refused with an error
naming the offending global. Tensor data itself is raw bytes and never unpickled.
"""

from __future__ import annotations

import io
import pathlib
import pickle
from typing import Any

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint import filesystem as dcp_filesystem
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

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
    """DCP's file reader with a restricted unpickler for `.metadata`."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as stream:
            metadata = read_dcp_metadata(stream)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, with every non-tensor leaf checked by a `weights_only` load first."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        data = value.read()
        try:
            torch.load(io.BytesIO(data), weights_only=True)
        except pickle.UnpicklingError as err:
            fqn = read_item.dest_index.fqn
            raise UnsafeCheckpointError(
                f"{fqn}: {str(err).strip().splitlines()[0]}; refusing to load it"
            ) from None
        super().load_bytes(read_item, io.BytesIO(data))
