"""The one error of Hugging Face interop, raised by every module of this package."""


class HFInteropError(ValueError):
    """A Hugging Face checkpoint moeforge cannot read or a model it cannot write: one line, naming why."""
