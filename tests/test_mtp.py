"""Multi-token prediction: offsets, no look-ahead, the lambda schedule, droppable modules, training."""

import pytest
import torch
from conftest import small_config
from test_transformer import MLA_SHAPES, tiny_model_config

from moeforge.config import ConfigError, TrainConfig, load_config
from moeforge.model.mtp import mtp_inputs_and_labels
from moeforge.model.transformer import Transformer
from moeforge import checkpoint as ckpt
from moeforge.train.losses import weighted_mtp_loss
from moeforge.run import read_metrics
from moeforge.train.optim import mtp_lambda
from moeforge.train.trainer import Trainer


def test_depth_k_embeds_the_token_k_ahead_and_predicts_the_one_after():
    """Inputs t_0..t_7 = 10..17, targets t_1..t_8. At position i depth k reads Emb(t_{i+k}) and
    predicts t_{i+k+1} (DeepSeek-V3 eqs. 21, 23), over positions 0..S-k-1."""
    inputs = torch.arange(10, 18)[None]
    targets = torch.arange(11, 19)[None]
    assert torch.equal(targets[:, :-1], inputs[:, 1:])
    embedded, labels = mtp_inputs_and_labels(targets, depth=1)
    assert embedded.tolist() == [[11, 12, 13, 14, 15, 16, 17]] and labels.tolist() == [[12, 13, 14, 15, 16, 17, 18]]
    embedded, labels = mtp_inputs_and_labels(targets, depth=2)
    assert embedded.tolist() == [[12, 13, 14, 15, 16, 17]] and labels.tolist() == [[13, 14, 15, 16, 17, 18]]
    embedded, labels = mtp_inputs_and_labels(targets, depth=3)
    assert embedded[0, 0] == 10 + 0 + 3 and labels[0, 0] == 10 + 0 + 3 + 1


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_depth_k_logits_at_position_i_never_see_tokens_past_i_plus_k(attention):
    torch.manual_seed(0)
    model = Transformer(tiny_model_config(mtp_depth=3, **(MLA_SHAPES if attention == "mla" else {}))).eval()
    tokens = torch.randint(0, 50, (1, 14))  # t_0..t_13
    changed = tokens.clone()
    first_changed = 7
    changed[:, first_changed:] = (changed[:, first_changed:] + 7) % 50
    outputs = []
    for seq in (tokens, changed):
        outputs.append(model(seq[:, :-1], mtp_targets=seq[:, 1:]).mtp_logits)
    assert [logits.shape[1] for logits in outputs[0]] == [12, 11, 10]
    for depth, (a, b) in enumerate(zip(*outputs), start=1):
        unaffected = first_changed - depth  # positions i with i + depth < first_changed
        torch.testing.assert_close(a[:, :unaffected], b[:, :unaffected])
        assert not torch.allclose(a[:, unaffected:], b[:, unaffected:])


def test_lambda_schedule_switches_at_the_stated_fraction():
    cfg = TrainConfig(steps=100, mtp_lambda=0.3, mtp_lambda_late=0.1, mtp_lambda_switch=0.7)
    assert [mtp_lambda(step, cfg) for step in (0, 69, 70, 99)] == [0.3, 0.3, 0.1, 0.1]
    losses = [torch.tensor(2.0), torch.tensor(4.0)]
    assert float(weighted_mtp_loss(losses, 0.3)) == pytest.approx(0.3 / 2 * (2.0 + 4.0))
    assert float(weighted_mtp_loss([], 0.3)) == 0.0


def test_dropping_the_mtp_modules_leaves_main_logits_unchanged():
    torch.manual_seed(0)
    with_mtp = Transformer(tiny_model_config(mtp_depth=2)).eval()
    without = Transformer(tiny_model_config(mtp_depth=0)).eval()
    main_state = {k: v for k, v in with_mtp.state_dict().items() if not k.startswith("mtp.")}
    assert len(main_state) < len(with_mtp.state_dict())
    without.load_state_dict(main_state)
    tokens = torch.randint(0, 50, (2, 12))
    reference = with_mtp(tokens).logits
    assert torch.equal(without(tokens).logits, reference)
    with torch.no_grad():
        for param in with_mtp.mtp.parameters():
            param.add_(1.0)
    assert torch.equal(with_mtp(tokens).logits, reference)


def test_trainer_adds_logs_and_checkpoints_the_mtp_loss(tmp_path):
    cfg = small_config(train__steps="3", model__mtp_depth="2", model__attention="mla", train__mtp_lambda="0.5")
    trainer = Trainer(cfg, tmp_path)
    trainer.fit()
    record = read_metrics(tmp_path)[-1]
    assert {"mtp_loss", "mtp/1", "mtp/2", "mtp_lambda"} <= set(record)
    assert record["mtp_loss"] == pytest.approx(0.5 / 2 * (record["mtp/1"] + record["mtp/2"]), rel=1e-5)
    assert record["loss"] == pytest.approx(record["lm_loss"] + record["aux_loss"] + record["mtp_loss"], rel=1e-5)
    assert record["mtp/1"] > 3.0  # untrained bytes: near ln(256)
    assert len(record["load"]) == cfg.model.n_layers - cfg.model.n_dense_layers + 2  # + the MTP MoE blocks
    fresh = Transformer(cfg.model)
    ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), fresh)
    for (name, saved), loaded in zip(trainer.model.mtp.state_dict().items(), fresh.mtp.state_dict().values()):
        assert torch.equal(saved, loaded), name


def test_mtp_settings_are_validated():
    with pytest.raises(ConfigError, match=r"^model.mtp-depth: got -1; allowed: an integer >= 0$"):
        load_config(overrides={"model.mtp-depth": "-1"})
    with pytest.raises(ConfigError, match=r"^train.seq-len: got 2; allowed: more than model.mtp-depth=2"):
        load_config(overrides={"model.mtp-depth": "2", "train.seq-len": "2"})
    with pytest.raises(ConfigError, match=r"^train.mtp-lambda-switch: got 1.5; allowed: a number in \[0, 1\]$"):
        load_config(overrides={"train.mtp-lambda-switch": "1.5"})
