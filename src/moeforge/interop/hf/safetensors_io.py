"""Safetensors checkpoint directories, whatever model they hold: which shard files there are, the
tensor names in their headers, reading one block of a stored tensor, and writing tensors as shards.

A directory holds `model.safetensors`, or shards `model-0000k-of-0000n.safetensors` named by an index
(`model.safetensors.index.json`). Shards are memory-mapped and read one tensor (or one block of a
tensor) at a time; they are written one shard at a time, so memory stays near the model plus a shard.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from moeforge.interop.hf.errors import HFInteropError

INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30

DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


def shard_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint directory: those its index names, else every
    *.safetensors file; [] for a directory with neither (a bare config.json)."""
    index = path / INDEX_FILE
    if not index.is_file():
        return sorted(path.glob("*.safetensors"))
    names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    files = [path / name for name in names]
    absent = [f.name for f in files if not f.is_file()]
    if absent:
        raise HFInteropError(f"{index}: names shard {absent[0]!r}, which does not exist")
    return files


def weight_files(path: Path) -> list[Path]:
    """The safetensors shards of a checkpoint (`shard_files`); a directory with neither an index nor
    *.safetensors files is an error."""
    files = shard_files(path)
    if not files and not (path / INDEX_FILE).is_file():
        raise HFInteropError(f"{path}: no *.safetensors files (PyTorch .bin checkpoints are not read)")
    return files


def tensor_names(files: Iterable[Path]) -> dict[Path, list[str]]:
    """The names of the tensors in each shard, from its header (no tensor data is read)."""
    names = {}
    for file in files:
        with safe_open(str(file), framework="pt") as shard:
            names[file] = list(shard.keys())  # noqa: SIM118 -- safe_open is not a mapping
    return names


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
