"""The `train` section: the optimisation loop (batch, schedule, optimizer, logging, checkpoints)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moeforge.config.checks import _check, _check_bounds, _check_choices, _check_values, _flag


TRAIN_BOUNDS = {
    "global_batch_size": (1, 2**24),
    "seq_len": (1, 2**24),
}
"""Upper bounds of a step's batch: 15,360 sequences in DeepSeek-V3's, ~2,000 in Llama-3-405B's (16M
tokens of 8,192); 2**24 sequences leaves 1,000x room. Sequences: as long as model.max-seq-len may be
(`MODEL_BOUNDS`). Whether a batch *fits* is the memory check's job (moeforge.plan.memory_budget)."""

MAX_NS_STEPS = 100
"""Newton-Schulz iterations allowed: 5 reach the quintic's band; 100 is 20x that (each costs three
matmuls per matrix per step)"""


@dataclass
class TrainConfig:
    """The optimisation loop: batch, schedule, logging, checkpoints."""

    steps: int = 300
    """optimizer steps"""
    global_batch_size: int = 16
    """sequences per optimizer step (over all data-parallel ranks)"""
    micro_batch_size: int = 0
    """sequences per forward/backward on one rank; 0 = the whole per-rank batch (no accumulation)"""
    seq_len: int = 128
    """tokens per training sequence"""
    lr: float = 3e-3
    """peak learning rate"""
    min_lr_ratio: float = 0.1
    """final learning rate as a fraction of the peak"""
    warmup_steps: int = 20
    """linear warm-up steps"""
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """learning-rate shape after warm-up: 'cosine', 'wsd' (warmup-stable-decay) or 'constant'"""
    decay_fraction: float = 0.2
    """for 'wsd': fraction of steps spent in the final linear decay"""
    optimizer: Literal["adamw", "sgd", "muon"] = "adamw"
    """'adamw'; 'muon' (Muon on the hidden matrices, AdamW on embeddings, output head, router, norms
    and biases; docs/training.md); or 'sgd' (plain SGD with the same lr schedule; for tests and
    comparisons)"""
    weight_decay: float = 0.1
    """decoupled weight decay of AdamW and Muon (not applied to norms, biases and embeddings)"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
    muon_momentum: float = 0.95
    """Muon's Nesterov momentum mu (Keller Jordan's and Moonshot's 0.95)"""
    muon_ns_steps: int = 5
    """Newton-Schulz iterations that orthogonalise each Muon update (5 with the quintic's coefficients)"""
    grad_clip: float = 1.0
    """clip the global gradient norm to this; 0 = off"""
    bias_update_until: float = 1.0
    """fraction of training after which the aux-loss-free bias is frozen (DeepSeek-V3 stops it late)"""
    mtp_lambda: float = 0.3
    """weight lambda of the multi-token prediction loss lambda/D * sum_k CE_k (DeepSeek-V3: 0.3)"""
    mtp_lambda_late: float = 0.1
    """lambda after train.mtp-lambda-switch (DeepSeek-V3: 0.1 for the last third of its tokens)"""
    mtp_lambda_switch: float = 0.7
    """fraction of training after which lambda drops from mtp-lambda to mtp-lambda-late"""
    seed: int = 0
    """seed for weights, data order and router jitter"""
    init_from_hf: str = ""
    """a Hugging Face model directory to start from; its model and tokenizer replace the preset's; '' = off"""
    dtype: Literal["auto", "fp32", "bf16"] = "auto"
    """compute precision: 'fp32', 'bf16' (autocast) or 'auto' (bf16 on CUDA, fp32 on CPU)"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """where to train; 'auto' = CUDA when available, else the CPU"""
    compile: bool = False
    """torch.compile each transformer block (main and MTP) on its own, before FSDP wraps it (regional
    compilation: short compile times, one graph per block); not with pp-schedule 'zbv' or 'dualpipev'"""
    activation_checkpoint: Literal["none", "experts", "block"] = "none"
    """recompute in the backward instead of keeping activations: 'experts' (the routed experts' grouped
    GEMMs and activation only), 'block' (whole blocks), or 'none'; load counts and bias updates are
    unchanged"""
    log_every: int = 10
    """steps between metrics.jsonl / TensorBoard records"""
    eval_every: int = 100
    """steps between validation-loss evaluations; 0 = only at the end"""
    eval_batches: int = 4
    """batches of the held-out split per evaluation"""
    checkpoint_every: int = 100
    """steps between checkpoints (one is also written at the end, and on SIGTERM/SIGINT)"""
    keep_checkpoints: int = 2
    """newest checkpoints kept on disk"""
    progress: bool = True
    """show a progress bar"""
    force: bool = False
    """start even when the planner estimates that the layout does not fit the device's memory"""
    report: bool = True
    """write the PNG report (loss curves, expert load; `moeforge report`) to OUT/report at the end"""
    wandb_project: str = ""
    """also log the metrics to this Weights & Biases project ('' = off; WANDB_MODE=offline logs locally)"""

    def computes_in_bf16(self, device_type: str) -> bool:
        """Whether `dtype` means bf16 autocast on this device: 'bf16', or 'auto' on CUDA. 'auto' stays
        fp32 on the CPU: bf16 is faster only where the CPU has bf16 matrix units (AMX), and it changes
        the numerics of a run."""
        return self.dtype == "bf16" or (self.dtype == "auto" and device_type == "cuda")

    def validate(self) -> None:
        _check_values(self, "train")
        _check_choices(self, "train")
        _check_bounds(self, "train", TRAIN_BOUNDS)
        for name in (
            "steps",
            "global_batch_size",
            "seq_len",
            "log_every",
            "checkpoint_every",
            "keep_checkpoints",
        ):
            value = getattr(self, name)
            _check(value >= 1, f"train.{_flag(name)}", value, "an integer >= 1")
        for name in ("micro_batch_size", "warmup_steps", "eval_every", "eval_batches", "seed"):
            value = getattr(self, name)
            _check(value >= 0, f"train.{_flag(name)}", value, "an integer >= 0")
        if self.micro_batch_size:
            _check(
                self.global_batch_size % self.micro_batch_size == 0,
                "train.micro-batch-size",
                self.micro_batch_size,
                f"a divisor of global-batch-size={self.global_batch_size}",
            )
        _check(self.lr > 0, "train.lr", self.lr, "a number > 0")
        _check(0 <= self.min_lr_ratio <= 1, "train.min-lr-ratio", self.min_lr_ratio, "a number in [0, 1]")
        _check(
            0 < self.decay_fraction <= 1, "train.decay-fraction", self.decay_fraction, "a number in (0, 1]"
        )
        _check(self.weight_decay >= 0, "train.weight-decay", self.weight_decay, "a number >= 0")
        _check(0 <= self.beta1 < 1, "train.beta1", self.beta1, "a number in [0, 1)")
        _check(0 <= self.beta2 < 1, "train.beta2", self.beta2, "a number in [0, 1)")
        _check(0 <= self.muon_momentum < 1, "train.muon-momentum", self.muon_momentum, "a number in [0, 1)")
        steps = self.muon_ns_steps
        _check(1 <= steps <= MAX_NS_STEPS, "train.muon-ns-steps", steps, f"an integer in [1, {MAX_NS_STEPS}]")
        _check(self.grad_clip >= 0, "train.grad-clip", self.grad_clip, "a number >= 0")
        _check(
            0 <= self.bias_update_until <= 1,
            "train.bias-update-until",
            self.bias_update_until,
            "a number in [0, 1]",
        )
        for name in ("mtp_lambda", "mtp_lambda_late"):
            value = getattr(self, name)
            _check(value >= 0, f"train.{_flag(name)}", value, "a number >= 0")
        switch = self.mtp_lambda_switch
        _check(0 <= switch <= 1, "train.mtp-lambda-switch", switch, "a number in [0, 1]")
