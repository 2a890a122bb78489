"""The cluster a plan runs on: nodes of GPUs, their nominal peaks and links, and the fraction of
each that training actually reaches, from a shipped preset (`clusters/NAME.toml`) or a TOML file,
with `--cluster.field-name VALUE` overrides. Every field is a fact with its source in the preset;
a fact the planner needs and nobody gave is a one-line error naming the flag, never a guess."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path

from moeforge.config import ConfigError, apply_mapping

CLUSTERS_DIR = Path(__file__).parent / "clusters"
COLLECTIVE_BACKENDS = ("nccl", "gloo")


@dataclass
class Cluster:
    """Nodes of identical GPUs: what one GPU can do, nominally and in practice."""

    name: str = "custom"
    """a label for reports"""
    gpus_per_node: int = 8
    """GPUs joined by NVLink inside one node"""
    peak_bf16_flops: float = 0.0
    """dense BF16 tensor-core peak of one GPU, FLOP/s"""
    peak_fp8_flops: float = 0.0
    """dense FP8 tensor-core peak of one GPU, FLOP/s"""
    peak_fp32_flops: float = 0.0
    """dense FP32 matmul peak of one device, FLOP/s (for fp32 layouts, e.g. a CPU)"""
    hbm_bytes: float = 0.0
    """memory of one GPU, bytes"""
    hbm_bandwidth: float = 0.0
    """memory bandwidth of one GPU, bytes/s"""
    nvlink_bandwidth: float = 0.0
    """NVLink bandwidth of one GPU to its node, one direction, bytes/s"""
    network_bandwidth: float = 0.0
    """network (InfiniBand/RoCE) bandwidth of one GPU to other nodes, one direction, bytes/s"""
    bf16_efficiency: float = 0.0
    """fraction of the BF16 peak a whole training step reaches (measured MFU of a published run)"""
    fp8_efficiency: float = 0.0
    """fraction of the FP8 peak that FP8 matmuls reach in a training step"""
    fp32_efficiency: float = 0.0
    """fraction of the FP32 peak that FP32 matmuls reach in a training step"""
    nvlink_efficiency: float = 0.0
    """fraction of nvlink-bandwidth that all-to-all and collectives reach"""
    network_efficiency: float = 0.0
    """fraction of network-bandwidth that all-to-all and collectives reach"""
    cross_replica_bandwidth: float = 0.0
    """bandwidth between DiLoCo replicas (e.g. datacenters) per replica, bytes/s; 0 = the network's
    per-GPU bandwidth times the replica's GPUs"""
    elementwise_bandwidth: float = 0.0
    """bytes/s the memory-bound work of a step (norms, elementwise ops, routing, the loss, the
    optimizer; `plan.memory_traffic`) moves at on one device, e.g. a measured copy bandwidth;
    0 = folded into the whole-step efficiency (the GPU presets: their bf16-efficiency is a
    published whole-step MFU)"""
    operator_overhead: float = 0.0
    """host seconds to launch one operator (dispatcher and autograd recording), times the
    operators a step dispatches (`plan.op_counts`); 0 = folded into the whole-step efficiency"""
    collective_latency: float = 0.0
    """seconds of a small all-reduce, all-gather or reduce-scatter beyond its bytes/bandwidth,
    charged per collective; 0 = folded into the whole-step efficiency"""
    all_to_all_latency: float = 0.0
    """seconds of a small all-to-all beyond its bytes/bandwidth, charged per all-to-all; 0 =
    folded into the whole-step efficiency"""
    sync_wait: float = 0.0
    """seconds a device waits, at each blocking collective, for the slowest device of its group,
    beyond the collective's own latency, when the work between collectives is short (devices that
    share cores, an OS's scheduling slices); 0 = folded into the whole-step efficiency"""
    sync_skew: float = 0.0
    """and the fraction of the work since the previous collective that it waits on top of that (the
    devices' rates differ while they share the machine); 0 = folded into the whole-step efficiency"""
    fsdp_unit_overhead: float = 0.0
    """host seconds FSDP2 spends per unit and micro-batch around its collectives, beyond their
    latencies and bytes (its pre/post hooks, copy-in/copy-out, sharded-gradient bookkeeping), not
    overlapped; 0 = folded into the whole-step efficiency"""
    ep_dispatch_overhead: float = 0.0
    """host seconds the expert-parallel dispatcher spends per MoE layer and micro-batch, forward and
    backward, beyond its all-to-alls' latencies and bytes (split sizes to the host, the exchanges'
    autograd functions, the bookkeeping around them), not overlapped; 0 = folded into the
    whole-step efficiency"""
    collective_backend: str = "nccl"
    """'nccl' (GPUs: collectives run on their own streams beside compute, FSDP's traffic hides under
    it; reduce-scatter is native) or 'gloo' (CPU processes: a collective runs on the cores the
    compute uses and the step waits for it; a reduce-scatter is an all-reduce of the whole tensor,
    torch's gloo `_reduce_scatter_base`)"""

    def peak_flops(self, dtype: str) -> float:
        return {"fp8": self.peak_fp8_flops, "fp32": self.peak_fp32_flops}.get(dtype, self.peak_bf16_flops)

    def achieved_flops(self, dtype: str) -> float:
        """FLOP/s one GPU reaches in `dtype` ('bf16', 'fp8' or 'fp32') during training."""
        if dtype in ("fp8", "fp32"):
            return self.require(f"peak_{dtype}_flops") * self.require(f"{dtype}_efficiency")
        return self.require("peak_bf16_flops") * self.require("bf16_efficiency")

    @property
    def achieved_nvlink(self) -> float:
        return self.require("nvlink_bandwidth") * self.require("nvlink_efficiency")

    @property
    def achieved_network(self) -> float:
        return self.require("network_bandwidth") * self.require("network_efficiency")

    def require(self, name: str) -> float:
        """The field `name`, or a one-line error naming its flag when nobody gave it."""
        value = getattr(self, name)
        if not value:
            flag = name.replace("_", "-")
            raise ConfigError(
                f"cluster.{flag}: not given for cluster {self.name!r}; set --cluster.{flag} VALUE"
            )
        return value

    @property
    def overlaps_collectives(self) -> bool:
        """Whether collectives run beside compute (NCCL) rather than in its place (gloo on CPU)."""
        return self.collective_backend == "nccl"

    def validate(self) -> Cluster:
        if self.gpus_per_node < 1:
            raise ConfigError(f"cluster.gpus-per-node: got {self.gpus_per_node}; allowed: an integer >= 1")
        if self.collective_backend not in COLLECTIVE_BACKENDS:
            raise ConfigError(
                f"cluster.collective-backend: got {self.collective_backend!r}; allowed: 'nccl' | 'gloo'"
            )
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and value < 0:
                raise ConfigError(f"cluster.{f.name.replace('_', '-')}: got {value}; allowed: a number >= 0")
            if f.name.endswith("_efficiency") and value > 1:
                raise ConfigError(
                    f"cluster.{f.name.replace('_', '-')}: got {value}; allowed: a fraction in (0, 1]"
                )
        return self


def available_clusters() -> list[str]:
    return sorted(p.stem for p in CLUSTERS_DIR.glob("*.toml"))


def load_cluster(name_or_file: str, overrides: dict[str, str] | None = None) -> Cluster:
    """A shipped preset ('h800', 'h100', 'h200', 'b200') or a TOML file of `Cluster` fields, then
    the `{field-name: text}` overrides."""
    path = CLUSTERS_DIR / f"{name_or_file}.toml"
    if not path.is_file():
        path = Path(name_or_file)
    if not path.is_file():
        raise ConfigError(
            f"--cluster: {name_or_file!r} is neither a preset ({', '.join(available_clusters())}) nor a TOML file"
        )
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--cluster: {path} is not valid TOML: {err}") from None
    cluster = Cluster()
    apply_mapping(cluster, data, "cluster.")
    apply_mapping(cluster, dict(overrides or {}), "cluster.")
    return cluster.validate()
