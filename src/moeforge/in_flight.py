"""Work that may still be in flight: a result to wait on, and the times of the exchange behind it.

The MoE layer (model/) and the expert-parallel dispatcher (parallel/) share these two types: the
layer's `start_dispatch` / `start_combine` return a `Pending` whatever the dispatcher, and a
schedule that overlaps compute with exchanges reads each one's `AllToAllTimes` from it. They know
nothing of tensors or process groups, so they sit below both layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class AllToAllTimes:
    """perf_counter seconds of one exchange: issued, and the wait on it (forward, then backward)."""

    issued: float = 0.0
    wait_began: float = 0.0
    wait_ended: float = 0.0
    grad_issued: float | None = None
    """the reverse exchange of the gradient (None until backward reaches it)"""
    grad_wait_began: float | None = None
    grad_wait_ended: float | None = None

    @property
    def exposed(self) -> float:
        """Seconds the calling thread blocked on this exchange, forward plus backward."""
        forward = self.wait_ended - self.wait_began
        if self.grad_wait_ended is None or self.grad_wait_began is None:
            return forward
        return forward + self.grad_wait_ended - self.grad_wait_began


class Pending(Generic[T]):
    """A result whose exchange may still be in flight: `wait()` finishes it and returns it (call it
    once). `exchanges` are the times of the exchanges it waits on (empty when nothing was in
    flight)."""

    def __init__(self, finish: Callable[[], T], exchanges: tuple[AllToAllTimes, ...] = ()):
        self._finish = finish
        self.exchanges = exchanges

    @classmethod
    def ready(cls, value: T) -> Pending[T]:
        return cls(lambda: value)

    def wait(self) -> T:
        return self._finish()
