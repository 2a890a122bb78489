"""Loading a checkpoint from someone else cannot run code: DCP's `.metadata` and non-tensor leaves are
unpickled only as plain data, and anything else is refused before it is called."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
import torch.distributed.checkpoint as dcp

from conftest import small_config
from moeforge.model.transformer import Transformer
from moeforge import checkpoint as ckpt
from moeforge.checkpoint.safe_load import SafeFileSystemReader, SafeLoadPlanner, UnsafeCheckpointError


class RunsCode:
    """Unpickling this calls os.system: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_hostile_metadata_is_refused_before_it_runs(tmp_path):
    cfg = small_config()
    model = Transformer(cfg.model)
    path = ckpt.save_checkpoint(tmp_path, 1, model, None, cfg.to_dict(), {}, keep=1)
    marker = tmp_path / "ran"
    (path / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(
        ckpt.CheckpointError, match=r"it is not safe to load: .metadata refers to posix\.system"
    ):
        ckpt.load_checkpoint(path, Transformer(cfg.model))
    assert not marker.exists()


def test_hostile_non_tensor_leaf_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    dcp.save({"lr": RunsCode(marker)}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert not marker.exists()
    with pytest.raises(UnsafeCheckpointError, match=r"^lr: Weights only load failed"):
        state = {"lr": None}
        reader, planner = SafeFileSystemReader(tmp_path / "ckpt"), SafeLoadPlanner()
        try:
            dcp.load(state, storage_reader=reader, planner=planner, no_dist=True)
        except dcp.CheckpointException as err:  # DCP wraps the failure of each rank
            raise next(iter(err.failures.values()))[0] from None
    assert not marker.exists()
    # the control: DCP's default loader does run it, so the refusal above is what protects
    dcp.load({"lr": None}, checkpoint_id=str(tmp_path / "ckpt"), no_dist=True)
    assert marker.exists()


def test_plain_optimizer_state_loads_through_the_safe_path(tmp_path):
    cfg = small_config()
    model = Transformer(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, betas=(0.9, 0.95))
    path = ckpt.save_checkpoint(tmp_path, 1, model, optimizer, cfg.to_dict(), {}, keep=1)
    fresh = Transformer(cfg.model)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    ckpt.load_checkpoint(path, fresh, fresh_optimizer)
    assert fresh_optimizer.param_groups[0]["lr"] == 3e-4
    assert fresh_optimizer.param_groups[0]["betas"] == (0.9, 0.95)


def test_hugging_face_import_never_runs_repository_code(tmp_path):
    hf_models = pytest.importorskip("hf_models")
    from moeforge.interop import HFInteropError, from_hf

    marker = tmp_path / "ran"
    hf_models.save_hf_model(hf_models.qwen3_config(), tmp_path / "hf")
    (tmp_path / "hf" / "modeling_custom.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    hf_models.edit_config(tmp_path / "hf", auto_map={"AutoModelForCausalLM": "modeling_custom.CustomModel"})
    from_hf(tmp_path / "hf")  # the weights load; the repository's module is never imported
    assert not marker.exists()

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    torch.save({"w": RunsCode(marker)}, pickled / "pytorch_model.bin")
    with pytest.raises(
        HFInteropError, match=r"no \*\.safetensors files \(PyTorch \.bin checkpoints are not read\)"
    ):
        from_hf(pickled)
    assert not marker.exists()
