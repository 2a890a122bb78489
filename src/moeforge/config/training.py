"""A run's other sections (`TrainConfig`, `ParallelConfig`) and the whole `Config`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from moeforge.config.checks import ConfigError, _check, _check_bounds, _check_choices, _check_values, _flag
from moeforge.config.data import DataConfig
from moeforge.config.diloco import DiLoCoConfig
from moeforge.config.model import ModelConfig, MoEConfig


TRAIN_BOUNDS = {
    "global_batch_size": (1, 2**24),
    "seq_len": (1, 2**24),
}
"""Upper bounds of a step's batch: 15,360 sequences in DeepSeek-V3's, ~2,000 in Llama-3-405B's (16M
tokens of 8,192); 2**24 sequences leaves 1,000x room. Sequences: as long as model.max-seq-len may be
(`MODEL_BOUNDS`). Whether a batch *fits* is the memory check's job (moeforge.plan.memory_budget)."""


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
    optimizer: Literal["adamw", "sgd"] = "adamw"
    """'adamw', or 'sgd' (plain SGD with the same lr schedule; for tests and comparisons)"""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to norms, biases and embeddings)"""
    beta1: float = 0.9
    """AdamW beta1"""
    beta2: float = 0.95
    """AdamW beta2"""
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


@dataclass
class ParallelConfig:
    """How the world of processes is laid out on the DeviceMesh."""

    dp_replicate: int = 1
    """HSDP replica groups (parameters replicated across them)"""
    dp_shard: int = -1
    """FSDP shard group size; -1 = whatever the world size leaves"""
    ep: int = 1
    """expert-parallel degree, borrowed from dp-shard (divides it and n-experts)"""
    ep_nodes: int = 1
    """nodes the ep group spans (contiguous blocks of ep ranks); > 1 ties group-limited routing to
    them: model.moe.n-groups must be a multiple, so a token's experts, and the all-to-all rows it
    sends, reach at most model.moe.topk-groups nodes (DeepSeek-V3 node-limited routing)"""
    pp: int = 1
    """pipeline-parallel degree: ranks the model's blocks are cut across (outside dp-replicate,
    dp-shard and ep; inside DiLoCo replicas)"""
    pp_schedule: Literal["1f1b", "interleaved-1f1b", "zbv", "dualpipev"] = "1f1b"
    """with pp > 1: '1f1b', 'interleaved-1f1b' (several stages per rank), 'zbv' (zero-bubble V: two
    stages per rank, weight gradients split off) or 'dualpipev' (DeepSeek's DualPipe on a V: two
    stages per rank, a forward and a backward overlapped); micro-batches are train.micro-batch-size's"""
    pp_stage_blocks: str = ""
    """blocks of each pipeline stage in stage order, comma-separated (e.g. '3,5,5,3'); the first and
    the last stage, which also hold the embedding and the head (+ MTP modules), may hold 0; V
    schedules have 2 stages per rank, interleaved-1f1b any multiple of pp; '' = balanced by training
    FLOPs (interleaved-1f1b: 2 stages per rank)"""
    ep_overlap: bool = False
    """hide the expert all-to-all under compute: each micro-batch runs as two halves, one half's
    all-to-all in flight while the other half computes (DeepSeek's two-micro-batch overlap); under
    pp-schedule 'dualpipev', the forward chunk of one micro-batch and the backward chunk of another
    run at once instead"""
    timeout_s: float = 300.0
    """seconds any rank waits for a peer (the first rendezvous, each collective, a checkpoint's
    barriers) before it stops with an error naming what it waited for, instead of hanging"""

    def validate(self, world_size: int = 1) -> None:
        _check_values(self, "parallel")
        _check_choices(self, "parallel")
        _check(self.pp >= 1 and world_size % self.pp == 0, "parallel.pp", self.pp, f"a divisor of the world size {world_size}")
        _check(self.dp_replicate >= 1, "parallel.dp-replicate", self.dp_replicate, "an integer >= 1")
        _check(
            self.dp_shard == -1 or self.dp_shard >= 1,
            "parallel.dp-shard",
            self.dp_shard,
            "-1 or an integer >= 1",
        )
        _check(self.ep >= 1, "parallel.ep", self.ep, "an integer >= 1")
        _check(
            self.ep_nodes >= 1 and self.ep % self.ep_nodes == 0,
            "parallel.ep-nodes",
            self.ep_nodes,
            f"a divisor of ep={self.ep}",
        )
        _check(self.timeout_s > 0, "parallel.timeout-s", self.timeout_s, "a number of seconds > 0")
        shard = self.resolved_dp_shard(world_size)
        _check(
            shard >= 1 and self.pp * self.dp_replicate * shard == world_size,
            "parallel.dp-shard",
            self.dp_shard,
            f"a value with pp*dp-replicate*dp-shard = world size {world_size}",
        )
        _check(shard % self.ep == 0, "parallel.ep", self.ep, f"a divisor of dp-shard={shard}")

    def validate_for(self, moe: MoEConfig) -> None:
        """The checks that tie the layout to a model's experts and routing groups."""
        _check(
            moe.n_experts % self.ep == 0,
            "parallel.ep",
            self.ep,
            f"a divisor of model.moe.n-experts={moe.n_experts}",
        )
        _check(
            moe.n_groups % self.ep_nodes == 0,
            "model.moe.n-groups",
            moe.n_groups,
            f"a multiple of parallel.ep-nodes={self.ep_nodes}, so that every expert group lives on one node",
        )

    def resolved_dp_shard(self, world_size: int) -> int:
        if self.dp_shard != -1:
            return self.dp_shard
        return world_size // (self.pp * self.dp_replicate)

    def pp_stages(self) -> int:
        """Pipeline stages: pp (1F1B), 2 x pp (V schedules), the stage-blocks list's length or
        2 x pp (interleaved 1F1B); 1 without pipelining."""
        if self.pp == 1:
            return 1
        if self.pp_schedule == "interleaved-1f1b" and self.pp_stage_blocks:
            return len(self.pp_stage_blocks.split(","))
        return self.pp if self.pp_schedule == "1f1b" else 2 * self.pp

    def validate_pipeline(self, n_layers: int, micro_batches: int) -> None:
        """The checks that tie the pipeline to the model's blocks and the step's micro-batches."""
        if self.pp == 1:
            return
        stages = self.pp_stages()
        if self.pp_stage_blocks:
            parse_stage_blocks(self.pp_stage_blocks, stages, n_layers, "parallel.pp-stage-blocks")
            _check(
                stages % self.pp == 0,
                "parallel.pp-stage-blocks",
                self.pp_stage_blocks,
                f"a multiple of pp={self.pp} counts (whole stages per rank)",
            )
        else:
            _check(
                stages <= n_layers,
                "parallel.pp",
                self.pp,
                f"at most {n_layers // (stages // self.pp)} for pp-schedule={self.pp_schedule!r} "
                f"({stages} stages of model.n-layers={n_layers} blocks)",
            )
        needed = 2 * self.pp if self.pp_schedule == "dualpipev" else self.pp
        ok = micro_batches >= needed and (self.pp_schedule != "interleaved-1f1b" or micro_batches % self.pp == 0)
        _check(
            ok,
            "train.micro-batch-size",
            f"{micro_batches} micro-batches per step",
            f"at least {needed} micro-batches for pp-schedule={self.pp_schedule!r} with pp={self.pp}"
            + (f", a multiple of {self.pp}" if self.pp_schedule == "interleaved-1f1b" else "")
            + " (a smaller micro-batch-size, or a larger global-batch-size)",
        )


def parse_stage_blocks(text: str, n_stages: int, n_blocks: int, where: str) -> list[int]:
    """'3,5,5,3' -> [3, 5, 5, 3], checked: `n_stages` counts summing to `n_blocks`, middle stages
    hold at least one block (the first and the last also hold the embedding and the head)."""
    try:
        counts = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a comma-separated list of integers") from None
    middle = counts[1:-1]
    _check(
        len(counts) == n_stages and sum(counts) == n_blocks and min(counts) >= 0 and min(middle, default=1) >= 1,
        where,
        text,
        f"{n_stages} counts summing to model.n-layers={n_blocks}, >= 1 except the first and the last",
    )
    return counts


@dataclass
class Config:
    """A whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    diloco: DiLoCoConfig = field(default_factory=DiLoCoConfig)

    def validate(self, world_size: int = 1) -> Config:
        self.model.validate()
        self.train.validate()
        self.data.validate()
        self.diloco.validate()
        self.parallel.validate(self._replica_world_size(world_size))
        self.parallel.validate_for(self.model.moe)
        self.parallel.validate_pipeline(self.model.n_layers, self._micro_batches(world_size))
        _check(
            self.parallel.pp == 1
            or self.parallel.pp_schedule not in ("zbv", "dualpipev")
            or not (self.model.tie_embeddings and self.model.mtp_depth),
            "parallel.pp-schedule",
            self.parallel.pp_schedule,
            "'1f1b' or 'interleaved-1f1b' with model.tie-embeddings and MTP modules (the V schedules' split "
            "weight backward cannot use one tied weight as the last stage's embedding and head)",
        )
        self._validate_overlap(world_size)
        self._validate_document_mask()
        _check(
            not (self.train.compile and self.parallel.pp > 1 and self.parallel.pp_schedule in ("zbv", "dualpipev")),
            "train.compile",
            True,
            f"false with parallel.pp-schedule={self.parallel.pp_schedule!r} (torch's split input/weight backward "
            "cannot run compiled stages; '1f1b' and 'interleaved-1f1b' can)",
        )
        _check(
            self.diloco.fragments <= self.model.n_layers,
            "diloco.fragments",
            self.diloco.fragments,
            f"at most model.n-layers={self.model.n_layers} (a fragment holds whole blocks)",
        )
        _check(
            self.train.seq_len <= self.model.max_seq_len,
            "train.seq-len",
            self.train.seq_len,
            f"at most model.max-seq-len={self.model.max_seq_len}",
        )
        _check(
            self.train.seq_len > self.model.mtp_depth,
            "train.seq-len",
            self.train.seq_len,
            f"more than model.mtp-depth={self.model.mtp_depth} (each MTP depth predicts one token further)",
        )
        return self

    def _replica_world_size(self, world_size: int) -> int:
        """The ranks of one DiLoCo replica, inside which `parallel` lays out its mesh."""
        replicas = self.diloco.replicas
        _check(
            world_size % replicas == 0,
            "diloco.replicas",
            replicas,
            f"a divisor of the world size {world_size}",
        )
        _check(
            replicas == 1 or self.parallel.dp_replicate == 1,
            "parallel.dp-replicate",
            self.parallel.dp_replicate,
            "1 with diloco.replicas > 1 (DiLoCo replicas take the place of HSDP's every-step all-reduce)",
        )
        return world_size // replicas

    def _validate_overlap(self, world_size: int) -> None:
        """parallel.ep-overlap splits each micro-batch in two halves, or under a pipeline pairs the
        forward of one micro-batch with the backward of another (DualPipeV's overlapped chunks)."""
        par = self.parallel
        if not par.ep_overlap:
            return
        _check(
            not self.train.compile,
            "train.compile",
            True,
            "false with parallel.ep-overlap (the overlap runs each block's phases itself, outside its compiled call)",
        )
        _check(
            self.train.activation_checkpoint != "block",
            "train.activation-checkpoint",
            "block",
            "'none' or 'experts' with parallel.ep-overlap (the overlap runs each block's phases itself)",
        )
        if par.pp > 1:
            _check(
                par.pp_schedule == "dualpipev",
                "parallel.ep-overlap",
                True,
                "false unless pp-schedule='dualpipev' (a pipeline overlaps a forward with a backward there)",
            )
            return
        per_rank = self.train.global_batch_size // max(1, world_size)
        micro = self.train.micro_batch_size or per_rank
        _check(
            micro >= 2,
            "train.micro-batch-size",
            micro,
            "at least 2 sequences per micro-batch with parallel.ep-overlap (each runs as two halves)",
        )

    def _validate_document_mask(self) -> None:
        """The document ids reach the blocks through `Transformer.forward` (or the overlapped forward);
        the pipeline's stages run their blocks themselves and do not pass them."""
        _check(
            not self.data.document_mask or self.parallel.pp == 1,
            "data.document-mask",
            True,
            f"false with parallel.pp={self.parallel.pp} (pipeline stages do not carry document ids yet)",
        )

    def _micro_batches(self, world_size: int) -> int:
        """Micro-batches per step on one rank (the data-parallel ranks are the world over pp)."""
        per_rank = self.train.global_batch_size // max(1, world_size // self.parallel.pp)
        return per_rank // self.train.micro_batch_size if self.train.micro_batch_size else 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
