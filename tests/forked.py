"""A function run in a process of its own, forked from the fork server that imported torch and moeforge
once (`moeforge.parallel.spawn.start_method`), for the tests that need a fresh process (a command's exit
code and output, a global process group) but not a fresh interpreter, which spends seconds of CPU
importing torch and moeforge again each time."""

from __future__ import annotations

import multiprocessing
import os
import sys
from collections.abc import Callable
from pathlib import Path

from moeforge.parallel.spawn import start_method


def call_in_fork(
    fn: Callable, *args, timeout: float = 300, stdout: Path | None = None, stderr: Path | None = None
) -> int:
    """The exit code of `fn(*args)` (a module-level function) in a forked process that sees this
    process's environment, working directory and import path, its standard output and error written
    to the existing files `stdout` and `stderr` (where given). An exception in `fn` prints its traceback
    there and exits 1, `sys.exit(n)` exits n, as in a `python` process."""
    context = multiprocessing.get_context(start_method())
    state = (dict(os.environ), os.getcwd(), list(sys.path), stdout, stderr)
    process = context.Process(target=_run, args=(state, fn, args))
    process.start()
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join()
        raise AssertionError(f"{fn.__name__}{args} still running after {timeout} s")
    return process.exitcode


def _run(state: tuple, fn: Callable, args: tuple) -> None:
    environ, cwd, path, stdout, stderr = state
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    sys.path[:] = path
    for file, fd in ((stdout, 1), (stderr, 2)):
        if file is not None:
            opened = os.open(file, os.O_WRONLY)
            os.dup2(opened, fd)
            os.close(opened)
    fn(*args)
