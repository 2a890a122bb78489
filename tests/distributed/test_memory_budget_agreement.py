"""Ranks whose memory budgets differ (MemAvailable read a moment apart, or set per rank) reach one
verdict: the smallest budget over the ranks decides, so that no rank refuses alone and leaves its
peers waiting in their first collective."""

import json
import os
from pathlib import Path

import torch

from conftest import small_config
from moeforge.config import ConfigError
from moeforge.parallel.spawn import run_on_processes
from moeforge.plan import estimate_run
from moeforge.plan.memory_budget import ENV_LIMIT, agreed_budgets, memory_budget
from moeforge.train.trainer import Trainer


def budgets_and_trainer(rank: int, limits: list[str], out: str) -> None:
    """Rank `rank` with budget `limits[rank]`: the agreed budget, and whether the trainer starts."""
    os.environ[ENV_LIMIT] = limits[rank]
    budget, host = agreed_budgets([memory_budget("cpu"), None], torch.device("cpu"))
    try:
        Trainer(small_config(world_size=2, train__steps="1"), Path(out) / "run")
        verdict = "started"
    except ConfigError as err:
        verdict = str(err)
    Path(out, f"rank{rank}.json").write_text(json.dumps([budget.bytes, budget.source, host, verdict]))


def test_the_smallest_budget_over_the_ranks_decides_on_every_rank(tmp_path):
    need = estimate_run(small_config(world_size=2), 2, "cpu").needed_bytes
    limits = [str(need * 1000), str(need / 2)]  # rank 0 alone would start, rank 1 alone would not
    run_on_processes(2, budgets_and_trainer, limits, str(tmp_path))
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [row[0] for row in seen] == [need / 2, need / 2]
    assert seen[0][1] == f"{ENV_LIMIT}, the smallest over the ranks" and seen[1][1] == ENV_LIMIT
    assert [row[2] for row in seen] == [None, None]
    for row in seen:
        assert row[3].startswith("train.force: off, and the layout does not fit: plan: ") and "DOES NOT FIT" in row[3]
