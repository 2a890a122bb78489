"""Pipeline parallelism: a `Transformer` cut into stage chunks run by `torch.distributed.pipelining`.

A pipeline of `n_stages` stages over `pp` ranks: blocks are cut into contiguous ranges, the
embedding goes with the first stage, the final norm, the head and the MTP modules with the last.
A chunk keeps its modules under their full-model names (`layers.5.ffn...`), so a chunk's
`state_dict` is a slice of the model's and checkpoints do not depend on the split.

Stages are placed on ranks in a loop or a V (stage_placement.py).

Two things the single-process loss does that a pipeline must redo:
  * The MoE balance losses are computed in the middle of the model, on stages that never see the
    loss. Each MoE layer's output carries its balance loss through an identity autograd function
    whose backward hands the loss the gradient `grad_scale` (Megatron's `MoEAuxLossAutoScaler`);
    any schedule that back-propagates through the layer's output (full B, or zero-bubble I then W)
    thus adds d(grad_scale * loss)/d(params), exactly the single-process term of `loss / n_micro`.
  * The MTP modules read the embedding of the tokens ahead on the last stage (and a head tied to
    the embedding is the embedding). The last stage holds its own copy (same values): on another
    rank (loop placement) its rank's module, on the first stage's rank (V placement) a deep copy,
    since no module may belong to two stages (torch scales each stage's grads, FSDP refuses a
    module under two roots). `sum_tied_embedding_grads` adds the two gradients into both copies,
    which then take the same update (Megatron's tied-embedding all-reduce).

Gradients are scaled by 1/n_microbatches inside the loss (and the balance-loss gradient), as the
single-process trainer scales each micro-batch's loss, not by the schedule (`scale_grads=False`):
torch divides each stage's whole `.grad` after the step (`PipelineStage.scale_grads`), which would
also divide what was accumulated before the step and, for a module in two stages, divide twice.
Shapes are given to `PipelineStage` up front (static mode): the dynamic mode's metadata
inference runs an extra real forward/backward (middle stages on uninitialised tensors), which would
route garbage through the MoE layers and record their loads.

Composing (checked on gloo, not applied here): expert parallelism inside the stages works as is
(`apply_expert_parallel` on the model before `build_pipeline`, the pp group from the mesh). FSDP2
inside the stages works with one `fully_shard` root per chunk; per-block units need
`reshard_after_forward=False` under the zero-bubble schedules (their split backward maps
`submod.parameters()` to the autograd graph, which a resharded parameter is no longer in).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.pipelining import (
    PipelineStage,
    Schedule1F1B,
    ScheduleDualPipeV,
    ScheduleInterleaved1F1B,
    ScheduleZBVZeroBubble,
)
from torch.distributed.pipelining.schedules import PipelineScheduleMulti, PipelineScheduleSingle
from torch.utils.hooks import RemovableHandle

from moeforge.model.moe import MoE, MoEStats
from moeforge.model.mtp import mtp_inputs_and_labels
from moeforge.model.transformer import ModelOutput, Transformer
from moeforge.parallel.regional import recomputing
from moeforge.parallel.sharded_load import local_shard
from moeforge.parallel.stage_placement import block_ranges, rank_stages, ranges_of_counts, stage_rank

SCHEDULES: dict[str, tuple[type, int, str]] = {
    "1f1b": (Schedule1F1B, 1, "loop"),
    "interleaved-1f1b": (ScheduleInterleaved1F1B, 2, "loop"),
    "zbv": (ScheduleZBVZeroBubble, 2, "v"),
    "dualpipev": (ScheduleDualPipeV, 2, "v"),
}
"""schedule name -> (torch schedule class, stages per rank, placement style)"""


class PipelineChunk(nn.Module):
    """One stage of a `Transformer`: tokens [B, S] (first) or hidden [B, S, dim] -> hidden [B, S, dim]
    (the last stage's is normalised: h^0 of the MTP modules, what the head reads in `loss_fn`).

    Holds references to the model's own modules under their model names, so a chunk's parameters
    are the model's parameters and its state-dict keys are the model's keys."""

    def __init__(self, model: Transformer, blocks: range, first: bool, last: bool):
        super().__init__()
        self.first, self.last = first, last
        if first or (last and model.cfg.mtp_depth):
            self.tok_embeddings = model.tok_embeddings
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in blocks})
        if last:
            self.norm, self.output, self.mtp = model.norm, model.output, model.mtp
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.tok_embeddings(x) if self.first else x
        cos, sin = self.rope_cos[: h.shape[1]], self.rope_sin[: h.shape[1]]
        for layer in self.layers.values():
            h, _ = layer(h, cos, sin)  # MoE stats leave through `attach_balance_losses`' hook
        return self.norm(h) if self.last else h

    def head(self, hidden: torch.Tensor, targets: torch.Tensor) -> ModelOutput:
        """The last stage's logits and MTP logits from its normalised hidden state [B, S, dim]
        (as `Transformer.forward` with `mtp_targets`, eqs. 21-23)."""
        mtp_logits, h = [], hidden
        for depth, module in enumerate(self.mtp, start=1):
            ahead, _ = mtp_inputs_and_labels(targets, depth)
            seq = ahead.shape[1]
            h, _ = module(h[:, :seq], self.tok_embeddings(ahead), self.rope_cos[:seq], self.rope_sin[:seq])
            mtp_logits.append(self.output(h))
        return ModelOutput(self.output(hidden), hidden, mtp_logits=mtp_logits)


class StageModel(nn.Module):
    """This pp rank's part of a `Transformer`, under the model's own names (`tok_embeddings`,
    `layers.<i>`, `norm`, `output`, `mtp`): what the optimizer, the gradient norm, the bias update
    and checkpoints see. Its state-dict keys are a subset of the model's, the same whatever the
    split, so a checkpoint loads into any other pipeline layout or into one process.

    The last stage's copy of the embedding on the first stage's rank (V placement) is not part of
    it: `Pipeline.sync_embedding_copy` sets that copy from the embedding after each update. On
    another rank (loop placement) the last stage's embedding is the model's module, kept here and
    updated by this rank's optimizer with the same summed gradient as the first stage's."""

    def __init__(self, model: Transformer, chunks: list[PipelineChunk]):
        super().__init__()
        self.cfg = model.cfg
        self.layers = nn.ModuleDict()
        for chunk in chunks:
            self.layers.update(chunk.layers)
        has_first, has_last = any(c.first for c in chunks), any(c.last for c in chunks)
        self.holds_embedding_copy = has_last and not has_first and hasattr(chunks[-1], "tok_embeddings")
        """the embedding here is the last stage's copy of the first stage's (loop placement)"""
        if has_first or self.holds_embedding_copy:
            self.tok_embeddings = model.tok_embeddings
        if has_last:
            self.norm, self.output, self.mtp = model.norm, model.output, model.mtp

    def moe_layers(self) -> Iterator[MoE]:
        """This rank's MoE layers, in model order (as `Transformer.moe_layers`)."""
        return (module for _, module in self.named_moe_layers())

    def named_moe_layers(self) -> Iterator[tuple[str, MoE]]:
        """(model name, layer) of this rank's MoE layers, in model order."""
        return ((name, m) for name, m in self.named_modules() if isinstance(m, MoE))

    def norm_parameters(self) -> list[nn.Parameter]:
        """The parameters the global gradient norm counts on this rank: each model parameter once
        over the pipeline, so not the last stage's embedding copy (nor a head tied to it)."""
        skip = set()
        if self.holds_embedding_copy:
            skip.add(id(self.tok_embeddings.weight))
        if hasattr(self, "output") and self.cfg.tie_embeddings and not hasattr(self, "tok_embeddings"):
            skip.add(id(self.output.weight))
        return [p for p in self.parameters() if id(p) not in skip]


class _AttachLossGradient(torch.autograd.Function):
    """y = x; in backward, dy flows to x unchanged and the scalar `loss` gets the gradient `scale`."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.full((), ctx.scale, dtype=grad.dtype, device=grad.device), None


def attach_balance_losses(
    model: Transformer, grad_scale: float, record: list[tuple[str, MoEStats]]
) -> list[RemovableHandle]:
    """Forward hooks on every MoE layer of `model` (MTP blocks' included): each output carries the
    layer's balance loss (gradient `grad_scale`, see the module docstring), and each call's
    (layer name, stats) is appended to `record`, for the metrics and the aux-loss-free bias update
    (the schedule interleaves micro-batches, so the name says which layer's counts they are). The
    block's residual add after the MoE layer makes the stage output a fresh tensor, not a view (the
    zero-bubble schedules `detach_()` stage outputs, which a view refuses: _backward.py:265)."""

    def hook(name: str):
        def attach(module: nn.Module, inputs: tuple, output: tuple[torch.Tensor, MoEStats]):
            out, stats = output
            if not recomputing():  # activation checkpointing's second forward: counted already
                record.append((name, stats))
            if stats.balance_losses:
                out = _AttachLossGradient.apply(out, stats.balance_loss, grad_scale)
            return out, stats

        return attach

    return [m.register_forward_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, MoE)]


def pipeline_loss_fn(
    chunk: PipelineChunk | None, loss: Callable[[ModelOutput, torch.Tensor], torch.Tensor], grad_scale: float
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`loss_fn(hidden, targets)` for the schedule: the caller's `loss(ModelOutput, targets)` (the
    trainer's objective; the output has no MoE stats, their losses travel by hook) on the last
    chunk's `head`, times `grad_scale`.

    Every rank must pass a loss_fn (torch sets `has_backward` from it: schedules.py
    `self._has_backward = self._loss_fn is not None`; without it the other ranks skip backward and
    the pipeline deadlocks), but only the last stage calls it: `chunk` is None elsewhere."""

    def loss_fn(hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        assert chunk is not None and chunk.last, "loss_fn runs on the last stage only"
        return loss(chunk.head(hidden, targets), targets) * grad_scale

    return loss_fn


@dataclass
class Pipeline:
    """What `build_pipeline` made for one rank: `schedule.step(tokens, target=targets)` on the whole
    step's batch (tokens on the rank with stage 0, targets on the rank with the last stage)."""

    schedule: PipelineScheduleSingle | PipelineScheduleMulti
    chunks: list[PipelineChunk]
    stages: list[int]
    ties_embedding: bool
    """the last stage holds a copy of the embedding (MTP modules or a tied head)"""
    tied_group: dist.ProcessGroup | None
    """the ranks of the first and the last stage when they differ (loop placement), with a copy"""
    hooks: list[RemovableHandle]
    """the balance-loss hooks on the model's MoE layers (remove them to run the model unpipelined)"""
    style: str
    """'loop' or 'v' placement of stages on ranks"""
    n_stages: int
    dim: int
    """the model width: hidden states between stages are [micro-batch, seq, dim]"""
    moe_stats: list[tuple[str, MoEStats]] = field(default_factory=list)
    """(MoE layer name, stats) of every MoE call of this rank's stages, in execution order; it
    grows with each step: the caller reads and clears it"""

    def parameters(self) -> list[nn.Parameter]:
        """This rank's parameters, each once (the optimizer's; they include the last stage's copy)."""
        return list({id(p): p for c in self.chunks for p in c.parameters()}.values())

    @property
    def has_first(self) -> bool:
        return any(c.first for c in self.chunks)

    @torch.no_grad()
    def sync_embedding_copy(self) -> None:
        """Set the last stage's own copy of the embedding (V placement: on the first stage's rank)
        from the embedding, after an optimizer step or a checkpoint load changed the latter, and
        drop the copy's gradient (no optimizer clears it: it is in none)."""
        if not (self.ties_embedding and self.has_first and self.has_last and len(self.chunks) > 1):
            return
        weights = _tied_weights(self)
        for copy_weight in weights[1:]:
            local_shard(copy_weight).copy_(local_shard(weights[0]))
            copy_weight.grad = None

    @torch.no_grad()
    def logits(
        self, tokens: torch.Tensor | None, shape: tuple[int, int], group: dist.ProcessGroup | None = None
    ) -> torch.Tensor | None:
        """The model's logits [B, S, vocab] for `tokens` of `shape` (B, S), without a schedule: the
        stages run one after the other, each sending its output to the next stage's rank
        (evaluation). Every rank of the pp `group` calls it; the tokens are read on the first
        stage's rank, the logits come back on the last stage's (None elsewhere)."""
        pp, rank = dist.get_world_size(group), dist.get_rank(group)
        by_stage = dict(zip(self.stages, self.chunks))
        device = self.chunks[0].rope_cos.device
        hidden = None
        for stage in range(self.n_stages):
            owner = stage_rank(stage, pp, self.style)
            previous = stage_rank(stage - 1, pp, self.style) if stage else owner
            if owner != rank:
                if previous == rank and stage:
                    dist.send(hidden.contiguous(), group_dst=owner, group=group)
                continue
            if stage and previous != rank:
                hidden = torch.empty(*shape, self.dim, device=device)
                dist.recv(hidden, group_src=previous, group=group)
            hidden = by_stage[stage](tokens if stage == 0 else hidden)
        last = by_stage.get(self.n_stages - 1)
        return last.output(hidden) if last is not None else None

    @property
    def has_last(self) -> bool:
        return any(c.last for c in self.chunks)


def build_pipeline(
    model: Transformer,
    schedule: str,
    n_microbatches: int,
    micro_batch: int,
    seq_len: int,
    loss: Callable[[ModelOutput, torch.Tensor], torch.Tensor],
    group: dist.ProcessGroup | None = None,
    stage_blocks: list[int] | None = None,
) -> Pipeline:
    """This rank's stage chunks of `model` and the torch schedule that runs them over the pp process
    `group` (default: the world; `mesh["pp"].get_group()` beside other mesh dims). Every rank
    builds the same `model` (same seed or checkpoint), with EP applied if any. `stage_blocks`:
    blocks per stage (default: as even as they go). To shard the chunks (FSDP) before the schedule
    is made, call `cut_into_stages` and `schedule_stages` with the sharding in between."""
    stages = cut_into_stages(model, schedule, dist.get_rank(group), dist.get_world_size(group), stage_blocks)
    return schedule_stages(model, stages, n_microbatches, micro_batch, seq_len, loss, group)


@dataclass
class RankStages:
    """What `cut_into_stages` gives one pp rank."""

    schedule: str
    chunks: list[PipelineChunk]
    stages: list[int]
    """the stage index of each chunk"""
    n_stages: int


def cut_into_stages(
    model: Transformer, schedule: str, pp_rank: int, pp: int, stage_blocks: list[int] | None = None
) -> RankStages:
    """The chunks of the stages pp rank `pp_rank` runs under `schedule` (module docstring)."""
    _, per_rank, style = SCHEDULES[schedule]
    n_stages = pp * per_rank if stage_blocks is None else len(stage_blocks)
    if style == "v" and model.cfg.tie_embeddings and model.cfg.mtp_depth:
        # the last stage would use the tied weight as the MTP embedding and as the head: torch's
        # split weight backward (_backward.py stage_backward_weight) then walks a freed graph
        raise ValueError(f"parallel.pp-schedule: {schedule} does not support model.tie-embeddings with MTP")
    ranges = block_ranges(model.cfg.n_layers, n_stages) if stage_blocks is None else ranges_of_counts(stage_blocks)
    ids = rank_stages(pp_rank, pp, n_stages, style)
    chunks = [PipelineChunk(model, ranges[s], s == 0, s == n_stages - 1) for s in ids]
    if len(chunks) > 1 and chunks[0].first and chunks[-1].last:
        _own_embedding_copy(chunks[-1], model)
    return RankStages(schedule, chunks, ids, n_stages)


def schedule_stages(
    model: Transformer,
    stages: RankStages,
    n_microbatches: int,
    micro_batch: int,
    seq_len: int,
    loss: Callable[[ModelOutput, torch.Tensor], torch.Tensor],
    group: dist.ProcessGroup | None = None,
) -> Pipeline:
    """The torch schedule over this rank's (possibly sharded) chunks, with the balance-loss hooks
    on the model's MoE layers."""
    cls, per_rank, style = SCHEDULES[stages.schedule]
    chunks, ids, n_stages = stages.chunks, stages.stages, stages.n_stages
    grad_scale = 1.0 / n_microbatches
    moe_stats: list[tuple[str, MoEStats]] = []
    hooks = attach_balance_losses(model, grad_scale, moe_stats)
    last = next((c for c in chunks if c.last), None)
    loss_fn = pipeline_loss_fn(last, loss, grad_scale)
    built = [_stage(c, s, n_stages, micro_batch, seq_len, model.cfg.dim, group) for c, s in zip(chunks, ids)]
    kwargs = {"n_microbatches": n_microbatches, "loss_fn": loss_fn, "scale_grads": False}
    sched = cls(built[0], **kwargs) if len(built) == 1 and per_rank == 1 else cls(built, **kwargs)
    ties = bool(model.cfg.mtp_depth or model.cfg.tie_embeddings)
    tied_group = _tied_embedding_group(ties, n_stages, style, group)
    return Pipeline(sched, chunks, ids, ties, tied_group, hooks, style, n_stages, model.cfg.dim, moe_stats)


def _own_embedding_copy(last: PipelineChunk, model: Transformer) -> None:
    """Give the last stage, on the first stage's rank, its own copy of what it shares with it: the
    embedding of the MTP modules, or else a head tied to the embedding."""
    if hasattr(last, "tok_embeddings"):
        last.tok_embeddings = copy.deepcopy(model.tok_embeddings)
    elif model.cfg.tie_embeddings:
        last.output = copy.deepcopy(model.output)


def _stage(
    chunk: PipelineChunk,
    stage: int,
    n_stages: int,
    micro_batch: int,
    seq_len: int,
    dim: int,
    group: dist.ProcessGroup | None,
) -> PipelineStage:
    """A static-shape stage: tokens [mb, S] int64 into the first, hidden [mb, S, dim] elsewhere.
    The hidden examples must require grad: torch derives the gradient buffers from them and sends
    no gradient for an example that does not (`_utils._derive_grad_metas`)."""

    def hidden() -> torch.Tensor:
        return torch.empty(micro_batch, seq_len, dim, device="meta", requires_grad=True)

    tokens = torch.empty(micro_batch, seq_len, dtype=torch.long, device="meta")
    inputs = tokens if chunk.first else hidden()
    return PipelineStage(
        chunk, stage, n_stages, torch.device("cpu"), input_args=inputs, output_args=hidden(), group=group
    )


def _tied_embedding_group(
    ties: bool, n_stages: int, style: str, group: dist.ProcessGroup | None
) -> dist.ProcessGroup | None:
    """The group of the first and the last stage's ranks when they differ and the last stage holds
    a copy of the embedding. Only its two members create it (`use_local_synchronization`): each pp
    group beside other mesh dims has its own pair, and every rank creates its groups in the same
    order."""
    pp, rank = dist.get_world_size(group), dist.get_rank(group)
    pair = sorted({stage_rank(0, pp, style), stage_rank(n_stages - 1, pp, style)})
    if not ties or len(pair) == 1 or rank not in pair:
        return None
    if len(pair) == pp:
        return group or dist.group.WORLD
    ranks = [dist.get_global_rank(group, r) if group is not None else r for r in pair]
    return dist.new_group(ranks, use_local_synchronization=True)


def _tied_weights(pipe: Pipeline) -> list[nn.Parameter]:
    """This rank's copies of the embedding: the first stage's, the last stage's (its MTP embedding,
    else its tied head). Read at call time: `fully_shard` replaces the parameters."""
    if not pipe.ties_embedding:
        return []
    weights = [c.tok_embeddings.weight for c in pipe.chunks if c.first]
    for chunk in (c for c in pipe.chunks if c.last):
        weights.append(
            chunk.tok_embeddings.weight if hasattr(chunk, "tok_embeddings") else chunk.output.weight
        )
    return weights


def sum_tied_embedding_grads(pipe: Pipeline) -> None:
    """Sum the gradients of the first stage's embedding and the last stage's copy into both (call
    after `schedule.step`, before the optimizer step): the copies then take the same update and
    stay equal. Under FSDP both copies are sharded alike over the same data-parallel dim, so the
    local shards are summed."""
    weights = _tied_weights(pipe)
    if not weights:
        return
    grads = []
    for weight in weights:
        if weight.grad is None:
            weight.grad = torch.zeros_like(weight)
        grads.append(local_shard(weight.grad))
    total = torch.stack(grads).sum(0) if len(grads) > 1 else grads[0]
    if pipe.tied_group is not None:
        dist.all_reduce(total, group=pipe.tied_group)
    for grad in grads:
        if grad is not total:
            grad.copy_(total)
