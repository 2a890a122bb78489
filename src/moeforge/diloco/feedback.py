"""Error feedback: what the wire dropped from a fragment's outer gradient is sent with its next one.

Each rank keeps, for its shard of every parameter, the residual e (fp32, zero at the start). When a
fragment syncs, with delta its outer gradient and Q(x) what a message for x decodes to (wire.py):

    x = beta*e + delta        what this replica means to send
    e = x - Q(x)              what the message left out, carried to the fragment's next sync

With beta = 1 (error feedback under the Nesterov outer) nothing is lost for good: after T syncs
sum_t Q(x_t) = sum_t delta_t - e_T exactly, so the transmitted values' running mean is the true one
up to e_T/T, and a codec's systematic shrink (round-to-nearest E3M0 keeps <Q(x),x>/<x,x> - 1 = -3.1 %
of Gaussian values) cancels out instead of compounding. beta < 1 is SparseLoCo's accumulator, which
takes the place of the outer momentum (outer.py).

The residual differs between replicas (each quantises its own outer gradient): a checkpoint keeps it
under the replica's own name. Without error feedback, or on a lossless wire, no residual is kept.
"""

from __future__ import annotations

import torch


class ErrorFeedback:
    """The residuals of one rank, by parameter name, each shaped as the rank's shard."""

    def __init__(self, shards: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.residual = {name: torch.zeros_like(shard) for name, shard in shards.items()}

    def compensate(self, names: list[str], delta: torch.Tensor) -> torch.Tensor:
        """x = beta*e + delta for the parameters `names`, flattened in that order like `delta`."""
        carried = torch.cat([self.residual[name].reshape(-1) for name in names]) if names else delta[:0]
        return delta.add(carried.to(delta.device), alpha=self.decay)

    def keep(self, names: list[str], meant: torch.Tensor, transmitted: torch.Tensor) -> None:
        """e = x - Q(x), split back into the parameters `names`."""
        left = meant - transmitted
        offset = 0
        for name in names:
            residual = self.residual[name]
            residual.copy_(left[offset : offset + residual.numel()].view_as(residual))
            offset += residual.numel()
