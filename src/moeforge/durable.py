"""Writing files so that a crash leaves either the old state or the new one, never half of each.

A write is durable once the file's data is fsynced; a file created or renamed is durable once its
directory is fsynced too. Checkpoints (checkpoint/meta.py) and prepared datasets (data/) write their
small files and publish their renames through these two functions.
"""

from __future__ import annotations

import os
from pathlib import Path


def write_synced(file: Path, data: bytes) -> None:
    """Write `data` to `file` (replacing it) and fsync it before returning."""
    with file.open("wb") as stream:
        stream.write(data)
        stream.flush()
        os.fsync(stream.fileno())


def fsync_directory(directory: Path) -> None:
    """Make the entries of `directory` (files created or renamed in it) durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
