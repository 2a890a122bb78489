"""The `parallel` section: how the world of processes is laid out on the DeviceMesh.

Its own checks only; those that tie the layout to the model or to the batch (experts divisible by
ep, a pipeline's stages and micro-batches) are in cross_section.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from moeforge.config.checks import ConfigError, _check, _check_choices, _check_values


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
