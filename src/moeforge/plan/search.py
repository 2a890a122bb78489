"""Enumerate the valid layouts of a model on a cluster, plan each, and rank those that fit by
tokens/s. The number formats, dispatch and DiLoCo settings come from the base layout; the search
varies pipeline degree and schedule, ZeRO-1 vs FSDP/HSDP, EP degree, micro-batch size and
recomputation."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from moeforge.config import ConfigError, ModelConfig
from moeforge.plan.cluster import Cluster
from moeforge.plan.layout import Layout
from moeforge.plan.step_time import Plan, TrainingShape, plan_layout

SCHEDULES = ("1f1b", "interleaved", "zbv", "dualpipe", "dualpipev")
MICRO_BATCH_SIZES = (1, 2, 4, 8)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidate_layouts(
    cfg: ModelConfig, base: Layout, world_size: int, gpus_per_node: int
) -> Iterator[Layout]:
    """Every layout of the search space that divides the world: pp up to the blocks (1 and powers
    of two), each schedule, EP degrees dividing the experts and the data-parallel ranks, FSDP (one
    shard group, or HSDP with the smallest group holding an ep group and a node) or ZeRO-1."""
    per_replica = world_size // base.diloco_replicas
    for pp in (d for d in divisors(per_replica) if d <= cfg.n_layers and d & (d - 1) == 0):
        dp = per_replica // pp
        for schedule in SCHEDULES if pp > 1 else ("1f1b",):
            if schedule in ("dualpipe", "dualpipev") and pp % 2:
                continue
            for ep in (e for e in divisors(cfg.moe.n_experts) if dp % e == 0):
                for sharding, replicate in _data_layouts(dp, ep, gpus_per_node):
                    for mbs in MICRO_BATCH_SIZES:
                        for recompute in ("none", "full"):
                            yield dataclasses.replace(
                                base,
                                pp=pp,
                                pp_schedule=schedule,
                                stage_blocks="",
                                dp_replicate=replicate,
                                dp_shard=dp // replicate,
                                data_sharding=sharding,
                                ep=ep,
                                ep_nodes=0,
                                micro_batch_size=mbs,
                                recompute=recompute,
                            )


def _data_layouts(dp: int, ep: int, gpus_per_node: int) -> list[tuple[str, int]]:
    """(data sharding, dp_replicate) choices: ZeRO-1, FSDP over all dp ranks, and HSDP whose shard
    group is the smallest multiple of ep and of a node that divides dp."""
    choices = [("zero1", 1), ("fsdp", 1)]
    shard = max(ep, gpus_per_node)
    if dp % shard == 0 and shard < dp and shard % ep == 0:
        choices.append(("fsdp", dp // shard))
    return choices


def search_layouts(
    cfg: ModelConfig, base: Layout, cluster: Cluster, shape: TrainingShape, world_size: int
) -> list[Plan]:
    """Plans of every valid layout that fits in memory, fastest first."""
    plans = []
    for layout in candidate_layouts(cfg, base, world_size, cluster.gpus_per_node):
        try:
            layout.validate(world_size, cluster.gpus_per_node)
            plan = plan_layout(cfg, layout, cluster, shape)
        except ConfigError:
            continue  # a batch that does not split, a stage count the blocks cannot fill
        if plan.fits:
            plans.append(plan)
    plans.sort(key=lambda plan: (-plan.tokens_per_s, plan.memory.total))
    return plans


def best_per_shape(plans: list[Plan], top: int) -> list[tuple[int, Plan]]:
    """(rank among all, plan) of the fastest layout of each pipeline shape (pp, schedule), for the
    `top` fastest shapes, plus the fastest layout moeforge runs today when it is not among them:
    near-copies that differ only in EP degree or micro-batch size do not crowd the table."""
    shown: list[tuple[int, Plan]] = []
    seen: set[tuple[int, str]] = set()
    for rank, plan in enumerate(plans, start=1):
        shape = (plan.layout.pp, plan.layout.pp_schedule)
        if shape not in seen and len(shown) < top:
            seen.add(shape)
            shown.append((rank, plan))
    runnable = next(((rank, plan) for rank, plan in enumerate(plans, start=1) if plan.runnable_now), None)
    if runnable is not None and runnable not in shown:
        shown.append(runnable)
    return shown
