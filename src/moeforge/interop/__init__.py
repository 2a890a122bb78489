"""Interchange with other ecosystems: Hugging Face safetensors checkpoints."""

from moeforge.interop.hf import (
    HFInteropError,
    apply_hf_model,
    from_hf,
    hf_model_config,
    hf_weights_loader,
    load_hf_weights,
    to_hf,
)

__all__ = [
    "HFInteropError",
    "apply_hf_model",
    "from_hf",
    "hf_model_config",
    "hf_weights_loader",
    "load_hf_weights",
    "to_hf",
]
