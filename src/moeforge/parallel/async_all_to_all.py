"""An all-to-all that stays in flight between two autograd nodes, forward and backward.

`start_all_to_all(x, ...)` issues the exchange (`dist.all_to_all_single(..., async_op=True)`) and
returns at once; `.wait()` blocks until the rows have arrived and returns them, differentiable.
Whatever runs between the two calls overlaps the exchange. The backward mirrors it: the node made
by `wait()` issues the reverse exchange of the incoming gradient, and the node made at the start
waits for it. The autograd engine runs ready nodes latest-created first, so the compute recorded
between the two forward calls runs between the two backward ones too: the gradient's exchange is
hidden under the same compute.

Both ends record `perf_counter` times (`AllToAllTimes`), so that a schedule can show what its
exchanges overlapped, and how long the calling thread waited on them (the exposed time).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from moeforge.in_flight import AllToAllTimes


@dataclass
class _Link:
    """What the start node and the wait node of one exchange share."""

    group: dist.ProcessGroup
    grad_group: dist.ProcessGroup
    recv_splits: list[int]
    send_splits: list[int]
    times: AllToAllTimes = field(default_factory=AllToAllTimes)
    work: dist.Work | None = None
    in_flight: tuple[torch.Tensor, ...] = ()
    """the send and receive buffers of the exchange in flight (kept alive until it is waited on)"""

    def issue(
        self, received: torch.Tensor, sent: torch.Tensor, recv: list[int], send: list[int], group: dist.ProcessGroup
    ) -> None:
        self.in_flight = (received, sent)
        self.work = dist.all_to_all_single(received, sent, recv, send, group=group, async_op=True)

    def wait(self) -> torch.Tensor:
        """Block until the exchange in flight is done; its received rows."""
        assert self.work is not None, "wait() on an exchange that was never issued"
        self.work.wait()
        received = self.in_flight[0]
        self.work, self.in_flight = None, ()
        return received


class AllToAllInFlight:
    """One exchange issued by `start_all_to_all`; `wait()` returns the received rows [sum(recv), ...]."""

    def __init__(self, received: torch.Tensor, link: _Link):
        self._received = received
        self._link = link

    @property
    def times(self) -> AllToAllTimes:
        return self._link.times

    def wait(self) -> torch.Tensor:
        return _WaitAllToAll.apply(self._received, self._link)


def start_all_to_all(
    x: torch.Tensor,
    recv_splits: list[int],
    send_splits: list[int],
    group: dist.ProcessGroup,
    grad_group: dist.ProcessGroup | None = None,
) -> AllToAllInFlight:
    """Issue the exchange of the rows of x [sum(send_splits), ...]: send_splits[r] rows to rank r,
    recv_splits[r] rows from it (the arguments of `all_to_all_single_autograd`, in its order). The
    gradient's reverse exchange runs on `grad_group` (default: `group`), a second group over the
    same ranks when a forward and a backward run at once, each keeping its own collective order."""
    link = _Link(group, grad_group or group, recv_splits, send_splits)
    return AllToAllInFlight(_StartAllToAll.apply(x, link), link)


class _StartAllToAll(torch.autograd.Function):
    """Forward: issue the exchange, return the (still filling) receive buffer. Backward: wait for
    the gradient's reverse exchange issued by `_WaitAllToAll.backward`, return what it brought."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor, link: _Link) -> torch.Tensor:
        ctx.link = link
        received = x.new_empty(sum(link.recv_splits), *x.shape[1:])
        link.times.issued = time.perf_counter()
        link.issue(received, x.contiguous(), link.recv_splits, link.send_splits, link.group)
        return received

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, _passed_through: torch.Tensor) -> tuple:
        link, times = ctx.link, ctx.link.times
        times.grad_wait_began = time.perf_counter()
        grad = link.wait()
        times.grad_wait_ended = time.perf_counter()
        return grad, None


class _WaitAllToAll(torch.autograd.Function):
    """Forward: wait for the exchange, return its rows. Backward: issue the reverse exchange of the
    gradient and pass the gradient on unchanged to `_StartAllToAll.backward`, which waits for it
    (a shape the engine accepts there: the receive buffer's)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, received: torch.Tensor, link: _Link) -> torch.Tensor:
        ctx.link = link
        link.times.wait_began = time.perf_counter()
        link.wait()
        link.times.wait_ended = time.perf_counter()
        return received.view_as(received)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> tuple:
        link = ctx.link
        grad = grad.contiguous()
        grad_sent = grad.new_empty(sum(link.send_splits), *grad.shape[1:])
        link.times.grad_issued = time.perf_counter()
        link.issue(grad_sent, grad, link.send_splits, link.recv_splits, link.grad_group)
        return grad, None
