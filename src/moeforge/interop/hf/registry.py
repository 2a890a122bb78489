"""The architectures moeforge reads and writes, by model_type, and config.json <-> `ModelConfig`
through them. A fourth architecture is one module like mixtral.py and one line in `ARCHITECTURES`
(and one in `export_architecture` if moeforge models should be written in it)."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

from moeforge.config import ConfigError, ModelConfig
from moeforge.errors import first_line
from moeforge.safe_paths import PathRefused, read_inside
from moeforge.interop.hf.architecture import (
    COMMON_FIELDS,
    IGNORED_FIELDS,
    Architecture,
    check_json_numbers,
    check_value_types,
    common_unsupported,
)
from moeforge.interop.hf.deepseek_v3 import DEEPSEEK_V3
from moeforge.interop.hf.errors import HFInteropError
from moeforge.interop.hf.layout import declared_mtp_layers, stored_mtp_layers
from moeforge.interop.hf.glm4_moe import GLM4_MOE
from moeforge.interop.hf.mixtral import MIXTRAL
from moeforge.interop.hf.qwen3_moe import QWEN3_MOE
from moeforge.interop.hf.safetensors_io import model_home, shard_files, tensor_names

CONFIG_FILE = "config.json"
"""a Hugging Face directory's config.json (not the same format as a run's, though the same name)"""

ARCHITECTURES: dict[str, Architecture] = {
    arch.model_type: arch for arch in (QWEN3_MOE, MIXTRAL, DEEPSEEK_V3, GLM4_MOE)
}


MAX_CONFIG_BYTES = 16 << 20
"""the most of a config.json read: a real model's is a few kilobytes"""


def read_hf_config(path: Path | str) -> dict[str, Any]:
    """The config.json of a Hugging Face model directory, read with a size bound and checked to be a
    JSON object of finite numbers (`check_json_numbers`); anything else is a one-line
    `HFInteropError` naming the file (and the field)."""
    directory = Path(path)
    file = directory / CONFIG_FILE
    if not file.is_file():
        raise HFInteropError(f"{path}: no {CONFIG_FILE}; expected a Hugging Face model directory")
    try:  # inside the model's directory (a cache snapshot's blobs included), at most MAX_CONFIG_BYTES
        data = read_inside(directory, CONFIG_FILE, directory, MAX_CONFIG_BYTES, model_home(directory))
    except PathRefused as err:  # a symlink out, not a regular file, too large
        raise HFInteropError(str(err)) from None
    except OSError as err:
        raise HFInteropError(f"{file}: cannot be read ({err.strerror or err})") from None
    try:
        config = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise HFInteropError(f"{file}: not valid UTF-8 (byte 0x{data[err.start]:02x} at offset {err.start})") from None
    except (ValueError, RecursionError) as err:  # JSONDecodeError, an integer of > 4300 digits, deep nesting
        raise HFInteropError(f"{file}: not valid JSON: {first_line(err)}") from None
    if not isinstance(config, dict):
        raise HFInteropError(f"{file}: got a JSON {type(config).__name__}; allowed: a JSON object of fields")
    check_json_numbers(config, file)
    return config


def hf_model_config(path: Path | str) -> ModelConfig:
    """The moeforge `ModelConfig` of a Hugging Face model directory (its config.json)."""
    hf = read_hf_config(path)
    where = Path(path) / CONFIG_FILE
    arch = architecture_of(hf, where)
    unknown = sorted(set(hf) - IGNORED_FIELDS - COMMON_FIELDS - arch.fields)
    if unknown:
        raise HFInteropError(
            f"{where}: unsupported config field(s) for {arch.model_type}: {', '.join(unknown)}"
        )
    values = {**arch.defaults, **hf}
    try:
        check_value_types(values)  # before any field is used: sizes bounded, numbers numbers
        problems = common_unsupported(values) + arch.unsupported(values)
        if problems:
            raise HFInteropError(f"unsupported: {'; '.join(problems)}")
        cfg = arch.to_model(values)
    except HFInteropError as err:
        raise HFInteropError(f"{where}: {err}") from None
    cfg.mtp_depth = _imported_mtp_depth(Path(path), values, cfg.n_layers)
    try:
        cfg.validate()
    except ConfigError as err:
        raise HFInteropError(f"{where}: gives an invalid moeforge model: {err}") from None
    return cfg


def _imported_mtp_depth(path: Path, values: dict[str, Any], n_layers: int) -> int:
    """The multi-token-prediction layers a checkpoint declares, or 0 when it stores none of them
    (`transformers` saves DeepSeek-V3 without them, keeping num_nextn_predict_layers, default 1).

    One layer only: DeepSeek-V3 has one, and how a second would read the first's output (before or
    after its shared_head.norm) is not defined by the format; moeforge's modules pass it normalised.
    """
    declared = declared_mtp_layers(values)
    if not declared:
        return 0
    names = itertools.chain(*tensor_names(shard_files(path)).values())  # none for a bare config.json
    stored = stored_mtp_layers(names, n_layers, declared)
    if stored > 1:
        raise HFInteropError(
            f"{path / CONFIG_FILE}: unsupported: num_nextn_predict_layers={declared} "
            "(one multi-token-prediction layer only)"
        )
    return stored


def architecture_of(hf: dict[str, Any], where: Path | str) -> Architecture:
    model_type = hf.get("model_type")
    if not isinstance(model_type, str) or model_type not in ARCHITECTURES:
        allowed = " | ".join(repr(name) for name in ARCHITECTURES)
        raise HFInteropError(f"{where}: model_type: got {model_type!r}; allowed: {allowed}")
    return ARCHITECTURES[model_type]


def export_architecture(cfg: ModelConfig) -> Architecture:
    """The Hugging Face architecture a moeforge model is written as: DeepSeek-V3 with MLA, GLM-4.5's
    MoE with grouped-query attention and sigmoid routing (the default model), Qwen3-MoE when it
    normalises query/key heads, Mixtral otherwise; an error listing what does not fit."""
    if cfg.attention == "mla":
        arch = DEEPSEEK_V3
    elif cfg.moe.score_func == "sigmoid":
        arch = GLM4_MOE
    else:
        arch = QWEN3_MOE if cfg.qk_norm else MIXTRAL
    problems = arch.misfits(cfg)
    if problems:
        raise HFInteropError(
            f"to_hf: this model does not fit the {arch.model_type} format: {'; '.join(problems)}"
        )
    return arch
