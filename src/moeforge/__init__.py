"""moeforge: train and serve dropless Mixture-of-Experts transformers with PyTorch."""

from moeforge.config import Config, ConfigError, DataConfig, ModelConfig, MoEConfig, ParallelConfig, TrainConfig
from moeforge.interop import from_hf, to_hf
from moeforge.model.moe import MoE
from moeforge.model.transformer import Transformer
from moeforge.parallel import parallelize

__all__ = [
    "Config",
    "ConfigError",
    "DataConfig",
    "ModelConfig",
    "MoE",
    "MoEConfig",
    "ParallelConfig",
    "TrainConfig",
    "Transformer",
    "from_hf",
    "parallelize",
    "to_hf",
]
__version__ = "0.1.0"
