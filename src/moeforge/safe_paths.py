"""Files named by other files, opened only where they belong and read only so far.

A checkpoint's meta.json and DCP `.metadata`, a Hugging Face index's weight_map and a run directory's
tokenizer.json all name further files. Such a name is data from whoever wrote the file that held it,
so before anything is opened it must name a regular file inside the directory it was read from
(after every symlink, the directory's own included, is resolved), and a read stops at a bound: the
recorded size, or a cap. Refused, in one line naming the file that held the name and the name: an
absolute path, a `..` that leaves the directory, a symlink pointing outside it, a directory, FIFO,
device or socket, and a file larger than its bound. Files under /proc (whose size reads 0 and whose
contents may never end) are reachable only by an absolute path or a symlink, so they are refused as
outside.

The open itself refuses a symlink put in place after the check and anything but a regular file
(O_NOFOLLOW | O_NONBLOCK, then fstat): a FIFO swapped in cannot block the reader.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO

from moeforge.errors import MoeforgeError

_KINDS = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFLNK: "a symlink",
}


class PathRefused(MoeforgeError, ValueError):
    """A name read from `source` that does not name a regular file inside its directory, or names one
    larger than allowed: one line, `source: entry 'NAME': reason`."""

    def __init__(self, source: Path | str, entry: object, reason: str) -> None:
        self.source, self.entry, self.reason = source, entry, reason
        super().__init__(f"{source}: entry {entry!r}: {reason}")


class FileMissing(PathRefused):
    """The name is acceptable but no file has it."""

    def __init__(self, source: Path | str, entry: object) -> None:
        super().__init__(source, entry, "missing")


def file_inside(
    directory: Path,
    entry: object,
    source: Path | str,
    home: Path | None = None,
    max_bytes: int | None = None,
) -> Path:
    """The regular file that `entry`, a name read from `source`, names inside `directory`, with its
    symlinks resolved; `PathRefused` (`FileMissing` when nothing has that name) otherwise.

    `home` (default `directory`) is the tree the resolved file must stay inside; `max_bytes` bounds
    its size."""
    if not isinstance(entry, str) or not entry or "\0" in entry:
        raise PathRefused(source, entry, "not a file name; refused")
    if Path(entry).is_absolute():
        raise PathRefused(source, entry, f"an absolute path; only files inside {directory} are read")
    boundary = _resolved(home or directory, source, entry)
    target = _resolved(directory / entry, source, entry)
    if not target.is_relative_to(boundary):
        raise PathRefused(source, entry, f"resolves to {target}, outside {boundary}; refused")
    try:
        mode = target.stat()
    except FileNotFoundError:
        raise FileMissing(source, entry) from None
    except OSError as err:
        raise PathRefused(source, entry, f"cannot be read ({err.strerror})") from None
    _check_regular(mode, source, entry, max_bytes)
    return target


def open_inside(directory: Path, entry: object, source: Path | str, home: Path | None = None) -> BinaryIO:
    """`file_inside`'s file, opened for reading; a symlink or non-regular file swapped in after the
    check is refused by the open itself."""
    path = file_inside(directory, entry, source, home)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileMissing(source, entry) from None
    except OSError as err:
        raise PathRefused(source, entry, f"cannot be opened ({err.strerror}); refused") from None
    stream = os.fdopen(fd, "rb")
    try:
        _check_regular(os.fstat(fd), source, entry, None)
    except PathRefused:
        stream.close()
        raise
    return stream


def read_inside(
    directory: Path, entry: object, source: Path | str, max_bytes: int, home: Path | None = None
) -> bytes:
    """The bytes of `file_inside`'s file, at most `max_bytes` of them (`PathRefused` if it holds more)."""
    with open_inside(directory, entry, source, home) as stream:
        data = stream.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise PathRefused(source, entry, f"more than the {max_bytes} bytes allowed; refused")
    return data


def _resolved(path: Path, source: Path | str, entry: object) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as err:  # RuntimeError: a symlink loop
        raise PathRefused(source, entry, f"cannot be resolved ({err}); refused") from None


def _check_regular(mode: os.stat_result, source: Path | str, entry: object, max_bytes: int | None) -> None:
    if not stat.S_ISREG(mode.st_mode):
        kind = _KINDS.get(stat.S_IFMT(mode.st_mode), "not a file")
        raise PathRefused(source, entry, f"not a regular file ({kind}); refused")
    if max_bytes is not None and mode.st_size > max_bytes:
        raise PathRefused(source, entry, f"{mode.st_size} bytes, more than the {max_bytes} allowed; refused")
