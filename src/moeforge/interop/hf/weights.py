"""Weights between a Hugging Face checkpoint directory and a moeforge model: `from_hf`,
`load_hf_weights` (whole or sharded, each rank reading only its own slices) and `to_hf`.

Local directories only (config.json + *.safetensors, optionally sharded with an index); nothing is
downloaded. Every tensor of a checkpoint must find its place in the model (layout.py) and every place
must be filled; import then export reproduces every tensor bit for bit (`to_hf(..., dtype=)` the
stored dtype).
"""

from __future__ import annotations

import itertools
import json
import warnings
from contextlib import closing
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from moeforge.config import ModelConfig
from moeforge.interop.hf.architecture import Architecture
from moeforge.interop.hf.errors import HFInteropError
from moeforge.interop.hf.layout import (
    Slot,
    declared_mtp_layers,
    layer_index,
    stored_mtp_layers,
    tensor_layout,
    view,
)
from moeforge.interop.hf.registry import (
    CONFIG_FILE,
    architecture_of,
    export_architecture,
    hf_model_config,
    read_hf_config,
)
from moeforge.interop.hf.safetensors_io import (
    DEFAULT_MAX_SHARD_BYTES,
    DTYPE_NAMES,
    read_block,
    stored_tensors,
    tensor_names,
    weight_files,
    write_shards,
)
from moeforge.model.transformer import Transformer
from moeforge.parallel.mesh import ParallelMesh
from moeforge.parallel.pipeline import StageModel
from moeforge.parallel.hsdp_reads import broadcast_shards, broadcast_verdict, is_first_replica, replicated
from moeforge.parallel.sharded_load import LocalPart, index_box, local_part, overlap
from moeforge.plan.memory_budget import check_model_fits

# ----------------------------------------------------------------------------------------------
# Import


def from_hf(path: Path | str, progress: bool = True) -> Transformer:
    """A moeforge `Transformer` (fp32, eval mode) with the weights of a local Hugging Face checkpoint;
    a one-line `MemoryLimitError` instead when the model would not fit this process's host memory
    (moeforge.plan.memory_budget)."""
    cfg = hf_model_config(path)
    check_model_fits(cfg, "cpu", f"the model of {Path(path) / CONFIG_FILE}")
    model = Transformer(cfg)
    load_hf_weights(model, path, progress)
    return model.eval()


@torch.no_grad()
def load_hf_weights(
    model: Transformer | StageModel, path: Path | str, progress: bool = True, mesh: ParallelMesh | None = None
) -> dict[str, int]:
    """Copy a Hugging Face checkpoint into `model`, whole or sharded by `parallelize`, in place.

    Each process reads from the memory-mapped shards, one tensor at a time, only the slices that land
    in its own part of each parameter (`local_part` in parallel/sharded_load.py). A plain model is all
    local: every tensor is read whole. After `parallelize`, a process reads of the routed experts only
    the E/ep it owns (of those, the ones FSDP gives it over efsdp) and never touches the others; of
    every other parameter, the rows FSDP gives it; buffers (the router's correction bias) in full.
    Memory beyond the model's own shards: one tensor's slice (plus, for DeepSeek's permuted RoPE rows,
    the rows around it). This is what loading costs; a caller that builds the whole model on every rank
    before `parallelize` (as the trainer does) still holds it whole until then.

    `model.cfg` must have the checkpoint's shapes (e.g. built from `hf_model_config(path)`); every
    tensor of the checkpoint must find its place and every place must be filled, except that DeepSeek's
    multi-token-prediction layers beyond `model.cfg.mtp_depth` are skipped with a warning, and MTP
    modules the checkpoint stores no layer for keep their initialisation.

    With the `mesh` of an HSDP run (dp_replicate > 1), only replica 0 reads; the other replicas
    receive their shards from it (parallel/hsdp_reads.py).

    Under pipelining, `model` is the rank's `StageModel`: it reads the tensors of its own stages only.

    Returns the bytes this process read from each tensor it read any part of.
    """
    path = Path(path)
    cfg = model.cfg
    hf_config = read_hf_config(path)
    arch = architecture_of(hf_config, path / CONFIG_FILE)
    names = tensor_names(weight_files(path))
    declared = declared_mtp_layers(hf_config)
    stored_mtp = stored_mtp_layers(itertools.chain(*names.values()), cfg.n_layers, declared)
    mtp_layers = min(cfg.mtp_depth, stored_mtp)
    layout = tensor_layout(cfg, arch, hf_config, mtp_layers)
    skipped_layers = range(cfg.n_layers + mtp_layers, cfg.n_layers + declared)
    located = _locate(path, names, layout, cfg, arch, skipped_layers)
    state = model.state_dict(keep_vars=True)
    # a pipeline stage's model (StageModel) holds some blocks only: it reads the tensors of those
    located = {name: file for name, file in located.items() if layout[name].param in state}
    if not replicated(mesh):
        return _read_local_parts(state, located, layout, progress)
    read, error = {}, None
    if is_first_replica(mesh):
        try:
            read = _read_local_parts(state, located, layout, progress)
        except HFInteropError as err:
            error = str(err)
    error, _ = broadcast_verdict(mesh, error, [])
    if error is not None:
        raise HFInteropError(error)
    broadcast_shards(mesh, state.values())
    return read


def _read_local_parts(
    state: dict[str, torch.Tensor], located: dict[str, Path], layout: dict[str, Slot], progress: bool
) -> dict[str, int]:
    """Copy into each tensor of `state` the slices of the located tensors that land in its local part;
    the bytes read per tensor."""
    parts = {name: local_part(tensor) for name, tensor in state.items()}
    read: dict[str, int] = {}
    in_order = sorted(located, key=lambda name: layout[name].duplicate)  # copies after what they repeat
    with (
        tqdm(total=len(located), desc="import", unit="tensor", disable=not progress) as bar,
        closing(stored_tensors(located, in_order)) as tensors,  # an error closes the open shard at once
    ):
        for name, stored in tensors:
            slot = layout[name]
            nbytes = _load_tensor(stored, name, slot, parts[slot.param])
            if nbytes:
                read[name] = nbytes
            bar.update(1)
    return read


def _locate(
    path: Path,
    names: dict[Path, list[str]],
    layout: dict[str, Slot],
    cfg: ModelConfig,
    arch: Architecture,
    skipped_layers: range,
) -> dict[str, Path]:
    """The file of every tensor in `layout`, checked from the shards' headers before any data is read:
    no tensor without a place, none twice, none missing; MTP layers in `skipped_layers` are skipped."""
    located: dict[str, Path] = {}
    skipped = 0
    for file, file_names in names.items():
        for name in file_names:
            if layer_index(name) in skipped_layers:
                skipped += 1
            elif _skippable(name, cfg):
                continue
            elif name not in layout:
                raise HFInteropError(
                    f"{file.name}: tensor {name!r} has no place in this {arch.model_type} model"
                )
            elif name in located:
                raise HFInteropError(f"{file.name}: tensor {name!r} appears in more than one shard")
            else:
                located[name] = file
    missing = [name for name in layout if name not in located]
    if missing:
        raise HFInteropError(
            f"{path}: {len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]!r}"
        )
    if skipped:
        warnings.warn(
            f"skipped the {skipped} tensors of the multi-token-prediction layer(s) from "
            f"model.layers.{skipped_layers.start} on (model.mtp-depth={cfg.mtp_depth}): the rest is imported",
            stacklevel=3,
        )
    return located


def _skippable(name: str, cfg: ModelConfig) -> bool:
    """Tensors that are not model state: cached RoPE frequencies, and the head of a tied model."""
    return name.endswith("rotary_emb.inv_freq") or (cfg.tie_embeddings and name == "lm_head.weight")


def _load_tensor(stored: Any, name: str, slot: Slot, part: LocalPart) -> int:
    """Copy the slice of one stored tensor that lands in `part` (for a duplicate: check it equals what
    is there); the bytes read, 0 when none of it lands there."""
    box = index_box(slot.index, part.full_shape)
    expected = [stop - start for start, stop, kept in box if kept]
    expected = expected[::-1] if slot.transpose else expected
    if list(stored.get_shape()) != expected:
        raise HFInteropError(
            f"tensor {name!r}: shape {list(stored.get_shape())} does not fit this model (expected {expected})"
        )
    landing = overlap(box, part)
    if landing is None:
        return 0
    local_index, ranges = landing
    target = part.tensor[local_index]
    if slot.transpose:
        target, ranges = target.T, ranges[::-1]
    value, nbytes = read_block(stored, ranges, slot.order)
    if not slot.duplicate:
        target.copy_(value)
    elif not torch.equal(target, value.to(target)):
        raise HFInteropError(
            f"tensor {name!r} differs from the {slot.param} it repeats (moeforge shares one copy)"
        )
    return nbytes


# ----------------------------------------------------------------------------------------------
# Export


@torch.no_grad()
def to_hf(
    model: Transformer,
    path: Path | str,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> Path:
    """Write `model` as a Hugging Face checkpoint directory (config.json + safetensors shards).

    `dtype`: the stored precision (default: the model's). The architecture is the one whose format can
    hold the model (`export_architecture`); anything the format has no place for (e.g. a non-zero
    aux-loss-free bias with softmax routing) is an error, not dropped.
    """
    path = Path(path)
    cfg = model.cfg
    arch = export_architecture(cfg)
    dtype = dtype or model.tok_embeddings.weight.dtype
    if dtype not in DTYPE_NAMES:
        raise HFInteropError(f"to_hf: dtype {dtype} is not one of {', '.join(DTYPE_NAMES.values())}")
    if path.is_dir() and any(path.glob("*.safetensors")):
        raise HFInteropError(f"to_hf: {path} already holds *.safetensors files; choose an empty directory")
    hf_config = {**arch.to_hf(cfg), "torch_dtype": DTYPE_NAMES[dtype]}
    layout = tensor_layout(cfg, arch, hf_config, cfg.mtp_depth)
    state = model.state_dict(keep_vars=True)
    _check_nothing_dropped(state, layout, cfg, arch)
    path.mkdir(parents=True, exist_ok=True)
    sizes = {name: _nbytes(state, slot, dtype) for name, slot in layout.items()}
    write_shards(path, sizes, lambda name: _hf_tensor(state, layout[name], dtype), max_shard_bytes, progress)
    (path / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2))
    return path


def _hf_tensor(state: dict[str, torch.Tensor], slot: Slot, dtype: torch.dtype) -> torch.Tensor:
    """A new contiguous tensor in the Hugging Face layout and precision, for one slot."""
    tensor = view(state, slot)
    if slot.rows is not None:
        tensor = tensor[torch.tensor(slot.rows).argsort()]
    if slot.columns is not None:
        tensor = tensor[:, torch.tensor(slot.columns).argsort()]
    return tensor.to(_slot_dtype(slot, dtype), memory_format=torch.contiguous_format, copy=True)


def _slot_dtype(slot: Slot, dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if slot.fp32 else dtype


def _nbytes(state: dict[str, torch.Tensor], slot: Slot, dtype: torch.dtype) -> int:
    return view(state, slot).numel() * _slot_dtype(slot, dtype).itemsize


def _check_nothing_dropped(
    state: dict[str, torch.Tensor], layout: dict[str, Slot], cfg: ModelConfig, arch: Architecture
) -> None:
    """Every moeforge tensor the format has no place for must be redundant: the tied head, or zeros."""
    placed = {slot.param for slot in layout.values()}
    for name, tensor in state.items():
        if name in placed or (cfg.tie_embeddings and name == "output.weight"):
            continue
        if torch.count_nonzero(tensor):
            raise HFInteropError(
                f"to_hf: {name} is non-zero and the {arch.model_type} format has no place for it"
                + (" (train with model.moe.bias-update-rate 0)" if name.endswith("expert_bias") else "")
            )
