"""moeforge's CPU grouped GEMM: each group's product against a plain matmul, forward and backward,
with any number of threads, under a dispatch mode, and torch's thread count left as it was."""

import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moeforge.model.moe.cpu_grouped_mm import deal_groups, grouped_mm

COUNTS = [5, 0, 17, 1, 9, 0, 30, 2]


def reference(x, w, counts, grad_out):
    """Per group: y_e = x_e @ w_e, and autograd's gradients of the same products, in fp64."""
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    out = torch.cat([group @ w64[e] for e, group in enumerate(x64.split(counts))])
    out.backward(grad_out.double())
    return out, x64.grad, w64.grad


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_grouped_mm_equals_a_matmul_per_group(threads):
    torch.manual_seed(0)
    x = torch.randn(sum(COUNTS), 12, requires_grad=True)
    w = torch.randn(len(COUNTS), 12, 7, requires_grad=True)
    grad_out = torch.randn(sum(COUNTS), 7)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = grouped_mm(x, w, COUNTS)
        out.backward(grad_out)
        assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    ref_out, ref_gx, ref_gw = reference(x, w, COUNTS, grad_out)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad.double(), ref_gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), ref_gw, rtol=1e-5, atol=1e-5)
    assert (w.grad[1] == 0).all() and (w.grad[5] == 0).all()  # empty groups


def test_results_do_not_depend_on_the_thread_count():
    """One group's product is one single-threaded GEMM however the groups are dealt out."""
    torch.manual_seed(1)
    x, w = torch.randn(sum(COUNTS), 64), torch.randn(len(COUNTS), 64, 48)
    before = torch.get_num_threads()
    outs = []
    try:
        for threads in (2, 3):
            torch.set_num_threads(threads)
            outs.append(grouped_mm(x, w, COUNTS))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1])


def test_groups_are_dealt_largest_first_to_the_lightest_worker():
    # 30 -> a; 17 -> b; 9 -> b (26); 5 -> b (31); 2 -> a (32); 1 -> b (32); the empty ones to a (ties: first)
    assert deal_groups(COUNTS, 2) == [[6, 7, 1, 5], [2, 4, 0, 3]]
    assert sorted(g for share in deal_groups(COUNTS, 3) for g in share) == list(range(len(COUNTS)))


class CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.mm = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.mm += func.overloadpacket.__name__ == "mm"
        return func(*args, **(kwargs or {}))


def test_a_dispatch_mode_sees_every_groups_product():
    """Modes are thread-local: under one, the groups run in the calling thread, where it counts them."""
    x, w = torch.randn(sum(COUNTS), 4), torch.randn(len(COUNTS), 4, 4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with CountMatmuls() as counter:
            grouped_mm(x, w, COUNTS)
    finally:
        torch.set_num_threads(before)
    assert counter.mm == sum(1 for c in COUNTS if c)


def test_concurrent_callers_leave_the_thread_count_as_it_was():
    x, w = torch.randn(sum(COUNTS), 32), torch.randn(len(COUNTS), 32, 32)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    errors = []

    def call() -> None:
        try:
            for _ in range(20):
                grouped_mm(x, w, COUNTS)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    try:
        callers = [threading.Thread(target=call) for _ in range(3)]
        for caller in callers:
            caller.start()
        for caller in callers:
            caller.join()
        assert not errors and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
