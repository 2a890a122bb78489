"""Muon (train/muon.py): Newton-Schulz against a float64 reference, one step of the whole update
against float64, experts orthogonalised one by one, the parameter grouping, a bit-exact resume and a
falling loss. The sharded equivalence: tests/distributed/test_muon_sharded.py."""

import math

import pytest
import torch

from conftest import small_config
from moeforge import checkpoint as ckpt
from moeforge.model.transformer import Transformer
from moeforge.run import read_metrics
from moeforge.train.muon import newton_schulz, orthogonalise
from moeforge.model.hidden_matrices import hidden_matrices
from moeforge.train.optim import build_optimizer
from moeforge.train.trainer import Trainer
from test_train import adamw_reference_step

QUINTIC = (3.4445, -4.7750, 2.0315)


def reference_newton_schulz(matrix: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """NS_steps in float64 through the SVD: the iteration maps each singular value s of
    G / ||G||_F to a s + b s^3 + c s^5 and keeps the singular vectors."""
    g = matrix.double()
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    s = s / torch.linalg.matrix_norm(g)
    a, b, c = QUINTIC
    for _ in range(steps):
        s = a * s + b * s**3 + c * s**5
    return u @ torch.diag(s) @ vh


def quintic_band(smallest: float) -> tuple[float, float]:
    """The range NS_5 maps normalised singular values in [smallest, 1] into (float64, on a fine grid)."""
    s = torch.logspace(math.log10(smallest), 0, 200_001, dtype=torch.float64)
    a, b, c = QUINTIC
    for _ in range(5):
        s = a * s + b * s**3 + c * s**5
    return s.min().item(), s.max().item()


def reference_halves(stack: torch.Tensor, halves: str) -> torch.Tensor:
    """Each matrix of `stack` ([A, B] or [E, A, B]) orthogonalised alone by the float64 reference,
    a fused gate/up pair as two matrices, one expert at a time."""
    if stack.ndim == 3:
        return torch.stack([reference_halves(matrix, halves) for matrix in stack])
    if halves == "none":
        return reference_newton_schulz(stack)
    dim = 0 if halves == "rows" else 1
    return torch.cat([reference_newton_schulz(half) for half in stack.chunk(2, dim=dim)], dim=dim)


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (48, 48)])
def test_newton_schulz_matches_float64_and_lands_in_the_quintic_band(shape):
    torch.manual_seed(0)
    g = torch.randn(*shape) * 3
    expected = reference_newton_schulz(g)
    torch.testing.assert_close(newton_schulz(g, dtype=torch.float64), expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(newton_schulz(g).double(), expected, rtol=0, atol=2e-5)
    inputs = torch.linalg.svdvals(g.double()) / torch.linalg.matrix_norm(g.double())
    low, high = quintic_band(min(inputs.min().item(), 2e-3))
    assert 0.68 < low and high < 1.21
    if min(shape) < max(shape):  # a rectangular Gaussian matrix is well conditioned: all inside
        singular = torch.linalg.svdvals(newton_schulz(g).double())
        assert low - 1e-4 < singular.min() and singular.max() < high + 1e-4


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (128, 512)])
def test_newton_schulz_in_bf16_lands_in_the_quintic_band_too(shape):
    """bf16 (where the run computes in bf16): its rounding moves singular values by well under 0.01."""
    torch.manual_seed(0)
    g = torch.randn(*shape) * 3
    low, high = quintic_band(2e-3)
    singular = torch.linalg.svdvals(newton_schulz(g, dtype=torch.bfloat16).double())
    assert low - 0.01 < singular.min() and singular.max() < high + 0.01


def test_a_zero_update_stays_zero():
    assert torch.equal(newton_schulz(torch.zeros(2, 8, 4)), torch.zeros(2, 8, 4))


@pytest.mark.parametrize("halves", ["none", "columns"])
def test_each_expert_is_orthogonalised_alone(halves):
    """A 3-D expert weight [E, D, 2F]: each expert's matrix (its gate and up halves apart with
    'columns') orthogonalised as if it were the only one; another expert's gradient changes nothing."""
    torch.manual_seed(0)
    stack = torch.randn(4, 16, 24)
    batched = orthogonalise(stack, halves, 5, torch.float32)
    torch.testing.assert_close(batched.double(), reference_halves(stack, halves), rtol=0, atol=2e-5)
    for e in range(4):
        alone = orthogonalise(stack[e : e + 1], halves, 5, torch.float32)[0]
        torch.testing.assert_close(batched[e], alone, rtol=1e-6, atol=1e-7)
    changed = stack.clone()
    changed[1] *= -7
    assert torch.equal(orthogonalise(changed, halves, 5, torch.float32)[0], batched[0])


def test_the_grouping_gives_muon_the_hidden_matrices_only():
    model = Transformer(small_config(model__mtp_depth="1").model)
    matrices = hidden_matrices(model)
    names = {name: matrices.get(id(p)) for name, p in model.named_parameters()}
    adamw = sorted(name for name, halves in names.items() if halves is None)
    assert all(name.endswith("norm.weight") for name in adamw if "norm" in name)
    assert [n for n in adamw if "norm" not in n] == [
        "layers.1.ffn.router.weight",
        "layers.2.ffn.router.weight",
        "mtp.0.block.ffn.router.weight",
        "output.weight",
        "tok_embeddings.weight",
    ]
    assert names["layers.0.ffn.w13.weight"] == names["layers.1.ffn.shared_experts.w13.weight"] == "rows"
    assert names["layers.1.ffn.experts.w13"] == "columns"
    assert names["layers.1.ffn.experts.w2"] == names["layers.0.attention.wq.weight"] == "none"
    assert names["mtp.0.proj.weight"] == "none"


def test_two_muon_steps_follow_the_equations():
    """build_optimizer's Muon against the whole update written out in float64 (Nesterov momentum,
    Newton-Schulz through the SVD, 0.2 sqrt(max(A, B)), decoupled decay, lr), and its AdamW groups
    against AdamW's equations, over two steps (the second uses the momentum)."""
    cfg = small_config(train__optimizer="muon")
    tcfg, mu = cfg.train, cfg.train.muon_momentum
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, tcfg)
    matrices, embedding = hidden_matrices(model), model.tok_embeddings.weight
    reference = {n: [p.detach().double().clone(), torch.zeros_like(p, dtype=torch.float64),
                     torch.zeros_like(p, dtype=torch.float64)] for n, p in model.named_parameters()}
    torch.manual_seed(1)
    for step in (1, 2):
        for name, param in model.named_parameters():
            param.grad = torch.randn_like(param)
            theta, m, v = reference[name]
            g = param.grad.double()
            if id(param) in matrices:
                halves = matrices[id(param)]
                m.mul_(mu).add_(g)  # v is unused: Muon keeps one buffer
                rows, cols = param.shape[-2] // (2 if halves == "rows" else 1), param.shape[-1]
                cols //= 2 if halves == "columns" else 1
                direction = reference_halves(g + mu * m, halves)
                theta.mul_(1 - tcfg.lr * tcfg.weight_decay).sub_(tcfg.lr * 0.2 * math.sqrt(max(rows, cols)) * direction)
                continue
            decay = tcfg.weight_decay if param.ndim >= 2 and param is not embedding else 0.0
            adamw_reference_step(theta, m, v, g, tcfg, step, decay)
        optimizer.step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach().double(), reference[name][0], rtol=1e-5, atol=1e-6, msg=name)


def test_muon_state_is_checkpointed_and_a_resume_is_bit_exact(tmp_path):
    def cfg():
        return small_config(train__steps="6", train__checkpoint_every="100", train__optimizer="muon")

    straight = Trainer(cfg(), tmp_path / "straight")
    straight.fit()
    first_half = Trainer(cfg(), tmp_path / "resumed")
    first_half.fit(until_step=3)
    saved = ckpt.latest_checkpoint(tmp_path / "resumed")
    from torch.distributed.checkpoint import FileSystemReader

    keys = FileSystemReader(str(saved)).read_metadata().state_dict_metadata
    assert "optim.state.layers.1.ffn.experts.w13.momentum_buffer" in keys
    assert "optim.state.tok_embeddings.weight.exp_avg_sq" in keys
    assert "optim.param_groups.layers.1.ffn.experts.w13.halves" in keys
    second_half = Trainer(cfg(), tmp_path / "resumed")
    second_half.fit()
    assert second_half.step == 6
    losses = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert [r["loss"] for r in read_metrics(tmp_path / "resumed")] == losses
    a, b = straight.model.state_dict(), second_half.model.state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    groups = [{k: v for k, v in g.items() if k != "params"} for g in second_half.optimizer.param_groups]
    assert groups == [{k: v for k, v in g.items() if k != "params"} for g in straight.optimizer.param_groups]


def test_resuming_with_another_optimizer_is_refused_in_one_line(tmp_path):
    Trainer(small_config(train__steps="1"), tmp_path).fit()
    with pytest.raises(ckpt.CheckpointError, match=r"train\.optimizer was 'adamw', now 'muon'") as info:
        Trainer(small_config(train__steps="2", train__optimizer="muon"), tmp_path).fit()
    assert "\n" not in str(info.value)


def test_loss_falls_with_muon(tmp_path):
    cfg = small_config(train__steps="40", train__global_batch_size="8", train__optimizer="muon")
    result = Trainer(cfg, tmp_path).fit()
    records = read_metrics(tmp_path)
    first, last = records[0]["lm_loss"], records[-1]["lm_loss"]
    assert first > 5.0
    assert last < 0.65 * first
    assert result.val_loss is not None and result.val_loss < 0.7 * first
