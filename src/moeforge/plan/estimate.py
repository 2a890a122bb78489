"""The planner's one-line estimate of a moeforge run, for the trainer to print before it starts, and
whether the run fits what its devices have (the budgets of `memory_budget`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeforge.config import Config
from moeforge.plan.cluster import Cluster, available_clusters, load_cluster
from moeforge.plan.layout import layout_from_config, moeforge_attention_kernel
from moeforge.plan.comm import expected_rows
from moeforge.plan.memory import MemoryEstimate, memory_estimate
from moeforge.plan.memory_budget import (
    ENV_LIMIT,
    MemoryBudget,
    agreed_budgets,
    batch_flags,
    format_bytes,
    host_budget,
    memory_budget,
    model_flags,
    model_memory,
    shortfall,
)
from moeforge.plan.step_time import TrainingShape, micro_batches, plan_layout

@dataclass(frozen=True)
class RunEstimate:
    """What the planner expects of a run on its devices, and whether that fits what they have."""

    memory_per_device_bytes: float
    """peak bytes on the busiest device: parameters, gradients, optimizer states, activations,
    communication buffers and DiLoCo state"""
    device_memory_bytes: float | None
    """the device's memory; None on the CPU (no fixed size)"""
    tokens_per_s: float | None
    """tokens per second over all devices; None where the device's peak and achievable fraction are
    not known (the CPU, a GPU without a cluster preset)"""
    cluster: str | None
    """the cluster preset the speed comes from"""
    model_build_bytes: float = 0.0
    """the whole model as every rank builds it before `parallelize` shards it (fp32, its RoPE
    temporaries included: `ModelMemory.peak`), on the host, then on the device"""
    limit: MemoryBudget | None = None
    """what this process may allocate on the run's device (`memory_budget`); None = not checked"""
    host_limit: MemoryBudget | None = None
    """what it may allocate on the host, where the model is built, when the device is a GPU"""
    parts: tuple[tuple[str, float], ...] = ()
    """the per-device estimate by part (parameters, gradients, optimizer, activations, ...)"""
    flags: tuple[str, ...] = ()
    """the flags, with their values, that drive the largest part"""

    @property
    def needed_bytes(self) -> float:
        """What the device must hold at the peak: the run's busiest device, or the whole model built
        before it is sharded, whichever is larger."""
        return max(self.memory_per_device_bytes, self.model_build_bytes)

    @property
    def fits(self) -> bool:
        """Whether the estimate fits the device's memory and this process's budgets (always true
        where none is known)."""
        return self._shortfall() is None and (
            self.device_memory_bytes is None or self.memory_per_device_bytes <= self.device_memory_bytes
        )

    def _shortfall(self) -> str | None:
        """What does not fit a budget, in words; None when everything does."""
        parts = dict(self.parts) or {"estimate": self.memory_per_device_bytes}
        if self.model_build_bytes > self.memory_per_device_bytes:
            parts = {"the whole model before sharding": self.model_build_bytes}
        flags = list(self.flags)
        device = shortfall("the run", parts, self.limit, flags, self.needed_bytes)
        host = shortfall("the model's build on the host", {"model": self.model_build_bytes}, self.host_limit, flags)
        return device or host

    def one_line(self) -> str:
        """e.g. 'plan: 61.3 GB per device of 80 GB (fits), ~41,000 tokens/s (h100 preset)'; a run over
        a budget says by how much and why, e.g. 'plan: 205.6 GB per device (DOES NOT FIT: the run
        needs ~205.6 GB (...) but the limit is 12.3 GB (MemAvailable of this host); driven by
        train.global-batch-size=100000000, ...)'."""
        memory = f"{format_bytes(self.memory_per_device_bytes)} per device"
        if self.device_memory_bytes is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            memory += f" of {format_bytes(self.device_memory_bytes)} ({verdict})"
        problem = self._shortfall()
        if problem is not None:
            memory += f" (DOES NOT FIT: {problem}; {ENV_LIMIT} overrides the limit)"
        speed = (
            f"~{self.tokens_per_s:,.0f} tokens/s ({self.cluster} preset)"
            if self.tokens_per_s is not None
            else "tokens/s not estimated (no preset for this device)"
        )
        return f"plan: {memory}, {speed}"

    def refusal(self) -> str:
        """The trainer's one line when the run does not fit and train.force is off."""
        return (
            f"train.force: off, and the layout does not fit: {self.one_line()}; find a layout that fits with "
            "`moeforge plan --search`, make the flags named smaller, or pass --train.force true to start anyway"
        )


def estimate_run(cfg: Config, world_size: int, device: torch.device | str) -> RunEstimate:
    """The planner's figures for the run `cfg` on `world_size` devices of type `device`.

    For the trainer: call it after the config is validated and before building the model; print
    `estimate.one_line()` on rank 0, and refuse to start when `not estimate.fits` (unless train.force)
    with `estimate.refusal()`, which names the figure, the budget and the flags that drive it.

    The layout is the run's own: `parallel.*` and `diloco.*`, `train.micro-batch-size` (0 = the whole
    per-rank batch), fp32 parameters, gradients and AdamW moments; activations in BF16 where the run
    autocasts to it (`TrainConfig.computes_in_bf16`: 'auto' on CUDA, or 'bf16'), fp32 otherwise.
    Memory is estimated everywhere; tokens/s only on a GPU whose name matches a shipped cluster
    preset (H100, H200, H800, B200). The budgets are `memory_budget`'s (the device's free memory on
    CUDA, MemAvailable shared by the host's ranks on the CPU, or MOEFORGE_MEMORY_LIMIT_BYTES), the
    smallest over the ranks of a launched run (one all-reduce, so that every rank decides alike).
    No GPU is touched beyond reading its name and memory; no model is allocated (sizes come from
    closed-form counts, shapes from a meta-device build of the validated, so bounded, config).
    Raises `ConfigError` (one line) for a layout the planner cannot place on `world_size` devices.
    """
    device = torch.device(device)
    cfg.model.validate()  # bounds first: the counts below are then quick whatever the flags said
    cluster, device_memory = _device_cluster(device)
    layout = layout_from_config(cfg)
    layout.validate(world_size, cluster.gpus_per_node)
    per_rank = cfg.train.global_batch_size // (layout.diloco_replicas * layout.data_parallel)
    layout.micro_batch_size = cfg.train.micro_batch_size or max(1, per_rank)
    # activations, and the rows the expert all-to-all carries, in the compute precision
    layout.activation_bytes = 2 if cfg.train.computes_in_bf16(device.type) else 4
    layout.dispatch_bytes = layout.combine_bytes = layout.activation_bytes
    layout.attention_kernel = moeforge_attention_kernel(cfg.model, device.type)
    shape = TrainingShape(cfg.train.global_batch_size, cfg.train.seq_len)
    tokens_per_s, preset = None, None
    if cluster.name in available_clusters():
        plan = plan_layout(cfg.model, layout, cluster, shape)
        memory, tokens_per_s, preset = plan.memory, plan.tokens_per_s, cluster.name
    else:
        rows = expected_rows(cfg.model, layout, cluster.gpus_per_node).total
        memory = memory_estimate(cfg.model, layout, shape.seq_len, micro_batches(layout, shape), rows)
    build = model_memory(cfg.model).peak
    on_gpu = device.type != "cpu"
    limit, host_limit = agreed_budgets([memory_budget(device), host_budget() if on_gpu else None], device)
    parts = _parts(memory)
    largest = max(parts, key=lambda part: part[1])[0]
    flags = batch_flags(cfg.train) if largest == "activations" and build < memory.total else model_flags(cfg.model)
    return RunEstimate(
        memory.total, device_memory, tokens_per_s, preset, build, limit, host_limit, parts, tuple(flags)
    )


def _parts(memory: MemoryEstimate) -> tuple[tuple[str, float], ...]:
    """The planner's estimate by part, in words."""
    return (
        ("parameters", memory.parameters),
        ("gradients", memory.gradients),
        ("optimizer", memory.optimizer),
        ("activations", memory.activations),
        ("communication buffers", memory.communication_buffers),
        ("DiLoCo state", memory.diloco_state),
    )


def device_peak_flops(device: torch.device | str) -> float | None:
    """The dense BF16 peak of a CUDA device whose name matches a shipped cluster preset (the
    trainer's MFU denominator); None elsewhere: no preset, or the CPU (no honest nominal figure)."""
    device = torch.device(device)
    cluster, _ = _device_cluster(device)
    return cluster.peak_bf16_flops or None


def _device_cluster(device: torch.device) -> tuple[Cluster, float | None]:
    """The shipped preset whose name is in the CUDA device's name, else a blank cluster; and the
    device's memory (None on the CPU)."""
    if device.type != "cuda":
        return Cluster(name="cpu"), None
    name = torch.cuda.get_device_name(device).lower()
    memory = float(torch.cuda.get_device_properties(device).total_memory)
    for preset in available_clusters():
        if preset in name:
            return load_cluster(preset), memory
    return Cluster(name=name), memory
