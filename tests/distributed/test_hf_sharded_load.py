"""Hugging Face checkpoints load straight into expert-parallel shards: each rank reads from the
safetensors files only its own experts (and its FSDP rows of the rest), and the sharded model equals
the single-process import bit for bit, logits included."""

from __future__ import annotations

import re

import pytest
import torch
from torch.distributed.tensor import DTensor

from moeforge.parallel.spawn import run_on_processes
from moeforge.config import ParallelConfig, load_config
from moeforge.interop import apply_hf_model, from_hf, hf_model_config, hf_weights_loader, load_hf_weights
from moeforge.model.transformer import Transformer
from moeforge.parallel import build_mesh, parallelize
from moeforge.train.trainer import Trainer

pytest.importorskip("transformers")  # the tests import hf_models inside, so the spawned ranks need not

EXPERT_TENSOR = re.compile(r"\.experts\.(\d+)\.")


def save_reference(hf_dir, path) -> None:
    """The single-process import's state and logits, for the ranks to compare against."""
    model = from_hf(hf_dir, progress=False)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits = model(ids).logits
    torch.save({"state": model.state_dict(), "tokens": ids, "logits": logits}, path)


def own_experts(n_experts: int, mesh) -> set[int]:
    """The experts a rank holds: its ep block of E/ep, and of that block its share over efsdp."""
    per_ep = n_experts // mesh["ep"].size()
    per_rank = per_ep // mesh["efsdp"].size()
    start = mesh["ep"].get_local_rank() * per_ep + mesh["efsdp"].get_local_rank() * per_rank
    return set(range(start, start + per_rank))


def assert_equals_reference(model: Transformer, reference: dict) -> None:
    for name, tensor in model.state_dict().items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        assert torch.equal(full, reference["state"][name]), name


def load_into_shards(rank: int, world_size: int, parallel: dict, hf_dir: str, reference_path: str) -> None:
    reference = torch.load(reference_path)
    cfg = hf_model_config(hf_dir)
    model = Transformer(cfg)
    mesh = build_mesh(ParallelConfig(**parallel), world_size, "cpu")
    parallelize(model, mesh)
    read = load_hf_weights(model, hf_dir, progress=False, mesh=mesh)

    if mesh["dp_replicate"].get_local_rank() > 0:
        assert read == {}  # HSDP: replica 0 reads, the others receive their shards from it
    else:
        experts_read = [int(match.group(1)) for name in read if (match := EXPERT_TENSOR.search(name))]
        mine = own_experts(cfg.moe.n_experts, mesh)
        moe_layers = sum(1 for _ in model.moe_layers())
        assert set(experts_read) == mine
        assert len(experts_read) == moe_layers * len(mine) * 3  # gate, up and down of each, nothing else
    assert_equals_reference(model, reference)
    with torch.no_grad():
        logits = model.eval()(reference["tokens"]).logits
    torch.testing.assert_close(logits, reference["logits"], rtol=1e-5, atol=1e-5)


def train_from_hf_then_compare(rank: int, world_size: int, hf_dir: str, reference_path: str, out: str) -> None:
    load_into_shards(rank, world_size, {"ep": 2}, hf_dir, reference_path)
    overrides = {"train.init-from-hf": hf_dir, "parallel.ep": "2", "train.seq-len": "16",
                 "train.global-batch-size": "2", "train.progress": "false", "train.report": "false"}  # fmt: skip
    cfg = load_config(overrides=overrides, world_size=world_size, apply_init_from=apply_hf_model)
    trainer = Trainer(cfg, out, init_weights=hf_weights_loader(cfg))
    assert_equals_reference(trainer.model, torch.load(reference_path))


def test_expert_parallel_ranks_load_only_their_experts_and_equal_one_process(tmp_path):
    """Two processes, ep=2: directly and through `moeforge train --init-from-hf` (build, parallelize, load)."""
    from hf_models import qwen3_config, save_hf_model

    save_hf_model(qwen3_config(), tmp_path / "hf")
    save_reference(tmp_path / "hf", tmp_path / "reference.pt")
    run_on_processes(
        2, train_from_hf_then_compare, 2, str(tmp_path / "hf"), str(tmp_path / "reference.pt"), str(tmp_path / "run")
    )


@pytest.mark.slow
def test_deepseek_with_mtp_loads_into_fsdp_and_expert_shards(tmp_path):
    """Four processes, dp_shard=4 x ep=2: experts split over ep and efsdp, MLA's permuted RoPE rows and
    the MTP layer (its experts, swapped projection halves, repeated head) split by FSDP."""
    from hf_models import save_deepseek_with_mtp

    save_deepseek_with_mtp(tmp_path / "hf")
    save_reference(tmp_path / "hf", tmp_path / "reference.pt")
    run_on_processes(
        4, load_into_shards, 4, {"dp_shard": 4, "ep": 2}, str(tmp_path / "hf"), str(tmp_path / "reference.pt")
    )


@pytest.mark.slow
def test_hsdp_replica_0_reads_and_the_other_replica_receives(tmp_path):
    """Four processes, dp_replicate=2 x ep=2: replica 1 reads nothing from disk and still holds exactly
    the single-process import."""
    from hf_models import qwen3_config, save_hf_model

    save_hf_model(qwen3_config(), tmp_path / "hf")
    save_reference(tmp_path / "hf", tmp_path / "reference.pt")
    run_on_processes(
        4, load_into_shards, 4, {"dp_replicate": 2, "ep": 2}, str(tmp_path / "hf"), str(tmp_path / "reference.pt")
    )


def pipeline_stage_from_hf(rank: int, world_size: int, hf_dir: str, reference_path: str, out: str) -> None:
    """`moeforge train --init-from-hf` with pp=2: each rank reads the tensors of its own stages only."""
    overrides = {"train.init-from-hf": hf_dir, "parallel.pp": "2", "train.seq-len": "16",
                 "train.global-batch-size": "2", "train.micro-batch-size": "1", "train.progress": "false",
                 "train.report": "false"}  # fmt: skip
    cfg = load_config(overrides=overrides, world_size=world_size, apply_init_from=apply_hf_model)
    trainer = Trainer(cfg, out, init_weights=hf_weights_loader(cfg))
    reference = torch.load(reference_path)
    assert_equals_reference(trainer.model, reference)
    torch.save(sorted(trainer.model.state_dict()), f"{out}.keys.{rank}")


@pytest.mark.slow
def test_pipeline_stages_load_their_own_tensors(tmp_path):
    """Two processes, pp=2, DeepSeek with MTP: each stage equals the single-process import, and the
    two stages together hold every tensor (the last stage's embedding copy on both)."""
    from hf_models import save_deepseek_with_mtp

    save_deepseek_with_mtp(tmp_path / "hf")
    save_reference(tmp_path / "hf", tmp_path / "reference.pt")
    out = str(tmp_path / "run")
    run_on_processes(2, pipeline_stage_from_hf, 2, str(tmp_path / "hf"), str(tmp_path / "reference.pt"), out)
    keys = [set(torch.load(f"{out}.keys.{rank}")) for rank in (0, 1)]
    assert keys[0] | keys[1] == set(torch.load(tmp_path / "reference.pt")["state"])
    assert keys[0] & keys[1] == {"tok_embeddings.weight"}
