"""What a checkpoint holds of Streaming DiLoCo's outer state, and how it is put back.

- meta.json (`checkpoint_meta`): the replica count, the exchanges in flight (their steps and message
  figures), the bytes sent so far, the step each fragment was last replaced at, and which outer
  tensors the checkpoint holds ("outer_state": the momentum of the Nesterov outer, the residuals of
  error feedback).
- the trees every replica holds alike (`shared_state`): "model" is theta_global under the model's own
  names (what `moeforge generate` and `convert` read), "diloco" the outer momentum and the mean outer
  gradients of the exchanges in flight.
- the replica's own tree (`replica_state`): the error-feedback residuals, which differ between
  replicas, saved under `replica_<r>.` beside the replica's model and optimizer.

Every tensor goes as the parameter's own kind (a DTensor with its placements), so a checkpoint
resumes under another sharding. A tree the checkpoint lacks (saved before error feedback, by the
other outer, by fewer replicas) starts at zero, and a tree this run does not keep is not read.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from moeforge.diloco.exchange import Exchange, receive
from moeforge.parallel.sharded_load import local_shard

_REPLICA_TOTALS = ("nbytes", "local_square", "error_square")
"""the message figures of an exchange in flight that meta.json holds summed over replica 0's ranks"""
_PENDING_FIELDS = (
    "fragment",
    "sent_step",
    "land_step",
    "nbytes",
    "local_square",
    "error_square",
    "wait_s",
)


class OuterCheckpointing:
    """The checkpoint half of `StreamingDiLoCo` (outer.py), which holds the attributes used here:
    cfg, wire, fragments, model, device, replica_group, global_params, global_biases, momentum,
    feedback, pending, bytes_per_replica, _replaced_at."""

    _copy_backs: list[tuple[torch.Tensor, torch.Tensor]]
    """(device stand-in, host tensor) pairs of the last state handed out, copied back after a load"""
    _loading_trees: frozenset[str] | None = None
    """None while saving (every outer tree this run keeps goes in); while loading, the outer trees
    ("momentum", "residual") the checkpoint holds, the only ones read"""

    def checkpoint_meta(self) -> dict[str, Any]:
        """The small outer state for meta.json."""
        self._receive_pending()
        pending = [self._pending_meta(exchange) for exchange in self.pending.values()]
        return {
            "replicas": self.cfg.replicas,
            "pending": pending,
            "bytes_per_replica": self.bytes_per_replica,
            "replaced_at": {str(k): v for k, v in self._replaced_at.items()},
            "outer_state": sorted(self._kept_trees()),
        }

    def restore_meta(self, saved: dict[str, Any] | None) -> None:
        """Before loading the tensors: the exchanges that were in flight, their means still to fill,
        and which outer trees to read."""
        self.pending.clear()
        self._loading_trees = frozenset()
        if saved is None:
            return
        self._loading_trees = frozenset(saved.get("outer_state", ["momentum"]))  # older: momentum only
        first = self.replica_group is None or dist.get_rank(self.replica_group) == 0
        for fields in saved["pending"]:
            frag = self.fragments[fields["fragment"]]
            # this rank's shard of the fragment, whatever the saving layout's sharding was; the
            # replica's totals of the message figures on one of its ranks, so that a landing sums
            # them again (the bytes are every replica's; the squares replica 0's)
            n_values = sum(self.global_params[name].numel() for name in frag.params)
            n_biases = sum(bias.numel() for bias in frag.biases.values())
            totals = {key: fields[key] if first else 0 for key in _REPLICA_TOTALS}
            steps = {key: fields[key] for key in _PENDING_FIELDS if key not in _REPLICA_TOTALS}
            exchange = Exchange(**steps, **totals, n_values=n_values, n_biases=n_biases)
            exchange.mean_delta = torch.zeros(n_values, device=self.device)
            exchange.mean_biases = torch.zeros(n_biases, device=self.device)
            self.pending[exchange.fragment] = exchange
        self.bytes_per_replica = saved["bytes_per_replica"]
        self._replaced_at = {int(k): v for k, v in saved["replaced_at"].items()}

    def shared_state(self, with_outer_state: bool = True) -> dict[str, Any]:
        """The tensor trees every replica holds alike, in place (loading fills them): "model", and
        "diloco" with the momentum (when this run keeps it and, on a load, the checkpoint has it) and
        the means of the exchanges in flight (received here if they have not landed yet: a
        checkpoint waits for them). Call after `restore_meta` when loading."""
        self._receive_pending()
        self._copy_backs = []
        state: dict[str, Any] = {"model": self._global_model_state()}
        if with_outer_state:
            params = self._params_by_name()
            pending = {str(p): self._pending_state(exchange, params) for p, exchange in self.pending.items()}
            state["diloco"] = {"pending": pending}
            if self.momentum and self._wanted("momentum"):
                state["diloco"]["momentum"] = {
                    name: self._like(value, params[name]) for name, value in self.momentum.items()
                }
        return state

    def replica_state(self) -> dict[str, Any]:
        """This replica's own outer tensors, saved under its name: {"diloco": {"residual": ...}}
        with error feedback (on a load: when the checkpoint has them), else {}."""
        if self.feedback is None or not self._wanted("residual"):
            return {}
        params = self._params_by_name()
        residual = {name: self._like(value, params[name]) for name, value in self.feedback.residual.items()}
        return {"diloco": {"residual": residual}}

    def after_load(self, replica_loaded: bool) -> None:
        """Copy what was loaded into device-side stand-ins back to host memory, and start a replica that
        the checkpoint did not have from theta_global (with zero residuals)."""
        for loaded, store in self._copy_backs:
            store.copy_(loaded)
        self._copy_backs = []
        self._loading_trees = None
        if not replica_loaded:
            with torch.no_grad():
                for frag in self.fragments:
                    for name, param in frag.params.items():
                        local_shard(param).copy_(self.global_params[name])
                    for name, bias in frag.biases.items():
                        bias.copy_(self.global_biases[name])
                if self.feedback is not None:
                    for residual in self.feedback.residual.values():
                        residual.zero_()

    def _kept_trees(self) -> set[str]:
        """The outer trees this run keeps."""
        trees = {"momentum"} if self.momentum else set()
        return trees | {"residual"} if self.feedback is not None else trees

    def _wanted(self, tree: str) -> bool:
        """Whether `tree` goes into the state: always on a save, on a load only if the checkpoint
        holds it."""
        return self._loading_trees is None or tree in self._loading_trees

    def _receive_pending(self) -> None:
        for exchange in self.pending.values():
            receive(exchange, self.wire)

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
        """An exchange in flight for meta.json: its steps, and its message figures summed over the
        replica's ranks (a collective inside the replica; rank 0 writes its replica's): per-rank
        figures would not survive a change of sharding."""
        fields = {key: getattr(exchange, key) for key in _PENDING_FIELDS}
        if self.replica_group is not None:
            totals = torch.tensor([float(fields[key]) for key in _REPLICA_TOTALS], dtype=torch.float64)
            totals = totals.to(self.device)
            dist.all_reduce(totals, group=self.replica_group)
            fields.update({key: type(fields[key])(value) for key, value in zip(_REPLICA_TOTALS, totals.tolist())})
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
