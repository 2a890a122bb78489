"""The one error of Hugging Face interop, raised by every module of this package."""

from moeforge.errors import MoeforgeError


class HFInteropError(MoeforgeError, ValueError):
    """A Hugging Face checkpoint moeforge cannot read or a model it cannot write: one line, naming why."""
