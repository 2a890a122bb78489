"""The wire: one fragment's outer gradients, quantised, gathered from every replica, summed in fp32.

A rank sends one uint8 message per fragment sync: its outer gradient (its own shard of the
fragment's parameters, flattened) in the run's codec (codecs.py), followed by its router biases as
raw fp32. An all-gather over the replica group brings every replica's message; each receiver
decodes them and sums in fp32 in replica order, so every replica computes the same bits and no
collective ever adds quantised values. The all-gather is started asynchronously: with overlap, the
next inner steps compute while it is in flight.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from moeforge.diloco.codecs import decode, encode, encoded_nbytes


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
    """this rank's |delta|^2 before quantisation"""
    error_square: float
    """this rank's |Q(delta) - delta|^2"""
    work: dist.Work | None = None
    gathered: list[torch.Tensor] | None = None
    mean_delta: torch.Tensor | None = None
    """the replicas' mean outer gradient (fp32), once received"""
    mean_biases: torch.Tensor | None = None
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
    codec: str,
    block: int,
    group: dist.ProcessGroup,
) -> Exchange:
    """Quantise `delta` (fp32, flat), append `biases` (fp32, flat) and start the all-gather."""
    payload = encode(delta, codec, block)
    error = decode(payload, delta.numel(), codec, block) - delta
    message = torch.cat([payload, biases.float().contiguous().view(torch.uint8)])
    replicas = dist.get_world_size(group)
    gathered = [torch.empty_like(message) for _ in range(replicas)]
    work = dist.all_gather(gathered, message, group=group, async_op=True)
    return Exchange(
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


def receive(exchange: Exchange, codec: str, block: int) -> None:
    """Wait for the all-gather (timing the wait) and set the replicas' means, summed in fp32."""
    if exchange.received:
        return
    started = time.perf_counter()
    exchange.work.wait()
    exchange.wait_s = time.perf_counter() - started
    payload_bytes = encoded_nbytes(exchange.n_values, codec, block)
    delta_sum = torch.zeros(exchange.n_values, dtype=torch.float32, device=exchange.gathered[0].device)
    bias_sum = torch.zeros(exchange.n_biases, dtype=torch.float32, device=delta_sum.device)
    for message in exchange.gathered:  # replica order: the same sum, bit for bit, on every replica
        delta_sum += decode(message[:payload_bytes], exchange.n_values, codec, block)
        bias_sum += message[payload_bytes:].clone().view(torch.float32)  # clone: 4-byte aligned
    replicas = len(exchange.gathered)
    exchange.mean_delta = delta_sum / replicas
    exchange.mean_biases = bias_sum / replicas
    exchange.work, exchange.gathered = None, None
