"""Error feedback (diloco/feedback.py) on every lossy wire format, against a float64 reference loop
of its recurrence: with it the transmitted values' long-run mean is the true one and a codec's shrink
<Q(x),x>/<x,x> - 1 cancels out over the rounds; without it the shrink stays."""

from __future__ import annotations

import pytest
import torch

from moeforge.diloco.feedback import ErrorFeedback
from moeforge.diloco.wire import WireFormat

N = 2048
WIRES = {
    "fp4-e3m0": WireFormat("fp4-e3m0", 128),
    "fp4-e2m1": WireFormat("fp4-e2m1", 128),
    "int2": WireFormat("int2", 128),
    "fp8": WireFormat("fp8", 128),
    "bf16": WireFormat("bf16", 128),
    "top-10% + int2": WireFormat("int2", 128, 0.1, 256),
    "top-10% + none": WireFormat("none", 128, 0.1, 256),
}
SHRINK_WITHOUT = {
    "fp4-e3m0": (-0.040, -0.025),
    "fp4-e2m1": (-0.02, -0.006),
    "int2": (-0.13, -0.10),
    "fp8": (-0.003, -0.0005),
    "bf16": (-1e-4, 1e-4),
    "top-10% + int2": (-0.65, -0.5),
    "top-10% + none": (-0.6, -0.4),
}
"""<Q(x),x>/<x,x> - 1 of one message of these 2048 Gaussian values in blocks of 128: -3.5 % for E3M0,
-1.7 % for E2M1, -11.6 % for int2 (on 2^20 values: -3.1 %, -0.83 % and -11.4 %, the issue's figures)"""


def gaussian(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def send_rounds(wire: WireFormat, deltas: list[torch.Tensor], feedback: ErrorFeedback | None) -> list[torch.Tensor]:
    """What the wire carried for each outer gradient (Q(x) decoded), with or without error feedback."""
    sent = []
    for delta in deltas:
        meant = feedback.compensate(["a", "b"], delta) if feedback else delta
        transmitted = wire.decode(wire.encode(meant), len(delta))
        if feedback:
            feedback.keep(["a", "b"], meant, transmitted)
        sent.append(transmitted)
    return sent


def two_parameters(decay: float = 1.0) -> ErrorFeedback:
    """Residuals of a (32, 32) and a (1024,) shard: 2048 values, flattened in that order."""
    return ErrorFeedback({"a": torch.zeros(32, 32), "b": torch.zeros(1024)}, decay)


def reference_residuals(deltas: list[torch.Tensor], sent: list[torch.Tensor], decay: float) -> torch.Tensor:
    """The recurrence in float64: e = decay*e + delta - Q, from the transmitted values."""
    residual = torch.zeros(N, dtype=torch.float64)
    for delta, transmitted in zip(deltas, sent):
        residual = decay * residual + delta.double() - transmitted.double()
    return residual


def accumulated_shrink(sent: list[torch.Tensor], deltas: list[torch.Tensor]) -> float:
    """<sum Q, sum delta>/<sum delta, sum delta> - 1 over the rounds, in float64."""
    total_sent = torch.stack(sent).double().sum(dim=0)
    total = torch.stack(deltas).double().sum(dim=0)
    return float((total_sent @ total) / (total @ total) - 1)


@pytest.mark.parametrize("name", WIRES)
def test_the_shrink_of_a_repeated_outer_gradient_cancels_out(name):
    """The same Gaussian outer gradient sent 200 times: without error feedback every message shrinks
    it alike; with it the shrink of the sum is -<e_T, x>/(T |x|^2), gone as 1/T."""
    wire, rounds = WIRES[name], 200
    deltas = [gaussian(N, 0)] * rounds
    low, high = SHRINK_WITHOUT[name]
    without = accumulated_shrink(send_rounds(wire, deltas[:2], None), deltas[:2])  # every round alike
    assert low < without < high
    feedback = two_parameters()
    sent = send_rounds(wire, deltas, feedback)
    shrink = accumulated_shrink(sent, deltas)
    residual = reference_residuals(deltas, sent, 1.0)
    total = deltas[0].double() * rounds
    assert shrink == pytest.approx(float(-(residual @ total) / (total @ total)), rel=1e-3, abs=1e-9)
    assert abs(shrink) < abs(without) / 20 + 1e-6
    early = accumulated_shrink(sent[:50], deltas[:50])  # 1/T: four times the rounds, a quarter
    assert abs(shrink) < abs(early) / 2 or abs(shrink) < 1e-6


@pytest.mark.parametrize("name", WIRES)
@pytest.mark.parametrize("decay", [1.0, 0.95])
def test_residuals_follow_a_float64_reference_loop(name, decay):
    """Outer gradients with a common direction and fresh noise each round: the residuals kept equal the
    float64 recurrence e = decay*e + delta - Q run on the same transmitted values, split back into
    the parameters' shapes."""
    wire, rounds = WIRES[name], 30
    mean = gaussian(N, 1)
    deltas = [mean + 2 * gaussian(N, 10 + t) for t in range(rounds)]
    feedback = two_parameters(decay)
    sent = send_rounds(wire, deltas, feedback)
    kept = torch.cat([feedback.residual["a"].flatten(), feedback.residual["b"]]).double()
    expected = reference_residuals(deltas, sent, decay)
    scale = expected.abs().max().item() + 1.0
    torch.testing.assert_close(kept, expected, rtol=0, atol=1e-5 * scale)
    assert feedback.residual["a"].shape == (32, 32)


@pytest.mark.parametrize("name", ["fp4-e3m0", "fp4-e2m1", "int2", "top-10% + int2"])
def test_the_long_run_mean_of_what_was_sent_is_the_true_mean(name):
    """mean_t Q_t - mean_t delta_t = -e_T / T exactly (float64); without error feedback the codec's
    bias stays in the mean."""
    wire, rounds = WIRES[name], 200
    mean = gaussian(N, 2)
    deltas = [mean + gaussian(N, 100 + t) for t in range(rounds)]
    true_mean = torch.stack(deltas).double().mean(dim=0)
    sent = send_rounds(wire, deltas, two_parameters())
    gap = torch.stack(sent).double().mean(dim=0) - true_mean
    residual = reference_residuals(deltas, sent, 1.0)
    torch.testing.assert_close(gap, -residual / rounds, rtol=0, atol=1e-6)
    without = torch.stack(send_rounds(wire, deltas, None)).double().mean(dim=0) - true_mean
    assert gap.norm() < 0.1 * without.norm()
    assert gap.norm() / true_mean.norm() < 0.03


def test_a_lossless_wire_keeps_nothing():
    assert not WireFormat("none", 128).lossy
    assert WireFormat("none", 128, 0.5, 16).lossy and WireFormat("bf16", 128).lossy
