"""What a resumed run may change: its training knobs, never its model."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from moeforge import checkpoint as ckpt
from moeforge.config import Config, config_from_dict


def check_resume_compatible(saved: dict[str, Any], current: Config, path: Path) -> None:
    """A run may change its training knobs on resume, never its model nor its optimizer (whose state
    it loads: AdamW's moments are no Muon momentum). Fields a saved config lacks (added to moeforge
    after it was written) take their defaults, which keep the old behaviour."""
    saved_cfg = config_from_dict(saved)
    if saved_cfg.train.optimizer != current.train.optimizer:
        raise ckpt.CheckpointError(
            f"checkpoint {str(path)!r} was trained with another optimizer: train.optimizer was "
            f"{saved_cfg.train.optimizer!r}, now {current.train.optimizer!r} (use a new --out)"
        )
    now = _dotted(dataclasses.asdict(current.model), "model.")
    was = _dotted(dataclasses.asdict(saved_cfg.model), "model.")
    differing = sorted(k for k in now if now[k] != was.get(k))
    if differing:
        key = differing[0]
        raise ckpt.CheckpointError(
            f"checkpoint {str(path)!r} is from another model: {key} was {was.get(key)!r}, now {now[key]!r} "
            "(use a new --out)"
        )


def _dotted(tree: dict[str, Any], prefix: str) -> dict[str, Any]:
    """{'moe': {'n_experts': 8}} -> {'model.moe.n-experts': 8}"""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = prefix + key.replace("_", "-")
        if isinstance(value, dict):
            flat.update(_dotted(value, name + "."))
        else:
            flat[name] = value
    return flat
