"""The checks every config section shares: one-line `ConfigError`s, typed choices, field docstrings."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import math
import typing
from functools import cache
from typing import Any, Literal

from moeforge.errors import MoeforgeError


class ConfigError(MoeforgeError, ValueError):
    """A user mistake in a config value: one line naming the field and what is allowed."""


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _check(ok: bool, where: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{where}: got {value!r}; allowed: {allowed}")


def _check_choices(obj: Any, prefix: str) -> None:
    """The one check of typed choices: each `Literal` field of the config dataclass `obj` holds one
    of the type's values."""
    for name, choices in _choice_fields(type(obj)).items():
        value = getattr(obj, name)
        _check(value in choices, f"{prefix}.{_flag(name)}", value, format_choices(choices))


@cache
def _choice_fields(cls: type) -> dict[str, tuple[str, ...]]:
    """{field name: allowed values} for the `Literal` fields of a config dataclass."""
    hints = typing.get_type_hints(cls)
    return {name: typing.get_args(typ) for name, typ in hints.items() if typing.get_origin(typ) is Literal}


INT64 = (-(2**63), 2**63 - 1)
"""the range every integer field keeps to: values reach torch (seeds, shapes, counts) as int64"""


def _check_values(obj: Any, prefix: str) -> None:
    """The one check of value types, run first by every section's `validate`: an `int` field holds an
    integer (not a bool) within int64, a `float` field a finite number (inf and nan mean nothing for
    any of them: a rate, a coefficient, an epsilon, a fraction, a timeout), a `bool` field a bool and
    a `str` field a string. Values set without parsing (a Hugging Face config.json, the Python API)
    meet the same check as flags and TOML files."""
    for name, typ in _field_types(type(obj)).items():
        value = getattr(obj, name)
        where = f"{prefix}.{_flag(name)}"
        if typ is int:
            is_int = isinstance(value, int) and not isinstance(value, bool)
            _check(is_int, where, value, "an integer")
            _check(INT64[0] <= value <= INT64[1], where, value, "an integer within int64 (|value| < 2**63)")
        elif typ is float:
            is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
            _check(is_number and math.isfinite(value), where, value, "a finite number")
        elif typ is bool:
            _check(isinstance(value, bool), where, value, "true | false")
        elif typ is str or typing.get_origin(typ) is Literal:
            _check(isinstance(value, str), where, value, "a string")


def _check_bounds(obj: Any, prefix: str, bounds: dict[str, tuple[int, int]]) -> None:
    """Each field named in `bounds` at most the high end of its inclusive (low, high), checked before
    the checks that combine fields (a divisor of a typo'd width is no help); the message gives the
    whole range, the low end is checked by the field's own check. The sections' tables say why each
    upper bound is where it is."""
    for name, (low, high) in bounds.items():
        value = getattr(obj, name)
        _check(value <= high, f"{prefix}.{_flag(name)}", value, f"an integer in [{low}, {high}]")


@cache
def _field_types(cls: type) -> dict[str, Any]:
    """{field name: type} of the leaf fields of a config dataclass (sections left out)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if not dataclasses.is_dataclass(hints[f.name])}


def format_choices(choices: tuple[str, ...]) -> str:
    """('a', 'b') -> "'a' | 'b'", as errors and `--help` list allowed values."""
    return " | ".join(repr(c) for c in choices)


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The string literal written under each field of a config dataclass: its help text."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for stmt, nxt in zip(body, body[1:]):
        if (
            isinstance(stmt, ast.AnnAssign)
            and isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
        ):
            docs[stmt.target.id] = " ".join(nxt.value.value.split())  # type: ignore[union-attr]
    return docs
