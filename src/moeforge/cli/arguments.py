"""What every command does with its arguments: the dotted `--section.field VALUE` overrides, a
refusal of anything else left over, comma-separated lists and output directories, each mistake one
`ConfigError` line naming the flag."""

from __future__ import annotations

from pathlib import Path

from moeforge.config import ConfigError


def parse_overrides(rest: list[str]) -> dict[str, str]:
    """['--train.steps', '200', '--model.moe.top-k=4'] -> {'train.steps': '200', 'model.moe.top-k': '4'}."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(rest):
        token = rest[i]
        if not token.startswith("--") or "." not in token.split("=", 1)[0]:
            raise ConfigError(f"{token}: unrecognised argument; options look like --section.field-name VALUE")
        if "=" in token:
            key, value = token[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(rest):
                raise ConfigError(f"{token}: missing a value")
            key, value = token[2:], rest[i + 1]
            i += 2
        overrides[key] = value
    return overrides


def reject_extra(rest: list[str]) -> None:
    """For a command that takes no dotted overrides: the first argument left over is an error."""
    if rest:
        raise ConfigError(f"{rest[0]}: unrecognised argument")


def comma_separated(text: str) -> tuple[str, ...]:
    """'a,b,,c' -> ('a', 'b', 'c')."""
    return tuple(item for item in text.split(",") if item)


def output_dir(path: str, flag: str) -> Path:
    """`path` created if missing; a one-line error naming `flag` when it cannot be."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"{flag}: cannot create the directory {path!r}: {err.strerror or err}") from None
    return out
