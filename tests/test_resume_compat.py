"""Resuming checks the model config against the checkpoint's, across moeforge versions."""

from pathlib import Path

import pytest

from moeforge.checkpoint import CheckpointError
from moeforge.train.compatibility import check_resume_compatible


def test_fields_added_after_a_checkpoint_take_their_defaults(small_cfg):
    saved = small_cfg.to_dict()
    del saved["model"]["qk_norm"]  # a checkpoint written before the field existed
    check_resume_compatible(saved, small_cfg, Path("ckpt"))


def test_a_different_model_is_refused_naming_the_field(small_cfg):
    saved = small_cfg.to_dict()
    saved["model"]["qk_norm"] = True
    with pytest.raises(CheckpointError, match="model.qk-norm was True, now False"):
        check_resume_compatible(saved, small_cfg, Path("ckpt"))
