"""A training run that starts from a Hugging Face model (`train.init-from-hf`): the model config and
tokenizer it layers under the user's settings, and the loader of its weights. The config and the
trainer take these as arguments, so that neither depends on interop."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from moeforge.config import Config, ConfigError
from moeforge.interop.hf.registry import CONFIG_FILE, hf_model_config
from moeforge.interop.hf.safetensors_io import model_home
from moeforge.interop.hf.weights import load_hf_weights
from moeforge.model.transformer import Transformer
from moeforge.parallel.mesh import ParallelMesh
from moeforge.run import tokenizer_file


def apply_hf_model(cfg: Config, hf_dir: str) -> None:
    """The model of a Hugging Face directory, and its tokenizer.json when it has one, into `cfg`
    (`load_config(..., apply_init_from=apply_hf_model)`)."""
    path = Path(hf_dir)
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"train.init-from-hf: got {hf_dir!r}; allowed: a directory with a {CONFIG_FILE}")
    cfg.model = hf_model_config(path)
    tokenizer = tokenizer_file(path, model_home(path))
    if tokenizer is not None:
        cfg.data.tokenizer = str(tokenizer)


def hf_weights_loader(cfg: Config) -> Callable[[Transformer, ParallelMesh | None], None]:
    """`Trainer(cfg, out, init_weights=...)`: reads the run's `train.init-from-hf` weights into the
    model after `parallelize`, each rank only its own shards."""
    return functools.partial(_load, cfg.train.init_from_hf, cfg.train.progress)


def _load(hf_dir: str, progress: bool, model: Transformer, mesh: ParallelMesh | None) -> None:
    on_main_rank = not dist.is_initialized() or dist.get_rank() == 0  # one progress bar, as for training
    load_hf_weights(model, hf_dir, progress and on_main_rank, mesh)
