"""Muon on sharded parameters (gloo processes): the orthogonalisation of a sharded stack of matrices
equals that of the whole stack, moving data only where a shard cuts through matrices; training with
Muon under FSDP2 + EP equals one process; Streaming DiLoCo with Muon inside equals two replicas
synchronised by hand.

Tolerance of the training runs: as tests/distributed/test_equivalence.py (the same fp32 gradients
summed in another order, ~1e-7 relative per step; Newton-Schulz divides by the Frobenius norm and its
polynomial has slope up to 3.4 at small singular values, which may enlarge such differences a little).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from torch.distributed.tensor.debug import CommDebugMode

from conftest import small_config
from moeforge.parallel.spawn import run_on_processes
from moeforge.parallel.whole_matrices import on_whole_matrices
from moeforge.run import read_metrics
from moeforge.train.muon import orthogonalise
from moeforge.train.trainer import Trainer
from test_diloco import STREAMING, assert_replicas_equal_hand_synchronised
from test_equivalence import overrides, train_and_save_full_state
from test_pipeline_training import assert_same_weights, losses, train_on_processes
from test_pipeline_training import options as pipeline_options

CASES = [  # (shape, sharded dim, halves, collectives expected)
    ((24, 16), 0, "rows", True),  # a dense w13 under FSDP: rows split
    ((16, 24), 1, "none", True),
    ((4, 16, 24), 0, "columns", False),  # experts split by whole experts: nothing moves
    ((4, 16, 24), 1, "none", True),
]


def orthogonalise_shards(rank: int, world: int, out: str) -> None:
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("dp_shard",))
    torch.manual_seed(0)
    report = {}
    for shape, dim, halves, _ in CASES:
        whole = torch.randn(*shape)
        fn = lambda m, halves=halves: orthogonalise(m, halves, 5, torch.float32)  # noqa: E731
        sharded = distribute_tensor(whole, mesh, [Shard(dim)])
        with CommDebugMode() as comm:
            result = on_whole_matrices(fn, sharded)
        assert result.placements == sharded.placements and result.shape == whole.shape
        report[(shape, dim)] = (result.full_tensor(), fn(whole), comm.get_total_counts())
    if rank == 0:
        torch.save(report, Path(out) / "report.pt")


def test_a_sharded_stack_is_orthogonalised_on_whole_matrices(tmp_path):
    run_on_processes(2, orthogonalise_shards, 2, str(tmp_path))
    report = torch.load(tmp_path / "report.pt")
    for shape, dim, _, moves in CASES:
        gathered, whole, collectives = report[(shape, dim)]
        assert torch.equal(gathered, whole), (shape, dim)
        assert (collectives > 0) == moves, (shape, dim, collectives)


def muon(**parallel: str) -> dict[str, str]:
    return {**overrides(**parallel), "train__optimizer": "muon"}


LAYOUTS = [
    pytest.param(2, {"ep": "2"}, id="2proc-shard2-ep2"),
    pytest.param(4, {"dp_shard": "4", "ep": "2"}, id="4proc-shard4-ep2", marks=pytest.mark.slow),
    pytest.param(
        4, {"dp_replicate": "2", "dp_shard": "2", "ep": "2"}, id="4proc-hsdp-replicate2-shard2-ep2",
        marks=pytest.mark.slow,
    ),
]


@pytest.mark.parametrize("world_size, parallel", LAYOUTS)
def test_muon_under_fsdp_and_expert_parallelism_equals_one_process(tmp_path, world_size, parallel):
    """2 processes: the dense weights FSDP-sharded by rows over dp_shard 2 (gathered for
    Newton-Schulz), the experts split over ep 2. 4 processes: the experts also FSDP-sharded over
    efsdp 2 (`_StridedShard` of the expert dim: still whole experts on each rank). HSDP: rows split
    over dp_shard 2 only, the two replicas each orthogonalising whole matrices of their own (the
    replicate dim cuts no matrix, so nothing is gathered over it)."""
    reference = Trainer(small_config(**muon()), tmp_path / "single")
    reference.fit()
    reference_losses = [r["loss"] for r in read_metrics(tmp_path / "single")]
    out, state_path = tmp_path / "dist", tmp_path / "state.pt"
    run_on_processes(world_size, train_and_save_full_state, world_size, muon(**parallel), str(out), str(state_path))
    assert [r["loss"] for r in read_metrics(out)] == pytest.approx(reference_losses, rel=1e-5)
    state = torch.load(state_path)
    for name, expected in reference.model.state_dict().items():
        torch.testing.assert_close(state[name], expected, rtol=1e-4, atol=2e-5, msg=name)


@pytest.mark.slow
def test_muon_over_pipeline_stages_equals_one_process(tmp_path):
    """pp 2 (1F1B, an MTP module on the last stage): each rank's optimizer groups its own stage's
    parameters, the output head and the embedding among AdamW's."""
    opts = {**pipeline_options(), "train__optimizer": "muon"}
    reference = Trainer(small_config(**opts), tmp_path / "single")
    reference.fit()
    state = train_on_processes(2, {**opts, "parallel__pp": "2", "parallel__pp_schedule": "1f1b"}, tmp_path / "pp")
    assert losses(tmp_path / "pp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
    assert_same_weights(state, reference.model.state_dict())


def test_streaming_diloco_with_muon_inside_equals_replicas_synchronised_by_hand(tmp_path):
    """Each replica's inner optimizer is Muon (MuLoCo's choice, arXiv 2505.23725); the hand-driven
    replicas build theirs with the trainer's `build_optimizer` too, so the outer loop is what is tested."""
    assert_replicas_equal_hand_synchronised(tmp_path, {**STREAMING, "train__optimizer": "muon"}, 5)
