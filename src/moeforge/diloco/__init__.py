"""Streaming DiLoCo: replicas that exchange quantised outer gradients every H steps, fragment by
fragment, overlapped with the next inner steps (fragments.py: what and when; exchange.py: the wire;
outer.py: the outer optimizer and the merge; codecs.py: the number formats)."""

from moeforge.diloco.outer import OuterGradientNotFinite, StreamingDiLoCo

__all__ = ["OuterGradientNotFinite", "StreamingDiLoCo"]
