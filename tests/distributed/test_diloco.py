"""Streaming DiLoCo on gloo processes, against references that do not use moeforge's outer loop:
data parallelism (where DiLoCo must equal it), and two single-process replicas driven step by step
with the outer step taken by torch.optim.SGD(nesterov=True) and the streaming schedule written out
here from the paper's rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader

from conftest import small_config
from moeforge.checkpoint import load_model
from moeforge.diloco import OuterGradientNotFinite
from moeforge.diloco.fragments import split_into_fragments
from moeforge.diloco.wire import WireFormat
from moeforge.parallel.sharded_load import local_shard
from moeforge.parallel.spawn import run_on_processes
from moeforge.run import read_metrics
from moeforge.train.trainer import Trainer

DILOCO_ONLY = ("diloco__",)


def train_replicas(rank: int, world: int, options: dict, out: str, until: int | None) -> None:
    """Train (or resume) on `world` processes and save each rank's local tensors to out/rank<r>.pt."""
    trainer = Trainer(small_config(world_size=world, **options), out)
    trainer.fit(until)
    local = {name: local_shard(t).clone() for name, t in trainer.model.state_dict().items()}
    torch.save(local, Path(out) / f"rank{rank}.pt")


def rank_state(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return torch.load(out / f"rank{rank}.pt")


def without_diloco(options: dict) -> dict:
    return {k: v for k, v in options.items() if not k.startswith(DILOCO_ONLY)}


# ----------------------------------------------------------------------------------------------
# DiLoCo with H = 1, outer SGD lr 1 and plain SGD inside is data parallelism


ONE_STEP_SGD = {
    "train__steps": "4",
    "train__optimizer": "sgd",
    "train__lr": "0.5",
    "train__grad_clip": "0",  # the norm is per replica
    "model__moe__bias_update_rate": "0",  # the counts are per replica
    "model__mtp_depth": "1",
    "diloco__replicas": "2",
    "diloco__sync_every": "1",
    "diloco__outer_lr": "1",
    "diloco__outer_momentum": "0",
    "diloco__quantize": "none",  # exact: the fp32 wire (the default, int2, rounds)
}


def test_one_step_rounds_with_sgd_equal_data_parallelism(tmp_path):
    options = ONE_STEP_SGD
    run_on_processes(2, train_replicas, 2, options, str(tmp_path / "diloco"), None)
    reference = Trainer(small_config(**without_diloco(options)), tmp_path / "dp")
    reference.fit()
    for rank in (0, 1):
        state = rank_state(tmp_path / "diloco", rank)
        for name, expected in reference.model.state_dict().items():
            torch.testing.assert_close(state[name], expected, rtol=1e-5, atol=1e-6, msg=name)
    # the checkpoint's model is theta_global, which every replica ends on
    final = load_model(tmp_path / "diloco", "cpu").model.state_dict()
    for name, expected in rank_state(tmp_path / "diloco", 0).items():
        torch.testing.assert_close(final[name], expected, rtol=0, atol=0, msg=name)


def test_three_replicas_equal_data_parallelism_and_count_their_bytes(tmp_path):
    """3 replicas on 3 processes, H = 1, SGD inside and outer SGD lr 1: data parallelism over 3. Each
    sync's bytes are one message (fp32 values, fp32 router biases, the stop byte); on the wire
    the all-gather carries 2 of them out of each replica, data parallelism's all-reduce
    2 * 2/3 of its fp32 gradient."""
    options = {**ONE_STEP_SGD, "train__steps": "3", "train__global_batch_size": "6", "diloco__replicas": "3"}
    run_on_processes(3, train_replicas, 3, options, str(tmp_path / "diloco"), None)
    reference = Trainer(small_config(**without_diloco(options)), tmp_path / "dp")
    reference.fit()
    for rank in range(3):
        state = rank_state(tmp_path / "diloco", rank)
        for name, expected in reference.model.state_dict().items():
            # a mean over 3 rounds where one over 2 is exact: a few ulps on rows few replicas touched
            torch.testing.assert_close(state[name], expected, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    fragment = split_into_fragments(reference.model, 1)[0]
    values = sum(p.numel() for p in fragment.params.values())
    message = 4 * values + 4 * sum(b.numel() for b in fragment.biases.values()) + 1
    records = read_metrics(tmp_path / "diloco")
    assert [s["bytes_per_replica"] for r in records for s in r.get("diloco", [])] == [message] * 3
    total = records[-1]["diloco_total"]
    assert total["bytes_per_replica"] == 3 * message
    assert total["wire_bytes_per_replica"] == 2 * 3 * message
    assert total["data_parallel_bytes_per_replica"] == 3 * 4 * values
    assert total["data_parallel_wire_bytes_per_replica"] == pytest.approx(2 * 2 / 3 * 3 * 4 * values)


# ----------------------------------------------------------------------------------------------
# Streaming fragments, overlap and mixing against two replicas driven by hand


def fragment_rule(name: str, fragments: int) -> int:
    """Written out from the paper and the issue: blocks strided, embedding first, the rest last."""
    if name.startswith("layers."):
        return int(name.split(".")[1]) % fragments
    return 0 if name.startswith("tok_embeddings.") else fragments - 1


def reference_replicas(tmp_path: Path, options: dict, steps: int) -> list[dict[str, torch.Tensor]]:
    """Two single-process trainers, each fed its half of every global batch, synchronised by hand.

    They compute with the workers' thread count: each replica then runs the same GEMMs as its worker,
    in the same order, and only the outer step is left to the tolerance. (With this process's two
    threads a GEMM's reduction order differs, and the test failed by 1.6e-5 in one weight whenever it
    ran on its own.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(run_on_processes.__kwdefaults__["threads"])
    try:
        return _synchronised_by_hand(tmp_path, options, steps)
    finally:
        torch.set_num_threads(threads)


def _synchronised_by_hand(tmp_path: Path, options: dict, steps: int) -> list[dict[str, torch.Tensor]]:
    h, p, tau = (int(options[f"diloco__{k}"]) for k in ("sync_every", "fragments", "overlap_steps"))
    alpha = float(options["diloco__mix"])
    replicas = []
    for r in range(2):
        trainer = Trainer(small_config(**without_diloco(options)), tmp_path / f"replica{r}")
        trainer.loader.rank, trainer.loader.world_size = r, 2
        trainer.loader.local_batch_size = trainer.local_batch = trainer.micro_batch = 2
        replicas.append(trainer)
    models = [t.model for t in replicas]
    names = [n for n, _ in models[0].named_parameters()]
    bias_names = [n for n, _ in models[0].named_buffers() if n.endswith("expert_bias")]
    theta = {n: q.detach().clone().requires_grad_(True) for n, q in models[0].named_parameters()}
    outer = torch.optim.SGD(
        list(theta.values()),
        lr=float(options["diloco__outer_lr"]),
        momentum=float(options["diloco__outer_momentum"]),
        nesterov=True,
    )
    landing: dict[int, list] = {}
    for step in range(1, steps + 1):
        for trainer in replicas:
            trainer.train_step()
        for frag, (new_theta, new_biases) in landing.pop(step, {}).items():
            merge(models, frag, p, new_theta, new_biases, alpha if tau else 0.0)
        for frag in range(p):
            if step % h != frag * h // p:
                continue
            outer.zero_grad(set_to_none=True)
            for n in names:
                if fragment_rule(n, p) == frag:
                    params = [dict(m.named_parameters())[n].detach() for m in models]
                    theta[n].grad = (theta[n].detach() - params[0] + theta[n].detach() - params[1]) / 2
            outer.step()
            buffers = [dict(m.named_buffers()) for m in models]
            new_biases = {
                n: (buffers[0][n] + buffers[1][n]) / 2 for n in bias_names if fragment_rule(n, p) == frag
            }
            new_theta = {n: t.detach().clone() for n, t in theta.items() if fragment_rule(n, p) == frag}
            landing.setdefault(step + tau, {})[frag] = (new_theta, new_biases)
            if tau == 0:
                merge(models, frag, p, new_theta, new_biases, 0.0)
                landing.pop(step)
    return [m.state_dict() for m in models]


@torch.no_grad()
def merge(models, frag, p, new_theta, new_biases, alpha) -> None:
    for model in models:
        own = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        for n, value in {**new_theta, **new_biases}.items():
            own[n].copy_(alpha * own[n] + (1 - alpha) * value)


STREAMING = {
    "train__steps": "50",  # the lr schedule's length; the runs stop early
    "model__mtp_depth": "1",
    "diloco__replicas": "2",
    "diloco__sync_every": "4",
    "diloco__fragments": "2",
    "diloco__overlap_steps": "1",
    "diloco__mix": "0.3",  # not 0.5: alpha and 1 - alpha must differ
    "diloco__outer_lr": "0.7",
    "diloco__outer_momentum": "0.9",
    "diloco__quantize": "none",  # the hand-made replicas average in fp32
}


def assert_replicas_equal_hand_synchronised(tmp_path, options: dict, steps: int) -> None:
    """`steps` of 2 replicas trained by the trainer on 2 processes end where `reference_replicas`,
    driven by hand in one process, ends (every replica's parameters)."""
    run_on_processes(2, train_replicas, 2, options, str(tmp_path / "diloco"), steps)
    expected = reference_replicas(tmp_path, options, steps)
    for rank in (0, 1):
        state = rank_state(tmp_path / "diloco", rank)
        for name, value in expected[rank].items():
            torch.testing.assert_close(state[name], value, rtol=1e-4, atol=1e-5, msg=f"rank {rank}: {name}")


def test_streaming_overlapped_rounds_equal_replicas_synchronised_by_hand(tmp_path):
    steps = 9  # fragment 1 syncs after steps 2, 6; fragment 0 after 4, 8; each lands a step later
    assert_replicas_equal_hand_synchronised(tmp_path, STREAMING, steps)
    synced = [
        (r["step"], s["fragment"], s["sent_step"])
        for r in read_metrics(tmp_path / "diloco")
        for s in r.get("diloco", [])
    ]
    assert synced == [(3, 1, 2), (5, 0, 4), (7, 1, 6), (9, 0, 8)]


# ----------------------------------------------------------------------------------------------
# Checkpoints: mid-round resume is bit-exact, in FP4, with an exchange in flight


FP4 = {**STREAMING, "train__steps": "8", "diloco__quantize": "fp4-e3m0", "diloco__quantize_block": "32"}


def test_resume_mid_round_with_an_exchange_in_flight_is_bit_exact(tmp_path):
    run_on_processes(2, train_replicas, 2, FP4, str(tmp_path / "straight"), None)
    run_on_processes(
        2, train_replicas, 2, FP4, str(tmp_path / "resumed"), 4
    )  # fragment 0 sent at 4, in flight
    saved = json.loads((tmp_path / "resumed/checkpoints/step_000004/meta.json").read_text())
    assert [e["fragment"] for e in saved["extra"]["diloco"]["pending"]] == [0]
    # error feedback (on by default with a lossy codec): each replica's residuals under its own name
    assert saved["extra"]["diloco"]["outer_state"] == ["momentum", "residual"]
    keys = FileSystemReader(tmp_path / "resumed/checkpoints/step_000004").read_metadata().state_dict_metadata
    for replica in (0, 1):
        assert f"replica_{replica}.diloco.residual.layers.0.attention.wq.weight" in keys
    run_on_processes(2, train_replicas, 2, FP4, str(tmp_path / "resumed"), None)
    for rank in (0, 1):
        straight, resumed = rank_state(tmp_path / "straight", rank), rank_state(tmp_path / "resumed", rank)
        for name, value in straight.items():
            assert torch.equal(resumed[name], value), f"rank {rank}: {name}"
    losses = lambda out: [(r["step"], r["loss"]) for r in read_metrics(out)]  # noqa: E731
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    records = [s for r in read_metrics(tmp_path / "straight") for s in r.get("diloco", [])]
    assert all(0 < s["quant_error"] < 0.5 for s in records)  # FP4: coarse, but not garbage
    # the last step: fragment 0, sent at step 8, lands by replacement; fragment 1 syncs once more
    last = read_metrics(tmp_path / "straight")[-1]["diloco"]
    assert [(s["fragment"], s["sent_step"], s["mixed"]) for s in last] == [(0, 8, 0.0), (1, 8, 0.0)]


SPARSELOCO = {
    **FP4,
    "diloco__outer": "sparseloco",
    "diloco__outer_lr": "1",
    "diloco__quantize": "int2",
    "diloco__topk_fraction": "0.05",
    "diloco__topk_chunk": "512",
}


@pytest.mark.slow
def test_sparseloco_with_top_k_resumes_mid_round_bit_exactly(tmp_path):
    """SparseLoCo keeps no momentum and each replica's accumulator in its own tree; a resume with
    fragment 0's exchange in flight continues bit-equal, and the bytes are the messages' sizes."""
    run_on_processes(2, train_replicas, 2, SPARSELOCO, str(tmp_path / "straight"), None)
    run_on_processes(2, train_replicas, 2, SPARSELOCO, str(tmp_path / "resumed"), 4)
    saved = json.loads((tmp_path / "resumed/checkpoints/step_000004/meta.json").read_text())
    assert saved["extra"]["diloco"]["outer_state"] == ["residual"]
    keys = FileSystemReader(tmp_path / "resumed/checkpoints/step_000004").read_metadata().state_dict_metadata
    assert not any(key.startswith("diloco.momentum.") for key in keys)
    run_on_processes(2, train_replicas, 2, SPARSELOCO, str(tmp_path / "resumed"), None)
    for rank in (0, 1):
        straight, resumed = rank_state(tmp_path / "straight", rank), rank_state(tmp_path / "resumed", rank)
        for name, value in straight.items():
            assert torch.equal(resumed[name], value), f"rank {rank}: {name}"
    # each sync's bytes are the wire format's size of each fragment (one rank per replica here)
    model = Trainer(small_config(**without_diloco(SPARSELOCO)), tmp_path / "sizes").model
    wire = WireFormat("int2", 32, 0.05, 512)
    sizes = {}
    for fragment in split_into_fragments(model, 2):
        values = sum(p.numel() for p in fragment.params.values())
        biases = sum(b.numel() for b in fragment.biases.values())
        sizes[fragment.index] = wire.nbytes(values) + 4 * biases + 1  # the stop flag: one byte
    records = [s for r in read_metrics(tmp_path / "straight") for s in r.get("diloco", [])]
    assert [s["bytes_per_replica"] for s in records] == [sizes[s["fragment"]] for s in records]
    total = read_metrics(tmp_path / "straight")[-1]["diloco_total"]
    assert total["bytes_per_replica"] == sum(sizes[s["fragment"]] for s in records)
    assert total["wire_format"] == "top-0.05 of 512 + int2"


def outer_state_on_resume(rank: int, world: int, options: dict, out: str, until: int) -> None:
    """Resume, record the residuals as loaded (zero where the checkpoint had none), train on."""
    trainer = Trainer(small_config(world_size=world, **options), out)
    assert trainer.resume_if_possible()
    residual = trainer.diloco.feedback.residual
    Path(out, f"rank{rank}.residual.json").write_text(json.dumps(max(float(r.abs().max()) for r in residual.values())))
    trainer.fit(until)


@pytest.mark.slow
def test_error_feedback_and_the_outer_may_change_on_resume(tmp_path):
    """A checkpoint without residuals resumes with zero ones; one of the Nesterov outer resumes as
    SparseLoCo, reading its residuals and not its momentum; and back, with a zero momentum."""
    out = str(tmp_path)
    run_on_processes(2, train_replicas, 2, {**FP4, "diloco__error_feedback": "false"}, out, 4)
    run_on_processes(2, outer_state_on_resume, 2, FP4, out, 6)
    assert json.loads((tmp_path / "rank0.residual.json").read_text()) == 0.0
    run_on_processes(2, outer_state_on_resume, 2, {**FP4, "diloco__outer": "sparseloco"}, out, 7)
    assert json.loads((tmp_path / "rank0.residual.json").read_text()) > 0.0
    run_on_processes(2, outer_state_on_resume, 2, FP4, out, 8)
    meta = json.loads((tmp_path / "checkpoints/step_000008/meta.json").read_text())
    assert meta["extra"]["diloco"]["outer_state"] == ["momentum", "residual"]


# ----------------------------------------------------------------------------------------------
# A NaN in an outer gradient stops every rank, names the fragment and the step, and saves nothing


def poison_then_train(rank: int, world: int, options: dict, out: str, report: str) -> None:
    trainer = Trainer(small_config(world_size=world, **options), out)
    original = trainer.diloco.after_inner_step

    def poisoned(step: int, stop_requested: bool):
        if rank == 1 and step == 2:
            with torch.no_grad():
                trainer.model.layers[1].attention_norm.weight[0] = float("nan")
        return original(step, stop_requested)

    trainer.diloco.after_inner_step = poisoned
    try:
        trainer.fit()
    except OuterGradientNotFinite as err:
        Path(report, f"rank{rank}.txt").write_text(str(err))


def test_a_nan_outer_gradient_stops_all_ranks_naming_fragment_and_step(tmp_path):
    options = {**STREAMING, "train__steps": "6", "train__checkpoint_every": "1", "diloco__overlap_steps": "0"}
    run_on_processes(2, poison_then_train, 2, options, str(tmp_path / "run"), str(tmp_path))
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert "fragment 1 sent after step 2 is not finite" in message
    checkpoints = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert checkpoints == ["step_000001"]  # the step of the NaN was not saved


# ----------------------------------------------------------------------------------------------
# Another number of replicas on resume; replicas with expert parallelism and FSDP inside


def resume_then_train(rank: int, world: int, options: dict, out: str, until: int) -> None:
    """Resume, keep each rank's local tensors as loaded (rank<r>.resumed.pt), then train on."""
    trainer = Trainer(small_config(world_size=world, **options), out)
    assert trainer.resume_if_possible()
    local = {name: local_shard(t).clone() for name, t in trainer.model.state_dict().items()}
    torch.save(local, Path(out) / f"rank{rank}.resumed.pt")
    trainer.fit(until)


CHANGING = {**STREAMING, "train__steps": "8", "train__global_batch_size": "6", "diloco__quantize": "fp8"}


@pytest.mark.slow
def test_a_run_resumes_with_more_replicas_and_without_diloco(tmp_path, capfd):
    out = tmp_path / "run"
    run_on_processes(2, train_replicas, 2, CHANGING, str(out), 4)
    two = [rank_state(out, rank) for rank in (0, 1)]
    theta_4 = load_model(out, "cpu").model.state_dict()
    run_on_processes(3, resume_then_train, 3, {**CHANGING, "diloco__replicas": "3"}, str(out), 6)
    resumed = [torch.load(out / f"rank{rank}.resumed.pt") for rank in range(3)]
    for name in theta_4:
        for rank in (0, 1):  # the replicas the checkpoint had keep their own parameters
            assert torch.equal(resumed[rank][name], two[rank][name]), name
        assert torch.equal(resumed[2][name], theta_4[name]), name  # a new one starts from theta_global
    assert "replicas 2..2 start from theta_global" in capfd.readouterr().err

    theta_6 = load_model(out, "cpu").model.state_dict()
    plain = Trainer(small_config(**without_diloco(CHANGING)), out)
    assert plain.resume_if_possible() and plain.step == 6
    assert "continues from their theta_global" in capfd.readouterr().err
    for name, value in plain.model.state_dict().items():
        assert torch.equal(value, theta_6[name]), name
    assert plain.fit().step == 8


EP_INSIDE = {**FP4, "train__steps": "5", "parallel__ep": "2", "diloco__sync_every": "2"}


@pytest.mark.slow
def test_two_replicas_with_expert_parallelism_inside_train_and_resume_bit_exactly(tmp_path):
    run_on_processes(4, train_replicas, 4, EP_INSIDE, str(tmp_path / "straight"), None)
    run_on_processes(4, train_replicas, 4, EP_INSIDE, str(tmp_path / "resumed"), 3)
    run_on_processes(4, train_replicas, 4, EP_INSIDE, str(tmp_path / "resumed"), None)
    for rank in range(4):
        straight, resumed = rank_state(tmp_path / "straight", rank), rank_state(tmp_path / "resumed", rank)
        for name, value in straight.items():
            assert torch.equal(resumed[name], value), f"rank {rank}: {name}"
    # ranks 0, 1 are replica 0 (experts split over ep), ranks 2, 3 replica 1; all end on theta_global
    for rank in (0, 1):
        for name, value in rank_state(tmp_path / "straight", rank).items():
            assert torch.equal(rank_state(tmp_path / "straight", rank + 2)[name], value), name
    # each sync's bytes: both ranks' messages (FP4 of each rank's own shards, plus its router
    # biases and stop byte), counted from the shards the ranks hold
    one_process = {k: v for k, v in EP_INSIDE.items() if not k.startswith(("diloco__", "parallel__"))}
    model = Trainer(small_config(**one_process), tmp_path / "sizes").model
    wire = WireFormat("fp4-e3m0", 32)
    sizes = {}
    for fragment in split_into_fragments(model, 2):
        sizes[fragment.index] = 0
        for rank in (0, 1):
            shards = rank_state(tmp_path / "straight", rank)
            values = sum(shards[name].numel() for name in fragment.params)
            biases = sum(shards[name].numel() for name in fragment.biases)
            sizes[fragment.index] += wire.nbytes(values) + 4 * biases + 1
    records = [s for r in read_metrics(tmp_path / "straight") for s in r.get("diloco", [])]
    assert [s["bytes_per_replica"] for s in records] == [sizes[s["fragment"]] for s in records]
    total = read_metrics(tmp_path / "straight")[-1]["diloco_total"]
    assert total["bytes_per_replica"] == sum(s["bytes_per_replica"] for s in records)


def signal_one_replica(rank: int, world: int, options: dict, out: str) -> None:
    trainer = Trainer(small_config(world_size=world, **options), out)
    original = trainer.train_step

    def step_then_signal():
        metrics = original()
        if rank == 1 and trainer.step == 2:
            trainer._stop_signal = "SIGTERM"  # what the handler sets
        return metrics

    trainer.train_step = step_then_signal
    result = trainer.fit()
    Path(out, f"rank{rank}.json").write_text(json.dumps([result.step, result.interrupted]))


def test_a_signal_to_one_replica_stops_every_replica_at_the_same_step(tmp_path):
    run_on_processes(2, signal_one_replica, 2, {**STREAMING, "train__steps": "8"}, str(tmp_path))
    # the request is agreed inside replica 1 in step 3's all-reduce and rides on the next message,
    # fragment 0's sent after step 4, which lands (tau = 1) after step 5 on both replicas
    for rank in (0, 1):
        assert json.loads((tmp_path / f"rank{rank}.json").read_text()) == [5, True]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000005"]


def test_a_run_without_diloco_resumes_as_diloco_replicas_from_its_model(tmp_path, capfd):
    out = tmp_path / "run"
    plain = Trainer(small_config(**without_diloco(STREAMING)), out)
    plain.fit(2)
    saved = plain.model.state_dict()
    run_on_processes(2, resume_then_train, 2, STREAMING, str(out), 4)
    assert "has no DiLoCo replicas; each replica starts from its model" in capfd.readouterr().err
    for rank in (0, 1):
        resumed = torch.load(out / f"rank{rank}.resumed.pt")
        for name, value in saved.items():
            assert torch.equal(resumed[name], value), f"rank {rank}: {name}"
    assert (
        json.loads((out / "checkpoints/step_000004/meta.json").read_text())["extra"]["diloco"]["replicas"]
        == 2
    )
