"""Every knob of moeforge, defined, documented and validated once.

A config is a tree of dataclasses. Each field's help text is the string literal right after it
(read from the source by `field_docs`), so the docstring *is* the `--help` text. Values come,
in increasing priority, from the dataclass defaults, a preset (`presets/NAME.toml`), a user's TOML
file and dotted command-line overrides spelled `--section.field-name VALUE`
(e.g. `--model.moe.n-experts 16`, `--train.steps 200`).

A field whose value is one of a fixed set of strings is typed `Literal[...]`: the type alone gives
its parsing, its allowed values in `--help` and its validation (`_check_choices`).

Mistakes are reported as one-line `ConfigError`s naming the field and what it accepts.
"""

from moeforge.config.checks import ConfigError, field_docs, format_choices
from moeforge.config.loading import (
    DEFAULT_PRESET,
    PRESETS_DIR,
    Option,
    apply_mapping,
    available_presets,
    config_from_dict,
    iter_options,
    load_config,
    set_dotted,
)
from moeforge.config.diloco import DiLoCoConfig
from moeforge.config.model import ModelConfig, MoEConfig
from moeforge.config.data import DataConfig
from moeforge.config.parallel import ParallelConfig
from moeforge.config.run_config import Config
from moeforge.config.train import TrainConfig

__all__ = [
    "DEFAULT_PRESET",
    "PRESETS_DIR",
    "Config",
    "ConfigError",
    "DataConfig",
    "DiLoCoConfig",
    "ModelConfig",
    "MoEConfig",
    "Option",
    "ParallelConfig",
    "TrainConfig",
    "apply_mapping",
    "available_presets",
    "config_from_dict",
    "field_docs",
    "format_choices",
    "iter_options",
    "load_config",
    "set_dotted",
]
