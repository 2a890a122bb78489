"""Process-level settings that make CPU training faster, applied once by the command line."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_KEEP_BYTES = 1 << 30


def keep_freed_memory() -> bool:
    """Stop glibc from returning large freed blocks to the OS after every step.

    By default glibc serves blocks above a few MB with a fresh mmap and unmaps them on free, so each
    activation / gradient buffer of a training step pays page faults again, which costs several
    times refilling a buffer already mapped (docs/benchmarks/source-figures.md). Raising the mmap and trim thresholds keeps them in
    the heap — what jemalloc/tcmalloc do, which PyTorch recommends for CPU training. Returns whether
    it was applied (only on glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
