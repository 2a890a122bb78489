"""Pipeline parallelism on 2 gloo processes equals one process on the same micro-batches.

Every schedule (1F1B, interleaved 1F1B, zero-bubble V, DualPipeV) runs 4 micro-batches of a 4-block
MoE model with all three balance losses and one MTP module; the gradients of every parameter,
gathered from the ranks, equal those of one process that back-propagates loss / n_micro per
micro-batch; then the same with expert parallelism inside the stages (pp=2 x ep=2, 4 processes).
fp32 tolerance: the same sums in another order.
"""

from __future__ import annotations

import functools

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from conftest import small_config
from moeforge.model.transformer import Transformer
from moeforge.parallel.parallelize import apply_expert_parallel, sum_across_ranks
from moeforge.parallel.pipeline import build_pipeline, sum_tied_embedding_grads
from moeforge.parallel.spawn import run_on_processes
from moeforge.train.losses import training_losses

MICRO, N_MICRO, SEQ, MTP_WEIGHT = 2, 4, 32, 0.3
SCHEDULES = ["1f1b", "interleaved-1f1b", "zbv", "dualpipev"]


def model_config():
    overrides = {
        "model__n_layers": "4",
        "model__mtp_depth": "1",
        "model__moe__seq_aux_coef": "0.01",
        "model__moe__aux_coef": "0.01",
        "model__moe__z_loss_coef": "0.001",
    }
    return small_config(**overrides).model


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.randint(
        0, model_config().vocab_size, (MICRO * N_MICRO, SEQ + 1), generator=torch.Generator().manual_seed(1)
    )
    return tokens[:, :-1], tokens[:, 1:]


def objective(out, targets):
    return training_losses(out, targets, MTP_WEIGHT).total


def new_model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(model_config())


@pytest.fixture(scope="module")
def single_process() -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Gradients and mean loss of one process over the same micro-batches."""
    model = new_model()
    inputs, targets = batch()
    total = torch.zeros(())
    for x, y in zip(inputs.split(MICRO), targets.split(MICRO)):
        loss = objective(model(x, mtp_targets=y), y) / N_MICRO
        loss.backward()
        total += loss.detach()
    return {name: p.grad for name, p in model.named_parameters()}, total


def pipeline_grads(rank: int, out_dir: str) -> None:
    """Two steps of each schedule on a fresh model (no update between: the second must not see the
    first's state); this rank's gradients and loss terms of the second saved per schedule."""
    inputs, targets = batch()
    for schedule in SCHEDULES:
        model = new_model()
        pipe = build_pipeline(model, schedule, N_MICRO, MICRO, SEQ, objective)
        for _ in range(2):
            for param in pipe.parameters():  # the model's and the last stage's embedding copy
                param.grad = None
            pipe.moe_stats.clear()
            losses: list[torch.Tensor] = []  # (lm + mtp) / n_micro of each micro-batch, last stage only
            args = [inputs] if pipe.has_first else []
            pipe.schedule.step(*args, target=targets if pipe.has_last else None, losses=losses)
            sum_tied_embedding_grads(pipe)
        grads = {name: p.grad for c in pipe.chunks for name, p in c.named_parameters() if p.grad is not None}
        balance = sum(stats.balance_loss.detach() for _, stats in pipe.moe_stats) / N_MICRO
        torch.save((grads, sum(losses) + balance), f"{out_dir}/{schedule}.{rank}")


@pytest.fixture(scope="module")
def pipeline_runs(tmp_path_factory) -> str:
    """All schedules in one pair of processes (spawning costs more than a step of this model)."""
    out_dir = str(tmp_path_factory.mktemp("pipeline"))
    run_on_processes(2, pipeline_grads, out_dir, timeout_s=60)
    return out_dir


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_pipeline_equals_single_process(pipeline_runs, schedule, single_process):
    expected_grads, expected_loss = single_process
    got, loss = {}, torch.zeros(())
    for rank in (0, 1):
        grads, rank_loss = torch.load(f"{pipeline_runs}/{schedule}.{rank}")
        got.update(grads)  # the embedding on both ranks (loop placement): equal after the sum
        loss += rank_loss
    torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=0)
    assert got.keys() == expected_grads.keys()
    for name, expected in expected_grads.items():
        torch.testing.assert_close(got[name], expected, rtol=1e-5, atol=1e-7, msg=name)


def expert_parallel_grads(rank: int, out_dir: str) -> None:
    """pp=2 x ep=2: each schedule's stages run their experts over the ep group (all-to-all), the two
    ep ranks of a stage read alternate sequences; dense gradients averaged over them."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
    ep_group = mesh["ep"].get_group()
    inputs, targets = batch()
    ep_rank = mesh["ep"].get_local_rank()
    inputs, targets = inputs[ep_rank::2], targets[ep_rank::2]
    for schedule in SCHEDULES:
        model = new_model()
        for layer in model.moe_layers():
            apply_expert_parallel(layer, mesh["ep"])
            layer.sum_over_data_parallel = functools.partial(sum_across_ranks, group=ep_group)
        pipe = build_pipeline(model, schedule, N_MICRO, MICRO // 2, SEQ, objective, mesh["pp"].get_group())
        args = [inputs] if pipe.has_first else []
        pipe.schedule.step(*args, target=targets if pipe.has_last else None)
        sum_tied_embedding_grads(pipe)
        grads = {}
        for chunk in pipe.chunks:
            for name, param in chunk.named_parameters():
                if isinstance(param.grad, DTensor):  # experts: already a mean over ep (1/ep in backward)
                    grads[name] = param.grad.full_tensor()
                else:
                    grads[name] = sum_across_ranks(param.grad.clone(), ep_group) / 2
        if ep_rank == 0:
            torch.save(grads, f"{out_dir}/{schedule}.{mesh['pp'].get_local_rank()}")


@pytest.mark.slow
def test_pipeline_with_expert_parallel_equals_single_process(tmp_path):
    """Micro-batch i of one process = micro-batch i of both ep ranks (the batch aux loss reads the
    counts summed over them, as one process reads its whole micro-batch)."""
    model = new_model()
    inputs, targets = batch()
    for i in range(N_MICRO):
        rows = [2 * i, 2 * i + 1]  # sequence i of ep rank 0 and of ep rank 1
        x, y = inputs[rows], targets[rows]
        (objective(model(x, mtp_targets=y), y) / N_MICRO).backward()
    run_on_processes(4, expert_parallel_grads, str(tmp_path), timeout_s=60)
    for schedule in SCHEDULES:
        got = {**torch.load(tmp_path / f"{schedule}.0"), **torch.load(tmp_path / f"{schedule}.1")}
        assert got.keys() == dict(model.named_parameters()).keys(), schedule
        for name, param in model.named_parameters():
            torch.testing.assert_close(got[name], param.grad, rtol=1e-5, atol=1e-7, msg=f"{schedule} {name}")
