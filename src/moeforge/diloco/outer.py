"""The outer loop of Streaming DiLoCo, run by every rank after each inner optimizer step.

Each replica trains alone; every rank also keeps theta_global, the replicas' common copy of its own
shard of the parameters (fp32, optionally in host memory), and the outer optimizer's momentum.
When a fragment is due (fragments.py) a rank sends its outer gradient delta = theta_global -
theta_local for that fragment (exchange.py); when the exchange lands (at once, or overlap-steps
later) every replica applies the same outer step, SGD with Nesterov momentum on the mean delta,

    m = mu*m + mean(delta);   theta_global -= lr * (mean(delta) + mu*m)

and takes theta_global into its local fragment: replacing it, or, when inner steps ran while the
exchange was in flight, mixing it in: theta_local = alpha*theta_local + (1-alpha)*theta_global.
Router biases are not trained by gradients: their replicas' plain mean is taken in the same way.
The inner optimizer's state is per replica and never exchanged.

The rank (r, x) of replica r exchanges with the ranks (r', x) of the other replicas, which hold the
same shards: one process group per position inside a replica (the mesh's "diloco" dimension).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moeforge.config import DiLoCoConfig
from moeforge.diloco.exchange import Exchange, receive, start_exchange
from moeforge.diloco.fragments import Fragment, fragments_due, split_into_fragments
from moeforge.errors import RunFailure
from moeforge.parallel.sharded_load import local_shard


class OuterGradientNotFinite(RunFailure, RuntimeError):
    """A replica sent a NaN/inf outer gradient: nothing was applied, nothing is saved."""


class StreamingDiLoCo:
    """The outer state of one rank (theta_global, momentum, exchanges in flight) and its schedule."""

    def __init__(
        self,
        model: nn.Module,
        cfg: DiLoCoConfig,
        replica: int,
        group: dist.ProcessGroup,
        device: torch.device,
    ):
        self.cfg = cfg
        self.replica = replica
        self.group = group
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
            self.momentum = {name: torch.zeros_like(value) for name, value in self.global_params.items()}
            self.global_biases = {
                name: bias.detach().float().clone()
                for frag in self.fragments
                for name, bias in frag.biases.items()
            }
        self.pending: dict[int, Exchange] = {}
        self.bytes_per_replica = 0
        """bytes each replica sent so far in the run (all its ranks' messages)"""
        self.parameter_count = sum(param.numel() for frag in self.fragments for param in frag.params.values())
        self._replaced_at: dict[int, int] = {}
        """fragment -> the step at which its local parameters were last replaced by theta_global"""
        self._stop_vote: torch.Tensor | None = None
        self._stop_work: dist.Work | None = None
        self._copy_backs: list[tuple[torch.Tensor, torch.Tensor]] = []
        """(device stand-in, host tensor) pairs of the last `shared_state`, copied back after a load"""

    def _stored(self, shard: torch.Tensor) -> torch.Tensor:
        copy = shard.detach().float().clone().to(self._store)
        return copy.pin_memory() if self._pin else copy

    # ------------------------------------------------------------------------------------------
    # The schedule

    def after_inner_step(self, step: int) -> list[dict[str, Any]]:
        """Land the exchanges due at inner step `step` (counted from 1), then send the fragments due;
        one metrics record per landed exchange."""
        records = [self._land(self.pending.pop(p), mix=True) for p in self._landing_at(step)]
        for fragment in fragments_due(step, self.cfg.sync_every, self.cfg.fragments):
            exchange = self._send(fragment, step, step + self.cfg.overlap_steps)
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
    def _send(self, fragment: int, step: int, land_step: int) -> Exchange:
        frag = self.fragments[fragment]
        deltas = [
            (self.global_params[name].to(param.device) - local_shard(param).float()).reshape(-1)
            for name, param in frag.params.items()
        ]
        biases = [bias.float().reshape(-1) for bias in frag.biases.values()]
        device = deltas[0].device if deltas else self._store
        return start_exchange(
            fragment,
            step,
            land_step,
            torch.cat(deltas) if deltas else torch.zeros(0, device=device),
            torch.cat(biases) if biases else torch.zeros(0, device=device),
            self.cfg.quantize,
            self.cfg.quantize_block,
            self.group,
        )

    @torch.no_grad()
    def _land(self, exchange: Exchange, mix: bool) -> dict[str, Any]:
        """Receive, check, apply the outer step and merge; every rank of every replica together."""
        receive(exchange, self.cfg.quantize, self.cfg.quantize_block)
        mean_delta, mean_biases = exchange.mean_delta, exchange.mean_biases
        not_finite = (~torch.isfinite(mean_delta)).sum() + (~torch.isfinite(mean_biases)).sum()
        totals = torch.stack(
            [
                not_finite.double(),
                mean_delta.double().square().sum(),
                torch.tensor(exchange.local_square, dtype=torch.float64, device=mean_delta.device),
                torch.tensor(exchange.error_square, dtype=torch.float64, device=mean_delta.device),
                torch.tensor(float(exchange.nbytes), dtype=torch.float64, device=mean_delta.device),
            ]
        )
        dist.all_reduce(totals)  # the verdict and the figures, the same on every rank
        not_finite, mean_square, local_square, error_square, nbytes = totals.tolist()
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
        replicas = self.cfg.replicas
        sent = int(nbytes) // replicas
        self.bytes_per_replica += sent
        return {
            "fragment": exchange.fragment,
            "sent_step": exchange.sent_step,
            "bytes_per_replica": sent,
            "outer_grad_norm": math.sqrt(mean_square / replicas),
            "quant_error": math.sqrt(error_square / local_square) if local_square > 0 else 0.0,
            "wait_s": exchange.wait_s,
            "mixed": alpha,
        }

    def _outer_step(self, frag: Fragment, mean_delta: torch.Tensor) -> None:
        """SGD with Nesterov momentum on theta_global (as torch.optim.SGD(nesterov=True) computes it)."""
        lr, mu = self.cfg.outer_lr, self.cfg.outer_momentum
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
    # Agreeing to stop, without a blocking collective between replicas on every step

    def agree_to_stop(self, requested: bool) -> bool:
        """Vote this replica's stop request and return the previous step's verdict: the vote travels
        while the next step computes, and every rank of every replica stops at the same step."""
        verdict = False
        if self._stop_work is not None:
            self._stop_work.wait()
            verdict = bool(self._stop_vote.item() > 0)
        self._stop_vote = torch.tensor([float(requested)], device=self.device)  # NCCL: on the GPU
        self._stop_work = dist.all_reduce(
            self._stop_vote, op=dist.ReduceOp.MAX, group=self.group, async_op=True
        )
        return verdict

    def close(self) -> None:
        """Wait for the vote in flight (every rank cast the same number)."""
        if self._stop_work is not None:
            self._stop_work.wait()
            self._stop_work = None

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def summary(self, steps: int) -> dict[str, Any]:
        """Bytes each replica sent so far, and what data parallelism's every-step all-reduce of fp32
        gradients would have sent for the same steps (counted the same way: each rank's payload)."""
        data_parallel = steps * 4 * self.parameter_count
        return {
            "bytes_per_replica": self.bytes_per_replica,
            "data_parallel_bytes_per_replica": data_parallel,
            "ratio": data_parallel / self.bytes_per_replica if self.bytes_per_replica else None,
        }

    def checkpoint_meta(self) -> dict[str, Any]:
        """The small outer state for meta.json."""
        self._receive_pending()
        pending = [self._pending_meta(exchange) for exchange in self.pending.values()]
        return {
            "replicas": self.cfg.replicas,
            "pending": pending,
            "bytes_per_replica": self.bytes_per_replica,
            "replaced_at": {str(k): v for k, v in self._replaced_at.items()},
        }

    def restore_meta(self, saved: dict[str, Any] | None) -> None:
        """Before loading the tensors: the exchanges that were in flight, their means still to fill."""
        self.pending.clear()
        if saved is None:
            return
        first = not dist.is_initialized() or dist.get_rank() == 0
        for fields in saved["pending"]:
            frag = self.fragments[fields["fragment"]]
            # this rank's shard of the fragment, whatever the saving layout's sharding was; the
            # world's totals of the message figures on one rank, so that a landing sums them again
            n_values = sum(self.global_params[name].numel() for name in frag.params)
            n_biases = sum(bias.numel() for bias in frag.biases.values())
            totals = {key: fields[key] if first else 0 for key in _WORLD_TOTALS}
            steps = {key: fields[key] for key in _PENDING_FIELDS if key not in _WORLD_TOTALS}
            exchange = Exchange(**steps, **totals, n_values=n_values, n_biases=n_biases)
            exchange.mean_delta = torch.zeros(n_values, device=self.device)
            exchange.mean_biases = torch.zeros(n_biases, device=self.device)
            self.pending[exchange.fragment] = exchange
        self.bytes_per_replica = saved["bytes_per_replica"]
        self._replaced_at = {int(k): v for k, v in saved["replaced_at"].items()}

    def shared_state(self, with_outer_state: bool = True) -> dict[str, Any]:
        """The tensor trees every replica holds alike, in place (loading fills them): "model" is
        theta_global under the model's own names (what `moeforge generate` and `convert` read), and
        "diloco" the momentum and the means of the exchanges in flight (received here if they
        have not landed yet: a checkpoint waits for them)."""
        self._receive_pending()
        self._copy_backs = []
        state: dict[str, Any] = {"model": self._global_model_state()}
        if with_outer_state:
            params = self._params_by_name()
            momentum = {name: self._like(value, params[name]) for name, value in self.momentum.items()}
            pending = {str(p): self._pending_state(exchange, params) for p, exchange in self.pending.items()}
            state["diloco"] = {"momentum": momentum, "pending": pending}
        return state

    def after_load(self, replica_loaded: bool) -> None:
        """Copy what was loaded into device-side stand-ins back to host memory, and start a replica that
        the checkpoint did not have from theta_global."""
        for loaded, store in self._copy_backs:
            store.copy_(loaded)
        self._copy_backs = []
        if not replica_loaded:
            with torch.no_grad():
                for frag in self.fragments:
                    for name, param in frag.params.items():
                        local_shard(param).copy_(self.global_params[name])
                    for name, bias in frag.biases.items():
                        bias.copy_(self.global_biases[name])

    def _receive_pending(self) -> None:
        for exchange in self.pending.values():
            receive(exchange, self.cfg.quantize, self.cfg.quantize_block)

    def _params_by_name(self) -> dict[str, nn.Parameter]:
        return {name: param for frag in self.fragments for name, param in frag.params.items()}

    def _global_model_state(self) -> dict[str, torch.Tensor]:
        canonical = {id(param): name for name, param in self._params_by_name().items()}
        state = {}
        for key, value in self.model.state_dict(keep_vars=True).items():
            if id(value) in canonical:
                state[key] = self._like(self.global_params[canonical[id(value)]], value)
            elif key in self.global_biases:
                state[key] = self.global_biases[key]
            else:
                state[key] = value.detach()
        return state

    def _pending_meta(self, exchange: Exchange) -> dict[str, Any]:
        """An exchange in flight for meta.json: its steps, and its message figures summed over every
        rank (a collective): per-rank figures would not survive a change of sharding."""
        fields = {key: getattr(exchange, key) for key in _PENDING_FIELDS}
        if dist.is_initialized():
            totals = torch.tensor([float(fields[key]) for key in _WORLD_TOTALS], dtype=torch.float64)
            totals = totals.to(self.device)
            dist.all_reduce(totals)
            fields.update({key: type(fields[key])(value) for key, value in zip(_WORLD_TOTALS, totals.tolist())})
        return fields

    def _pending_state(self, exchange: Exchange, params: dict[str, nn.Parameter]) -> dict[str, Any]:
        frag = self.fragments[exchange.fragment]
        delta, offset = {}, 0
        for name in frag.params:
            target = self.global_params[name]
            part = exchange.mean_delta[offset : offset + target.numel()].view_as(target)
            offset += target.numel()
            delta[name] = self._like(part, params[name])
        biases, offset = {}, 0
        for name, bias in frag.biases.items():
            biases[name] = exchange.mean_biases[offset : offset + bias.numel()].view_as(bias)
            offset += bias.numel()
        return {"delta": delta, "biases": biases}

    def _like(self, value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
        """`value` (this rank's shard) as the tensor DCP expects for `param`: a DTensor with its
        placements; a stand-in on the parameter's device when `value` lives in host memory."""
        device = local_shard(param).device
        on_device = value if value.device == device else value.to(device)
        if on_device is not value:
            self._copy_backs.append((on_device, value))
        if not isinstance(param, DTensor):
            return on_device
        return DTensor.from_local(
            on_device,
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )


_WORLD_TOTALS = ("nbytes", "local_square", "error_square")
"""the message figures of an exchange in flight that meta.json holds summed over every rank"""
_PENDING_FIELDS = (
    "fragment",
    "sent_step",
    "land_step",
    "nbytes",
    "local_square",
    "error_square",
    "wait_s",
)


def _blend(local: torch.Tensor, target: torch.Tensor, alpha: float) -> None:
    target = target.to(local.device, local.dtype)
    if alpha:
        local.mul_(alpha).add_(target, alpha=1 - alpha)
    else:
        local.copy_(target)
