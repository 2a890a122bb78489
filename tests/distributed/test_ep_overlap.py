"""`--parallel.ep-overlap`: the micro-batch in two halves, one half's all-to-all in flight while the
other computes, equals the plain forward (losses, gradients, loads), and really overlaps; under
DualPipeV (pp=2 x ep=2) the forward and the backward of an OVERLAP_F_B action run at once, exactly.
The pipeline test reuses test_pipeline.py's model, batch and objective."""

from __future__ import annotations

import functools
import threading

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from conftest import small_config
from moeforge.config import ParallelConfig
from moeforge.model.transformer import Transformer
from moeforge.parallel import build_mesh, parallelize
from moeforge.parallel import overlap as overlap_module
from moeforge.parallel.overlap import (
    ForwardBackwardSpans,
    OverlapTimeline,
    overlap_forward_and_backward,
    overlapped_forward,
)
from moeforge.parallel.parallelize import apply_expert_parallel, sum_across_ranks
from moeforge.parallel.pipeline import build_pipeline, sum_tied_embedding_grads
from moeforge.parallel.spawn import run_on_processes
from moeforge.train.losses import training_losses
from test_pipeline import MICRO, N_MICRO, SEQ, objective
from test_pipeline import batch as pipeline_batch
from test_pipeline import new_model as new_pipeline_model

MTP_WEIGHT = 0.3


def model_config():
    """3 blocks (dense, MoE, MoE), one MoE MTP module, a shared expert, every balance loss on."""
    overrides = {
        "model__n_layers": "3",
        "model__mtp_depth": "1",
        "model__moe__n_shared_experts": "1",
        "model__moe__seq_aux_coef": "0.01",
        "model__moe__aux_coef": "0.01",
        "model__moe__z_loss_coef": "0.001",
    }
    return small_config(**overrides).model


def batch(seed: int, size: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    cfg = model_config()
    tokens = torch.randint(0, cfg.vocab_size, (size, 33), generator=torch.Generator().manual_seed(seed))
    return tokens[:, :-1], tokens[:, 1:]


def step(model: Transformer, inputs, targets, overlap: bool, timeline: OverlapTimeline | None = None):
    """(loss, loads, balance losses, {name: local gradient}) of one forward/backward."""
    out = overlapped_forward(model, inputs, targets, timeline=timeline) if overlap else model(inputs, mtp_targets=targets)
    loss = training_losses(out, targets, MTP_WEIGHT).total
    loss.backward()
    grads = {n: (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad) for n, p in model.named_parameters()}
    balance = torch.stack([torch.stack(list(s.balance_losses.values())) for s in out.moe_stats])
    return loss.detach(), out.load, balance.detach(), grads


def assert_same_step(got, expected) -> None:
    loss, load, balance, grads = got
    torch.testing.assert_close(loss, expected[0], rtol=1e-6, atol=0)
    assert torch.equal(load, expected[1])  # both halves' tokens per expert
    torch.testing.assert_close(balance, expected[2], rtol=1e-6, atol=0)
    assert grads.keys() == expected[3].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[3][name], rtol=1e-5, atol=1e-7, msg=name)


def new_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(model_config())


def test_overlap_on_one_process_equals_the_plain_forward():
    """Local dispatcher: nothing is in flight, but the halves, the stats over both and the MTP
    module are the same code as under expert parallelism."""
    inputs, targets = batch(1)
    expected = step(new_model(), inputs, targets, overlap=False)
    assert_same_step(step(new_model(), inputs, targets, overlap=True), expected)


def test_overlap_needs_two_sequences():
    inputs, targets = batch(1, size=1)
    with pytest.raises(ValueError, match=r"^parallel\.ep-overlap: a micro-batch of 1 sequences cannot be split in 2"):
        overlapped_forward(new_model(), inputs, targets)


def overlap_equals_plain_under_ep(rank: int) -> None:
    """ep=2 with FSDP over both ranks, as `parallelize` sets up the trainer; each rank its own batch."""
    mesh = build_mesh(ParallelConfig(ep=2), 2, "cpu")
    inputs, targets = batch(1 + rank)
    expected = step(parallelize(new_model(), mesh), inputs, targets, overlap=False)
    runs = []
    for _ in range(2):
        timeline = OverlapTimeline()
        runs.append(step(parallelize(new_model(), mesh), inputs, targets, overlap=True, timeline=timeline))
    assert_same_step(runs[0], expected)
    first, again = runs  # deterministic: the same bits run to run
    assert torch.equal(first[0], again[0]) and all(torch.equal(g, again[3][n]) for n, g in first[3].items())
    check_overlap(timeline)


def check_overlap(timeline: OverlapTimeline) -> None:
    """Each half's exchanges (dispatch: rows and routing; combine) were in flight while the other
    half computed: its next stage lies between the exchange's issue and the wait on it. Backward
    issued and waited on every exchange's reverse."""
    labels = ("layers.1", "layers.2", "mtp.0.block")
    assert len(timeline.exchanges) == len(labels) * 2 * 3  # 2 halves x (rows, routing, combine)
    for exchange in timeline.exchanges:
        hidden = {span.label for span in timeline.hidden_under(exchange)}
        layer = exchange.label.rsplit(" ", 1)[0]
        after = {
            ("dispatch", 0): "attention+route",
            ("dispatch", 1): "experts",
            ("combine", 0): "experts",
            ("combine", 1): "shared experts",
        }[exchange.label.rsplit(" ", 1)[1], exchange.part]
        assert f"{layer} {after}" in hidden, (exchange, hidden)
        times = exchange.times
        assert times.issued <= times.wait_began <= times.wait_ended
        assert times.grad_issued is not None and times.grad_issued <= times.grad_wait_began <= times.grad_wait_ended
    assert timeline.exposed_seconds() > 0


def test_overlap_under_expert_parallelism_equals_the_plain_forward():
    run_on_processes(2, overlap_equals_plain_under_ep, timeout_s=60)


class MeetAtStart:
    """Makes each OVERLAP_F_B action's forward and backward meet at their start: each waits there
    for the other (a two-party barrier per action, 60 s). If the two ran one after the other, the
    first would wait in vain; so `met` says, per action, without any timing, that both were in flight
    at once. (Comparing their perf_counter spans instead depended on how the OS scheduled the threads:
    a short backward could finish before the forward's thread got the CPU.)"""

    def __init__(self):
        self.met: list[bool] = []
        self._barrier: threading.Barrier | None = None

    def install(self) -> None:
        module = overlap_module
        at_once, forward, backward = module._forward_and_backward_at_once, module._forward, module._full_backward

        def action_at_once(action, ctx):
            self._barrier = threading.Barrier(2, timeout=60)
            self.met.append(True)
            return at_once(action, ctx)

        def meeting(run):
            def met_first(ctx, action):
                try:
                    self._barrier.wait()
                except threading.BrokenBarrierError:
                    self.met[-1] = False
                return run(ctx, action)

            return met_first

        module._forward_and_backward_at_once = action_at_once
        module._forward, module._full_backward = meeting(forward), meeting(backward)


def dualpipev_grads(rank: int, out_dir: str) -> None:
    """pp=2 x ep=2 under DualPipeV, forward and backward of each OVERLAP_F_B action at once or one
    after the other; per pp rank its stages' gradients (experts whole, the rest averaged over ep) and,
    overlapped, whether each action's forward and backward were in flight together (`MeetAtStart`)."""
    meetings = MeetAtStart()
    meetings.install()
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
    ep_group, ep_rank = mesh["ep"].get_group(), mesh["ep"].get_local_rank()
    inputs, targets = pipeline_batch()
    inputs, targets = inputs[ep_rank::2], targets[ep_rank::2]
    for overlap in (False, True):
        model = new_pipeline_model()
        for layer in model.moe_layers():
            apply_expert_parallel(layer, mesh["ep"])
            layer.sum_over_data_parallel = functools.partial(sum_across_ranks, group=ep_group)
        pipe = build_pipeline(model, "dualpipev", N_MICRO, MICRO // 2, SEQ, objective, mesh["pp"].get_group())
        spans: list[ForwardBackwardSpans] = []
        if overlap:
            overlap_forward_and_backward(pipe, spans)
        pipe.schedule.step(*([inputs] if pipe.has_first else []), target=targets if pipe.has_last else None)
        sum_tied_embedding_grads(pipe)
        grads = {}
        for chunk in pipe.chunks:
            for name, param in chunk.named_parameters():
                if isinstance(param.grad, DTensor):
                    grads[name] = param.grad.full_tensor()
                else:
                    grads[name] = sum_across_ranks(param.grad.clone(), ep_group) / 2
        if ep_rank == 0:
            met = meetings.met if overlap else []
            torch.save((grads, spans, met), f"{out_dir}/{overlap}.{mesh['pp'].get_local_rank()}")


@pytest.mark.slow
def test_dualpipev_forward_backward_overlap_is_exact(tmp_path):
    """Overlapped: the same bits as one after the other, both equal to one process; the forward and
    the backward of every OVERLAP_F_B action were in flight at the same time."""
    model = new_pipeline_model()
    inputs, targets = pipeline_batch()
    for i in range(N_MICRO):
        rows = [2 * i, 2 * i + 1]  # sequence i of ep rank 0 and of ep rank 1
        (objective(model(inputs[rows], mtp_targets=targets[rows]), targets[rows]) / N_MICRO).backward()
    run_on_processes(4, dualpipev_grads, str(tmp_path), timeout_s=60)
    for pp_rank in (0, 1):
        sequential, _, _ = torch.load(tmp_path / f"False.{pp_rank}", weights_only=False)
        overlapped, spans, met = torch.load(tmp_path / f"True.{pp_rank}", weights_only=False)
        assert spans and len(met) == len(spans) and all(met)
        assert overlapped.keys() == sequential.keys()
        for name, grad in overlapped.items():
            assert torch.equal(grad, sequential[name]), name
            torch.testing.assert_close(grad, dict(model.named_parameters())[name].grad, rtol=1e-5, atol=1e-7, msg=name)
