"""The tests' name for the library's process launcher (kept so test files import it as `launch`)."""

from moeforge.parallel.spawn import free_port, run_on_processes

__all__ = ["free_port", "run_on_processes"]
