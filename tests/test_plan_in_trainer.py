"""The trainer asks the planner before it builds anything: one line of estimate, and a refusal of a
layout that cannot fit the device unless train.force."""

from __future__ import annotations

import pytest

from conftest import small_config
from moeforge.config import ConfigError
from moeforge.plan import RunEstimate, estimate_run
from moeforge.train import trainer as trainer_module
from moeforge.train.trainer import Trainer


def test_the_trainer_prints_the_planners_estimate(tmp_path, capsys):
    cfg = small_config(train__progress="true")
    Trainer(cfg, tmp_path)
    expected = estimate_run(small_config(), 1, "cpu").one_line()
    assert expected.startswith("plan: ") and "per device" in expected
    assert expected in capsys.readouterr().out


def test_a_layout_that_does_not_fit_is_refused_unless_forced(tmp_path, monkeypatch):
    too_big = RunEstimate(
        memory_per_device_bytes=100e9, device_memory_bytes=80e9, tokens_per_s=None, cluster=None
    )
    monkeypatch.setattr(trainer_module, "estimate_run", lambda cfg, world, device: too_big)
    with pytest.raises(ConfigError) as refused:
        Trainer(small_config(), tmp_path)
    message = str(refused.value)
    assert message.startswith(
        "train.force: off, and the layout does not fit: plan: 100.0 GB per device of 80.0 GB"
    )
    assert "\n" not in message and "moeforge plan --search" in message
    assert Trainer(small_config(train__force="true"), tmp_path).step == 0
