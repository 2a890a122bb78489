"""Building a `Config`: presets, TOML files, dotted overrides, saved dicts; and the options `--help` lists."""

from __future__ import annotations

import dataclasses
import decimal
import tomllib
import typing
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

from moeforge.config.checks import ConfigError, _choice_fields, _flag, field_docs
from moeforge.config.data import mixture_text
from moeforge.config.training import Config

PRESETS_DIR = Path(__file__).parent.parent / "presets"
DEFAULT_PRESET = "tiny"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.toml"))


def load_config(
    preset: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, str] | None = None,
    world_size: int = 1,
    apply_init_from: Callable[[Config, str], None] | None = None,
) -> Config:
    """Defaults <- preset (default 'tiny' when no file is given) <- TOML file <- dotted overrides.

    With `train.init-from-hf` set (anywhere), `apply_init_from(cfg, directory)` puts that model (and
    its tokenizer) between the preset and the file: defaults <- preset <- HF model <- TOML file <-
    dotted overrides. The command line passes `moeforge.interop.apply_hf_model`.
    """
    if preset is None and config_file is None:
        preset = DEFAULT_PRESET
    cfg = _layered_config(preset, config_file, overrides or {})
    if cfg.train.init_from_hf:
        if apply_init_from is None:
            raise ConfigError(
                "train.init-from-hf: set, but nothing to read it with; load the config with "
                "apply_init_from=moeforge.interop.apply_hf_model (the command line does)"
            )
        layer = partial(apply_init_from, hf_dir=cfg.train.init_from_hf)
        cfg = _layered_config(preset, config_file, overrides or {}, model_layer=layer)
    return cfg.validate(world_size)


def _layered_config(
    preset: str | None,
    config_file: str | Path | None,
    overrides: dict[str, str],
    model_layer: Callable[[Config], None] | None = None,
) -> Config:
    cfg = Config()
    if preset is not None:
        path = PRESETS_DIR / f"{preset}.toml"
        if not path.is_file():
            raise ConfigError(
                f"--preset: unknown preset {preset!r}; allowed: {', '.join(available_presets())}"
            )
        apply_mapping(cfg, _read_toml(path))
    if model_layer is not None:
        model_layer(cfg)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config: file {str(path)!r} does not exist")
        apply_mapping(cfg, _read_toml(path))
    for dotted, text in overrides.items():
        set_dotted(cfg, dotted, text)
    return cfg


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config saved with `Config.to_dict` (e.g. from a checkpoint)."""
    cfg = Config()
    apply_mapping(cfg, data)
    return cfg


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"--config: {path} is not valid TOML: {err}") from None


def apply_mapping(obj: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Set fields of a (nested) config dataclass from a (nested) mapping, rejecting unknown keys."""
    fields = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in data.items():
        name = key.replace("-", "_")
        dotted = f"{prefix}{_flag(name)}"
        if name not in fields:
            allowed = ", ".join(_flag(n) for n in fields)
            raise ConfigError(f"{dotted}: unknown field; allowed: {allowed}")
        current = getattr(obj, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{dotted}: expected a table of fields, got {value!r}")
            apply_mapping(current, value, f"{dotted}.")
        else:
            if dotted == "data.path" and isinstance(value, dict):  # a mixture as a TOML table
                value = mixture_text(value)
            setattr(obj, name, _coerce(value, _field_type(type(obj), name), dotted))


def set_dotted(cfg: Config, dotted: str, text: str) -> None:
    """Apply one `section.field-name=value` override given as text."""
    parts = dotted.split(".")
    obj: Any = cfg
    for i, part in enumerate(parts):
        name = part.replace("-", "_")
        where = ".".join(parts[: i + 1])
        if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
            options = (
                [_flag(f.name) for f in dataclasses.fields(obj)] if dataclasses.is_dataclass(obj) else []
            )
            raise ConfigError(f"--{where}: unknown option; allowed here: {', '.join(options)}")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(getattr(obj, name)):
                raise ConfigError(f"--{where}: is a section; name one of its fields, e.g. --{where}.<field>")
            setattr(obj, name, _coerce(text, _field_type(type(obj), name), where))
        else:
            obj = getattr(obj, name)


def _field_type(cls: type, name: str) -> type:
    return typing.get_type_hints(cls)[name]


def _coerce(value: Any, typ: type, where: str) -> Any:
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            lowered = str(value).lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if typ is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            if isinstance(value, bool):
                raise ValueError
            return int(value) if not isinstance(value, str) else _integer_text(value)
        if typ is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)  # a str, or a Literal of strings: `_check_choices` checks the value
    except ValueError:
        raise ConfigError(f"{where}: {value!r} is not a valid {typ.__name__}") from None


def _integer_text(text: str) -> int:
    """An integer written in digits ('100_000' too) or in exact scientific notation ('1e9', '2.5e3'),
    as a TOML file may hold it; a ValueError for anything else, and for a magnitude past int64 before
    it is expanded ('1e999999999' is not turned into a billion digits; validation bounds the rest)."""
    text = text.replace("_", "")
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = decimal.Decimal(text.strip())
    except decimal.InvalidOperation:
        raise ValueError(text) from None
    if not number.is_finite() or number.adjusted() > 100 or number != number.to_integral_value():
        raise ValueError(text)
    return int(number)


class Option(NamedTuple):
    """One leaf field as `--help` shows it."""

    flag: str
    """dotted name, e.g. 'model.moe.n-experts'"""
    default: Any
    doc: str
    """the field's docstring"""
    choices: tuple[str, ...]
    """the allowed values of a `Literal` field; () for any other"""


def iter_options(obj: Any = None, prefix: str = "") -> typing.Iterator[Option]:
    """Every leaf field, for `--help`."""
    obj = Config() if obj is None else obj
    docs = field_docs(type(obj))
    choices = _choice_fields(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        dotted = f"{prefix}{_flag(f.name)}"
        if dataclasses.is_dataclass(value):
            yield from iter_options(value, f"{dotted}.")
        else:
            yield Option(dotted, value, docs.get(f.name, ""), choices.get(f.name, ()))
