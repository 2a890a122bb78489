"""Hugging Face safetensors checkpoints <-> moeforge models: Qwen3-MoE, Mixtral and DeepSeek-V3.

    errors.py          HFInteropError: one line, naming why
    architecture.py    what an architecture module declares; the config.json fields all share
    qwen3_moe.py, mixtral.py, deepseek_v3.py
                       one per architecture: its config.json mapping and its tensor names
    registry.py        the architectures by model_type; config.json -> ModelConfig (`hf_model_config`)
    layout.py          where each Hugging Face tensor lives in a moeforge model
    safetensors_io.py  shard files and index, tensor names, block reads, sharded writes
    weights.py         `from_hf`, `load_hf_weights`, `to_hf`
    training.py        a run that starts from a Hugging Face model: its config layer, its weights

An expert-parallel (or FSDP) run loads after `parallelize`: each process reads only the slices of the
tensors that land in its own shards (parallel/sharded_load.py), so a rank never reads the experts of
another (`load_hf_weights`).
"""

from moeforge.interop.hf.errors import HFInteropError
from moeforge.interop.hf.registry import hf_model_config
from moeforge.interop.hf.safetensors_io import DTYPE_NAMES, weight_files
from moeforge.interop.hf.training import apply_hf_model, hf_weights_loader
from moeforge.interop.hf.weights import from_hf, load_hf_weights, to_hf

__all__ = [
    "DTYPE_NAMES",
    "HFInteropError",
    "apply_hf_model",
    "from_hf",
    "hf_model_config",
    "hf_weights_loader",
    "load_hf_weights",
    "to_hf",
    "weight_files",
]
