"""Inference: loading a trained model, generating text with a KV cache, scoring it on prepared data."""

from moeforge.infer.evaluate import EvalResult, evaluate
from moeforge.infer.generate import GenerationResult, SamplingConfig, generate
from moeforge.checkpoint.model_loading import LoadedModel, load_model

__all__ = ["EvalResult", "GenerationResult", "LoadedModel", "SamplingConfig", "evaluate", "generate", "load_model"]
