"""The forwards of an engine step: its requests as rows [B, S], grouped by how many tokens they feed.

Requests of a step differ in length: a prefill chunk of dozens of tokens beside one-token decodes,
or speculative verifies of the newest token and its drafts. Each request becomes one row that reads
only its own context from the paged cache, and rows of similar length share one forward:

- `row_groups` sorts the requests by length and starts a new group where padding every row to the
  group's longest would add more than `PAD_SLACK` tokens and a quarter of the group: a step of
  decodes is one group [B, 1], a prefill chunk beside them a second [1, chunk] (one decode padded
  to a 64-token chunk would compute 64 tokens for one; a forward per request would pay a step's
  fixed cost per request).
- A prefill chunk alone in its group is split over two rows of consecutive tokens (`group_rows`)
  where the compiled forward, which wants at least two rows, would compute a padding row as long.
- Within a group, a row's padding tokens (past its own tokens) and padding rows (when the compiled
  forward wants at least two) write their keys and values to the cache's scratch block, which no
  request holds, and read nothing a real token reads: the mask [B, 1, S, T] keeps each query at or
  before its own position, and padding comes after a row's tokens.

So a token at position p reads its request's positions 0..p whatever else shares its step, and the
outputs are the same as the request alone (tests/test_serve_engine.py). The forward itself is the
trainer's blocks over `CacheSlots` (`rows_forward`); `StepForward` runs it eagerly or compiled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from moeforge.infer.decode import CPU_COMPILE_OPTIONS, grouped_moe_output, moe_output
from moeforge.model.attention import CacheSlots
from moeforge.model.moe import MoE
from moeforge.model.transformer import Transformer

PAD_SLACK = 16
"""padding tokens a group of rows may add in any case; more only while they stay within a quarter of
the group's tokens (`row_groups`)"""


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

    def piece(self, start: int, stop: int) -> Segment:
        """Its tokens start..stop-1, at their positions."""
        return Segment(self.tokens[start:stop], self.start + start, self.table)


@dataclass(frozen=True)
class Row:
    """One row of a forward: tokens start..stop-1 of the step's segment `member` (a whole segment,
    or a piece of a prefill chunk split over several rows: `group_rows`)."""

    member: int
    start: int
    stop: int


@dataclass
class RowBatch:
    """Some segments of a step as rows: `rows` (in row order), tokens and positions [B, S] (B >=
    len(rows): padding rows last), the rows' block tables [B, blocks] and real token counts [B, 1],
    and the context T each row reads. `slots` derives the `CacheSlots` from them; the compiled
    forward derives them inside its graph (`rows_forward`), where that arithmetic fuses with the
    kernels that read them instead of running as a dozen small operations before each forward."""

    rows: list[Row]
    tokens: torch.Tensor
    positions: torch.Tensor
    tables: torch.Tensor
    counts: torch.Tensor
    context: int
    block_size: int
    scratch: int

    @property
    def slots(self) -> CacheSlots:
        return row_slots(self.positions, self.tables, self.counts, self.context, self.block_size, self.scratch)

    def rows_of(self, hidden: torch.Tensor, index: int) -> torch.Tensor:
        """Row `index`'s outputs in `hidden` [B * S, dim]: [its tokens, dim]."""
        start = index * self.tokens.shape[1]
        return hidden[start : start + self.rows[index].stop - self.rows[index].start]


def row_groups(lengths: list[int], slack: int = PAD_SLACK) -> list[list[int]]:
    """Indices of `lengths`, longest first, grouped so that padding each group's rows to its longest
    adds at most `slack` tokens or a quarter of the padded group: a decoding row does not join a
    prefill chunk, verify rows of 1 to D+1 tokens share one forward."""
    groups: list[list[int]] = []
    padded = real = 0
    for index in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        waste = padded + lengths[groups[-1][0]] - real - lengths[index] if groups else 0
        if groups and waste <= max(slack, (padded + lengths[groups[-1][0]]) // 4):
            groups[-1].append(index)
            padded, real = padded + lengths[groups[-1][0]], real + lengths[index]
        else:
            groups.append([index])
            padded = real = lengths[index]
    return groups


def group_rows(segments: list[Segment], group: list[int], min_rows: int) -> list[Row]:
    """The rows of a group of segments (`row_groups`): one per segment, except that a segment alone in
    its group with several tokens (a prefill chunk) is split into up to `min_rows` rows of
    consecutive tokens, where a compiled forward would otherwise compute padding rows as long as it.
    A later piece reads the keys and values the earlier ones write: every attention layer writes the
    forward's tokens into the cache before any row reads its context."""
    if len(group) >= min_rows or len(segments[group[0]].tokens) == 1:
        return [Row(member, 0, len(segments[member].tokens)) for member in group]
    (member,) = group
    length = len(segments[member].tokens)
    size = -(-length // min_rows)
    return [Row(member, start, min(start + size, length)) for start in range(0, length, size)]


def _tensor(values: list, device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)


def row_batch(
    segments: list[Segment],
    rows: list[Row],
    block_size: int,
    scratch: int,
    device: torch.device,
    min_rows: int = 1,
    min_context: int = 2,
) -> RowBatch:
    """`rows` of `segments` as [B, S], S their longest, B = max(len(rows), min_rows); padding tokens
    and rows write to and read the scratch block `scratch`, hidden by the mask (`row_slots`). The
    tables hold the blocks of at least `min_context` positions (a decoding burst's later forwards
    read further: `decode_burst.py`)."""
    chosen = [segments[row.member].piece(row.start, row.stop) for row in rows]
    length = max(len(s.tokens) for s in chosen)
    chosen += [Segment([], 0, [])] * (min_rows - len(chosen))
    # T: the longest context (padding reads within it), at least 2: a compiled step would make a graph
    # of its own for a context of one position
    context = max(max(s.end for s in chosen), min_context, 2)
    blocks = max(-(-context // block_size), 2)  # tables of one block would make a graph of their own too
    tables = [s.table[:blocks] + [scratch] * (blocks - len(s.table[:blocks])) for s in chosen]
    # a padding token takes its row's last position (so its position stays within the context the
    # model was built for) and reads what that token reads: never an empty mask row
    positions = [[s.start + min(j, max(len(s.tokens) - 1, 0)) for j in range(length)] for s in chosen]
    tokens = [s.tokens + [0] * (length - len(s.tokens)) for s in chosen]
    counts = [[len(s.tokens)] for s in chosen]
    tensors = [_tensor(values, device) for values in (tokens, positions, tables, counts)]
    return RowBatch(rows, *tensors, context, block_size, scratch)


def row_slots(
    positions: torch.Tensor, tables: torch.Tensor, counts: torch.Tensor, context: int, block_size: int, scratch: int
) -> CacheSlots:
    """Where rows of tokens at `positions` [B, S] write and what they read, for block tables [B, blocks]
    and real token counts [B, 1]: each row reads its table's first `context` positions, in order,
    each token those up to its own position; its real tokens write at their positions, padding
    tokens at the scratch block."""
    batch, length = positions.shape
    # the rows of a request's positions: table[p // block_size] * block_size + p % block_size
    context_positions = torch.arange(context, device=tables.device)
    in_table = (context_positions // block_size)[None, :].expand(batch, -1)
    read = tables.gather(1, in_table) * block_size + context_positions % block_size  # [B, T]
    mask = context_positions[None, None, :] <= positions[:, :, None]  # [B, S, T]
    real = torch.arange(length, device=tables.device)[None, :] < counts  # [B, S]
    written = torch.where(real, read.gather(1, positions), scratch * block_size).reshape(-1)
    return CacheSlots(written, mask.unsqueeze(1), read)


def forward_segments(
    segments: list[Segment],
    forward: Callable[[RowBatch], torch.Tensor],
    block_size: int,
    scratch: int,
    device: torch.device,
    min_rows: int = 1,
) -> list[torch.Tensor]:
    """Each segment's outputs [its tokens, dim], in order: `forward(batch)` [B * S, dim] runs once per
    group of segments (`row_groups`), each as rows (`group_rows`)."""
    pieces: list[list[torch.Tensor]] = [[] for _ in segments]
    for group in row_groups([len(s.tokens) for s in segments]):
        batch = row_batch(segments, group_rows(segments, group, min_rows), block_size, scratch, device, min_rows)
        out = forward(batch)
        for index, row in enumerate(batch.rows):
            pieces[row.member].append(batch.rows_of(out, index))
    return [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in pieces]


def rows_forward(
    model: Transformer,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    tables: torch.Tensor,
    counts: torch.Tensor,
    context: int,
    block_size: int,
    scratch: int,
) -> torch.Tensor:
    """The main model's final normalised hidden states [B * S, dim] of the rows of a `RowBatch` (its
    fields, tokens [B, S] first), what its output head reads, writing their keys and values into the
    paged caches."""
    slots = row_slots(positions, tables, counts, context, block_size, scratch)
    cos, sin = model.rope_at(positions)
    h = model.tok_embeddings(tokens)
    for block in model.layers:
        h = block.attend(h, cos, sin, slots)
        h = h + ffn_output(block.ffn, block.ffn_norm(h))
    return model.norm(h).reshape(-1, h.shape[-1])


GATHER_EXPERTS_PER_EXPERT = 4
"""an MoE layer gathers each token's experts (decoding's path) while the tokens choose at most this
many experts per expert it has; above, it dispatches them to the grouped GEMM"""


def ffn_output(ffn: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The block's feed-forward output for x [B, S, dim]. An MoE layer with few tokens gathers each
    token's chosen experts (`moe_output`); with more, it groups the tokens by expert for the grouped
    GEMM (`grouped_moe_output`). Both keep static shapes: a compiled step is one graph."""
    if not isinstance(ffn, MoE):
        return ffn(x)
    if x.shape[0] * x.shape[1] * ffn.router.top_k <= GATHER_EXPERTS_PER_EXPERT * ffn.router.n_experts:
        return moe_output(ffn, x)
    return grouped_moe_output(ffn, x)


class StepForward:
    """`rows_forward`, eager or compiled.

    Compiled, every size is dynamic, so that one graph serves every batch, row length and context,
    except what the compiler specialises: sizes 0 and 1 (the engine pads batches to at least
    `min_rows` = 2 rows and contexts to at least 2 positions; rows of one token, the decoding steps,
    make their own graph) and the MoE path (`ffn_output`: gathered or grouped experts).
    `warm_up` compiles those graphs before the first request, with duck sizing off: two sizes that
    happen to be equal when a graph is traced (a prefill's row length and its context) are not
    assumed equal, which would recompile later. On the CPU the graphs' kernels are called from C++
    (`CPU_COMPILE_OPTIONS`).
    """

    def __init__(self, compile: bool, device: torch.device):
        self.compiled = compile
        self.min_rows = 2 if compile else 1
        forward: Callable = rows_forward
        if compile:
            options = CPU_COMPILE_OPTIONS if device.type == "cpu" else None
            forward = torch.compile(rows_forward, dynamic=True, fullgraph=True, options=options)
        self._forward = forward

    def __call__(self, model: Transformer, batch: RowBatch) -> torch.Tensor:
        inputs = (batch.tokens, batch.positions, batch.tables, batch.counts, batch.context, batch.block_size, batch.scratch)
        if not self.compiled:
            return self._forward(model, *inputs)
        with torch.fx.experimental._config.patch(use_duck_shape=False):
            return self._forward(model, *inputs)

    def warm_up(self, model: Transformer, block_size: int, scratch: int, max_batch: int) -> None:
        """Compile every graph the steps can take (nothing when eager), on rows that only touch the
        scratch block, so that no request waits for a compilation: rows of one token and of several,
        each with gathered experts and, where a step can have that many tokens, grouped ones."""
        if not self.compiled:
            return
        device = model.tok_embeddings.weight.device
        with torch.inference_mode():  # as the engine's steps: a tensor's inference flag is part of a graph's guards
            for rows, length in warm_up_shapes(model, max_batch):
                segments = [Segment([0] * length, 2, []) for _ in range(rows)]
                whole = [Row(i, 0, length) for i in range(rows)]
                self(model, row_batch(segments, whole, block_size, scratch, device, self.min_rows))


def warm_up_shapes(model: Transformer, max_batch: int) -> list[tuple[int, int]]:
    """(rows, tokens per row) of one step of each graph: [2, 1] and [2, 2] (gathered experts while
    the tokens choose few), [max_batch, 1] and [2, L] with enough tokens for grouped experts."""
    shapes = [(2, 1), (2, 2)]
    moe = next((block.ffn for block in model.layers if isinstance(block.ffn, MoE)), None)
    if moe is not None:
        grouped_from = GATHER_EXPERTS_PER_EXPERT * moe.router.n_experts // moe.router.top_k + 1  # tokens
        if max_batch >= grouped_from:
            shapes.append((max_batch, 1))
        shapes.append((2, min(max(2, -(-grouped_from // 2)), model.cfg.max_seq_len - 2)))
    return shapes
