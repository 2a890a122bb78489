"""Rebuild a trained model, its config and its tokenizer from a checkpoint."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moeforge.config import Config, config_from_dict
from moeforge.data.tokenizer import Tokenizer
from moeforge.model.transformer import Transformer
from moeforge.checkpoint.discovery import resolve_checkpoint
from moeforge.checkpoint.meta import read_meta
from moeforge.checkpoint.store import load_checkpoint
from moeforge.run import tokenizer_for_run


@dataclass
class LoadedModel:
    model: Transformer
    config: Config
    tokenizer: Tokenizer
    checkpoint: Path
    step: int


def load_config_and_tokenizer(checkpoint: Path) -> tuple[Config, Tokenizer]:
    """A resolved checkpoint's config and its run's tokenizer, without reading the weights (a server
    whose engine loads the model in another process)."""
    cfg = config_from_dict(read_meta(checkpoint).config)
    return cfg, tokenizer_for_run(checkpoint.parent.parent, cfg)


def load_model(path: Path | str, device: str | torch.device = "cpu") -> LoadedModel:
    """`path` is a run directory (its newest checkpoint is used) or one checkpoint directory."""
    checkpoint = resolve_checkpoint(path)
    meta = read_meta(checkpoint)
    cfg = config_from_dict(meta.config)
    model = Transformer(cfg.model).to(device)
    load_checkpoint(checkpoint, model)
    run_dir = checkpoint.parent.parent
    return LoadedModel(model.eval(), cfg, tokenizer_for_run(run_dir, cfg), checkpoint, meta.step)
