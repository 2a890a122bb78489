"""The inner optimizer (AdamW, Muon with AdamW, or plain SGD) with sensible parameter groups, and the
learning-rate schedules."""

from __future__ import annotations

import math
from collections.abc import Collection

import torch
from torch import nn

from moeforge.config import TrainConfig
from moeforge.model.hidden_matrices import hidden_matrices
from moeforge.train.muon import Muon


def parameter_groups(model: nn.Module, weight_decay: float, exclude: Collection[int] = ()) -> list[dict]:
    """Matrices decay; vectors (norms, biases) and embeddings don't (the usual GPT recipe); parameters
    whose id is in `exclude` are left out. A group with no parameter (a pipeline stage of matrices
    only) is left out: checkpoints name each group's hyper-parameters by its parameters
    (checkpoint/store.py), so an empty one could not be restored."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for param in model.parameters():
        if not param.requires_grad or id(param) in exclude:
            continue
        if param.ndim < 2 or id(param) in embeddings:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def muon_parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Muon groups over the hidden matrices (`model.hidden_matrices`; decay; one group per way of
    holding matrices), then AdamW's `parameter_groups` of the rest; groups without parameters are
    left out."""
    matrices = hidden_matrices(model)
    groups = []
    for halves in ("none", "rows", "columns"):
        params = [p for p in model.parameters() if matrices.get(id(p)) == halves]
        groups.append({"params": params, "weight_decay": weight_decay, "algorithm": "muon", "halves": halves})
    rest = parameter_groups(model, weight_decay, exclude=set(matrices))
    groups += [{**group, "algorithm": "adamw"} for group in rest]
    return [group for group in groups if group["params"]]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD, AdamW over `parameter_groups`, or Muon with AdamW over `muon_parameter_groups`. AdamW's
    fused kernel when every parameter is on a device that has one (CPU, CUDA): one pass over each
    parameter's four tensors instead of torch's default for CPU tensors, a for-loop of eight
    elementwise ops per tensor (docs/benchmarks/train.md); on CUDA one kernel for all updates, no host
    sync. Muon's Newton-Schulz runs in bf16 where the run computes in bf16 (train/muon.py)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = has_fused_adamw(params)
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "muon":
        bf16 = bool(params) and cfg.computes_in_bf16(params[0].device.type)
        return Muon(
            muon_parameter_groups(model, cfg.weight_decay),
            lr=cfg.lr,
            momentum=cfg.muon_momentum,
            ns_steps=cfg.muon_ns_steps,
            betas=betas,
            ns_dtype=torch.bfloat16 if bf16 else torch.float32,
            fused_adamw=fused,
        )
    groups = parameter_groups(model, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, eps=1e-8, fused=fused or None)


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
