"""Expert all-to-all hidden under compute (`--parallel.ep-overlap`), DeepSeek's two-micro-batch overlap.

`overlapped_forward(model, tokens, mtp_targets)` returns what `model(tokens, mtp_targets=...)`
returns, but runs each block on the two halves of the micro-batch (split along the batch) in turns,
so that one half's exchange is in flight while the other half computes (with `document_ids`, each
half attends with its own rows of the RoPE tables and of the document mask). Per MoE block:

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

DualPipeV (`overlap_forward_and_backward(pipe)`): torch's `ScheduleDualPipeV` pairs the forward of
one micro-batch on one of a rank's stages with the full backward of another micro-batch on its other
stage (an OVERLAP_F_B action), but runs the two one after the other. The function registered here
runs the backward on a second thread while the forward runs on the calling one: whenever one waits on
its all-to-all (or on anything else), the other computes. The two directions must not share an
ordered stream of collectives, whose order would then depend on thread timing and differ between
ranks, so every expert-parallel dispatcher's backward exchanges move to a second process group over
the same ranks (`AllToAllDispatcher.grad_group`): forward exchanges (counts, rows, the batch-aux
count sum) are issued by forward work only, backward exchanges by backward work only, each in the
schedule's order on every rank. Exact: the two threads share no tensor; each computes what the
sequential run computes, in the same order.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining.schedules import (
    FORWARD,
    FULL_BACKWARD,
    OVERLAP_F_B,
    ScheduleDualPipeV,
    _Action,
    _PipelineContext,
    _wait_batch_p2p,
)

from moeforge.in_flight import AllToAllTimes, Pending
from moeforge.model.attention import AttentionMask
from moeforge.model.moe import MoE, MoEStats
from moeforge.model.moe.router import RouterOutput
from moeforge.model.mtp import mtp_inputs_and_labels
from moeforge.model.transformer import Block, ModelOutput, Transformer
from moeforge.parallel.expert_parallel import AllToAllDispatcher
from moeforge.parallel.pipeline import Pipeline


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
    document_ids: torch.Tensor | None = None,
) -> ModelOutput:
    """`model(tokens [B, S], mtp_targets=..., document_ids=...)` with each block run on `parts` slices
    of the batch in turns (module docstring); `parts=1` is the same schedule with nothing to overlap
    (a baseline). The times of every compute span and exchange go to `timeline` when given."""
    if not 1 <= parts <= tokens.shape[0]:
        raise ValueError(
            f"parallel.ep-overlap: a micro-batch of {tokens.shape[0]} sequences cannot be split in {parts}; "
            f"allowed: train.micro-batch-size >= {parts}"
        )
    trace = timeline if timeline is not None else OverlapTimeline()

    def forward(
        tokens: torch.Tensor, mtp_targets: torch.Tensor | None, document_ids: torch.Tensor | None
    ) -> ModelOutput:
        return _forward_in_parts(model, tokens, mtp_targets, document_ids, parts, trace)

    return _call_as(model, forward, tokens, mtp_targets, document_ids)


AttentionInputs = tuple[torch.Tensor, torch.Tensor, AttentionMask | None]
"""RoPE's cos and sin and the attention mask (None: causal) of one part, as `Block.forward` takes them"""


def _attention_parts(
    model: Transformer, seq: int, document_ids: torch.Tensor | None, parts: int
) -> list[AttentionInputs]:
    """Each batch part's `Transformer.training_attention` over `seq` positions: the same shared
    tables and no mask for every part, or with `document_ids` each part's own per-row tables and
    document mask (the parts are `tensor_split`s of the batch, as the hidden states')."""
    if document_ids is None:
        return [model.training_attention(seq)] * parts
    return [model.training_attention(seq, ids) for ids in document_ids.tensor_split(parts)]


def _forward_in_parts(
    model: Transformer,
    tokens: torch.Tensor,
    mtp_targets: torch.Tensor | None,
    document_ids: torch.Tensor | None,
    parts: int,
    trace: OverlapTimeline,
) -> ModelOutput:
    """`Transformer.forward` (training: no KV cache) with the blocks run by `_block_on_parts`."""
    attention = _attention_parts(model, tokens.shape[1], document_ids, parts)
    h = model.tok_embeddings(tokens)
    moe_stats: list[MoEStats] = []
    for i, block in enumerate(model.layers):
        h = _block_on_parts(block, h, attention, f"layers.{i}", trace, moe_stats)
    hidden = model.norm(h)
    out = ModelOutput(model.output(hidden), hidden, moe_stats)
    if mtp_targets is not None:
        out.mtp_logits = _mtp_logits(model, hidden, mtp_targets, document_ids, parts, trace, moe_stats)
    return out


def _mtp_logits(
    model: Transformer,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    document_ids: torch.Tensor | None,
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
        ids = None if document_ids is None else document_ids[:, :seq]
        attention = _attention_parts(model, seq, ids, parts)
        h = _block_on_parts(module.block, merged, attention, f"mtp.{depth - 1}.block", trace, moe_stats)
        hidden = module.norm(h)
        logits.append(model.output(hidden))
    return logits


def _block_on_parts(
    block: Block,
    h: torch.Tensor,
    attention: list[AttentionInputs],
    label: str,
    trace: OverlapTimeline,
    moe_stats: list[MoEStats],
) -> torch.Tensor:
    """The block's output [B, S, dim] on h [B, S, dim], computed on the `len(attention)` slices of
    the batch (in turns for an MoE block), each with its own `attention` inputs; an MoE block's
    stats, over the whole batch, are appended to `moe_stats`."""
    batch, seq, _ = h.shape
    slices = list(h.tensor_split(len(attention)))
    if not isinstance(block.ffn, MoE):
        plain_forward = block.forward

        def dense(slices: list[torch.Tensor], attention: list[AttentionInputs]) -> list[torch.Tensor]:
            return [plain_forward(x, cos, sin, None, mask)[0] for x, (cos, sin, mask) in zip(slices, attention)]

        return torch.cat(_call_as(block, dense, slices, attention))

    def moe(slices: list[torch.Tensor], attention: list[AttentionInputs]) -> tuple[list[torch.Tensor], RouterOutput]:
        return _moe_block_in_turns(block, slices, attention, label, trace)

    outs, routing = _call_as(block, moe, slices, attention)
    moe_stats.append(block.ffn.stats(routing, batch, seq))
    return torch.cat(outs)


def _moe_block_in_turns(
    block: Block, slices: list[torch.Tensor], attention: list[AttentionInputs], label: str, trace: OverlapTimeline
) -> tuple[list[torch.Tensor], RouterOutput]:
    """An MoE block on each slice [b, S, dim], the parts taking turns stage by stage (the table in
    the module docstring); the outputs and the routing of all parts' tokens, in batch order."""
    moe: MoE = block.ffn
    attended, tokens, routings, dispatches = [], [], [], []
    for part, (x, (cos, sin, mask)) in enumerate(zip(slices, attention)):
        with trace.span(f"{label} attention+route", part):
            x = block.attend(x, cos, sin, None, mask)
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


@dataclass
class ForwardBackwardSpans:
    """perf_counter seconds of one OVERLAP_F_B action: its forward (calling thread) and its
    backward (second thread)."""

    forward: tuple[float, float]
    backward: tuple[float, float]

    @property
    def overlap_seconds(self) -> float:
        """How long the two ran at the same time."""
        return max(0.0, min(self.forward[1], self.backward[1]) - max(self.forward[0], self.backward[0]))


def overlap_forward_and_backward(pipe: Pipeline, spans: list[ForwardBackwardSpans] | None = None) -> None:
    """Run the forward and the backward of each OVERLAP_F_B action of `pipe`'s DualPipeV schedule
    at once (module docstring); each action's times are appended to `spans` when given. Call it on
    every rank after `build_pipeline` (it creates a process group per ep group: collective)."""
    schedule = pipe.schedule
    if not isinstance(schedule, ScheduleDualPipeV):
        raise ValueError(f"parallel.ep-overlap: a pipeline overlaps forward and backward under dualpipev only, got {type(schedule).__name__}")
    _separate_backward_exchanges(pipe)

    def run(action: _Action, ctx: _PipelineContext) -> None:
        spans_of_action = _forward_and_backward_at_once(action, ctx)
        if spans is not None:
            spans.append(spans_of_action)

    schedule.register_custom_function(OVERLAP_F_B, run)


def _separate_backward_exchanges(pipe: Pipeline) -> None:
    """Give every expert-parallel dispatcher of the pipeline's stages a second group over the ranks
    of its own, for its backward exchanges (one new group per distinct ep group)."""
    grad_groups: dict[tuple[int, ...], dist.ProcessGroup] = {}
    for chunk in pipe.chunks:
        for layer in (m for m in chunk.modules() if isinstance(m, MoE)):
            if isinstance(layer.dispatcher, AllToAllDispatcher):
                ranks = tuple(dist.get_process_group_ranks(layer.dispatcher.group))
                if ranks not in grad_groups:
                    grad_groups[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
                layer.dispatcher.grad_group = grad_groups[ranks]


def _forward_and_backward_at_once(action: _Action, ctx: _PipelineContext) -> ForwardBackwardSpans:
    """The FORWARD sub-action on this thread while the FULL_BACKWARD one runs on another; an error
    in either is raised here after both ended."""
    forward, backward = action.sub_actions or ()
    assert forward.computation_type == FORWARD and backward.computation_type == FULL_BACKWARD, action
    backward_times: list[float] = []
    errors: list[BaseException] = []

    def run_backward() -> None:
        backward_times.append(time.perf_counter())
        try:
            _full_backward(ctx, backward)
        except BaseException as error:  # re-raised on the calling thread
            errors.append(error)
        backward_times.append(time.perf_counter())

    thread = threading.Thread(target=run_backward, name=f"backward {backward}")
    thread.start()
    forward_start = time.perf_counter()
    try:
        _forward(ctx, forward)
    finally:
        forward_end = time.perf_counter()
        thread.join()
    if errors:
        raise errors[0]
    return ForwardBackwardSpans((forward_start, forward_end), (backward_times[0], backward_times[1]))


def _forward(ctx: _PipelineContext, action: _Action) -> None:
    """What the schedule runtime does for a FORWARD action: wait for the input (unless the previous
    stage is on this rank), run the stage, the loss on the last stage, hand the output on locally."""
    schedule = ctx.schedule_ref
    stages = {stage.stage_index: stage for stage in schedule._stages}
    index, micro = action.stage_index, action.microbatch_index
    stage = stages[index]
    schedule._assert_unsharded(stage)
    if not stage.is_first and index - 1 not in stages:
        _wait_batch_p2p(schedule.fwd_recv_ops.pop((index, micro)))
    output = stage.forward_one_chunk(micro, ctx.arg_mbs[micro], ctx.kwarg_mbs[micro])
    schedule._maybe_compute_loss(stage, output, ctx.target_mbs, micro)
    if index + 1 in stages:
        stages[index + 1].set_local_fwd_input(output, micro)


def _full_backward(ctx: _PipelineContext, action: _Action) -> None:
    """What the schedule runtime does for a FULL_BACKWARD action: wait for the output's gradient
    (unless the next stage is on this rank), back-propagate, hand the input's gradient on locally."""
    schedule = ctx.schedule_ref
    stages = {stage.stage_index: stage for stage in schedule._stages}
    index, micro = action.stage_index, action.microbatch_index
    stage = stages[index]
    schedule._assert_unsharded(stage)
    if not stage.is_last and index + 1 not in stages:
        _wait_batch_p2p(schedule.bwd_recv_ops.pop((index, micro)))
    schedule.backward_counter[index] += 1
    last = schedule.backward_counter[index] == schedule._n_microbatches
    stage.backward_one_chunk(micro, loss=schedule._maybe_get_loss(stage, micro), full_backward=True, last_backward=last)
    if index - 1 in stages:
        stages[index - 1].set_local_bwd_input(stage.get_local_bwd_output(micro), micro)
