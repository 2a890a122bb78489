"""Streaming DiLoCo: replicas that exchange quantised outer gradients every H steps, fragment by
fragment, overlapped with the next inner steps (fragments.py: what and when; exchange.py: the
all-gather; wire.py: a message, from sparse.py's chunked top-k and codecs.py's number formats;
feedback.py: error feedback; outer.py: the outer optimizers and the merge; checkpointing.py: what
a checkpoint holds of it)."""

from moeforge.diloco.outer import OuterGradientNotFinite, StreamingDiLoCo

__all__ = ["OuterGradientNotFinite", "StreamingDiLoCo"]
