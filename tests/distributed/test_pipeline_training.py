"""`moeforge train` with pipeline parallelism equals one process with the same micro-batches.

The trainer cuts the model into stages (`--parallel.pp`), runs each schedule over 4 micro-batches
per step with all three balance losses and one MTP module on, and must log the same losses, reach
the same validation loss and leave the same weights as one process that back-propagates
loss / n_micro per micro-batch. Checkpoints move between pipeline layouts (pp=2 -> pp=1 and back,
pp x ep -> one process): the resumed run continues the uninterrupted one's losses.

Tolerance: as tests/distributed/test_equivalence.py (the same fp32 sums in another order; AdamW
divides by sqrt(v), which can enlarge them on parameters with tiny gradients).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from conftest import small_config
from moeforge.parallel.spawn import run_on_processes
from moeforge.run import read_metrics
from moeforge.train.trainer import Trainer

OPTIONS = {
    "train__steps": "4",
    "train__checkpoint_every": "100",
    "train__micro_batch_size": "1",
    "train__grad_clip": "0.5",
    "model__n_layers": "4",
    "model__mtp_depth": "1",
    "model__moe__aux_coef": "0.01",
    "model__moe__z_loss_coef": "0.001",
}


def options(**parallel: str) -> dict[str, str]:
    return {**OPTIONS, **{f"parallel__{key}": value for key, value in parallel.items()}}


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir)]


def val_loss(run_dir) -> float:
    return [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r][-1]


def train_and_save_stage_state(
    rank: int, world_size: int, opts: dict, out_dir: str, state_dir: str, until: int | None = None
) -> None:
    """Train; each rank saves the full tensors of its stages' parameters (keys: model names)."""
    trainer = Trainer(small_config(world_size=world_size, **opts), out_dir)
    trainer.fit(until_step=until)
    # full tensors on every rank (cpu_offload would keep them on global rank 0 only)
    full = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True))
    torch.save(full, f"{state_dir}/state.{rank}")


def train_on_processes(world_size: int, opts: dict, run_dir) -> dict[str, torch.Tensor]:
    """Train `opts` on `world_size` processes into `run_dir`; the final weights, gathered."""
    run_on_processes(world_size, train_and_save_stage_state, world_size, opts, str(run_dir), str(run_dir))
    return gathered_state(run_dir, world_size)


def assert_same_weights(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert state.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, rtol=1e-4, atol=2e-5, msg=name)


def gathered_state(state_dir, world_size: int) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for rank in range(world_size):
        state.update(torch.load(f"{state_dir}/state.{rank}"))
    return state


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """4 steps in one process: losses, validation loss and weights."""
    out = tmp_path_factory.mktemp("single")
    trainer = Trainer(small_config(**options()), out)
    trainer.fit()
    return losses(out), val_loss(out), trainer.model.state_dict()


def assert_same_run(run_dir, state, single_process) -> None:
    expected_losses, expected_val, expected_state = single_process
    assert losses(run_dir) == pytest.approx(expected_losses, rel=1e-5)
    assert val_loss(run_dir) == pytest.approx(expected_val, rel=1e-5)
    assert_same_weights(state, expected_state)


@pytest.mark.parametrize(
    "schedule",
    [
        "1f1b",
        pytest.param("interleaved-1f1b", marks=pytest.mark.slow),
        pytest.param("zbv", marks=pytest.mark.slow),
        "dualpipev",
    ],
)
def test_pipelined_training_equals_single_process(tmp_path, schedule, single_process):
    state = train_on_processes(2, options(pp="2", pp_schedule=schedule), tmp_path)
    assert_same_run(tmp_path, state, single_process)


@pytest.mark.slow
def test_uneven_stages_from_the_layout_flag_train_the_same_model(tmp_path, single_process):
    """Blocks moved off the first and last stages (they carry embedding, head and MTP module)."""
    opts = options(pp="2", pp_schedule="dualpipev", pp_stage_blocks="0,2,2,0")
    assert_same_run(tmp_path, train_on_processes(2, opts, tmp_path), single_process)


@pytest.mark.slow
def test_pipeline_with_expert_parallel_fsdp_and_overlap_equals_single_process_and_resumes_in_one(tmp_path):
    """pp=2 x ep=2 with DualPipeV on 4 processes: each stage's experts over its 2 ep ranks, its dense
    weights FSDP-sharded over them, 4 micro-batches of 1 sequence per rank, the forward and the
    backward chunk of each overlapped pair run at once (parallel.ep-overlap); 2 steps there, then one
    process resumes the checkpoint (another pipeline and EP degree) for 2 more. One process runs 4
    micro-batches of 2: the same sequences, grouped otherwise (each data-parallel rank reads a
    contiguous slice of the batch), which only the batch-wise aux loss could tell apart (its counts
    are per micro-batch), so it is off here; test_pipeline.py checks it per micro-batch."""
    batch = {"train__global_batch_size": "8", "model__moe__aux_coef": "0"}
    single = {**options(), **batch, "train__micro_batch_size": "2"}
    reference = tmp_path / "single"
    trainer = Trainer(small_config(**single), reference)
    trainer.fit()
    opts = {**options(pp="2", ep="2", pp_schedule="dualpipev", ep_overlap="true"), **batch}
    run_on_processes(4, train_and_save_stage_state, 4, opts, str(tmp_path / "run"), str(tmp_path), 2)
    resumed = Trainer(small_config(**single), tmp_path / "run")
    resumed.fit()
    expected = (losses(reference), val_loss(reference), trainer.model.state_dict())
    assert_same_run(tmp_path / "run", resumed.model.state_dict(), expected)


def test_checkpoint_moves_from_pp2_to_one_process_and_back(tmp_path, single_process):
    """Fully qualified names do not depend on the split: 2 steps on a pipeline, 2 more in one
    process; and 2 steps in one process, 2 more on a pipeline; both continue the uninterrupted run."""
    pipelined = options(pp="2", pp_schedule="dualpipev")
    run_on_processes(2, train_and_save_stage_state, 2, pipelined, str(tmp_path / "a"), str(tmp_path), 2)
    Trainer(small_config(**options()), tmp_path / "a").fit()
    assert losses(tmp_path / "a") == pytest.approx(single_process[0], rel=1e-5)

    Trainer(small_config(**options()), tmp_path / "b").fit(until_step=2)
    assert_same_run(tmp_path / "b", train_on_processes(2, pipelined, tmp_path / "b"), single_process)


@pytest.mark.slow
def test_expert_overlap_in_training_equals_no_overlap(tmp_path):
    """parallel.ep-overlap without a pipeline on 2 processes (ep=2, all balance losses on): each
    micro-batch of 2 sequences runs as two halves whose all-to-alls overlap the other half's
    compute; the run equals the same one without overlap."""
    batch = {"train__micro_batch_size": "2", "train__global_batch_size": "8"}
    plain = train_on_processes(2, {**options(ep="2"), **batch}, tmp_path / "plain")
    overlapped = train_on_processes(2, {**options(ep="2", ep_overlap="true"), **batch}, tmp_path / "overlap")
    assert losses(tmp_path / "overlap") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    assert_same_weights(overlapped, plain)


@pytest.mark.slow
def test_diloco_replicas_sit_outside_the_pipeline(tmp_path):
    """2 DiLoCo replicas x pp=2 (4 processes) run as 2 replicas of one process each: the replicas'
    outer steps see the same fragments whether their blocks sit on one rank or on two stages."""
    diloco = {"diloco__replicas": "2", "diloco__sync_every": "2", "train__global_batch_size": "8",
              "diloco__quantize": "none"}  # fp32 on the wire: the byte count below is 4 per value
    plain = train_on_processes(2, {**options(), **diloco}, tmp_path / "plain")
    pipelined = train_on_processes(4, {**options(pp="2"), **diloco}, tmp_path / "pp")
    assert losses(tmp_path / "pp") == pytest.approx(losses(tmp_path / "plain"), rel=1e-5)
    assert val_loss(tmp_path / "pp") == pytest.approx(val_loss(tmp_path / "plain"), rel=1e-5)
    assert_same_weights(pipelined, plain)
    # what data parallelism would have sent counts both stages' parameters, each once; the pipelined
    # replicas sent each stage's part, with one more stop byte per message, and the last stage's
    # copy of the embedding (MTP's) as a parameter of its own: 4 more bytes per embedding value
    plain_total, pp_total = (read_metrics(tmp_path / run)[-1]["diloco_total"] for run in ("plain", "pp"))
    assert pp_total["data_parallel_bytes_per_replica"] == plain_total["data_parallel_bytes_per_replica"]
    syncs = sum(len(r.get("diloco", [])) for r in read_metrics(tmp_path / "plain"))
    copy = 4 * plain["tok_embeddings.weight"].numel() + 1
    assert pp_total["bytes_per_replica"] == plain_total["bytes_per_replica"] + syncs * copy
