"""--train.activation-checkpoint and --train.compile: the same training as without them (fp32), the
load counts and bias updates counted once, and the combinations that cannot work refused in one line."""

import pytest
import torch

from conftest import small_config
from moeforge.config import ConfigError
from moeforge.model.mlp import swiglu
from moeforge.model.moe import MoE
from moeforge.model.moe.experts import RoutedExperts
from moeforge.model.transformer import Block, Transformer
from moeforge.parallel.regional import apply_block_wrappers, recomputing
from moeforge.train.trainer import Trainer

# jitter on: the recomputed router must draw the same noise; MTP on: its block is wrapped too
AC_MODEL = {"model__moe__jitter": "0.1", "model__mtp_depth": "1", "train__steps": "3"}


def _train(trainer):
    """(losses and load counts of each step, final weights and biases) of train.steps steps."""
    steps = [trainer.train_step() for _ in range(trainer.cfg.train.steps)]
    losses = [(m["loss"], m["lm_loss"], m["aux_loss"], m.get("mtp_loss", 0.0)) for m in steps]
    loads = [[layer["tokens_per_expert"] for layer in m["load"]] for m in steps]
    state = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    return losses, loads, state


def test_activation_checkpointing_changes_nothing_but_memory(tmp_path):
    plain = _train(Trainer(small_config(**AC_MODEL), tmp_path / "none"))
    for mode in ("experts", "block"):
        cfg = small_config(train__activation_checkpoint=mode, **AC_MODEL)
        losses, loads, state = _train(Trainer(cfg, tmp_path / mode))
        assert losses == plain[0], mode
        assert loads == plain[1], mode  # counted once per step, not again by the recomputation
        for name, value in plain[2].items():
            torch.testing.assert_close(state[name], value, rtol=0, atol=1e-6, msg=f"{mode}: {name}")
    assert any(k.endswith("expert_bias") and v.abs().sum() > 0 for k, v in plain[2].items())


def test_block_checkpointing_recomputes_the_block_and_marks_it(tmp_path):
    trainer = Trainer(small_config(train__activation_checkpoint="block", **AC_MODEL), tmp_path)
    seen = []
    moe = next(m for m in trainer.model.modules() if isinstance(m, MoE))
    moe.register_forward_hook(lambda *_: seen.append(recomputing()))
    with torch.utils.checkpoint.set_checkpoint_early_stop(False):  # recompute the whole block
        trainer.train_step()
    assert seen == [False, True]  # the forward, then its recomputation in the backward


def test_wrapped_blocks_keep_their_names():
    cfg = small_config().model
    plain = Transformer(cfg).state_dict().keys()
    for mode in ("experts", "block"):
        wrapped = Transformer(cfg)
        apply_block_wrappers(wrapped, mode, compile=True)
        assert wrapped.state_dict().keys() == plain
        assert [n for n, _ in wrapped.named_moe_layers()] == [n for n, _ in Transformer(cfg).named_moe_layers()]


@pytest.mark.parametrize(
    "overrides",
    [
        {"parallel__pp": "2", "parallel__pp_schedule": "zbv", "model__n_layers": "4"},
        {"parallel__pp": "2", "parallel__pp_schedule": "dualpipev", "model__n_layers": "4"},
    ],
)
def test_compile_with_a_split_backward_schedule_is_one_line(overrides):
    with pytest.raises(ConfigError, match=r"^train\.compile: got True; allowed: false with parallel\.pp-schedule"):
        small_config(world_size=2, train__compile="true", train__micro_batch_size="1", **overrides)


def test_compile_under_a_1f1b_pipeline_is_allowed():
    small_config(world_size=2, train__compile="true", train__micro_batch_size="1", parallel__pp="2")


def test_bad_activation_checkpoint_value_is_one_line():
    with pytest.raises(ConfigError, match=r"^train\.activation-checkpoint: got 'all'; allowed: 'none' \| 'experts'"):
        small_config(train__activation_checkpoint="all")


def test_compile_and_block_checkpointing_with_ep_overlap_are_refused():
    with pytest.raises(ConfigError, match=r"^train\.compile: got True; allowed: false with parallel\.ep-overlap"):
        small_config(train__compile="true", parallel__ep_overlap="true")
    with pytest.raises(ConfigError, match=r"^train\.activation-checkpoint: got 'block'"):
        small_config(train__activation_checkpoint="block", parallel__ep_overlap="true")


COMPILED_MODELS = {
    "gqa": {},
    "mla": {
        "model__attention": "mla", "model__q_lora_rank": "32", "model__kv_lora_rank": "32",
        "model__qk_nope_head_dim": "16", "model__qk_rope_head_dim": "8", "model__v_head_dim": "16",
    },
}  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("attention", sorted(COMPILED_MODELS))
def test_compiled_blocks_train_like_eager(tmp_path, attention):
    overrides = {"train__steps": "3", **COMPILED_MODELS[attention]}
    eager = _train(Trainer(small_config(**overrides), tmp_path / "eager"))
    torch._dynamo.reset()
    trainer = Trainer(small_config(train__compile="true", **overrides), tmp_path / "compiled")
    blocks = [m for m in trainer.model.modules() if isinstance(m, Block)]
    assert blocks and all(b._compiled_call_impl is not None for b in blocks)
    experts = [m for m in trainer.model.modules() if isinstance(m, RoutedExperts)]
    assert experts and all(e.activation is not swiglu for e in experts)  # compiled between eager GEMMs
    compiled = _train(trainer)
    assert compiled[1] == eager[1]  # same routing, same counts
    torch.testing.assert_close(compiled[0], eager[0], rtol=1e-4, atol=1e-5)
    for name, value in eager[2].items():
        torch.testing.assert_close(compiled[2][name], value, rtol=1e-3, atol=1e-4, msg=name)


@pytest.mark.slow
def test_a_lone_compiled_moe_layer_matches_eager():
    """`compile_moe` (what `bench moe --compile` times): the same output, balance loss and gradients
    as the eager layer with the same weights, its fp32 experts' SwiGLU compiled between eager GEMMs."""
    from moeforge.config import MoEConfig
    from moeforge.parallel.regional import compile_moe

    cfg = MoEConfig(dim=32, n_experts=8, top_k=2, expert_ffn_dim=16, n_shared_experts=1, seq_aux_coef=1e-3)
    torch.manual_seed(0)
    eager = MoE(cfg).train()
    compiled = MoE(cfg).train()
    compiled.load_state_dict(eager.state_dict())
    torch._dynamo.reset()
    compile_moe(compiled)
    assert compiled.experts.activation is not swiglu
    x = torch.randn(2, 24, 32)
    results = []
    for layer in (eager, compiled):
        leaf = x.clone().requires_grad_()
        out, stats = layer(leaf)
        (out.square().sum() + stats.balance_loss).backward()
        grads = {name: p.grad for name, p in layer.named_parameters()}
        results.append((out, stats.balance_loss, stats.tokens_per_expert, leaf.grad, grads))
    (out_e, loss_e, counts_e, dx_e, grads_e), (out_c, loss_c, counts_c, dx_c, grads_c) = results
    assert torch.equal(counts_c, counts_e)
    torch.testing.assert_close(out_c, out_e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(dx_c, dx_e, rtol=1e-4, atol=1e-5)
    for name, grad in grads_e.items():
        torch.testing.assert_close(grads_c[name], grad, rtol=1e-4, atol=1e-5, msg=name)
