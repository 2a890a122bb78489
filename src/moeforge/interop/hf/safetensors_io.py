"""Safetensors checkpoint directories, whatever model they hold: which shard files there are, the
tensor names in their headers, reading one block of a stored tensor, and writing tensors as shards.

A directory holds `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` named by an index
(`model.safetensors.index.json`). Shards are memory-mapped and read one tensor (or one block of a
tensor) at a time; they are written one shard at a time, so memory stays near the model plus a shard.

A directory is someone else's data: the index is read with a size bound and each shard it names must
be a regular file inside the directory (moeforge.safe_paths; a Hugging Face cache snapshot's
symlinks into the cache's blobs/ are inside its home), and every shard's header is checked here
(`read_header`) before safetensors maps the file, so that a damaged one is one line naming it.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from moeforge.interop.hf.errors import HFInteropError
from moeforge.errors import first_line
from moeforge.safe_paths import FileMissing, PathRefused, file_inside, read_inside

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
MAX_INDEX_BYTES = 256 << 20
"""a bound on the index (DeepSeek-V3's, ~90k tensors, is ~9 MB)"""
MAX_HEADER_BYTES = 100_000_000
"""a bound on a shard's JSON header: safetensors' own limit"""
DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
    "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
    "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
}  # fmt: skip
"""the safetensors dtypes and the bits of one element"""

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def shard_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint directory: those its index names, else every
    *.safetensors file; [] for a directory with neither (a bare config.json). Each is a regular file
    inside the directory, or a one-line `HFInteropError` names the entry."""
    home = model_home(path)
    try:
        weight_map = _weight_map(path, home)
        if weight_map is None:
            return [file_inside(path, f.name, path, home) for f in sorted(path.glob("*.safetensors"))]
        return [file_inside(path, name, path / INDEX_FILE, home) for name in sorted(set(weight_map.values()))]
    except FileMissing as err:
        raise HFInteropError(f"{err.source}: names shard {err.entry!r}, which does not exist") from None
    except PathRefused as err:
        raise HFInteropError(str(err)) from None


def _weight_map(path: Path, home: Path) -> dict[str, Any] | None:
    """The index's weight_map ({tensor name: shard name}), read with a bound; None without an index."""
    index = path / INDEX_FILE
    if not index.exists() and not index.is_symlink():
        return None
    try:
        data = json.loads(read_inside(path, INDEX_FILE, path, MAX_INDEX_BYTES, home))
    except (ValueError, RecursionError) as err:
        raise HFInteropError(f"{index}: not valid JSON ({first_line(err)})") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict):
        raise HFInteropError(f"{index}: no 'weight_map' object ({{tensor name: shard file}})")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise HFInteropError(f"{index}: weight_map[{name!r}] is {shard!r}; allowed: a shard's file name")
    return weight_map


def model_home(path: Path) -> Path:
    """The tree a model directory's files may resolve into: the directory itself, or for a Hugging
    Face cache snapshot (`models--org--name/snapshots/<revision>/`, whose files are symlinks to
    `../../blobs/<hash>`) the cache entry `models--org--name`."""
    resolved = path.resolve()
    return resolved.parent.parent if resolved.parent.name == "snapshots" else resolved


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint (`shard_files`); a directory with neither an index nor
    *.safetensors files is an error."""
    files = shard_files(path)
    if not files and not (path / INDEX_FILE).is_file():
        raise HFInteropError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not read)")
    return files


def tensor_names(files: Iterable[Path]) -> dict[Path, list[str]]:
    """The names of the tensors in each shard, sorted, from its header checked by `read_header` (no
    tensor data is read): a shard listed here opens with safetensors without surprise."""
    return {file: sorted(read_header(file)) for file in files}


def read_header(file: Path) -> dict[str, dict[str, Any]]:
    """The tensors a safetensors file declares ({name: {"dtype", "shape", "data_offsets"}}), its header
    checked against the file: an 8-byte little-endian length within the file and `MAX_HEADER_BYTES`,
    a JSON object, known dtypes, shapes of non-negative integers, and offsets that tile the data
    region exactly (each tensor's span = elements x dtype size, no overlap, no gap, none past the
    end: what safetensors requires). Anything else is a one-line `HFInteropError` naming the file."""
    with file.open("rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size < 8:
            _damaged(file, f"{size} bytes, fewer than the 8 of its header length")
        length = struct.unpack("<Q", stream.read(8))[0]
        if length > min(size - 8, MAX_HEADER_BYTES):
            _damaged(file, f"its header length {length} does not fit in the file's {size} bytes (or in 100 MB)")
        text = stream.read(length)
    try:
        header = json.loads(text)
    except (ValueError, RecursionError) as err:
        _damaged(file, f"its header is not JSON ({first_line(err)})")
    if not isinstance(header, dict):
        _damaged(file, "its header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        _damaged(file, "its __metadata__ is not an object of strings")
    for name, entry in header.items():
        _check_entry(file, name, entry)
    _check_tiling(file, header, size - 8 - length)
    return header


def _check_entry(file: Path, name: str, entry: Any) -> None:
    """One tensor's dtype, shape and the size of its span."""
    if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BITS:
        dtype = entry.get("dtype") if isinstance(entry, dict) else entry
        _damaged(file, f"tensor {name!r} has dtype {dtype!r}; known: {', '.join(DTYPE_BITS)}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not isinstance(shape, list) or not all(_is_count(d) and d < 2**63 for d in shape):
        _damaged(file, f"tensor {name!r} has shape {shape!r}; allowed: a list of integers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))):
        _damaged(file, f"tensor {name!r} has data_offsets {offsets!r}; allowed: [begin, end], integers >= 0")
    bits = math.prod(shape) * DTYPE_BITS[entry["dtype"]]
    if (offsets[1] - offsets[0]) * 8 != bits:
        _damaged(file, f"tensor {name!r} of shape {shape} {entry['dtype']} spans {offsets}, not {bits / 8:g} bytes")


def _check_tiling(file: Path, header: dict[str, dict[str, Any]], data_bytes: int) -> None:
    """The tensors' spans, in order, cover the data region once."""
    end = 0
    for name, entry in sorted(header.items(), key=lambda item: tuple(item[1]["data_offsets"])):
        begin, stop = entry["data_offsets"]
        if stop > data_bytes:
            _damaged(file, f"tensor {name!r} at {entry['data_offsets']} runs past a data region of {data_bytes} bytes")
        if begin != end:
            what = "overlaps the tensor before it" if begin < end else f"leaves bytes {end}..{begin} unused"
            _damaged(file, f"tensor {name!r} at {entry['data_offsets']} {what}")
        end = stop
    if end != data_bytes:
        _damaged(file, f"its tensors end at byte {end} of a data region of {data_bytes} bytes")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _damaged(file: Path, reason: str) -> NoReturn:
    raise HFInteropError(f"{file}: damaged safetensors file: {reason}")


def stored_tensors(files: dict[str, Path], names: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """(name, lazy slice) of each of `names`, in that order, from its shard `files[name]`: nothing is
    read until the slice is indexed; a shard stays open while consecutive names are in it."""
    for file, group in itertools.groupby(names, key=files.__getitem__):
        with safe_open(str(file), framework="pt") as shard:
            for name in group:
                yield name, shard.get_slice(name)


def read_block(
    stored: Any, ranges: list[tuple[int, int]], order: Callable[[int], tuple[int, ...] | None]
) -> tuple[torch.Tensor, int]:
    """The block of a stored tensor at `ranges` ([start, stop) in each of its dims) and the bytes read.
    Along a dim that `order(dim)` permutes, the ranges count in the permuted order (position i holds
    stored index order(dim)[i]): the covering slice is read, then reordered."""
    slices, picks = [], []
    for dim, (start, stop) in enumerate(ranges):
        permutation = order(dim)
        if permutation is None:
            slices.append(slice(start, stop))
            picks.append(None)
        else:
            wanted = torch.tensor(permutation[start:stop])
            first = int(wanted.min())
            slices.append(slice(first, int(wanted.max()) + 1))
            picks.append(wanted - first)
    block = stored[tuple(slices)]
    nbytes = block.numel() * block.element_size()
    for dim, pick in enumerate(picks):
        if pick is not None:
            block = block.index_select(dim, pick)
    return block, nbytes


def write_shards(
    path: Path,
    sizes: dict[str, int],
    tensor: Callable[[str], torch.Tensor],
    max_shard_bytes: int,
    progress: bool,
) -> None:
    """Write the tensors named in `sizes` (their bytes; `tensor(name)` makes each, one shard at a time)
    in that order into `path`: one model.safetensors, or shards of at most `max_shard_bytes` each and
    their index."""
    shards = _plan_shards(sizes, max_shard_bytes)
    weight_map = {}
    with tqdm(total=len(sizes), desc="export", unit="tensor", disable=not progress) as bar:
        for k, names in enumerate(shards):
            file = (
                "model.safetensors"
                if len(shards) == 1
                else f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
            )
            save_file({name: tensor(name) for name in names}, str(path / file), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(names, file))
            bar.update(len(names))
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
        (path / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Tensor names grouped into shards of at most `max_bytes` each (a larger tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, nbytes in sizes.items():
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards
