"""Inference: loading a trained model and generating text with a KV cache."""

from moeforge.infer.generate import GenerationResult, SamplingConfig, generate
from moeforge.checkpoint.model_loading import LoadedModel, load_model

__all__ = ["GenerationResult", "LoadedModel", "SamplingConfig", "generate", "load_model"]
