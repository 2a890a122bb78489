"""The MoE layer (router + dispatch + experts + combine + shared experts) vs a naive per-token reference."""

import pytest
import torch
import torch.nn.functional as F

from moeforge.config import ConfigError, MoEConfig
from moeforge.model.moe import MoE
from moeforge.model.moe.balance import batch_aux_loss, router_z_loss, sequence_aux_loss
from moeforge.model.moe.dispatch import LocalDispatcher

DIM, FFN = 16, 8


def config(**overrides):
    options = {
        "dim": DIM,
        "n_experts": 8,
        "top_k": 2,
        "expert_ffn_dim": FFN,
        "n_shared_experts": 2,
        "score_func": "sigmoid",
        "route_scale": 2.5,
        "n_groups": 4,
        "topk_groups": 2,
    }
    options.update(overrides)
    return MoEConfig(**options)


def make_layer(cfg, seed=0):
    torch.manual_seed(seed)
    layer = MoE(cfg)
    layer.init_weights(0.3, 0.2)
    with torch.no_grad():
        layer.router.expert_bias.copy_(torch.linspace(-0.2, 0.2, cfg.n_experts))
    return layer


def reference_params(layer):
    """Float64 leaf copies of every weight the reference needs."""
    names = [
        "router.weight",
        "experts.w13",
        "experts.w2",
        "shared_experts.w13.weight",
        "shared_experts.w2.weight",
    ]
    state = dict(layer.named_parameters())
    return {n: state[n].detach().double().requires_grad_() for n in names if n in state}


def naive_moe(params, bias, cfg, x):
    """Token by token: score, pick experts (bias and groups for selection only), sum gated SwiGLUs."""
    per_group = cfg.n_experts // cfg.n_groups
    outputs = []
    for token in x.reshape(-1, cfg.dim).double():
        logits = params["router.weight"] @ token
        scores = logits.sigmoid() if cfg.score_func == "sigmoid" else logits.softmax(-1)
        biased = (scores.detach() + bias.double()).tolist()
        group_scores = [
            sum(sorted(biased[g * per_group : (g + 1) * per_group])[-2:]) for g in range(cfg.n_groups)
        ]
        groups = sorted(range(cfg.n_groups), key=lambda g: -group_scores[g])[: cfg.topk_groups]
        eligible = [e for e in range(cfg.n_experts) if e // per_group in groups]
        chosen = sorted(eligible, key=lambda e: -biased[e])[: cfg.top_k]
        gates = torch.stack([scores[e] for e in chosen])
        if cfg.route_norm:
            gates = gates / gates.sum()
        out = torch.zeros(cfg.dim, dtype=torch.float64)
        for gate, e in zip(gates * cfg.route_scale, chosen):
            hidden = token @ params["experts.w13"][e]
            out = out + gate * ((F.silu(hidden[:FFN]) * hidden[FFN:]) @ params["experts.w2"][e])
        if "shared_experts.w13.weight" in params:
            hidden = params["shared_experts.w13.weight"] @ token
            half = hidden.shape[0] // 2
            out = out + params["shared_experts.w2.weight"] @ (F.silu(hidden[:half]) * hidden[half:])
        outputs.append(out)
    return torch.stack(outputs).view(x.shape)


@pytest.mark.parametrize(
    "overrides",
    [
        {"backend": "grouped"},
        {"backend": "loop"},
        {
            "backend": "grouped",
            "score_func": "softmax",
            "route_norm": False,
            "n_groups": 1,
            "topk_groups": 1,
            "route_scale": 1.0,
        },
        {"backend": "grouped", "n_shared_experts": 0},
    ],
)
def test_layer_matches_naive_reference_with_gradients(overrides):
    cfg = config(**overrides)
    layer = make_layer(cfg).eval()
    torch.manual_seed(1)
    x = torch.randn(2, 5, DIM)
    grad_out = torch.randn(2, 5, DIM)
    xg = x.clone().requires_grad_()
    out, _ = layer(xg)
    out.backward(grad_out)

    params = reference_params(layer)
    x64 = x.double().requires_grad_()
    expected = naive_moe(params, layer.router.expert_bias, cfg, x64)
    expected.backward(grad_out.double())

    torch.testing.assert_close(out.detach().double(), expected.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=1e-4, atol=1e-5)
    module_params = dict(layer.named_parameters())
    for name, ref in params.items():
        torch.testing.assert_close(
            module_params[name].grad.double(), ref.grad, rtol=1e-4, atol=1e-5, msg=name
        )


def test_training_aux_losses_are_the_enabled_balance_losses():
    cfg = config(seq_aux_coef=1e-2, aux_coef=1e-2, z_loss_coef=1e-3)
    layer = make_layer(cfg).train()
    x = torch.randn(3, 4, DIM)
    _, stats = layer(x)
    routing = layer.router(x.reshape(-1, DIM))
    expected = {
        "seq_aux": sequence_aux_loss(routing.scores, routing.expert_indices, 3, 4, 1e-2),
        "batch_aux": batch_aux_loss(routing.logits, routing.expert_indices, 1e-2),
        "z_loss": router_z_loss(routing.logits, 1e-3),
    }
    assert list(stats.balance_losses) == list(expected)
    for name, value in expected.items():
        torch.testing.assert_close(stats.balance_losses[name], value)
        assert stats.balance_losses[name].requires_grad
    torch.testing.assert_close(stats.balance_loss, sum(expected.values()))


def test_aux_loss_is_zero_in_eval_and_when_disabled():
    _, stats = make_layer(config(seq_aux_coef=1e-2)).eval()(torch.randn(1, 4, DIM))
    assert stats.balance_loss.item() == 0.0 and stats.balance_losses == {}
    _, stats = make_layer(config(seq_aux_coef=0.0)).train()(torch.randn(1, 4, DIM))
    assert stats.balance_loss.item() == 0.0 and stats.balance_losses == {}


def test_each_call_returns_its_own_load_in_training_and_eval():
    layer = make_layer(config()).train()
    x = torch.randn(2, 6, DIM)
    _, stats = layer(x)
    routing = layer.router(x.reshape(-1, DIM))
    assert torch.equal(stats.tokens_per_expert, torch.bincount(routing.expert_indices.reshape(-1), minlength=8))
    assert stats.tokens_per_expert.dtype == torch.int64 and int(stats.tokens_per_expert.sum()) == 12 * 2
    _, eval_stats = layer.eval()(x)
    assert torch.equal(eval_stats.tokens_per_expert, stats.tokens_per_expert)


def test_identical_calls_are_bit_identical():
    layer = make_layer(config()).train()
    x = torch.randn(2, 8, DIM)
    results = []
    for _ in range(2):
        layer.zero_grad()
        xg = x.clone().requires_grad_()
        out, stats = layer(xg)
        (out.square().sum() + stats.balance_loss).backward()
        results.append([out.detach(), xg.grad] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_same_seed_same_weights_and_out_std():
    a, b = make_layer(config(), seed=3), make_layer(config(), seed=3)
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    torch.manual_seed(0)
    layer = MoE(config(n_experts=16, expert_ffn_dim=64))
    layer.init_weights(0.02, 0.002)
    assert layer.experts.w13.std().item() == pytest.approx(0.02, rel=0.05)
    assert layer.experts.w2.std().item() == pytest.approx(0.002, rel=0.05)


def test_checkpoint_holds_the_balancing_bias():
    state = make_layer(config()).state_dict()
    assert "router.expert_bias" in state


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"dim": 0}, "moe.dim"), ({"top_k": 9}, "moe.top-k"), ({"n_groups": 3}, "moe.n-groups")],
)
def test_invalid_config_raises_config_error(overrides, field):
    with pytest.raises(ConfigError, match=field):
        MoE(config(**overrides))


def test_local_dispatch_groups_rows_by_expert_stably():
    x = torch.arange(4.0).unsqueeze(1).repeat(1, 4)  # row t holds the value t
    experts = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    x_sorted, counts, _ = LocalDispatcher(3).dispatch(x, experts, torch.ones(4, 2))
    assert counts.tolist() == [3, 2, 3]
    # expert 0 gets tokens 0,1,3; expert 1 gets 1,2; expert 2 gets 0,2,3 (token order kept)
    assert x_sorted[:, 0].tolist() == [0, 1, 3, 1, 2, 0, 2, 3]


def test_local_combine_is_gated_sum_with_gradients():
    torch.manual_seed(0)
    dispatcher = LocalDispatcher(5)
    x = torch.randn(7, 8, requires_grad=True)
    experts = torch.rand(7, 5).topk(3, dim=-1).indices
    gates = torch.rand(7, 3, requires_grad=True)
    x_sorted, _, state = dispatcher.dispatch(x, experts, gates)
    scale = torch.arange(1.0, 6.0)  # "expert e" multiplies its rows by e + 1
    expert_of_row = experts.reshape(-1).sort(stable=True).values
    out = dispatcher.combine(x_sorted * scale[expert_of_row].unsqueeze(1), state)
    expected = (gates.unsqueeze(-1) * scale[experts].unsqueeze(-1) * x.unsqueeze(1)).sum(1)
    torch.testing.assert_close(out, expected)
    grad = torch.randn(7, 8)
    got = torch.autograd.grad(out, (x, gates), grad)
    want = torch.autograd.grad(expected, (x, gates), grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
