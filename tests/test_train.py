"""The trainer: schedules, a falling loss, bit-exact resume, atomic checkpoints, clean failures."""

import hashlib
import json

import pytest
import torch

from conftest import small_config
from moeforge.config import TrainConfig
from moeforge.model.transformer import Transformer
from moeforge.parallel import clip_grad_norm_
from moeforge import checkpoint as ckpt
from moeforge.run import read_metrics
from moeforge.train.optim import lr_factor
from moeforge.train.trainer import Trainer, TrainingDiverged


def test_cosine_schedule_endpoints():
    cfg = TrainConfig(steps=110, warmup_steps=10, lr=1.0, min_lr_ratio=0.1, schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(60, cfg) == pytest.approx(0.55)
    assert lr_factor(110, cfg) == pytest.approx(0.1)


def test_wsd_schedule_is_flat_then_linear():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.0, schedule="wsd", decay_fraction=0.2)
    assert lr_factor(50, cfg) == 1.0 and lr_factor(79, cfg) == 1.0
    assert lr_factor(90, cfg) == pytest.approx(0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.0)


def test_loss_falls_well_below_start_on_embedded_corpus(tmp_path):
    cfg = small_config(train__steps="60", train__lr="3e-3", train__global_batch_size="8")
    result = Trainer(cfg, tmp_path).fit()
    records = read_metrics(tmp_path)
    first, last = records[0]["lm_loss"], records[-1]["lm_loss"]
    assert first > 5.0  # ~ln(256): an untrained byte model
    assert last < 0.62 * first
    assert result.val_loss is not None and result.val_loss < 0.7 * first
    needed = {"step", "loss", "lm_loss", "tokens_per_s", "load", "aux_loss", "lr", "model_tflops"}
    assert needed <= set(records[-1])
    layer0 = records[-1]["load"][0]
    assert sum(layer0["tokens_per_expert"]) == 8 * 32 * 2  # dropless: every token reaches top-k experts
    assert (tmp_path / "tensorboard").is_dir() and any((tmp_path / "tensorboard").iterdir())


def _final_state(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def test_resume_is_bit_exact(tmp_path):
    def cfg():
        return small_config(train__steps="8", train__checkpoint_every="100", model__moe__jitter="0.1")

    straight = Trainer(cfg(), tmp_path / "straight")
    straight.fit()
    first_half = Trainer(cfg(), tmp_path / "resumed")
    first_half.fit(until_step=4)
    assert ckpt.latest_checkpoint(tmp_path / "resumed").name == "step_000004"
    second_half = Trainer(cfg(), tmp_path / "resumed")
    second_half.fit()
    assert second_half.step == 8
    losses = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert [r["loss"] for r in read_metrics(tmp_path / "resumed")] == losses
    a, b = _final_state(straight), _final_state(second_half)
    for name in a:
        assert torch.equal(a[name], b[name]), name
    biases = [k for k in a if k.endswith("expert_bias")]
    assert biases and any(a[k].abs().sum() > 0 for k in biases)


def test_checkpoints_are_atomic_and_pruned(tmp_path):
    cfg = small_config(train__steps="6", train__checkpoint_every="2", train__keep_checkpoints="2")
    Trainer(cfg, tmp_path).fit()
    names = [p.name for p in ckpt.list_checkpoints(tmp_path)]
    assert names == ["step_000004", "step_000006"]
    leftover = ckpt.checkpoint_dir(tmp_path) / "step_000008.tmp"
    leftover.mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step_000006"
    meta = json.loads((ckpt.latest_checkpoint(tmp_path) / "meta.json").read_text())
    assert meta["step"] == 6 and meta["extra"]["data"]["sequences_consumed"] == 6 * 4


def test_a_run_killed_in_its_first_save_logs_each_step_once_when_rerun(tmp_path, monkeypatch):
    """A kill -9 while the first checkpoint is written leaves steps 1-2 in metrics.jsonl and no
    checkpoint: the rerun starts at step 0 and must not log steps 1-2 a second time."""
    cfg = small_config(train__steps="4", train__checkpoint_every="2")

    def killed(*args, **kwargs):
        raise SystemExit("killed while saving")  # what the disk holds after the kill: no checkpoint

    monkeypatch.setattr(ckpt.store.dcp, "save", killed)
    with pytest.raises(SystemExit):
        Trainer(cfg, tmp_path).fit()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2] and ckpt.latest_checkpoint(tmp_path) is None
    monkeypatch.undo()
    Trainer(small_config(train__steps="4", train__checkpoint_every="2"), tmp_path).fit()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_a_checkpoint_with_positional_optimizer_groups_still_resumes_exactly(tmp_path, monkeypatch):
    """Checkpoints written before optimizer state was saved by parameter name hold torch's positional
    layout (`optim.param_groups.0.lr`, the group's names in `...0.params`): they load as written."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    def cfg():
        return small_config(train__steps="4", train__checkpoint_every="2")

    def positional(model, optimizers, options=None):
        return get_state_dict(model, optimizers, options=StateDictOptions(flatten_optimizer_state_dict=False))

    Trainer(cfg(), tmp_path / "straight").fit()
    monkeypatch.setattr(ckpt.store, "get_state_dict", positional)
    Trainer(cfg(), tmp_path / "resumed").fit(until_step=2)
    monkeypatch.undo()
    old = ckpt.latest_checkpoint(tmp_path / "resumed")  # as such a version wrote it: format 1, no hash
    meta = json.loads((old / ckpt.META_FILE).read_text())
    del meta["format"]
    (old / ckpt.META_FILE).write_text(json.dumps(meta))
    (old / "meta.sha256").unlink()
    keys = FileSystemReader(str(old)).read_metadata().state_dict_metadata
    assert "optim.param_groups.0.params" in keys and "optim.param_groups.0.betas" in keys
    resumed = Trainer(cfg(), tmp_path / "resumed")
    resumed.fit()
    assert [g["betas"] for g in resumed.optimizer.param_groups] == [(0.9, 0.95)] * 2
    straight = [r["loss"] for r in read_metrics(tmp_path / "straight")]
    assert [r["loss"] for r in read_metrics(tmp_path / "resumed")] == straight


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = small_config(train__steps="6", train__checkpoint_every="2")
    trainer = Trainer(cfg, tmp_path)
    trainer.fit(until_step=2)
    with torch.no_grad():
        trainer.model.tok_embeddings.weight.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="loss is nan at step 3; the last good checkpoint .*step_000002"):
        trainer.fit()
    resumed = Trainer(small_config(train__steps="6", train__checkpoint_every="2"), tmp_path)
    assert resumed.resume_if_possible() and resumed.step == 2
    assert torch.isfinite(resumed.model.tok_embeddings.weight).all()


def test_resuming_a_different_model_is_refused(tmp_path):
    Trainer(small_config(train__steps="2"), tmp_path).fit()
    other = Trainer(small_config(train__steps="4", model__moe__n_experts="4", model__moe__n_groups="2"), tmp_path)
    with pytest.raises(ckpt.CheckpointError, match=r"model\.moe\.n-experts was 8, now 4"):
        other.fit()


def test_loading_into_a_model_it_does_not_fit_is_a_one_line_error(tmp_path):
    Trainer(small_config(train__steps="1"), tmp_path).fit()
    other = Transformer(small_config(model__dim="32").model)
    with pytest.raises(ckpt.CheckpointError, match=r"it does not fit this model: Size mismatch .*tok_embeddings"):
        ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), other)


def test_gradient_accumulation_matches_one_big_batch(tmp_path):
    whole = Trainer(small_config(train__steps="3"), tmp_path / "a")
    whole.fit()
    split = Trainer(small_config(train__steps="3", train__micro_batch_size="1"), tmp_path / "b")
    split.fit()
    a, b = _final_state(whole), _final_state(split)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)


def adamw_reference_step(theta, m, v, g, tcfg: TrainConfig, step: int, decay: float) -> None:
    """One AdamW step in float64, in place (Loshchilov & Hutter: decoupled decay; Kingma & Ba:
    bias-corrected moments, eps 1e-8): theta, m, v updated for gradient g at step `step` (from 1)."""
    theta.mul_(1 - tcfg.lr * decay)
    m.mul_(tcfg.beta1).add_((1 - tcfg.beta1) * g)
    v.mul_(tcfg.beta2).add_((1 - tcfg.beta2) * g * g)
    m_hat, v_hat = m / (1 - tcfg.beta1**step), v / (1 - tcfg.beta2**step)
    theta.sub_(tcfg.lr * m_hat / (v_hat.sqrt() + 1e-8))


def test_fused_adamw_follows_the_equations():
    """build_optimizer's AdamW (fused on the CPU) against AdamW written out in fp64 (Loshchilov &
    Hutter: decoupled decay; Kingma & Ba: bias-corrected moments), three steps, decay on matrices only."""
    from moeforge.train.optim import build_optimizer

    cfg = small_config()
    model = Transformer(cfg.model)
    optimizer = build_optimizer(model, cfg.train)
    assert optimizer.defaults["fused"]
    tcfg = cfg.train
    embedding = model.tok_embeddings.weight
    reference = {n: (p.detach().double().clone(), torch.zeros_like(p, dtype=torch.float64),
                     torch.zeros_like(p, dtype=torch.float64)) for n, p in model.named_parameters()}
    torch.manual_seed(1)
    for step in range(1, 4):
        for name, param in model.named_parameters():
            param.grad = torch.randn_like(param)
            theta, m, v = reference[name]
            g = param.grad.double()
            decay = tcfg.weight_decay if param.ndim >= 2 and param is not embedding else 0.0
            adamw_reference_step(theta, m, v, g, tcfg, step, decay)
        optimizer.step()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach().double(), reference[name][0], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("max_norm", [1e-3, float("inf")])
def test_clip_grad_norm_in_one_process_against_a_float64_norm(max_norm):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape)) for shape in [(33, 7), (5,), (4, 3, 2)]]
    for p in params:
        p.grad = torch.randn_like(p) * 3
    params.append(torch.nn.Parameter(torch.randn(2)))  # no gradient: skipped
    before = [p.grad.double().clone() for p in params[:3]]
    expected = torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in before]))
    norm = clip_grad_norm_(params, max_norm)
    torch.testing.assert_close(norm.double(), expected, rtol=1e-6, atol=0)
    scale = min(1.0, max_norm / (expected.item() + 1e-6))
    for p, g in zip(params, before):
        torch.testing.assert_close(p.grad.double(), g * scale, rtol=1e-6, atol=0)


def test_metrics_reach_weights_and_biases_offline(tmp_path, monkeypatch):
    """train.wandb-project logs every metrics.jsonl record's scalars to a W&B run (offline here: no
    network; what reaches `Run.log` is recorded on its way through), whose id follows the run
    directory so that a resume continues it."""
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    logged = []
    real_log = wandb.Run.log

    def recorded(run, data, step=None, **kwargs):
        logged.append((step, dict(data)))
        return real_log(run, data, step=step, **kwargs)

    monkeypatch.setattr(wandb.Run, "log", recorded)
    cfg = small_config(train__steps="3", train__wandb_project="moeforge-test")
    Trainer(cfg, tmp_path / "run").fit()
    records = read_metrics(tmp_path / "run")
    assert [step for step, _ in logged] == [r["step"] for r in records] == [1, 2, 3]
    for (_, data), record in zip(logged, records):
        assert data["loss"] == record["loss"] and data["lm_loss"] == record["lm_loss"]
        assert data["load/0/max_violation"] == record["load"][0]["max_violation"]
    run_id = hashlib.sha256(str((tmp_path / "run").resolve()).encode()).hexdigest()[:16]
    (offline,) = (tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}")
    assert (offline / f"run-{run_id}.wandb").stat().st_size > 0
