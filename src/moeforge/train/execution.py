"""How this rank runs a step: the whole model (`WholeModel`), or its part of a pipeline
(`PipelineStages`). Each mode holds its own forward/backward over the step's micro-batches, its
logits for validation, its gradient clipping and its tied-embedding upkeep, so that the trainer
calls one object and never branches on the mode. `build_execution` shards the freshly built model
(EP, FSDP2/HSDP, the per-block wrappers, or the cut into pipeline stages) and returns the mode."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from moeforge.config import Config, TrainConfig
from moeforge.model.transformer import ModelOutput, Transformer
from moeforge.parallel import ParallelMesh, apply_block_wrappers, clip_grad_norm_, parallelize, sum_across_ranks
from moeforge.parallel.overlap import overlap_forward_and_backward, overlapped_forward
from moeforge.parallel.pipeline import (
    Pipeline,
    StageModel,
    cut_into_stages,
    schedule_stages,
    sum_tied_embedding_grads,
)
from moeforge.plan.layout import layout_from_config, stage_block_counts
from moeforge.train.losses import TrainingLosses, training_losses
from moeforge.train.step_sums import StepSums


def autocast_context(train: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast where `train.computes_in_bf16`, else nothing."""
    if not train.computes_in_bf16(device.type):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


class WholeModel:
    """Every rank holds the whole model (sharded by FSDP2/EP or not): micro-batches one after another,
    gradients accumulated, each one's expert all-to-all hidden under the other half's compute under
    parallel.ep-overlap."""

    def __init__(self, model: Transformer, cfg: Config, device: torch.device, shard_group: Any) -> None:
        self.model = model
        self.cfg = cfg
        self.device = device
        self.shard_group = shard_group
        """the dp_shard group the gradient norm is reduced over (None in one process)"""

    def forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, documents: torch.Tensor | None, mtp_weight: float,
        micro_batch: int, sums: StepSums,
    ) -> None:
        """Backward of the mean of the micro-batches' objectives; each one's terms go to `sums`.
        `documents` (data.document-mask) are each token's document ids, or None."""
        n_micro = len(inputs) // micro_batch
        per_micro = documents.to(self.device).split(micro_batch) if documents is not None else [None] * n_micro
        for inp, tgt, docs in zip(inputs.split(micro_batch), targets.split(micro_batch), per_micro):
            with autocast_context(self.cfg.train, self.device):
                out = self._forward(inp, tgt, docs)
            losses = training_losses(out, tgt, mtp_weight)
            (losses.total / n_micro).backward()
            sums.add(losses, out)

    def _forward(self, inputs: torch.Tensor, targets: torch.Tensor, documents: torch.Tensor | None) -> ModelOutput:
        if self.cfg.parallel.ep_overlap:
            return overlapped_forward(self.model, inputs, targets, document_ids=documents)
        return self.model(inputs, mtp_targets=targets, document_ids=documents)

    def logits(self, inputs: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor | None:
        """The model's logits for `inputs` (attending inside `documents` when given), under the run's
        autocast."""
        with autocast_context(self.cfg.train, self.device):
            return self.model(inputs, document_ids=documents).logits

    def validation_total(self, total: torch.Tensor) -> torch.Tensor:
        """The summed validation loss of this rank's batches: computed here whole."""
        return total

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        return clip_grad_norm_(list(self.model.parameters()), max_norm, self.shard_group)

    def sync_embedding_copy(self) -> None:
        """Nothing: one model, one embedding."""


class PipelineStages:
    """This rank holds pipeline stages (a `StageModel`) and runs the schedule over the pp ranks: tokens
    enter on the first stage's rank, targets on the last's, where the objective is computed."""

    def __init__(
        self, model: StageModel, cfg: Config, device: torch.device, mesh: ParallelMesh,
        moe_rows: dict[str, int],
    ) -> None:
        self.model = model
        self.cfg = cfg
        self.device = device
        self.mesh = mesh
        self.moe_rows = moe_rows
        self.shard_group = mesh["dp_shard"].get_group()
        self.pipeline: Pipeline | None = None
        """the schedule over the pp ranks, set by `build_execution` once the stages are sharded"""
        self._mtp_weight = 0.0
        """the MTP loss weight lambda of the current step"""
        self._stage_losses: list[TrainingLosses] = []
        """the last stage's losses of each micro-batch of the current step"""

    def stage_loss(self, out: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
        """The last stage's objective for one micro-batch (the balance losses reach the gradients
        by their own hooks); its terms are kept for the step's sums."""
        losses = training_losses(out, targets, self._mtp_weight)
        self._stage_losses.append(losses)
        return losses.total

    def forward_backward(
        self, inputs: torch.Tensor, targets: torch.Tensor, documents: torch.Tensor | None, mtp_weight: float,
        micro_batch: int, sums: StepSums,
    ) -> None:
        """The step's micro-batches through the schedule; this rank's part of the losses and counts
        goes to `sums`, and the two copies of the embedding get their summed gradient. (Document ids
        are refused with pipelining by the config's checks.)"""
        pipe = self.pipeline
        assert pipe is not None and documents is None
        self._mtp_weight = mtp_weight
        self._stage_losses.clear()
        args = [inputs] if pipe.has_first else []
        with autocast_context(self.cfg.train, self.device):
            pipe.schedule.step(*args, target=targets if pipe.has_last else None)
        for losses in self._stage_losses:
            sums.add_losses(losses)
        for name, stats in pipe.moe_stats:
            sums.add_moe_stats(self.moe_rows[name], stats)
        pipe.moe_stats.clear()
        sum_tied_embedding_grads(pipe)

    def logits(self, inputs: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor | None:
        """The logits for `inputs`, on the last stage's rank only (None elsewhere)."""
        assert self.pipeline is not None and documents is None
        with autocast_context(self.cfg.train, self.device):
            return self.pipeline.logits(inputs, tuple(inputs.shape), self.mesh["pp"].get_group())

    def validation_total(self, total: torch.Tensor) -> torch.Tensor:
        """The summed validation loss, which only the last stage's rank computed, on every rank."""
        assert self.pipeline is not None
        self.pipeline.moe_stats.clear()
        return sum_across_ranks(total, self.mesh["pp"].get_group())

    def clip_gradients(self, max_norm: float) -> torch.Tensor:
        parameters = list(self.model.parameters())
        counted = self.model.norm_parameters()
        pp_group = self.mesh["pp"].get_group()
        return clip_grad_norm_(parameters, max_norm, self.shard_group, counted=counted, stage_group=pp_group)

    def sync_embedding_copy(self) -> None:
        assert self.pipeline is not None
        self.pipeline.sync_embedding_copy()


Execution = WholeModel | PipelineStages


def build_execution(
    model: Transformer, cfg: Config, device: torch.device, mesh: ParallelMesh | None,
    n_micro: int, micro_batch: int, moe_rows: dict[str, int],
) -> Execution:
    """Shard `model` for this rank's mesh and return how a step runs on it. Per-block recomputation
    and compilation are applied between EP and FSDP (parallel/regional.py)."""
    wrappers = {"activation_checkpoint": cfg.train.activation_checkpoint, "compile": cfg.train.compile}
    if mesh is None:
        apply_block_wrappers(model, **wrappers)
        return WholeModel(model, cfg, device, None)
    if cfg.parallel.pp == 1:
        parallelize(model, mesh, cfg.parallel, **wrappers)
        return WholeModel(model, cfg, device, mesh["dp_shard"].get_group())
    return _pipeline_stages(model, cfg, device, mesh, n_micro, micro_batch, moe_rows, wrappers)


def _pipeline_stages(
    model: Transformer, cfg: Config, device: torch.device, mesh: ParallelMesh, n_micro: int,
    micro_batch: int, moe_rows: dict[str, int], wrappers: dict[str, Any],
) -> PipelineStages:
    """Cut `model` into this rank's pipeline stages (blocks per stage: parallel.pp-stage-blocks, or
    the planner's balance by FLOPs), shard them (EP, the block `wrappers` and FSDP inside each
    stage) and make the schedule over the pp ranks."""
    blocks = stage_block_counts(layout_from_config(cfg), cfg.model)
    stages = cut_into_stages(model, cfg.parallel.pp_schedule, mesh["pp"].get_local_rank(), cfg.parallel.pp, blocks)
    execution = PipelineStages(StageModel(model, stages.chunks), cfg, device, mesh, moe_rows)
    zero_bubble = cfg.parallel.pp_schedule in ("zbv", "dualpipev")
    parallelize(
        execution.model, mesh, cfg.parallel, stages.chunks, reshard_after_forward=not zero_bubble, **wrappers
    )
    execution.pipeline = schedule_stages(
        model, stages, n_micro, micro_batch, cfg.train.seq_len, execution.stage_loss, mesh["pp"].get_group()
    )
    if cfg.parallel.ep_overlap:  # DualPipeV (config-checked): forward and backward chunks at once
        overlap_forward_and_backward(execution.pipeline)
    return execution
