"""Which parameters are hidden matrices — the linear maps between hidden states, which Muon
orthogonalises (`moeforge.train.muon`) — and how each holds its matrices. The trainer builds its
optimizer groups from it and the planner counts optimizer state by it, so the two agree.

The hidden matrices are the attention and MLA projections, the dense, shared and routed experts'
weights and the MTP projections, 2-D or 3-D (a stack of experts). Not the embedding and the output
head (a lookup and a classifier, not maps between hidden states), the router (a few rows whose scale
sets the gates), nor the vectors (norms, biases): Keller Jordan's and Moonshot's runs give those to
AdamW.
"""

from __future__ import annotations

from typing import Literal

from torch import nn

from moeforge.model.mlp import SwiGLU
from moeforge.model.moe.experts import RoutedExperts
from moeforge.model.moe.router import Router

Halves = Literal["none", "rows", "columns"]
"""How a parameter holds its matrices: as they are, or two fused ones stacked along its rows
(dense `w13.weight` [2F, D]: gate rows, then up rows) or its columns (experts' `w13` [E, D, 2F])."""


def hidden_matrices(model: nn.Module) -> dict[int, Halves]:
    """{id(parameter): how it holds its matrices} of the trainable hidden matrices of `model` (the
    module docstring says which they are)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    routers = {id(m.weight) for m in model.modules() if isinstance(m, Router)}
    head = getattr(model, "output", None)
    excluded = embeddings | routers | ({id(head.weight)} if isinstance(head, nn.Linear) else set())
    fused: dict[int, Halves] = {}
    for module in model.modules():
        if isinstance(module, SwiGLU):
            fused[id(module.w13.weight)] = "rows"  # [2F, D]: gate rows, then up rows
        elif isinstance(module, RoutedExperts):
            fused[id(module.w13)] = "columns"  # [E, D, 2F]: gate columns, then up columns
    return {
        id(p): fused.get(id(p), "none")
        for p in model.parameters()
        if p.requires_grad and p.ndim >= 2 and id(p) not in excluded
    }
