"""Balance losses, bias update and load statistics vs hand computations."""

import math

import pytest
import torch

from moeforge.config import MoEConfig
from moeforge.model.moe import MoE
from moeforge.model.moe.balance import (
    batch_aux_loss,
    load_stats,
    router_z_loss,
    sequence_aux_loss,
    update_expert_bias,
    update_expert_biases,
)


def test_sequence_aux_loss_hand_example():
    # 2 sequences of 2 tokens, 3 experts, top-1.
    scores = torch.tensor(
        [
            [0.5, 0.3, 0.2],  # seq 0: already sums to 1
            [0.2, 0.2, 0.6],
            [0.8, 0.4, 0.8],  # seq 1: sums to 2, normalised to [0.4, 0.2, 0.4]
            [1.0, 0.5, 0.5],  # -> [0.5, 0.25, 0.25]
        ]
    )
    experts = torch.tensor([[0], [2], [2], [0]])
    # both sequences: f = 3/(1*2) * [1, 0, 1] = [1.5, 0, 1.5]
    # seq 0: P = [0.35, 0.25, 0.40] -> 1.5*0.35 + 1.5*0.40 = 1.125
    # seq 1: P = [0.45, 0.225, 0.325] -> 1.5*0.45 + 1.5*0.325 = 1.1625
    expected = 0.1 * (1.125 + 1.1625) / 2
    loss = sequence_aux_loss(scores, experts, batch=2, seq=2, alpha=0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_sequence_aux_loss_matches_loops_top2():
    torch.manual_seed(0)
    batch, seq, n_experts, top_k = 3, 5, 4, 2
    scores = torch.rand(batch * seq, n_experts)
    experts = scores.topk(top_k, dim=-1).indices
    expected = 0.0
    for b in range(batch):
        rows = range(b * seq, (b + 1) * seq)
        for i in range(n_experts):
            f = n_experts / (top_k * seq) * sum(int(i in experts[t].tolist()) for t in rows)
            p = sum(float(scores[t, i] / scores[t].sum()) for t in rows) / seq
            expected += f * p
    expected = 0.01 * expected / batch
    assert sequence_aux_loss(scores, experts, batch, seq, 0.01).item() == pytest.approx(expected, rel=1e-6)


def test_sequence_aux_loss_gradient_flows_through_scores_only():
    scores = torch.rand(4, 3, requires_grad=True)
    sequence_aux_loss(scores, torch.tensor([[0], [1], [2], [0]]), 1, 4, 1.0).backward()
    assert scores.grad is not None and scores.grad.abs().sum() > 0


def test_batch_aux_loss_hand_example():
    # probs: softmax([ln 3, 0]) = [0.75, 0.25]; softmax([0, 0]) = [0.5, 0.5]  ->  P = [0.625, 0.375]
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, 0.0]])
    # both tokens chose expert 0 (k=1): f = [1, 0]  ->  alpha * 2 * 0.625
    assert batch_aux_loss(logits, torch.tensor([[0], [0]]), 0.01).item() == pytest.approx(0.0125)
    # balanced assignments score exactly alpha
    assert batch_aux_loss(logits, torch.tensor([[0], [1]]), 0.01).item() == pytest.approx(0.01)


def test_batch_aux_loss_top2_divides_by_all_assignments():
    logits = torch.zeros(2, 4)  # P = 1/4 each
    experts = torch.tensor([[0, 1], [0, 2]])  # f = [2, 1, 1, 0] / 4
    # alpha * 4 * sum(f * 1/4) = alpha
    assert batch_aux_loss(logits, experts, 0.5).item() == pytest.approx(0.5)


def test_router_z_loss_hand_example():
    # logsumexp([0, 0]) = ln 2, logsumexp([ln 3, 0]) = ln 4
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    expected = 1e-3 * (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert router_z_loss(logits, 1e-3).item() == pytest.approx(expected, rel=1e-6)


def test_update_expert_bias_follows_sign_rule():
    bias = torch.tensor([0.5, 0.0, -0.25])
    update_expert_bias(bias, torch.tensor([10, 2, 6]), 0.001)  # mean 6
    torch.testing.assert_close(bias, torch.tensor([0.499, 0.001, -0.25]))


def test_load_stats_hand_example():
    stats = load_stats(torch.tensor([4, 0, 2, 2]))
    assert stats["tokens_per_expert"] == [4, 0, 2, 2]
    assert stats["max_over_mean"] == pytest.approx(2.0)
    assert stats["max_violation"] == pytest.approx(1.0)
    assert stats["cv"] == pytest.approx(math.sqrt(2) / 2)  # population std sqrt(8/4) over mean 2
    assert stats["dead_experts"] == 1


def test_load_stats_without_tokens():
    stats = load_stats(torch.zeros(3, dtype=torch.int64))
    assert stats["max_violation"] == 0.0 and stats["cv"] == 0.0 and stats["dead_experts"] == 3


def test_bias_update_balances_a_skewed_router():
    generator = torch.Generator().manual_seed(0)
    n_tokens, n_experts, top_k = 1024, 16, 2
    skew = torch.linspace(-1.5, 1.5, n_experts)
    scores = torch.sigmoid(torch.randn(n_tokens, n_experts, generator=generator) + skew)
    bias = torch.zeros(n_experts)

    def load():
        chosen = (scores + bias).topk(top_k, dim=-1).indices
        return torch.bincount(chosen.reshape(-1), minlength=n_experts)

    before = load_stats(load())
    for _ in range(200):
        update_expert_bias(bias, load(), 0.005)
    after = load_stats(load())
    assert before["max_violation"] > 2.0
    assert after["max_violation"] < 0.15 * before["max_violation"]
    assert after["cv"] < 0.15 * before["cv"]


def test_update_expert_biases_per_layer():
    biases = [torch.zeros(4), torch.zeros(4)]
    update_expert_biases(biases, torch.tensor([[5, 1, 3, 3], [0, 0, 8, 0]]), rate=0.01)
    torch.testing.assert_close(biases[0], torch.tensor([-0.01, 0.01, 0.0, 0.0]))
    torch.testing.assert_close(biases[1], torch.tensor([0.01, 0.01, -0.01, 0.01]))


def test_zero_rate_leaves_the_biases():
    biases = [torch.zeros(4)]
    update_expert_biases(biases, torch.tensor([[5, 1, 3, 3]]), rate=0.0)
    assert (biases[0] == 0).all()
    assert load_stats([5, 1, 3, 3])["max_violation"] == pytest.approx(5 / 3 - 1)


def test_a_forward_returns_its_load_and_leaves_nothing_on_the_layer():
    layer = MoE(MoEConfig(dim=8, n_experts=4, top_k=2, expert_ffn_dim=8, seq_aux_coef=0.01)).train()
    before = dict(vars(layer))
    buffers = {name: b.clone() for name, b in layer.named_buffers()}
    x = torch.randn(2, 3, 8)
    _, first = layer(x)
    _, second = layer(x)
    assert first.tokens_per_expert.sum() == 2 * 3 * 2  # this call's assignments, not a running total
    assert torch.equal(first.tokens_per_expert, second.tokens_per_expert)
    assert set(first.balance_losses) == {"seq_aux"} and first.balance_loss.requires_grad
    assert dict(vars(layer)) == before
    assert all(torch.equal(b, buffers[name]) for name, b in layer.named_buffers())
