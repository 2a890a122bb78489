"""The bases of every error moeforge raises on purpose: a mistake or failure the user can act on.

Each kind is defined beside the code that raises it (`config.ConfigError`, `checkpoint.
CheckpointError`, ...). The command line reports a `MoeforgeError` as one line, without a traceback,
and exits with its `exit_code`; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from typing import TextIO


class MoeforgeError(Exception):
    """Wrong input: a flag, a config value, a file. One line; the command line exits with 2."""

    exit_code = 2


class RunFailure(MoeforgeError):
    """A run or checkpoint that failed on valid input (the loss diverged, a checkpoint cannot be used).
    One line; the command line exits with 1."""

    exit_code = 1


def first_line(err: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none: what a one-line
    error quotes of a failure from deep inside a library."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def print_line(text: str, stream: TextIO | None = None) -> None:
    """`text` and its newline on `stream` (stderr by default) in one write. Under torchrun (`python -u`)
    every rank writes to the same stream, and `print`'s separate write of the newline lets their lines
    interleave."""
    stream = sys.stderr if stream is None else stream
    stream.write(f"{text}\n")
    stream.flush()
