"""The MoE layer's hand-written kernels against naive float64 references: values and gradients.

The fused SwiGLU (with and without per-row gates), the gather-and-sum of dispatch's backward and of
combine (weighted, unweighted, with empty slots), the gated routed experts, and the layer's fused
path (gates inside the experts) against its stage-by-stage path (gates in the combine).
"""

import pytest
import torch
import torch.nn.functional as F

from moeforge.config import MoEConfig
from moeforge.model.mlp import reference_swiglu, swiglu
from moeforge.model.moe import MoE
from moeforge.model.moe.dispatch import LocalDispatcher
from moeforge.model.moe.row_gathers import fan_in_rows, fan_out_rows
from moeforge.model.moe.experts import grouped_swiglu, looped_swiglu


def grads_of(fn, inputs, grad_out):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return [out.detach(), *(leaf.grad for leaf in leaves)]


def naive_swiglu(gate_up, row_gates):
    """Row by row, element by element: g * a * sigmoid(a) * b, in float64."""
    hidden = gate_up.shape[1] // 2
    rows = []
    for r, row in enumerate(gate_up.double()):
        a, b = row[:hidden], row[hidden:]
        rows.append(row_gates.double()[r] * a * torch.sigmoid(a) * b)
    return torch.stack(rows)


@pytest.mark.parametrize("gated", [False, True])
def test_swiglu_matches_naive_float64(gated):
    torch.manual_seed(0)
    gate_up = torch.randn(11, 2 * 6) * 3
    row_gates = torch.rand(11) if gated else torch.ones(11)
    grad_out = torch.randn(11, 6)
    inputs = [gate_up, row_gates] if gated else [gate_up]
    got = grads_of(lambda *t: swiglu(t[0], t[1] if gated else None), inputs, grad_out)
    want = grads_of(lambda *t: naive_swiglu(t[0], t[1] if gated else row_gates), inputs, grad_out)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-6)
    assert got[1].is_contiguous()


def test_swiglu_gradcheck_float64():
    torch.manual_seed(0)
    gate_up = torch.randn(5, 8, dtype=torch.float64, requires_grad=True)
    row_gates = torch.rand(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (gate_up, row_gates))
    assert torch.autograd.gradcheck(lambda a: swiglu(a), (gate_up,))


def test_swiglu_equals_plain_expression_bitwise_forward():
    torch.manual_seed(0)
    gate_up, row_gates = torch.randn(64, 32), torch.rand(64)
    assert torch.equal(swiglu(gate_up), reference_swiglu(gate_up))
    assert torch.equal(swiglu(gate_up, row_gates), reference_swiglu(gate_up, row_gates))


def naive_fan_in(y, slot_table, weights=None):
    """out[n] = sum_c w[n, c] * y[slot_table[n, c]], skipping entries len(y), one row at a time."""
    out = torch.zeros(slot_table.shape[0], y.shape[1], dtype=torch.float64)
    for n, slots in enumerate(slot_table.tolist()):
        for c, r in enumerate(slots):
            if r < y.shape[0]:
                out[n] += (1.0 if weights is None else weights.double()[n, c]) * y.double()[r]
    return out


def test_fan_in_rows_with_empty_slots_matches_naive():
    torch.manual_seed(0)
    y = torch.randn(6, 4)
    slot_table = torch.tensor([[0, 6, 3], [6, 6, 6], [5, 1, 6], [2, 4, 6]])  # 6 = empty
    row_owner = torch.tensor([0, 2, 3, 0, 3, 2])
    grad = torch.randn(4, 4)
    got = grads_of(lambda t: fan_in_rows(t, slot_table, row_owner), [y], grad)
    want = grads_of(lambda t: naive_fan_in(t, slot_table), [y], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float())
    assert (got[0][1] == 0).all()  # a token with no slot sums to zero


@pytest.mark.parametrize("padded", [False, True])
def test_fan_out_rows_backward_adds_copies_in_slot_order(padded):
    torch.manual_seed(0)
    x = torch.randn(3, 4)
    if padded:  # token 1 is copied once; its second slot (5 = the number of rows) is empty
        rows, slot_table = torch.tensor([2, 0, 1, 0, 2]), torch.tensor([[1, 3], [2, 5], [0, 4]])
    else:
        rows, slot_table = torch.tensor([2, 0, 1, 0, 2, 1]), torch.tensor([[1, 3], [2, 5], [0, 4]])
    out = fan_out_rows(x.requires_grad_(), rows, slot_table, padded)
    assert torch.equal(out, x.detach()[rows])
    grad = torch.randn(out.shape)
    (gx,) = torch.autograd.grad(out, x, grad)
    torch.testing.assert_close(gx.double(), naive_fan_in(grad, slot_table))


def routed(n_tokens=9, n_experts=4, top_k=3, dim=5, seed=0):
    torch.manual_seed(seed)
    x = torch.randn(n_tokens, dim)
    experts = torch.rand(n_tokens, n_experts).topk(top_k, dim=-1).indices
    gates = torch.rand(n_tokens, top_k)
    return x, experts, gates


def test_gated_combine_matches_naive_with_gradients():
    x, experts, gates = routed()
    dispatcher = LocalDispatcher(4)
    _, _, state = dispatcher.dispatch(x, experts, gates)
    y = torch.randn(experts.numel(), x.shape[1])
    grad = torch.randn(x.shape)
    got = grads_of(lambda a, g: dispatcher.combine(a, state._replace(gates=g)), [y, gates], grad)
    want = grads_of(lambda a, g: naive_fan_in(a, state.rows_of_token, g), [y, gates], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-6)


def test_gates_applied_combine_is_a_plain_sum():
    x, experts, gates = routed()
    dispatcher = LocalDispatcher(4)
    _, _, state = dispatcher.dispatch(x, experts, gates)
    y = torch.randn(experts.numel(), x.shape[1])
    got = grads_of(lambda a: dispatcher.combine(a, state.gates_applied()), [y], torch.ones(x.shape))
    want = grads_of(lambda a: naive_fan_in(a, state.rows_of_token), [y], torch.ones(x.shape))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-6)


def test_row_gates_follow_the_grouped_rows_with_gradients():
    x, experts, gates = routed()
    gates.requires_grad_()
    _, _, state = LocalDispatcher(4).dispatch(x, experts, gates)
    for n in range(experts.shape[0]):
        for c in range(experts.shape[1]):
            assert state.row_gates[state.rows_of_token[n, c]] == gates[n, c]
    weights = torch.arange(float(experts.numel()))
    (grad,) = torch.autograd.grad((state.row_gates * weights).sum(), gates)
    assert torch.equal(grad, weights[state.rows_of_token])


COUNTS = torch.tensor([5, 0, 7, 4])


@pytest.mark.parametrize("kernel", ["grouped", "grouped_aligned", "loop"])
def test_gated_experts_match_naive_float64(kernel):
    torch.manual_seed(0)
    dim, hidden, n_rows = 8, 4, int(COUNTS.sum())
    x, row_gates = torch.randn(n_rows, dim), torch.rand(n_rows)
    w13, w2 = torch.randn(4, dim, 2 * hidden) * 0.5, torch.randn(4, hidden, dim) * 0.5
    grad = torch.randn(n_rows, dim)
    run = {
        "grouped": lambda *t: grouped_swiglu(*t[:3], COUNTS, 1, t[3]),
        "grouped_aligned": lambda *t: grouped_swiglu(*t[:3], COUNTS, 16, t[3]),
        "loop": lambda *t: looped_swiglu(*t[:3], COUNTS, t[3]),
    }[kernel]
    expert_of_row = torch.repeat_interleave(torch.arange(4), COUNTS)

    def naive(x, w13, w2, g):
        rows = [
            g[r] * (F.silu(x[r] @ w13[e, :, :hidden]) * (x[r] @ w13[e, :, hidden:])) @ w2[e]
            for r, e in enumerate(expert_of_row.tolist())
        ]
        return torch.stack(rows)

    got = grads_of(run, [x, w13, w2, row_gates], grad)
    want = grads_of(naive, [t.double() for t in (x, w13, w2, row_gates)], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w.float(), rtol=1e-5, atol=1e-5)


def test_layer_fused_path_equals_stage_by_stage_path():
    """`forward` (gates in the experts) vs route/dispatch/compute/combine (gates in the combine)."""
    cfg = MoEConfig(dim=16, n_experts=8, top_k=3, expert_ffn_dim=8, n_shared_experts=1)
    torch.manual_seed(0)
    layer = MoE(cfg).train()
    x = torch.randn(2, 10, 16)
    grad = torch.randn(2, 10, 16)

    def stage_by_stage(x):
        tokens = x.reshape(-1, 16)
        routing = layer.route(tokens)
        x_sorted, per_expert, state = layer.dispatch(tokens, routing)
        return layer.combine(layer.compute_experts(x_sorted, per_expert), state, tokens).view_as(x)

    results = []
    for fn in (lambda x: layer(x)[0], stage_by_stage):
        layer.zero_grad()
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        out.backward(grad)
        results.append([out.detach(), leaf.grad, *(p.grad.clone() for p in layer.parameters())])
    for fused, staged in zip(*results):
        torch.testing.assert_close(fused, staged, rtol=1e-5, atol=1e-6)


def test_layer_forward_backward_is_bit_reproducible():
    def run():
        torch.manual_seed(0)
        layer = MoE(MoEConfig(dim=16, n_experts=8, top_k=3, expert_ffn_dim=8, n_shared_experts=1)).train()
        x = torch.randn(2, 12, 16, requires_grad=True)
        out, stats = layer(x)
        (out.square().sum() + stats.balance_loss).backward()
        return [out.detach(), x.grad, *(p.grad for p in layer.parameters())]

    assert all(torch.equal(a, b) for a, b in zip(run(), run()))
