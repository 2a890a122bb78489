"""The planner's one-line estimate of a moeforge run, for the trainer to print before it starts."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moeforge.config import Config
from moeforge.plan.cluster import Cluster, available_clusters, load_cluster
from moeforge.plan.layout import layout_from_config, moeforge_attention_kernel
from moeforge.plan.comm import expected_rows
from moeforge.plan.memory import memory_estimate
from moeforge.plan.step_time import TrainingShape, micro_batches, plan_layout

GB = 1e9


@dataclass(frozen=True)
class RunEstimate:
    """What the planner expects of a run on its devices."""

    memory_per_device_bytes: float
    """peak bytes on the busiest device: parameters, gradients, optimizer states, activations,
    communication buffers and DiLoCo state"""
    device_memory_bytes: float | None
    """the device's memory; None on the CPU (no fixed budget)"""
    tokens_per_s: float | None
    """tokens per second over all devices; None where the device's peak and achievable fraction are
    not known (the CPU, a GPU without a cluster preset)"""
    cluster: str | None
    """the cluster preset the speed comes from"""

    @property
    def fits(self) -> bool:
        """Whether the estimate fits the device's memory (always true without a known budget)."""
        return self.device_memory_bytes is None or self.memory_per_device_bytes <= self.device_memory_bytes

    def one_line(self) -> str:
        """e.g. 'plan: 61.3 GB per device of 80 GB (fits), ~41,000 tokens/s (h100 preset)'."""
        memory = f"{_size(self.memory_per_device_bytes)} per device"
        if self.device_memory_bytes is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            memory += f" of {_size(self.device_memory_bytes)} ({verdict})"
        speed = (
            f"~{self.tokens_per_s:,.0f} tokens/s ({self.cluster} preset)"
            if self.tokens_per_s is not None
            else "tokens/s not estimated (no preset for this device)"
        )
        return f"plan: {memory}, {speed}"


def _size(nbytes: float) -> str:
    return f"{nbytes / GB:,.1f} GB" if nbytes >= GB else f"{nbytes / 1e6:,.0f} MB"


def estimate_run(cfg: Config, world_size: int, device: torch.device | str) -> RunEstimate:
    """The planner's figures for the run `cfg` on `world_size` devices of type `device`.

    For the trainer: call it after the config is validated and before building the model; print
    `estimate.one_line()` on rank 0, and refuse to start when `not estimate.fits` (CUDA only: the CPU
    has no fixed budget), quoting `one_line()` and pointing to `moeforge plan` for other layouts.

    The layout is the run's own: `parallel.*` and `diloco.*`, `train.micro-batch-size` (0 = the whole
    per-rank batch), fp32 parameters, gradients and AdamW moments; activations in BF16 where the run
    autocasts to it (`TrainConfig.computes_in_bf16`: 'auto' on CUDA, or 'bf16'), fp32 otherwise.
    Memory is estimated everywhere; tokens/s only on a GPU whose name matches a shipped cluster
    preset (H100, H200, H800, B200). No GPU is touched beyond
    reading its name and memory size; no model is allocated (shapes come from a meta-device build).
    Raises `ConfigError` (one line) for a layout the planner cannot place on `world_size` devices.
    """
    device = torch.device(device)
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
    if cluster.name in available_clusters():
        plan = plan_layout(cfg.model, layout, cluster, shape)
        return RunEstimate(plan.memory.total, device_memory, plan.tokens_per_s, cluster.name)
    rows = expected_rows(cfg.model, layout, cluster.gpus_per_node).total
    memory = memory_estimate(cfg.model, layout, shape.seq_len, micro_batches(layout, shape), rows)
    return RunEstimate(memory.total, device_memory, None, None)


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
