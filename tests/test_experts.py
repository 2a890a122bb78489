"""Routed experts: grouped vs loop vs a dense per-token reference, outputs and gradients."""

import pytest
import torch
import torch.nn.functional as F

from moeforge.model.moe.experts import (
    CPU_BF16_ROW_ALIGN,
    RoutedExperts,
    aligned_group_layout,
    group_row_align,
    grouped_mm_unsupported_reason,
    grouped_swiglu,
    looped_swiglu,
    padded_capacity,
)

DIM, HIDDEN = 16, 8
# experts 1 and 3 receive no tokens
COUNTS = torch.tensor([7, 0, 12, 0, 9, 12])


def per_token_reference(x, w13, w2, counts):
    """Each row through its own expert with plain float64 matmuls, one row at a time."""
    expert_of_row = torch.repeat_interleave(torch.arange(len(counts)), counts)
    rows = []
    for row, e in zip(x.double(), expert_of_row.tolist()):
        gate = row @ w13[e, :, :HIDDEN].double()
        up = row @ w13[e, :, HIDDEN:].double()
        rows.append((F.silu(gate) * up) @ w2[e].double())
    return torch.stack(rows)


def make_experts(backend, seed=0):
    torch.manual_seed(seed)
    experts = RoutedExperts(len(COUNTS), DIM, HIDDEN, backend)
    experts.init_weights(0.3, 0.2)
    return experts


def output_and_grads(fn, x, w13, w2, grad_out):
    x, w13, w2 = (t.detach().clone().requires_grad_() for t in (x, w13, w2))
    out = fn(x, w13, w2)
    out.backward(grad_out)
    return out.detach(), x.grad, w13.grad, w2.grad


@pytest.fixture
def data():
    torch.manual_seed(1)
    experts = make_experts("grouped")
    x = torch.randn(int(COUNTS.sum()), DIM)
    grad_out = torch.randn(x.shape[0], DIM)
    return x, experts.w13.detach(), experts.w2.detach(), grad_out


def reference_results(x, w13, w2, grad_out):
    results = output_and_grads(
        lambda a, b, c: per_token_reference(a, b, c, COUNTS), x, w13, w2, grad_out.double()
    )
    return [r.float() for r in results]


@pytest.mark.parametrize("backend", ["grouped", "loop"])
def test_backend_matches_per_token_reference(data, backend):
    x, _, _, grad_out = data
    experts = make_experts(backend)
    xg = x.clone().requires_grad_()
    experts(xg, COUNTS).backward(grad_out)
    out = experts(x, COUNTS).detach()
    ref_out, ref_gx, ref_g13, ref_g2 = reference_results(
        x, experts.w13.detach(), experts.w2.detach(), grad_out
    )
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(xg.grad, ref_gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(experts.w13.grad, ref_g13, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(experts.w2.grad, ref_g2, rtol=1e-5, atol=1e-5)
    for idle in (1, 3):
        assert (experts.w13.grad[idle] == 0).all() and (experts.w2.grad[idle] == 0).all()


def test_grouped_equals_loop_with_gradients(data):
    x, w13, w2, grad_out = data
    grouped = output_and_grads(lambda a, b, c: grouped_swiglu(a, b, c, COUNTS), x, w13, w2, grad_out)
    looped = output_and_grads(lambda a, b, c: looped_swiglu(a, b, c, COUNTS), x, w13, w2, grad_out)
    for g, ref in zip(grouped, looped):
        torch.testing.assert_close(g, ref, rtol=1e-6, atol=1e-6)


def test_row_aligned_grouped_path_equals_loop(data):
    """The CUDA padding layout, exercised on CPU: same outputs and gradients."""
    x, w13, w2, grad_out = data
    padded = output_and_grads(
        lambda a, b, c: grouped_swiglu(a, b, c, COUNTS, row_align=16), x, w13, w2, grad_out
    )
    looped = output_and_grads(lambda a, b, c: looped_swiglu(a, b, c, COUNTS), x, w13, w2, grad_out)
    for p, ref in zip(padded, looped):
        torch.testing.assert_close(p, ref, rtol=1e-6, atol=1e-6)


def test_aligned_group_layout_hand_example():
    rows, ends = aligned_group_layout(torch.tensor([3, 0, 17]), n_rows=20, row_align=16)
    # groups start at 0, 16, 16; capacity = round_up(20 + 3*15, 16) = 80 closes the last group
    assert rows.tolist() == [0, 1, 2] + list(range(16, 33))
    assert ends.tolist() == [16, 16, 80]


def test_grouped_backward_accepts_expanded_gradient(data):
    x = data[0]
    experts = make_experts("grouped")
    xg = x.clone().requires_grad_()
    experts(xg, COUNTS).sum().backward()  # sum() sends a stride-0 gradient
    assert xg.grad.shape == x.shape and torch.isfinite(xg.grad).all()


def test_unaligned_dims_fall_back_to_loop():
    torch.manual_seed(0)
    grouped = RoutedExperts(3, 6, 5, "grouped")
    grouped.init_weights(0.3)
    looped = RoutedExperts(3, 6, 5, "loop")
    looped.load_state_dict(grouped.state_dict())
    counts = torch.tensor([2, 0, 3])
    x = torch.randn(5, 6)
    assert "multiples of 4" in grouped_mm_unsupported_reason(x, grouped.w13, grouped.w2)
    with pytest.warns(UserWarning, match="fall back to the loop backend"):
        out = grouped(x, counts)
    torch.testing.assert_close(out, looped(x, counts))


def test_aligned_fp32_on_cpu_uses_grouped_mm(data):
    x, w13, w2, _ = data
    assert grouped_mm_unsupported_reason(x, w13, w2) is None


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        RoutedExperts(2, 8, 8, "triton")


def test_bf16_groups_on_the_cpu_are_padded_to_repeating_shapes(monkeypatch):
    """Under bf16 autocast on the CPU each group's GEMM gets a row count that is a multiple of
    CPU_BF16_ROW_ALIGN (the last one: the static capacity minus such a multiple), so oneDNN meets
    the same few shapes every step; the result equals the unpadded bf16 loop."""
    torch.manual_seed(3)
    experts = make_experts("grouped")
    x = torch.randn(int(COUNTS.sum()), DIM)
    assert group_row_align(x) == 1
    seen = []
    real = torch._grouped_mm

    def recording(a, b, offs=None, **kwargs):
        seen.append(offs.tolist())
        return real(a, b, offs=offs, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", recording)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert group_row_align(x) == CPU_BF16_ROW_ALIGN
        out = experts(x, COUNTS)
        reference = looped_swiglu(x, experts.w13, experts.w2, COUNTS)
    ends = seen[0]
    sizes = [b - a for a, b in zip([0, *ends[:-1]], ends)]
    assert all(size % CPU_BF16_ROW_ALIGN == 0 for size in sizes[:-1])
    assert ends[-1] == padded_capacity(int(COUNTS.sum()), len(COUNTS), CPU_BF16_ROW_ALIGN)
    torch.testing.assert_close(out.float(), reference.float(), rtol=2e-2, atol=2e-2)
