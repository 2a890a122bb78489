"""The training loop: batches in, optimizer steps out, with everything a long run needs around it
(resume, periodic checkpoints, SIGTERM/SIGINT, validation, metrics, load balancing)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeforge import checkpoint as ckpt
from moeforge.config import Config, ConfigError
from moeforge.data import TokenArray, validation_batches
from moeforge.data.blend import BlendedLoader
from moeforge.data.indexed import IndexedDataset
from moeforge.data.loader import validation_document_ids
from moeforge.errors import RunFailure, print_line
from moeforge.model.cross_entropy import summed_token_cross_entropy
from moeforge.model.flops import training_flops_per_token
from moeforge.model.moe.balance import load_stats, update_expert_biases
from moeforge.model.transformer import Transformer
from moeforge.parallel import (
    ParallelMesh,
    World,
    build_mesh,
    data_parallel_rank,
    init_distributed,
    launched_distributed,
    sum_across_ranks,
)
from moeforge.parallel.pipeline import StageModel
from moeforge.plan import device_peak_flops, estimate_run
from moeforge.run import truncate_metrics, write_run_files
from moeforge.train.metrics import MetricsLogger, ProgressBar
from moeforge.train.compatibility import check_resume_compatible
from moeforge.train.diloco_start import start_diloco
from moeforge.train.execution import build_execution
from moeforge.train.optim import build_optimizer, build_scheduler, mtp_lambda
from moeforge.train.run_data import build_run_data
from moeforge.train.step_sums import StepSums


class TrainingDiverged(RunFailure, RuntimeError):
    """The loss became NaN/inf; the last good checkpoint is left untouched."""


@dataclass
class TrainResult:
    step: int
    final_loss: float
    val_loss: float | None
    checkpoint: Path | None
    interrupted: bool
    exchange: dict[str, Any] | None = None
    """with DiLoCo: bytes each replica sent, and what data parallelism would have sent"""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device: got 'cuda' but no CUDA device is available; allowed: 'cpu' | 'auto'")
    return torch.device(name)


class Trainer:
    """Trains `cfg`'s model into the run directory `out_dir` (run.py), resuming from it when it holds
    checkpoints. `init_weights(model, mesh)`, when given, fills the freshly built (and parallelized)
    model before training, e.g. `moeforge.interop.hf_weights_loader(cfg)` for `train.init-from-hf`."""

    def __init__(
        self,
        cfg: Config,
        out_dir: Path | str,
        init_weights: Callable[[Transformer, ParallelMesh | None], None] | None = None,
    ):
        self.out_dir = Path(out_dir)
        device = resolve_device(cfg.train.device)
        self.world = (
            init_distributed(device.type, cfg.parallel.timeout_s)
            if launched_distributed()
            else World(0, 1, 0, device)
        )
        self.rank, self.world_size, self.is_main = self.world.rank, self.world.world_size, self.world.is_main
        self.device = self.world.device
        replicas, pp = cfg.diloco.replicas, cfg.parallel.pp
        data_rank, data_ranks = data_parallel_rank(self.rank, self.world_size, pp, replicas)
        data = build_run_data(cfg, data_rank, data_ranks, progress=self.is_main and cfg.train.progress)
        self.tokenizer, self.loader, self.val_sets = data.tokenizer, data.loader, data.val_sets
        self.cfg = _with_vocabulary_of(cfg, self.tokenizer.vocab_size)
        """the run's config; its model's vocabulary grown to the tokenizer's (the caller's is left as given)"""
        cfg, tcfg = self.cfg, self.cfg.train
        self._check_plan()
        self.replica_size = self.world_size // replicas
        """ranks of one DiLoCo replica (the whole world without DiLoCo)"""
        self.mesh = (
            build_mesh(cfg.parallel, self.world_size, self.device.type, replicas)
            if self.replica_size > 1
            else None
        )
        self.data_parallel_size = data_ranks // replicas
        """data-parallel ranks of one replica: what the step's summed losses are averaged over"""
        self.local_batch = tcfg.global_batch_size // data_ranks
        """sequences per rank per step (DiLoCo replicas draw different ones: each its part of the batch;
        the stages of one pipeline the same ones)"""
        self.micro_batch = tcfg.micro_batch_size or self.local_batch
        if self.local_batch % self.micro_batch:
            raise ConfigError(
                f"train.micro-batch-size: got {self.micro_batch}; allowed: a divisor of the per-rank batch "
                f"{self.local_batch}"
            )
        n_micro = self.local_batch // self.micro_batch

        torch.manual_seed(tcfg.seed)
        model = Transformer(cfg.model).to(self.device)
        self.moe_rows = {name: row for row, (name, _) in enumerate(model.named_moe_layers())}
        """each MoE layer's row in the step's [L, E] load counts (whole model, MTP modules' included)"""
        self.execution = build_execution(model, cfg, self.device, self.mesh, n_micro, self.micro_batch, self.moe_rows)
        """how a step runs here: the whole model, or this rank's pipeline stages (execution.py)"""
        self.model: Transformer | StageModel = self.execution.model
        """this rank's model: the whole Transformer, or under pipelining its stages' part (StageModel)"""
        self.pipeline = getattr(self.execution, "pipeline", None)
        """the pipeline schedule over the pp ranks, or None"""
        if tcfg.init_from_hf:  # after parallelize: each rank reads only what its own shards hold
            if init_weights is None:
                raise ConfigError(
                    "train.init-from-hf: set, but this Trainer was given no init_weights to read it with "
                    "(pass moeforge.interop.hf_weights_loader(cfg), as `moeforge train` does)"
                )
            init_weights(self.model, self.mesh)
            self.execution.sync_embedding_copy()
        self.diloco = None
        if cfg.diloco.enabled:  # after any initial weights: they are the first theta_global
            self.diloco = start_diloco(self.model, cfg, self.mesh, self.rank // self.replica_size, self.device)
        self.optimizer = build_optimizer(self.model, tcfg)
        self.scheduler = build_scheduler(self.optimizer, tcfg)
        self.flops_per_token = training_flops_per_token(cfg.model, tcfg.seq_len)
        self.peak_flops = device_peak_flops(self.device)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self._stop_signal: str | None = None
        """the signal (SIGTERM/SIGINT) this rank received, if any"""
        self._stop_agreed = False
        """some rank received one: all ranks finish the step, save and return (decided in train_step)"""

    def _check_plan(self) -> None:
        """The planner's one-line estimate of this run (moeforge.plan), and a refusal to start a run it
        says cannot fit the memory budget (plan/memory_budget.py: the device's free memory, or on the
        CPU this host's available memory shared among its ranks) unless train.force."""
        estimate = estimate_run(self.cfg, self.world_size, self.device)
        if self.is_main and self.cfg.train.progress:
            print_line(estimate.one_line(), sys.stdout)
        if not estimate.fits and not self.cfg.train.force:
            raise ConfigError(estimate.refusal())

    # ------------------------------------------------------------------------------------------
    # Resume and checkpoints

    def resume_if_possible(self) -> bool:
        """Resume from the newest checkpoint whose files match their checksums (bad ones are set aside)."""
        path = ckpt.newest_good_checkpoint(self.out_dir, warn=print_line)
        if path is None:
            if self.is_main:  # steps an attempt logged before it died in its first save come again
                truncate_metrics(self.out_dir, 0)
            return False
        saved = ckpt.read_meta(path)
        check_resume_compatible(saved.config, self.cfg, path)
        meta = self._load_checkpoint(path, saved.extra.get("diloco"))
        self.execution.sync_embedding_copy()
        self.step = meta.step
        self.loader.load_state_dict(meta.extra["data"])
        self.scheduler.load_state_dict(meta.extra["scheduler"])
        self.last_checkpoint = path
        loaded = meta.load_stats.summed_over_ranks(self.device)
        if self.is_main:
            truncate_metrics(self.out_dir, self.step)
            print_line(f"resumed from step {self.step}: {loaded.describe()}", sys.stdout)
        return True

    def _load_checkpoint(self, path: Path, saved_diloco: dict[str, Any] | None) -> ckpt.CheckpointMeta:
        """Load `path` into this run, whether each of them has DiLoCo replicas or not, and how many."""
        if self.diloco is None:
            if saved_diloco is None:
                return ckpt.load_checkpoint(path, self.model, self.optimizer, self.mesh)
            self._say(
                f"diloco: {path.name} was trained by {saved_diloco['replicas']} DiLoCo replicas; this run "
                "continues from their theta_global with a fresh optimizer state"
            )
            return ckpt.load_checkpoint(path, self.model, None, self.mesh)
        saved_replicas = saved_diloco["replicas"] if saved_diloco is not None else 0
        self.diloco.restore_meta(saved_diloco)
        load_inner = self.diloco.replica < saved_replicas
        replica = ckpt.ReplicaCheckpoint(
            self.diloco.replica,
            self.diloco.shared_state(with_outer_state=saved_diloco is not None),
            load_inner=load_inner,
            own=self.diloco.replica_state() if load_inner else {},
        )
        meta = ckpt.load_checkpoint(path, self.model, self.optimizer, self.mesh, replica=replica)
        self.diloco.after_load(replica.load_inner)
        if saved_diloco is None:
            self._say(f"diloco: {path.name} has no DiLoCo replicas; each replica starts from its model, fresh optimizer")
        elif self.cfg.diloco.replicas != saved_replicas:
            self._say(
                f"diloco: {path.name} has {saved_replicas} replicas, this run {self.cfg.diloco.replicas}: "
                + (
                    f"replicas {saved_replicas}..{self.cfg.diloco.replicas - 1} start from theta_global "
                    "with a fresh optimizer state"
                    if self.cfg.diloco.replicas > saved_replicas
                    else f"the states of replicas {self.cfg.diloco.replicas}..{saved_replicas - 1} are dropped"
                )
            )
        return meta

    def _say(self, line: str) -> None:
        if self.is_main:
            print_line(line)

    def save(self) -> Path:
        extra = {"data": self.loader.state_dict(), "scheduler": self.scheduler.state_dict()}
        replica = None
        if self.diloco is not None:
            extra["diloco"] = self.diloco.checkpoint_meta()
            replica = ckpt.ReplicaCheckpoint(
                self.diloco.replica, self.diloco.shared_state(), own=self.diloco.replica_state()
            )
        self.last_checkpoint = ckpt.save_checkpoint(
            self.out_dir,
            self.step,
            self.model,
            self.optimizer,
            self.cfg.to_dict(),
            extra,
            keep=self.cfg.train.keep_checkpoints,
            replica=replica,
        )
        return self.last_checkpoint

    # ------------------------------------------------------------------------------------------
    # One optimizer step

    def train_step(self) -> dict[str, Any]:
        """Forward/backward over the micro-batches of one global batch, then clip, step, rebalance.

        The step reaches the host once (step_sums.py): one all-reduce sums the losses, the expert
        counts and the stop request over the ranks, and one transfer brings them with the gradient
        norm, for the loss check and the metrics."""
        self.model.train()
        inputs, targets, documents = self.loader.next_training_batch()
        inputs, targets = inputs.to(self.device), targets.to(self.device)
        mtp_weight = mtp_lambda(self.step, self.cfg.train)
        moe = self.cfg.model.moe
        sums = StepSums(
            len(inputs) // self.micro_batch,
            self.device,
            moe.balance_loss_names(),
            self.cfg.model.mtp_depth,
            (len(self.moe_rows), moe.n_experts),
        )
        self.execution.forward_backward(inputs, targets, documents, mtp_weight, self.micro_batch, sums)
        grad_norm = self.execution.clip_gradients(self.cfg.train.grad_clip or float("inf"))
        reduced = self._sum_over_replica(sums.packed(stop_requested=self._stop_signal is not None))
        host = sums.to_host(reduced, grad_norm, self.data_parallel_size)
        if not math.isfinite(host.lm_loss):
            raise TrainingDiverged(
                f"loss is {host.lm_loss} at step {self.step + 1}; the last good checkpoint "
                f"{self.last_checkpoint or '(none yet)'} is intact — lower train.lr or raise train.warmup-steps"
            )
        self.optimizer.step()
        self.execution.sync_embedding_copy()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        layers = list(self.model.named_moe_layers())
        rows = [self.moe_rows[name] for name, _ in layers]
        biases = [layer.router.expert_bias for _, layer in layers]
        update_expert_biases(biases, sums.load_rows(reduced)[rows], self._bias_rate())
        if self.diloco is None:
            self._stop_agreed = host.stop_requested  # every rank stops at the same step
        metrics = {
            "loss": host.lm_loss + host.balance_loss + host.mtp_loss,
            "lm_loss": host.lm_loss,
            "aux_loss": host.balance_loss,
            "aux": host.balance_parts,
            "grad_norm": host.grad_norm,
            "lr": self.scheduler.get_last_lr()[0],
            "load": [load_stats(counts) for counts in host.load],
        }
        if host.mtp_depths:
            depths = {f"mtp/{depth}": loss for depth, loss in enumerate(host.mtp_depths, start=1)}
            metrics.update({"mtp_loss": host.mtp_loss, "mtp_lambda": mtp_weight, **depths})
        if self.diloco is not None:
            synced = self.diloco.after_inner_step(self.step, host.stop_requested)
            if self.step == self.cfg.train.steps:
                synced += self.diloco.finish(self.step)
            if synced:
                metrics["diloco"] = synced
            # a stop request rides on the exchanges: all replicas stop after the step one lands
            self._stop_agreed = self.diloco.stop_agreed
        return metrics

    def _sum_over_replica(self, packed: torch.Tensor) -> torch.Tensor:
        """The step's sums over the ranks of this replica (of the world, without DiLoCo), pipeline
        stages included: the losses logged, the counts the biases follow. DiLoCo replicas share
        nothing between syncs."""
        if self.mesh is None:
            return packed
        return sum_across_ranks(packed, self.mesh["replica_world"].get_group())

    def _bias_rate(self) -> float:
        until = self.cfg.train.bias_update_until * self.cfg.train.steps
        return self.cfg.model.moe.bias_update_rate if self.step <= until else 0.0

    def validation_loss(self) -> float:
        """Mean token cross-entropy on the validation split; with a mixture, the sources' validation
        losses averaged with the mixture's weights (`validation_losses` gives each)."""
        return self._mixture_mean(self.validation_losses())

    def validation_losses(self) -> dict[str, float]:
        """Validation loss of each source's own validation split, by path ('' without a mixture)."""
        return {name: self._split_loss(tokens) for name, _, tokens in self.val_sets}

    def _mixture_mean(self, losses: dict[str, float]) -> float:
        return sum(weight * losses[name] for name, weight, _ in self.val_sets)

    @torch.no_grad()
    def _split_loss(self, val: TokenArray | IndexedDataset) -> float:
        self.model.eval()
        shape = (self.micro_batch, self.cfg.train.seq_len, self.cfg.train.eval_batches or 1)
        tokens = val.tokens if isinstance(val, IndexedDataset) else val
        logits_of = self.execution.logits
        if self.cfg.data.document_mask:  # each batch's document ids, in step with the batches
            documents = validation_document_ids(val, *shape)

            def logits_of(inputs: torch.Tensor) -> torch.Tensor | None:
                return self.execution.logits(inputs, next(documents).to(self.device))

        sums = summed_token_cross_entropy(validation_batches(tokens, *shape), logits_of, self.device)
        total = self.execution.validation_total(sums.total)
        self.model.train()
        return float(total) / sums.tokens

    # ------------------------------------------------------------------------------------------
    # The loop

    def fit(self, until_step: int | None = None) -> TrainResult:
        """Train to train.steps (or stop early at `until_step`, with a checkpoint), resuming if possible."""
        tcfg = self.cfg.train
        stop_at = tcfg.steps if until_step is None else min(until_step, tcfg.steps)
        if self.step == 0:
            self.resume_if_possible()
        if self.is_main:
            write_run_files(self.out_dir, self.cfg)
        logger = MetricsLogger(self.out_dir, self.is_main, tcfg.wandb_project, self.cfg.to_dict())
        bar = ProgressBar(tcfg.steps, self.step, enabled=self.is_main and tcfg.progress)
        tokens_per_step = tcfg.global_batch_size * tcfg.seq_len
        previous_handlers = self._install_signal_handlers()
        metrics: dict[str, Any] = {"loss": float("nan")}
        val_loss = None
        try:
            while self.step < stop_at and not self._stop_agreed:
                started = time.perf_counter()
                metrics = self.train_step()
                elapsed = time.perf_counter() - started
                tokens_per_s = tokens_per_step / elapsed
                imbalance = _mean_violation(metrics["load"])
                bar.update(metrics["loss"], tokens_per_s, imbalance)
                is_last = self.step == tcfg.steps
                if (tcfg.eval_every and self.step % tcfg.eval_every == 0) or is_last:
                    val_losses = self.validation_losses()
                    val_loss = metrics["val_loss"] = self._mixture_mean(val_losses)
                    if len(self.val_sets) > 1:
                        metrics["val_loss_per_source"] = val_losses
                if is_last and self.diloco is not None:
                    metrics["diloco_total"] = self.diloco.summary(self.step)
                if self.step % tcfg.log_every == 0 or is_last or "val_loss" in metrics or "diloco" in metrics:
                    logger.log(self._record(metrics, tokens_per_s))
                if self.step % tcfg.checkpoint_every == 0 or is_last:
                    self.save()
            interrupted = self._stop_agreed
            if self.step != _checkpoint_step(self.last_checkpoint):
                self.save()
            if interrupted:
                cause = self._stop_signal or "a signal to another rank"
                bar.write(f"{cause}: saved {self.last_checkpoint} at step {self.step}; rerun to resume")
        finally:
            bar.close()
            logger.close()
            # last: until here a SIGTERM (torchrun's, after a peer died) only sets a flag
            self._restore_signal_handlers(previous_handlers)
        exchange = self.diloco.summary(self.step) if self.diloco is not None else None
        return TrainResult(self.step, metrics["loss"], val_loss, self.last_checkpoint, interrupted, exchange)

    def _record(self, metrics: dict[str, Any], tokens_per_s: float) -> dict[str, Any]:
        achieved = tokens_per_s * self.flops_per_token
        record = {
            "step": self.step,
            "tokens_seen": self.step * self.cfg.train.global_batch_size * self.cfg.train.seq_len,
            "tokens_per_s": tokens_per_s,
            "model_tflops": achieved / 1e12,
            "mfu": achieved / self.peak_flops if self.peak_flops else None,
        }
        if isinstance(self.loader, BlendedLoader) and len(self.val_sets) > 1:
            paths = [name for name, _, _ in self.val_sets]
            record["tokens_per_source"] = dict(zip(paths, self.loader.tokens_per_source()))
        record.update({k: v for k, v in metrics.items()})
        return record

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGTERM/SIGINT finish the current step, save a checkpoint and return cleanly."""

        def request_stop(signum: int, _frame: Any) -> None:
            self._stop_signal = signal.Signals(signum).name

        previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave handlers alone
                previous[sig] = signal.signal(sig, request_stop)
        return previous

    @staticmethod
    def _restore_signal_handlers(previous: dict[int, Any]) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _with_vocabulary_of(cfg: Config, vocab_size: int) -> Config:
    """`cfg`, or a copy of it whose model's vocabulary is grown to `vocab_size` (a tokenizer's)."""
    if cfg.model.vocab_size >= vocab_size:
        return cfg
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))


def _mean_violation(load: list[dict[str, Any]]) -> float | None:
    if not load:
        return None
    return sum(layer["max_violation"] for layer in load) / len(load)


def _checkpoint_step(path: Path | None) -> int | None:
    return None if path is None else ckpt.read_meta(path).step
