"""`moeforge convert`: Hugging Face checkpoint directories <-> moeforge run directories.

A converted model is a run directory like a training run's (config.json, tokenizer.json when the
model has one, and its tokenizer_config.json and chat_template.jinja, which carry the chat template
`moeforge serve` uses; checkpoints/step_000000/ with the weights only), so `moeforge generate --checkpoint`
and `moeforge convert --to-hf` read it like any other.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moeforge.config import Config
from moeforge.interop.hf import (
    DTYPE_NAMES,
    HFInteropError,
    from_hf,
    to_hf,
    weight_files,
)
from moeforge.interop.hf.safetensors_io import model_home, read_header
from moeforge import checkpoint as ckpt
from moeforge import run

SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
HF_DTYPE_KEY = "hf_dtype"


def hf_to_checkpoint(hf_dir: Path | str, out: Path | str, progress: bool = True) -> Path:
    """Import a Hugging Face model into a new run directory `out`; returns its checkpoint.

    The weights are kept in fp32 (what training and generation use); the precision the model was
    stored in is remembered in the checkpoint, and `checkpoint_to_hf` writes it back in it.
    """
    hf_dir, out = Path(hf_dir), Path(out)
    if ckpt.latest_checkpoint(out) is not None:
        raise HFInteropError(f"--out: {out} already holds checkpoints; choose a new directory")
    model = from_hf(hf_dir, progress)
    cfg = Config(model=model.cfg)
    out.mkdir(parents=True, exist_ok=True)
    (out / run.CONFIG_FILE).write_text(json.dumps(cfg.to_dict(), indent=1))
    run.copy_tokenizer_files(hf_dir, out, model_home(hf_dir))
    extra = {"hf_source": str(hf_dir.resolve()), HF_DTYPE_KEY: DTYPE_NAMES[stored_dtype(hf_dir)]}
    return ckpt.save_checkpoint(out, 0, model, None, cfg.to_dict(), extra, keep=1)


def checkpoint_to_hf(checkpoint: Path | str, out: Path | str, dtype: torch.dtype | None = None) -> Path:
    """Export a moeforge checkpoint (or a run directory's newest) as a Hugging Face directory `out`.

    `dtype` defaults to the precision the model was imported from, fp32 for a model trained here.
    """
    loaded = ckpt.load_model(checkpoint)
    if dtype is None:
        name = ckpt.read_meta(loaded.checkpoint).extra.get(HF_DTYPE_KEY, "float32")
        dtype = {v: k for k, v in DTYPE_NAMES.items()}[name]
    path = to_hf(loaded.model, out, dtype)
    run.copy_tokenizer_files(loaded.checkpoint.parent.parent, Path(out))
    return path


def stored_dtype(hf_dir: Path) -> torch.dtype:
    """The precision of a checkpoint's token embedding, taken as the precision of the checkpoint."""
    for file in weight_files(hf_dir):
        entry = read_header(file).get("model.embed_tokens.weight")
        if entry is not None:
            if entry["dtype"] not in SAFETENSORS_DTYPES:
                raise HFInteropError(f"{file.name}: weights stored as {entry['dtype']}; allowed: F32, BF16, F16")
            return SAFETENSORS_DTYPES[entry["dtype"]]
    raise HFInteropError(f"{hf_dir}: no tensor 'model.embed_tokens.weight' in any shard")
