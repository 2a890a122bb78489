"""The checks every config section shares: one-line `ConfigError`s, typed choices, field docstrings."""

from __future__ import annotations

import ast
import inspect
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
