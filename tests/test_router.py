"""Router vs a naive per-token reference: scores, bias-for-selection, group-limited top-k, gates."""

import math

import pytest
import torch

from moeforge.config import MoEConfig
from moeforge.model.moe.router import Router


def naive_route(x, weight, bias, cfg):
    """Token by token, in float64 Python: (experts, gates, scores) following SPEC's router facts."""
    experts_per_group = cfg.n_experts // cfg.n_groups
    all_experts, all_gates, all_scores = [], [], []
    for token in x.double():
        logits = [float(token @ w) for w in weight.double()]
        if cfg.score_func == "sigmoid":
            scores = [1 / (1 + math.exp(-v)) for v in logits]
        else:
            total = sum(math.exp(v) for v in logits)
            scores = [math.exp(v) / total for v in logits]
        biased = [s + float(b) for s, b in zip(scores, bias)]
        group_score = []
        for g in range(cfg.n_groups):
            members = sorted(biased[g * experts_per_group : (g + 1) * experts_per_group], reverse=True)
            group_score.append(members[0] if experts_per_group == 1 else members[0] + members[1])
        kept_groups = sorted(range(cfg.n_groups), key=lambda g: -group_score[g])[: cfg.topk_groups]
        eligible = [e for e in range(cfg.n_experts) if e // experts_per_group in kept_groups]
        chosen = sorted(eligible, key=lambda e: -biased[e])[: cfg.top_k]
        gates = [scores[e] for e in chosen]
        if cfg.route_norm:
            gates = [g / sum(gates) for g in gates]
        all_experts.append(chosen)
        all_gates.append([g * cfg.route_scale for g in gates])
        all_scores.append(scores)
    f64 = torch.float64
    return torch.tensor(all_experts), torch.tensor(all_gates, dtype=f64), torch.tensor(all_scores, dtype=f64)


def make_router(cfg, seed=0):
    torch.manual_seed(seed)
    router = Router(cfg)
    router.init_weights(0.5)
    return router


CASES = [
    {"score_func": "sigmoid", "route_norm": True, "route_scale": 1.0},
    {"score_func": "sigmoid", "route_norm": True, "route_scale": 2.5},
    {"score_func": "sigmoid", "route_norm": False, "route_scale": 1.0},
    {"score_func": "softmax", "route_norm": False, "route_scale": 1.0},
    {"score_func": "softmax", "route_norm": True, "route_scale": 1.0},
    {"score_func": "sigmoid", "route_norm": True, "route_scale": 2.5, "n_groups": 4, "topk_groups": 2},
    {"score_func": "softmax", "route_norm": False, "route_scale": 1.0, "n_groups": 2, "topk_groups": 1},
]


@pytest.mark.parametrize("options", CASES)
def test_router_matches_naive_reference(options):
    cfg = MoEConfig(dim=8, n_experts=8, top_k=2, **options)
    cfg.validate()
    router = make_router(cfg)
    x = torch.randn(40, 8)
    out = router(x)
    experts, gates, scores = naive_route(x, router.weight.detach(), router.expert_bias, cfg)
    assert out.expert_indices.dtype == torch.int64
    assert out.scores.dtype == torch.float32 and out.logits.dtype == torch.float32
    assert torch.equal(out.expert_indices, experts)
    torch.testing.assert_close(out.gates.double(), gates, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.scores.double(), scores, rtol=1e-5, atol=1e-6)


def test_bias_changes_selection_but_not_gates():
    cfg = MoEConfig(dim=8, n_experts=8, top_k=2, route_norm=False)
    router = make_router(cfg)
    x = torch.randn(64, 8)
    plain = router(x)
    router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0, 5.0]))
    biased = router(x)
    assert torch.equal(biased.scores, plain.scores)
    assert (biased.expert_indices.sort(dim=-1).values == torch.tensor([6, 7])).all()
    assert not torch.equal(biased.expert_indices, plain.expert_indices)
    # the gates are the unbiased scores of the newly chosen experts, never score + bias
    torch.testing.assert_close(biased.gates, plain.scores.gather(1, biased.expert_indices))
    assert (biased.gates < 1).all()
    experts, gates, _ = naive_route(x, router.weight.detach(), router.expert_bias, cfg)
    assert torch.equal(biased.expert_indices, experts)
    torch.testing.assert_close(biased.gates.double(), gates, rtol=1e-5, atol=1e-6)


def test_group_limited_routing_hand_example():
    # dim = E and an identity router weight: the logits are the input itself.
    cfg = MoEConfig(dim=4, n_experts=4, top_k=2, n_groups=2, topk_groups=1, route_norm=False)
    router = Router(cfg)
    with torch.no_grad():
        router.weight.copy_(torch.eye(4))
    # global top-2 is {0, 2}; group {0,1} sums 3.0+2.5 > group {2,3} sums 2.9-1.0
    logits = torch.tensor([[3.0, 2.5, 2.9, -1.0]])
    out = router(logits)
    assert out.expert_indices.tolist() == [[0, 1]]
    plain = Router(MoEConfig(dim=4, n_experts=4, top_k=2, route_norm=False))
    with torch.no_grad():
        plain.weight.copy_(torch.eye(4))
    assert plain(logits).expert_indices.tolist() == [[0, 2]]
    torch.testing.assert_close(out.gates, torch.sigmoid(torch.tensor([[3.0, 2.5]])))


def test_one_expert_per_group_uses_that_expert_as_group_score():
    # MoEConfig.validate refuses 1 expert per group; the router still defines it (max of the group).
    cfg = MoEConfig(dim=8, n_experts=8, top_k=2, n_groups=8, topk_groups=3)
    router = make_router(cfg)
    x = torch.randn(32, 8)
    experts, gates, _ = naive_route(x, router.weight.detach(), router.expert_bias, cfg)
    out = router(x)
    assert torch.equal(out.expert_indices, experts)
    torch.testing.assert_close(out.gates.double(), gates, rtol=1e-5, atol=1e-6)


def test_logits_are_fp32_under_bf16_autocast():
    cfg = MoEConfig(dim=8, n_experts=8, top_k=2)
    router = make_router(cfg)
    x = torch.randn(16, 8)
    reference = router(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = router(x)
    assert autocast.logits.dtype == torch.float32
    assert torch.equal(autocast.logits, reference.logits)


def test_jitter_only_in_training():
    cfg = MoEConfig(dim=8, n_experts=8, top_k=2, jitter=0.1)
    router = make_router(cfg)
    x = torch.randn(16, 8)
    exact = torch.nn.functional.linear(x, router.weight.detach())
    router.eval()
    torch.testing.assert_close(router(x).logits.detach(), exact)
    router.train()
    noisy = router(x).logits.detach()
    assert not torch.allclose(noisy, exact)
    # multiplicative noise in [1-j, 1+j] per input element bounds the logit change
    bound = 0.1 * (x.abs() @ router.weight.detach().abs().t())
    assert ((noisy - exact).abs() <= bound + 1e-6).all()


def test_gates_carry_gradient_to_router_weight():
    cfg = MoEConfig(dim=8, n_experts=8, top_k=2, route_norm=False)
    router = make_router(cfg)
    router(torch.randn(16, 8)).gates.sum().backward()
    assert router.weight.grad is not None and router.weight.grad.abs().sum() > 0


def test_expert_bias_is_a_persistent_fp32_zero_buffer():
    router = make_router(MoEConfig(dim=8, n_experts=8, top_k=2))
    state = router.state_dict()
    assert "expert_bias" in state
    assert state["expert_bias"].dtype == torch.float32
    assert torch.equal(state["expert_bias"], torch.zeros(8))
    assert not router.expert_bias.requires_grad


@pytest.mark.parametrize(
    ("n_experts", "top_k", "n_groups", "topk_groups", "ep", "ep_nodes"),
    [(32, 8, 8, 4, 8, 8), (32, 8, 8, 2, 8, 4), (16, 4, 4, 1, 4, 2), (64, 8, 16, 4, 8, 4)],
)
def test_node_limited_routing_reaches_at_most_m_nodes(n_experts, top_k, n_groups, topk_groups, ep, ep_nodes):
    """With groups tied to the ep mesh's nodes (parallel.ep-nodes), a token's experts, placed
    contiguously on ep ranks and ranks contiguously on nodes, come from at most topk-groups nodes,
    whatever the scores and balancing biases."""
    cfg = MoEConfig(dim=16, n_experts=n_experts, top_k=top_k, n_groups=n_groups, topk_groups=topk_groups)
    router = make_router(cfg)
    experts_per_rank = n_experts // ep
    ranks_per_node = ep // ep_nodes
    for seed in range(4):
        torch.manual_seed(seed)
        router.expert_bias.copy_(torch.randn(n_experts) * 0.1 * seed)
        experts = router(torch.randn(512, 16)).expert_indices
        node = experts // experts_per_rank // ranks_per_node
        nodes_per_token = torch.zeros(512, ep_nodes, dtype=torch.bool).scatter_(1, node, True).sum(1)
        assert nodes_per_token.max() <= min(topk_groups, ep_nodes)
        if n_groups // ep_nodes == 1 and topk_groups < ep_nodes:  # the limit binds: some token uses M nodes
            assert nodes_per_token.max() == topk_groups
