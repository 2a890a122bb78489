"""The inner optimizer (AdamW, or plain SGD) with sensible parameter groups, and the learning-rate
schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from moeforge.config import TrainConfig


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Matrices decay; vectors (norms, biases) and embeddings don't (the usual GPT recipe). A group
    with no parameter (a pipeline stage of matrices only) is left out: checkpoints name each group's
    hyper-parameters by its parameters (checkpoint/store.py), so an empty one could not be restored."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad:
            continue
        if param.ndim < 2 or id(param) in embeddings:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD or AdamW over `parameter_groups`; AdamW's fused kernel when every parameter is on a device
    that has one (CPU, CUDA): one pass over each parameter's four tensors instead of torch's default
    for CPU tensors, a for-loop of eight elementwise ops per tensor (docs/benchmarks/train.md);
    on CUDA one kernel for all updates, no host sync."""
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    fused = has_fused_adamw([p for group in groups for p in group["params"]])
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, fused=fused or None)


FUSED_ADAMW_DEVICES = ("cpu", "cuda")
"""device types whose fused AdamW kernel moeforge uses (and tests, on the CPU)"""


def has_fused_adamw(params: list[torch.Tensor]) -> bool:
    """True when there are parameters and all of them (plain tensors or DTensors) live on a device
    type of `FUSED_ADAMW_DEVICES`."""
    return bool(params) and all(p.device.type in FUSED_ADAMW_DEVICES for p in params)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step `step` (0-based): linear warm-up, then
    cosine to min_lr_ratio, WSD (constant, then a linear decay over the last decay_fraction) or constant."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(cfg.decay_fraction * cfg.steps))
    decay_start = max(cfg.warmup_steps, cfg.steps - decay_steps)
    if step < decay_start:
        return 1.0
    progress = min(1.0, (step - decay_start) / max(1, cfg.steps - decay_start))
    return 1.0 - (1.0 - floor) * progress


def mtp_lambda(step: int, cfg: TrainConfig) -> float:
    """Weight of the multi-token prediction loss at optimizer step `step` (0-based): mtp_lambda, then
    mtp_lambda_late from mtp_lambda_switch x steps on (DeepSeek-V3 §4.2: 0.3, then 0.1)."""
    return cfg.mtp_lambda if step < cfg.mtp_lambda_switch * cfg.steps else cfg.mtp_lambda_late


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))
