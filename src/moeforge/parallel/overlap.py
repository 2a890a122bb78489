"""Expert all-to-all hidden under compute (`--parallel.ep-overlap`), DeepSeek's two-micro-batch overlap.

`overlapped_forward(model, tokens, mtp_targets)` returns what `model(tokens, mtp_targets=...)`
returns, but runs each block on the two halves of the micro-batch (split along the batch) in turns,
so that one half's exchange is in flight while the other half computes. Per MoE block:

    half A: attention, route, dispatch issued      |
    half B: attention, route, dispatch issued      |  A's dispatch in flight
    half A: wait, experts, combine issued          |  B's dispatch in flight
    half B: wait, experts, combine issued          |  A's combine in flight
    half A: shared experts, wait, residual         |  B's combine in flight
    half B: shared experts, wait, residual

The exchanges are `parallel/async_all_to_all.py`'s, whose backward mirrors the forward, so the
gradients' exchanges hide under the other half's backward compute as well. Only the counts
exchange of a dispatch (a few integers whose sizes the host needs) still blocks.

Exact: a half's attention, routing and experts see only its own sequences, and everything else
(embedding, final norm, head, MTP merge) runs on the whole micro-batch. The balance losses are
those of the whole micro-batch: each MoE layer's `stats` reads both halves' routings concatenated
(the batch-wise aux loss counts both, summed over data parallelism once; the z-loss is a mean over
all tokens; the sequence-wise loss is per sequence anyway), and the tokens per expert are both
halves'.

A block runs as one call of the block module (`_call_as`), so whatever wraps it (FSDP2's
all-gather before and reshard after) sees one forward of the block on both halves.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from moeforge.model.moe import MoE, MoEStats
from moeforge.model.moe.dispatch import Pending
from moeforge.model.moe.router import RouterOutput
from moeforge.model.mtp import mtp_inputs_and_labels
from moeforge.model.transformer import Block, ModelOutput, Transformer
from moeforge.parallel.async_all_to_all import AllToAllTimes


@dataclass
class Span:
    """perf_counter seconds of one piece of compute of one part (half) of the micro-batch."""

    label: str
    part: int
    start: float
    end: float


@dataclass
class Exchange:
    """One all-to-all of one part, with its issue and wait times (backward ones filled in by backward)."""

    label: str
    part: int
    times: AllToAllTimes


@dataclass
class OverlapTimeline:
    """What an overlapped forward did when: compute spans and exchanges, in issue order."""

    compute: list[Span] = field(default_factory=list)
    exchanges: list[Exchange] = field(default_factory=list)

    @contextmanager
    def span(self, label: str, part: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.compute.append(Span(label, part, start, time.perf_counter()))

    def record(self, label: str, part: int, pending: Pending) -> Pending:
        """Keep the exchanges `pending` waits on; return it."""
        self.exchanges += [Exchange(label, part, times) for times in pending.exchanges]
        return pending

    def exposed_seconds(self) -> float:
        """Seconds the calling thread waited on the exchanges (forward, plus backward once it ran)."""
        return sum(exchange.times.exposed for exchange in self.exchanges)

    def hidden_under(self, exchange: Exchange) -> list[Span]:
        """The other parts' compute spans that ran entirely while `exchange` was in flight, between
        its issue and the start of the wait on it."""
        times = exchange.times
        return [
            span
            for span in self.compute
            if span.part != exchange.part and times.issued <= span.start and span.end <= times.wait_began
        ]


def overlapped_forward(
    model: Transformer,
    tokens: torch.Tensor,
    mtp_targets: torch.Tensor | None = None,
    parts: int = 2,
    timeline: OverlapTimeline | None = None,
) -> ModelOutput:
    """`model(tokens [B, S], mtp_targets=...)` with each block run on `parts` slices of the batch in
    turns (module docstring); `parts=1` is the same schedule with nothing to overlap (a baseline).
    The times of every compute span and exchange go to `timeline` when given."""
    if not 1 <= parts <= tokens.shape[0]:
        raise ValueError(
            f"parallel.ep-overlap: a micro-batch of {tokens.shape[0]} sequences cannot be split in {parts}; "
            f"allowed: train.micro-batch-size >= {parts}"
        )
    trace = timeline if timeline is not None else OverlapTimeline()

    def forward(tokens: torch.Tensor, mtp_targets: torch.Tensor | None) -> ModelOutput:
        return _forward_in_parts(model, tokens, mtp_targets, parts, trace)

    return _call_as(model, forward, tokens, mtp_targets)


def _forward_in_parts(
    model: Transformer, tokens: torch.Tensor, mtp_targets: torch.Tensor | None, parts: int, trace: OverlapTimeline
) -> ModelOutput:
    """`Transformer.forward` (training: no KV cache) with the blocks run by `_block_on_parts`."""
    seq = tokens.shape[1]
    cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
    h = model.tok_embeddings(tokens)
    moe_stats: list[MoEStats] = []
    for i, block in enumerate(model.layers):
        h = _block_on_parts(block, h, cos, sin, parts, f"layers.{i}", trace, moe_stats)
    hidden = model.norm(h)
    out = ModelOutput(model.output(hidden), hidden, moe_stats)
    if mtp_targets is not None:
        out.mtp_logits = _mtp_logits(model, hidden, mtp_targets, parts, trace, moe_stats)
    return out


def _mtp_logits(
    model: Transformer,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    parts: int,
    trace: OverlapTimeline,
    moe_stats: list[MoEStats],
) -> list[torch.Tensor]:
    """`Transformer._mtp_logits` with each MTP module's block run by `_block_on_parts` (eqs. 21-23)."""
    logits = []
    for depth, module in enumerate(model.mtp, start=1):
        ahead, _ = mtp_inputs_and_labels(targets, depth)
        seq = ahead.shape[1]
        merged = module.merge(hidden[:, :seq], model.tok_embeddings(ahead))
        cos, sin = model.rope_cos[:seq], model.rope_sin[:seq]
        h = _block_on_parts(module.block, merged, cos, sin, parts, f"mtp.{depth - 1}.block", trace, moe_stats)
        hidden = module.norm(h)
        logits.append(model.output(hidden))
    return logits


def _block_on_parts(
    block: Block,
    h: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    parts: int,
    label: str,
    trace: OverlapTimeline,
    moe_stats: list[MoEStats],
) -> torch.Tensor:
    """The block's output [B, S, dim] on h [B, S, dim], computed on `parts` slices of the batch (in
    turns for an MoE block); an MoE block's stats, over the whole batch, are appended to `moe_stats`."""
    batch, seq, _ = h.shape
    slices = list(h.tensor_split(parts))
    if not isinstance(block.ffn, MoE):
        plain_forward = block.forward

        def dense(slices: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor) -> list[torch.Tensor]:
            return [plain_forward(x, cos, sin)[0] for x in slices]

        return torch.cat(_call_as(block, dense, slices, cos, sin))

    def moe(slices: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor) -> tuple[list[torch.Tensor], RouterOutput]:
        return _moe_block_in_turns(block, slices, cos, sin, label, trace)

    outs, routing = _call_as(block, moe, slices, cos, sin)
    moe_stats.append(block.ffn.stats(routing, batch, seq))
    return torch.cat(outs)


def _moe_block_in_turns(
    block: Block, slices: list[torch.Tensor], cos: torch.Tensor, sin: torch.Tensor, label: str, trace: OverlapTimeline
) -> tuple[list[torch.Tensor], RouterOutput]:
    """An MoE block on each slice [b, S, dim], the parts taking turns stage by stage (the table in
    the module docstring); the outputs and the routing of all parts' tokens, in batch order."""
    moe: MoE = block.ffn
    attended, tokens, routings, dispatches = [], [], [], []
    for part, x in enumerate(slices):
        with trace.span(f"{label} attention+route", part):
            x = block.attend(x, cos, sin)
            flat = block.ffn_norm(x).reshape(-1, x.shape[-1])
            routing = moe.route(flat)
            dispatches.append(trace.record(f"{label} dispatch", part, moe.start_dispatch(flat, routing)))
        attended.append(x)
        tokens.append(flat)
        routings.append(routing)
    combines = []
    for part, dispatch in enumerate(dispatches):
        x_sorted, tokens_per_expert, state = dispatch.wait()
        with trace.span(f"{label} experts", part):
            expert_out = moe.compute_experts(x_sorted, tokens_per_expert)
            combines.append(trace.record(f"{label} combine", part, moe.start_combine(expert_out, state)))
    outs = []
    for part, (x, flat, combine) in enumerate(zip(attended, tokens, combines)):
        with trace.span(f"{label} shared experts", part):
            shared = moe.shared_output(flat)
        out = moe.add_shared_output(combine.wait(), shared)
        outs.append(x + out.view_as(x))
    return outs, _concatenated(routings)


def _concatenated(routings: list[RouterOutput]) -> RouterOutput:
    """The routing of all parts' tokens, in order: each field concatenated along the tokens."""
    return RouterOutput(*(torch.cat(field) for field in zip(*routings)))


def _call_as(module: nn.Module, forward: Callable[..., Any], *args: Any) -> Any:
    """forward(*args) called as `module`'s forward: `module(*args)` with `forward` in place of the
    module's own for this one call, so that the hooks of whatever wraps the module (FSDP2's
    all-gather before and reshard after, its backward hooks on inputs and outputs) run around it."""
    module.forward = forward
    try:
        return module(*args)
    finally:
        del module.forward
