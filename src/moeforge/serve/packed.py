"""One forward over every request of an engine step, packed into a single row of tokens.

Requests of a step differ in length (a prefill chunk of hundreds of tokens beside one-token decodes),
so instead of padding them into a [B, S] batch the engine lays their tokens end to end: [1, N]. The
MoE layers and projections see N real tokens, no padding. Attention keeps each token to its own
request: its keys are the rows of that request's context in the paged cache, and the mask lets a
token at position p read its request's positions 0..p only (`packed_slots`). The price is that every
token's scores span all requests' contexts (masked), small next to the MLPs at the batch sizes of
this engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeforge.infer.decode import moe_output
from moeforge.model.attention import CacheSlots
from moeforge.model.moe import MoE
from moeforge.model.transformer import Transformer
from moeforge.serve.paged_cache import rows_of


@dataclass
class Segment:
    """One request's tokens in a step: `tokens` at positions start, start+1, ...; its context in the
    cache is positions 0 .. start + len(tokens) - 1 of the block table `table`."""

    tokens: list[int]
    start: int
    table: list[int]

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


def packed_slots(segments: list[Segment], block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, CacheSlots]:
    """Tokens [1, N], their positions [N] and the `CacheSlots` of the packed step: rows written
    (`index` [N]), rows read (`read` [T], every segment's context in order) and the mask [1, 1, N, T]."""
    tokens, positions, written, read, query_segment, key_segment, key_position = [], [], [], [], [], [], []
    for number, segment in enumerate(segments):
        span = range(segment.start, segment.end)
        tokens += segment.tokens
        positions += span
        written += rows_of(segment.table, span, block_size)
        read += rows_of(segment.table, range(segment.end), block_size)
        query_segment += [number] * len(span)
        key_segment += [number] * segment.end
        key_position += range(segment.end)

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    position = tensor(positions)
    same_request = tensor(query_segment)[:, None] == tensor(key_segment)[None, :]
    mask = same_request & (tensor(key_position)[None, :] <= position[:, None])
    slots = CacheSlots(tensor(written), mask[None, None], tensor(read))
    return tensor(tokens)[None], position, slots


def packed_forward(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, slots: CacheSlots) -> torch.Tensor:
    """The main model's final normalised hidden states [N, dim] of the packed tokens [1, N] (what its
    output head reads), writing their keys and values into the paged caches."""
    cos, sin = model.rope_at(positions)
    h = model.tok_embeddings(tokens)
    for block in model.layers:
        h = block.attend(h, cos, sin, slots)
        h = h + ffn_output(block.ffn, block.ffn_norm(h))
    return model.norm(h)[0]


def ffn_output(ffn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's feed-forward output for x [1, N, dim]. An MoE layer with few tokens (fewer chosen
    experts than it has experts) gathers each token's experts (`moe_output`, decoding's path); with
    more it dispatches them to the grouped GEMM, as in training."""
    if not isinstance(ffn, MoE):
        return ffn(x)
    if x.shape[1] * ffn.router.top_k < ffn.router.n_experts:
        return moe_output(ffn, x)
    return ffn(x)[0]
