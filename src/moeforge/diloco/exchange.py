"""The wire: one fragment's outer gradients, encoded, gathered from every replica, summed in fp32.

A rank sends one uint8 message per fragment sync: its outer gradient (its own shard of the
fragment's parameters, flattened; with error feedback, plus what earlier messages dropped) in the
run's wire format (wire.py: a codec, optionally after chunked top-k), followed by its router biases
as raw fp32 and one byte, its replica's stop request (1 after a SIGTERM/SIGINT, else 0): the replicas
agree to stop when an exchange lands, without a collective of their own. The collective is an all-gather over the replica group (the ranks holding the same
shard in the M replicas): each rank contributes its message of B bytes and receives the M - 1
others, (M - 1)*B bytes in and, over a ring or a direct exchange alike, (M - 1)*B bytes out; the
message size depends only on the shard's size, so no sizes are exchanged first. Each receiver
decodes every message to a dense vector and sums them in fp32 in replica order, so every replica
computes the same bits and no collective ever adds quantised or sparse values. The all-gather is
started asynchronously: with overlap, the next inner steps compute while it is in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeforge.diloco.wire import WireFormat

STOP_FLAG_BYTES = 1
"""the stop request closing every message"""


def message_nbytes(wire: WireFormat, n_values: int, n_biases: int) -> int:
    """Bytes of one rank's message: the outer gradient, the router biases (fp32), the stop flag."""
    return wire.nbytes(n_values) + 4 * n_biases + STOP_FLAG_BYTES


@dataclass
class Exchange:
    """One fragment's exchange, from the send to the merge."""

    fragment: int
    sent_step: int
    land_step: int
    n_values: int
    """outer-gradient values in this rank's message (its shard of the fragment)"""
    n_biases: int
    nbytes: int
    """bytes of this rank's message"""
    local_square: float
    """this rank's |x|^2, x the outer gradient it meant to send (error feedback's carry included)"""
    error_square: float
    """this rank's |Q(x) - x|^2, what its message left out"""
    work: dist.Work | None = None
    gathered: list[torch.Tensor] | None = None
    mean_delta: torch.Tensor | None = None
    """the replicas' mean outer gradient (fp32), once received"""
    mean_biases: torch.Tensor | None = None
    stop: bool = False
    """some replica asked to stop (set once received)"""
    wait_s: float = 0.0
    """time this rank waited for the all-gather to finish"""

    @property
    def received(self) -> bool:
        return self.mean_delta is not None


def start_exchange(
    fragment: int,
    sent_step: int,
    land_step: int,
    delta: torch.Tensor,
    biases: torch.Tensor,
    wire: WireFormat,
    group: dist.ProcessGroup,
    stop: bool = False,
) -> tuple[Exchange, torch.Tensor]:
    """Encode `delta` (fp32, flat), append `biases` (fp32, flat) and the stop flag, and start the
    all-gather; returns the exchange and Q(delta), what this rank's message decodes to (the
    receivers' view of it)."""
    payload = wire.encode(delta)
    transmitted = wire.decode(payload, delta.numel()) if wire.lossy else delta
    error = transmitted - delta
    flag = torch.tensor([int(stop)], dtype=torch.uint8, device=payload.device)
    message = torch.cat([payload, biases.float().contiguous().view(torch.uint8), flag])
    assert message.numel() == message_nbytes(wire, delta.numel(), biases.numel())
    replicas = dist.get_world_size(group)
    gathered = [torch.empty_like(message) for _ in range(replicas)]
    work = dist.all_gather(gathered, message, group=group, async_op=True)
    exchange = Exchange(
        fragment,
        sent_step,
        land_step,
        n_values=delta.numel(),
        n_biases=biases.numel(),
        nbytes=message.numel(),
        local_square=float(delta.double().square().sum()),
        error_square=float(error.double().square().sum()),
        work=work,
        gathered=gathered,
    )
    return exchange, transmitted


def receive(exchange: Exchange, wire: WireFormat) -> None:
    """Wait for the all-gather (timing the wait) and set the replicas' means, summed in fp32, and
    whether any replica asked to stop."""
    if exchange.received:
        return
    started = time.perf_counter()
    exchange.work.wait()
    exchange.wait_s = time.perf_counter() - started
    payload_bytes = wire.nbytes(exchange.n_values)
    delta_sum = torch.zeros(exchange.n_values, dtype=torch.float32, device=exchange.gathered[0].device)
    bias_sum = torch.zeros(exchange.n_biases, dtype=torch.float32, device=delta_sum.device)
    for message in exchange.gathered:  # replica order: the same sum, bit for bit, on every replica
        delta_sum += wire.decode(message[:payload_bytes], exchange.n_values)
        bias_sum += message[payload_bytes:-STOP_FLAG_BYTES].clone().view(torch.float32)  # clone: aligned
    exchange.stop = bool(torch.stack([message[-1] for message in exchange.gathered]).any())
    replicas = len(exchange.gathered)
    exchange.mean_delta = delta_sum / replicas
    exchange.mean_biases = bias_sum / replicas
    exchange.work, exchange.gathered = None, None
