"""A training step reaches the host once: one conversion of a tensor to Python for the loss check and
the metrics, whatever the number of MoE layers or micro-batches (no float() per layer)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from conftest import small_config
from moeforge.train.trainer import Trainer

SOURCE = str(Path(__import__("moeforge").__file__).parent)
CONVERSIONS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__")


@pytest.fixture
def conversions(monkeypatch):
    """Every tensor-to-Python conversion called from moeforge's own code, by the caller's file:line."""
    calls: list[str] = []
    for name in CONVERSIONS:
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            caller = sys._getframe(1).f_code
            if caller.co_filename.startswith(SOURCE):
                calls.append(f"{caller.co_filename}:{sys._getframe(1).f_lineno}")
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    return calls


@pytest.mark.parametrize("micro_batch", ["4", "1"], ids=["one-micro-batch", "four-micro-batches"])
def test_one_step_converts_one_tensor(tmp_path, conversions, micro_batch):
    cfg = small_config(
        train__steps="2",
        train__micro_batch_size=micro_batch,
        model__mtp_depth="1",
        model__moe__aux_coef="0.01",
        model__moe__z_loss_coef="0.001",
    )
    trainer = Trainer(cfg, tmp_path)
    assert sum(1 for _ in trainer.model.moe_layers()) >= 3  # several MoE layers (the MTP block's too)
    trainer.train_step()  # warm-up: lazy initialisation may look at values once
    conversions.clear()
    metrics = trainer.train_step()
    assert len(conversions) == 1, conversions
    assert len(metrics["load"]) >= 3 and metrics["aux"].keys() == {"seq_aux", "batch_aux", "z_loss"}


@pytest.mark.parametrize("mode", ["experts", "block"])
def test_a_checkpointed_step_converts_one_tensor(tmp_path, conversions, mode):
    """The recomputation in the backward reaches the host no more than the forward did."""
    cfg = small_config(train__steps="2", train__activation_checkpoint=mode, model__mtp_depth="1")
    trainer = Trainer(cfg, tmp_path)
    trainer.train_step()
    conversions.clear()
    trainer.train_step()
    assert len(conversions) == 1, conversions
