"""One forward over every request of an engine step.

Requests of a step differ in length (a prefill chunk of hundreds of tokens beside one-token decodes).
Two layouts, chosen per step (`step_inputs`):

- **rows** — every request feeds the same number of tokens S (a step of decodes only, or of
  speculative verifies, each the newest token and D drafts): a batch [B, S], each row reading its
  own context, padded to the longest, from the paged cache under a mask [B, 1, S, T]. Attention
  costs each request its own context only.
- **packed** — otherwise: the tokens laid end to end in one row [1, N], no padding for the MoE
  layers and projections; attention reads every request's context [T = sum of contexts] under a
  mask that keeps each token to its own request's earlier positions.

Either way a token at position p reads its request's positions 0..p, so the outputs are the same.
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


def step_inputs(segments: list[Segment], block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, CacheSlots]:
    """Tokens, their positions (both [B, S]: rows, or [1, N]: packed) and the `CacheSlots` of the step."""
    if len({len(segment.tokens) for segment in segments}) == 1:
        return row_slots(segments, block_size, device)
    return packed_slots(segments, block_size, device)


def _tensor(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def row_slots(segments: list[Segment], block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, CacheSlots]:
    """Segments of equal length S as rows [B, S]; each reads its context padded to the longest, T."""
    longest = max(segment.end for segment in segments)
    blocks = -(-longest // block_size)
    tables = _tensor([s.table[:blocks] + [0] * (blocks - len(s.table[:blocks])) for s in segments], device)
    # row of position p: table[p // block_size] * block_size + p % block_size; past a request's
    # context the rows are block 0's (or its own), which the mask hides
    read = (tables[:, :, None] * block_size + torch.arange(block_size, device=device)).view(len(segments), -1)
    read = read[:, :longest].contiguous()  # [B, T]
    starts = _tensor([segment.start for segment in segments], device)
    positions = starts[:, None] + torch.arange(len(segments[0].tokens), device=device)  # [B, S]
    mask = torch.arange(longest, device=device)[None, None, :] <= positions[:, :, None]  # [B, S, T]
    written = read.gather(1, positions).reshape(-1)
    tokens = _tensor([segment.tokens for segment in segments], device)
    return tokens, positions, CacheSlots(written, mask.unsqueeze(1), read)


def packed_slots(segments: list[Segment], block_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, CacheSlots]:
    """Tokens [1, N], their positions [1, N] and the `CacheSlots` of the packed step: rows written
    (`index` [N]), rows read (`read` [1, T], every segment's context in order) and the mask [1, 1, N, T]."""
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
    position = _tensor(positions, device)
    same_request = _tensor(query_segment, device)[:, None] == _tensor(key_segment, device)[None, :]
    mask = same_request & (_tensor(key_position, device)[None, :] <= position[:, None])
    slots = CacheSlots(_tensor(written, device), mask[None, None], _tensor(read, device)[None])
    return _tensor(tokens, device)[None], position[None], slots


def packed_forward(model: Transformer, tokens: torch.Tensor, positions: torch.Tensor, slots: CacheSlots) -> torch.Tensor:
    """The main model's final normalised hidden states [B * S, dim] of tokens [B, S] at positions
    [B, S] (what its output head reads), writing their keys and values into the paged caches."""
    cos, sin = model.rope_at(positions)
    h = model.tok_embeddings(tokens)
    for block in model.layers:
        h = block.attend(h, cos, sin, slots)
        h = h + ffn_output(block.ffn, block.ffn_norm(h))
    return model.norm(h).reshape(-1, h.shape[-1])


def ffn_output(ffn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's feed-forward output for x [B, S, dim]. An MoE layer with few tokens (fewer chosen
    experts than it has experts) gathers each token's experts (`moe_output`, decoding's path); with
    more it dispatches them to the grouped GEMM, as in training."""
    if not isinstance(ffn, MoE):
        return ffn(x)
    if x.shape[0] * x.shape[1] * ffn.router.top_k < ffn.router.n_experts:
        return moe_output(ffn, x)
    return ffn(x)[0]
