"""The model's parameter tensors as the planner counts them: read from a `Transformer` built on the
meta device (no memory, no weights), so that the planner's shapes are the model's own."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from math import prod

import torch

from moeforge.config import ModelConfig
from moeforge.diloco.fragments import ROUTER_BIAS_SUFFIX
from moeforge.model.hidden_matrices import hidden_matrices
from moeforge.model.transformer import Transformer

EXPERT_TENSORS = ("experts.w13", "experts.w2")
"""the routed experts' stacked weights [E, ...]: sharded over ep, then over efsdp"""


@dataclass(frozen=True)
class ParamTensor:
    name: str
    shape: tuple[int, ...]
    block: int
    """the transformer block holding it; -1 = embedding; n_layers = final norm, head and MTP modules"""
    is_expert: bool
    is_hidden_matrix: bool = False
    """a matrix Muon updates (`model.hidden_matrices`): one momentum where AdamW keeps two moments"""

    @property
    def numel(self) -> int:
        return prod(self.shape)


def parameter_tensors(cfg: ModelConfig) -> tuple[ParamTensor, ...]:
    """Every parameter of `Transformer(cfg)` with the block it belongs to (the MTP modules and the
    head go with the last stage, the embedding with the first). Built once per model config."""
    key = json.dumps(dataclasses.asdict(cfg), sort_keys=True)
    if key not in _BUILT:
        with torch.device("meta"):
            model = Transformer(cfg)
        matrices = hidden_matrices(model)
        _BUILT[key] = tuple(
            ParamTensor(
                name, tuple(p.shape), _block_of(name, cfg.n_layers), name.endswith(EXPERT_TENSORS), id(p) in matrices
            )
            for name, p in model.named_parameters()
        )
        _BIASES[key] = tuple(
            ParamTensor(name, tuple(b.shape), _block_of(name, cfg.n_layers), False)
            for name, b in model.named_buffers()
            if name.endswith(ROUTER_BIAS_SUFFIX)
        )
    return _BUILT[key]


def router_bias_tensors(cfg: ModelConfig) -> tuple[ParamTensor, ...]:
    """The aux-loss-free router biases (buffers, fp32): DiLoCo exchanges them with their fragment."""
    parameter_tensors(cfg)
    return _BIASES[json.dumps(dataclasses.asdict(cfg), sort_keys=True)]


_BUILT: dict[str, tuple[ParamTensor, ...]] = {}
_BIASES: dict[str, tuple[ParamTensor, ...]] = {}


def transformer_blocks(cfg: ModelConfig, blocks: list[int]) -> int:
    """Transformer blocks (each one attention layer and one FFN unit) among `blocks`, indexed as
    `ParamTensor.block`: the main blocks 0..n_layers-1, and the MTP modules' blocks, which go with
    index n_layers."""
    return sum(1 for b in blocks if 0 <= b < cfg.n_layers) + (cfg.mtp_depth if cfg.n_layers in blocks else 0)


def _block_of(name: str, n_layers: int) -> int:
    if name.startswith("tok_embeddings."):
        return -1
    if name.startswith("layers."):
        return int(name.split(".")[1])
    return n_layers
