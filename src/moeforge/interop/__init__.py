"""Interchange with other ecosystems: Hugging Face safetensors checkpoints."""

from moeforge.interop.hf import HFInteropError, from_hf, hf_model_config, load_hf_weights, to_hf

__all__ = ["HFInteropError", "from_hf", "hf_model_config", "load_hf_weights", "to_hf"]
