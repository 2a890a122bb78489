"""The outer loop of Streaming DiLoCo, run by every rank after each inner optimizer step.

Each replica trains alone; every rank also keeps theta_global, the replicas' common copy of its own
shard of the parameters (fp32, optionally in host memory), the outer optimizer's momentum and, with
error feedback on a lossy wire, its replica's residuals (feedback.py). When a fragment is due
(fragments.py) a rank sends its outer gradient delta = theta_global - theta_local for that fragment
(exchange.py), with error feedback x = beta*e + delta instead, and keeps e = x - Q(x); when the
exchange lands (at once, or overlap-steps later) every replica applies the same outer step to the
mean of what was sent, mean(Q) (= mean(delta) on a lossless wire). DiLoCo's outer
(`diloco.outer nesterov`, its error feedback undecayed: beta = 1) is SGD with Nesterov momentum:

    m = mu*m + mean(Q);   theta_global -= lr * (mean(Q) + mu*m)

SparseLoCo's (`diloco.outer sparseloco`, Sarfi et al. 2025, arXiv 2508.15706, Algorithm 1) keeps no
momentum: each replica's decayed accumulator e = beta*e + delta (beta = diloco.ef-decay) stands in
for it, what its top-k and quantiser drop stays in e, and

    theta_global -= lr * mean(Q)

Either way every replica then takes theta_global into its local fragment: replacing it, or, when
inner steps ran while the exchange was in flight, mixing it in:
theta_local = alpha*theta_local + (1-alpha)*theta_global.
Router biases are not trained by gradients: their replicas' plain mean is taken in the same way.
The inner optimizer's state is per replica and never exchanged.

The rank (r, x) of replica r exchanges with the ranks (r', x) of the other replicas, which hold the
same shards: one process group per position inside a replica (the mesh's "diloco" dimension). That
all-gather is the only collective between replicas: a landing agrees on its verdict (all finite?)
and its figures over the replica's own ranks, and a stop request rides on the messages, so a
replica waits for the others only where it needs their outer gradients.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from moeforge.config import DiLoCoConfig
from moeforge.diloco.checkpointing import OuterCheckpointing
from moeforge.diloco.exchange import Exchange, receive, start_exchange
from moeforge.diloco.feedback import ErrorFeedback
from moeforge.diloco.fragments import Fragment, fragments_due, split_into_fragments
from moeforge.diloco.wire import WireFormat
from moeforge.errors import RunFailure
from moeforge.parallel.sharded_load import local_shard


class OuterGradientNotFinite(RunFailure, RuntimeError):
    """A replica sent a NaN/inf outer gradient: nothing was applied, nothing is saved."""


class StreamingDiLoCo(OuterCheckpointing):
    """The outer state of one rank (theta_global, momentum, residuals, exchanges in flight) and its
    schedule; what a checkpoint holds of it is in checkpointing.py."""

    def __init__(
        self,
        model: nn.Module,
        cfg: DiLoCoConfig,
        replica: int,
        group: dist.ProcessGroup,
        device: torch.device,
        replica_group: dist.ProcessGroup | None = None,
        parameter_count: int | None = None,
    ):
        """`group`: the ranks holding this rank's shards in every replica; `replica_group`: this
        replica's ranks (None: the replica is this one rank); `parameter_count`: the replica's
        parameters, all pipeline stages together (default: this rank's model's)."""
        self.cfg = cfg
        self.wire = WireFormat.of(cfg)
        self.replica = replica
        self.group = group
        self.replica_group = replica_group
        self.model = model
        self.device = device
        self.fragments = split_into_fragments(model, cfg.fragments)
        self._store = torch.device("cpu") if cfg.global_on_cpu else device
        self._pin = cfg.global_on_cpu and device.type == "cuda"
        with torch.no_grad():
            self.global_params = {
                name: self._stored(local_shard(param))
                for frag in self.fragments
                for name, param in frag.params.items()
            }
            nesterov = cfg.outer == "nesterov"
            self.momentum = (
                {name: torch.zeros_like(value) for name, value in self.global_params.items()} if nesterov else {}
            )
            self.feedback = (
                ErrorFeedback(self.global_params, 1.0 if nesterov else cfg.ef_decay)
                if cfg.error_feedback and self.wire.lossy
                else None
            )
            """the residuals of error feedback; None without it (or on a lossless wire)"""
            self.global_biases = {
                name: bias.detach().float().clone()
                for frag in self.fragments
                for name, bias in frag.biases.items()
            }
        self.pending: dict[int, Exchange] = {}
        self.bytes_per_replica = 0
        """bytes each replica sent so far in the run (all its ranks' messages)"""
        self.parameter_count = parameter_count or sum(
            param.numel() for frag in self.fragments for param in frag.params.values()
        )
        """the replica's parameters: what data parallelism would all-reduce each step"""
        self._replaced_at: dict[int, int] = {}
        """fragment -> the step at which its local parameters were last replaced by theta_global"""
        self.stop_agreed = False
        """a landed exchange carried a replica's stop request: every rank of every replica stops
        after this same step"""
        self._copy_backs = []

    def _stored(self, shard: torch.Tensor) -> torch.Tensor:
        copy = shard.detach().float().clone().to(self._store)
        return copy.pin_memory() if self._pin else copy

    # ------------------------------------------------------------------------------------------
    # The schedule

    def after_inner_step(self, step: int, stop_requested: bool = False) -> list[dict[str, Any]]:
        """Land the exchanges due at inner step `step` (counted from 1), then send the fragments due,
        each message carrying `stop_requested` (this replica's, agreed inside it); one metrics record
        per landed exchange. Sets `stop_agreed` when a landed exchange carried a stop request: a
        request is agreed at the landing of the first exchange sent after it, at most H/P + tau
        steps later."""
        records = [self._land(self.pending.pop(p), mix=True) for p in self._landing_at(step)]
        for fragment in fragments_due(step, self.cfg.sync_every, self.cfg.fragments):
            exchange = self._send(fragment, step, step + self.cfg.overlap_steps, stop_requested)
            if self.cfg.overlap_steps == 0:
                records.append(self._land(exchange, mix=False))
            else:
                self.pending[fragment] = exchange
        return records

    def finish(self, step: int) -> list[dict[str, Any]]:
        """At the end of training: land what is in flight, then synchronise once more, without
        overlap, every fragment whose local parameters are not theta_global yet, so that every
        replica ends on theta_global (the checkpoint's model). An exchange sent at this very step
        carries all of its fragment's progress: it lands by replacement and needs no second round."""
        records = []
        for fragment in sorted(self.pending):
            exchange = self.pending.pop(fragment)
            records.append(self._land(exchange, mix=exchange.sent_step != step))
        for fragment in range(self.cfg.fragments):
            if self._replaced_at.get(fragment) != step:
                records.append(self._land(self._send(fragment, step, step), mix=False))
        return records

    def _landing_at(self, step: int) -> list[int]:
        return sorted(p for p, exchange in self.pending.items() if exchange.land_step == step)

    # ------------------------------------------------------------------------------------------
    # One exchange

    @torch.no_grad()
    def _send(self, fragment: int, step: int, land_step: int, stop: bool = False) -> Exchange:
        frag = self.fragments[fragment]
        deltas = [
            (self.global_params[name].to(param.device) - local_shard(param).float()).reshape(-1)
            for name, param in frag.params.items()
        ]
        biases = [bias.float().reshape(-1) for bias in frag.biases.values()]
        device = deltas[0].device if deltas else self._store
        meant = torch.cat(deltas) if deltas else torch.zeros(0, device=device)
        names = list(frag.params)
        if self.feedback is not None:
            meant = self.feedback.compensate(names, meant)
        exchange, transmitted = start_exchange(
            fragment,
            step,
            land_step,
            meant,
            torch.cat(biases) if biases else torch.zeros(0, device=device),
            self.wire,
            self.group,
            stop,
        )
        if self.feedback is not None:
            self.feedback.keep(names, meant, transmitted)
        return exchange

    @torch.no_grad()
    def _land(self, exchange: Exchange, mix: bool) -> dict[str, Any]:
        """Receive, check, apply the outer step and merge. The ranks of this replica agree on the
        verdict and sum the figures among themselves (every replica computes the same mean, so
        every replica reaches the same verdict); no replica waits for another here."""
        receive(exchange, self.wire)
        mean_delta, mean_biases = exchange.mean_delta, exchange.mean_biases
        not_finite = (~torch.isfinite(mean_delta)).sum() + (~torch.isfinite(mean_biases)).sum()
        figures = [exchange.local_square, exchange.error_square, float(exchange.nbytes), float(exchange.stop)]
        totals = torch.cat(
            [
                torch.stack([not_finite.double(), mean_delta.double().square().sum()]),
                torch.tensor(figures, dtype=torch.float64, device=mean_delta.device),
            ]
        )
        if self.replica_group is not None:
            dist.all_reduce(totals, group=self.replica_group)
        not_finite, mean_square, local_square, error_square, nbytes, stop = totals.tolist()
        if not_finite:
            raise OuterGradientNotFinite(
                f"diloco: the outer gradient of fragment {exchange.fragment} sent after step "
                f"{exchange.sent_step} is not finite (NaN/inf) on some replica; nothing was applied and the "
                "last checkpoint is intact — lower train.lr or diloco.outer-lr"
            )
        frag = self.fragments[exchange.fragment]
        self._outer_step(frag, mean_delta)
        alpha = self.cfg.mix if mix else 0.0
        self._merge(frag, mean_biases, alpha)
        if not mix:
            self._replaced_at[exchange.fragment] = exchange.sent_step
        self.stop_agreed = self.stop_agreed or stop > 0
        self.bytes_per_replica += int(nbytes)
        return {
            "fragment": exchange.fragment,
            "sent_step": exchange.sent_step,
            "bytes_per_replica": int(nbytes),
            "parameters": sum(param.numel() for param in frag.params.values()),
            "outer_grad_norm": math.sqrt(mean_square),
            "quant_error": math.sqrt(error_square / local_square) if local_square > 0 else 0.0,
            "wait_s": exchange.wait_s,
            "mixed": alpha,
        }

    def _outer_step(self, frag: Fragment, mean_delta: torch.Tensor) -> None:
        """SGD with Nesterov momentum on theta_global (as torch.optim.SGD(nesterov=True) computes it);
        SparseLoCo's plain step without momentum."""
        lr = self.cfg.outer_lr
        mu = self.cfg.outer_momentum if self.momentum else 0.0
        offset = 0
        for name in frag.params:
            target = self.global_params[name]
            grad = mean_delta[offset : offset + target.numel()].view_as(target).to(target.device)
            offset += target.numel()
            if mu:
                momentum = self.momentum[name]
                momentum.mul_(mu).add_(grad)
                grad = grad.add(momentum, alpha=mu)
            target.add_(grad, alpha=-lr)

    def _merge(self, frag: Fragment, mean_biases: torch.Tensor, alpha: float) -> None:
        """theta_local = alpha*theta_local + (1-alpha)*theta_global; router biases to their mean likewise."""
        for name, param in frag.params.items():
            _blend(local_shard(param), self.global_params[name], alpha)
        offset = 0
        for name, bias in frag.biases.items():
            mean = mean_biases[offset : offset + bias.numel()].view_as(bias)
            offset += bias.numel()
            self.global_biases[name].copy_(mean)
            _blend(bias, mean, alpha)

    # ------------------------------------------------------------------------------------------
    # The bytes

    def summary(self, steps: int) -> dict[str, Any]:
        """What each replica sent so far, counted two ways, beside data parallelism's fp32 gradient
        every step for the same steps counted the same ways:

        - payload: the replica's messages (its ranks' together), what it hands the collective. Data
          parallelism: 4 bytes x parameters per step.
        - wire: what the replica's links carry out (and, alike, in). The exchange is an all-gather:
          each message reaches the M - 1 other replicas, (M - 1) x payload. Data parallelism's
          all-reduce of the gradient across the M replicas (a ring, or reduce-scatter + all-gather):
          2 (M - 1) / M x its payload.

        With M = 2 both ratios agree; with more replicas the all-gather's (M - 1) grows against the
        all-reduce's 2 (M - 1) / M, the price of never adding quantised or sparse values in flight."""
        m = self.cfg.replicas
        data_parallel = steps * 4 * self.parameter_count
        wire, data_parallel_wire = (m - 1) * self.bytes_per_replica, 2 * (m - 1) * data_parallel / m
        return {
            "wire_format": self.wire.describe(),
            "bytes_per_replica": self.bytes_per_replica,
            "data_parallel_bytes_per_replica": data_parallel,
            "ratio": data_parallel / self.bytes_per_replica if self.bytes_per_replica else None,
            "wire_bytes_per_replica": wire,
            "data_parallel_wire_bytes_per_replica": data_parallel_wire,
            "wire_ratio": data_parallel_wire / wire if wire else None,
        }


def _blend(local: torch.Tensor, target: torch.Tensor, alpha: float) -> None:
    target = target.to(local.device, local.dtype)
    if alpha:
        local.mul_(alpha).add_(target, alpha=1 - alpha)
    else:
        local.copy_(target)
