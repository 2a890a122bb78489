"""Streaming DiLoCo's fragments: which parameters synchronise together, and when.

Blocks are dealt out strided (fragment p holds blocks p, p+P, p+2P, ...; Streaming DiLoCo found
strided slightly better than contiguous): the embedding joins the first fragment, the final norm,
the head and the MTP modules the last. Tied weights belong to the fragment of their first name (the
embedding). The router biases of the aux-loss-free balancing are buffers, not parameters: they travel
with their block's fragment and are averaged, not stepped by the outer optimizer.

Fragment p synchronises after the inner steps s with s = p*H/P (mod H): each fragment once every H
steps, one fragment at a time, so the peak bandwidth drops by P.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn

_BLOCK = re.compile(r"layers\.(\d+)\.")
_FIRST = ("tok_embeddings.",)
_LAST = ("norm.", "output.", "mtp.")
ROUTER_BIAS_SUFFIX = "router.expert_bias"
"""the name ending of the aux-loss-free balancing's bias buffers"""


@dataclass
class Fragment:
    """One fragment's parameters (each once) and router-bias buffers, by their model names."""

    index: int
    params: dict[str, nn.Parameter] = field(default_factory=dict)
    biases: dict[str, torch.Tensor] = field(default_factory=dict)


def fragment_of(name: str, n_fragments: int) -> int:
    """The fragment of the parameter or buffer called `name` in a `Transformer`."""
    block = _BLOCK.match(name)
    if block:
        return int(block[1]) % n_fragments
    if name.startswith(_FIRST):
        return 0
    if name.startswith(_LAST):
        return n_fragments - 1
    raise ValueError(f"{name}: no fragment rule for this part of the model (add it to diloco/fragments.py)")


def split_into_fragments(model: nn.Module, n_fragments: int) -> list[Fragment]:
    fragments = [Fragment(p) for p in range(n_fragments)]
    for name, param in model.named_parameters():  # a tied weight once, under its first name
        fragments[fragment_of(name, n_fragments)].params[name] = param
    for name, buffer in model.named_buffers():
        if name.endswith(ROUTER_BIAS_SUFFIX):
            fragments[fragment_of(name, n_fragments)].biases[name] = buffer
    return fragments


def sync_offset(fragment: int, sync_every: int, n_fragments: int) -> int:
    """The step (mod H) after which `fragment` synchronises: p*H/P, rounded down."""
    return fragment * sync_every // n_fragments


def fragments_due(step: int, sync_every: int, n_fragments: int) -> list[int]:
    """The fragments that synchronise after inner step `step` (counted from 1)."""
    return [p for p in range(n_fragments) if step % sync_every == sync_offset(p, sync_every, n_fragments)]
