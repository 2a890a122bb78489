"""Shared helpers: a small, fast configuration of the default model."""

import pytest

from moeforge.config import Config, load_config

SMALL = {
    "model.dim": "64",
    "model.n-layers": "3",
    "model.n-heads": "4",
    "model.n-kv-heads": "2",
    "model.ffn-dim": "128",
    "model.max-seq-len": "128",
    "model.moe.n-experts": "8",
    "model.moe.top-k": "2",
    "model.moe.expert-ffn-dim": "32",
    "model.moe.n-groups": "4",
    "model.moe.topk-groups": "2",
    "train.seq-len": "32",
    "train.global-batch-size": "4",
    "train.warmup-steps": "2",
    "train.log-every": "1",
    "train.eval-every": "0",
    "train.eval-batches": "1",
    "train.progress": "false",
    "train.report": "false",
}


def small_config(world_size: int = 1, **overrides: str) -> Config:
    """The tiny preset shrunk for tests; keyword overrides use underscores for dots and dashes:
    small_config(train__steps="4") sets train.steps."""
    values = dict(SMALL)
    values.update({key.replace("__", ".").replace("_", "-"): value for key, value in overrides.items()})
    return load_config(overrides=values, world_size=world_size)


@pytest.fixture
def small_cfg() -> Config:
    return small_config()
