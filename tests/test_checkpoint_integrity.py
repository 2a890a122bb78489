"""Checkpoints record a checksum of every file; a resume never loads a bad one: it names the file,
sets the checkpoint aside and continues from the one before, like an uninterrupted run. A full disk
during a save leaves the previous checkpoint intact and stops with one clear error."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil

import pytest
from torch.distributed.checkpoint import filesystem

from conftest import small_config
from moeforge.cli import main
from moeforge import checkpoint as ckpt
from moeforge.run import read_metrics
from moeforge.train.trainer import Trainer

STEPS = 4


def config(steps: int = STEPS):
    return small_config(train__steps=str(steps), train__checkpoint_every="2", train__keep_checkpoints="3")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 4 steps with checkpoints at steps 2 and 4 (copied by each test)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    Trainer(config(), run).fit()
    return run


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def shard(run, step: int = STEPS):
    return ckpt.step_path(run, step) / "__0_0.distcp"


def overwrite_the_middle(path) -> None:
    with path.open("r+b") as stream:
        stream.seek(path.stat().st_size // 2)
        stream.write(os.urandom(4096))


def truncate(path) -> None:
    with path.open("r+b") as stream:
        stream.truncate(path.stat().st_size // 3)


def losses(run) -> list[float]:
    return [record["loss"] for record in read_metrics(run)]


def test_every_file_but_meta_is_recorded_with_its_size_and_sha256(run):
    path = ckpt.latest_checkpoint(run)
    files = ckpt.read_meta(path).files
    on_disk = sorted(p.name for p in path.iterdir() if p.name not in (ckpt.META_FILE, ckpt.META_HASH_FILE))
    assert sorted(files) == on_disk and ".metadata" in files
    for name, entry in files.items():
        data = (path / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify_checkpoint(path) == []


@pytest.mark.parametrize(
    "damage, said",
    [
        (overwrite_the_middle, "__0_0.distcp: its SHA-256 differs from the one recorded when it was written"),
        (truncate, r"__0_0.distcp: \d+ bytes, \d+ written \(truncated or overwritten\)"),
        (os.remove, "__0_0.distcp: missing"),
    ],
    ids=["corrupted", "truncated", "missing"],
)
def test_resume_sets_a_bad_checkpoint_aside_and_continues_from_the_one_before(run, capsys, damage, said):
    uninterrupted = losses(run)
    damage(shard(run))
    resumed = Trainer(config(), run)
    assert resumed.resume_if_possible()
    assert resumed.step == 2
    err = capsys.readouterr().err
    assert f"checkpoint '{ckpt.step_path(run, 4)}' is bad: " in err
    assert "set aside as step_000004.corrupt, trying the one before" in err
    assert re.search(said, err), err
    aside = ckpt.checkpoint_dir(run) / "step_000004.corrupt"
    assert aside.is_dir()  # kept for a person to look at, never deleted
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000002"]

    resumed.fit()  # trains steps 3 and 4 again and writes step_000004 anew
    assert losses(run) == uninterrupted
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000002", "step_000004"]
    assert ckpt.verify_checkpoint(ckpt.step_path(run, 4)) == [] and aside.is_dir()


def test_retention_counts_only_good_checkpoints(run):
    overwrite_the_middle(shard(run))
    cfg = small_config(train__steps="8", train__checkpoint_every="2", train__keep_checkpoints="2")
    Trainer(cfg, run).fit()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000006", "step_000008"]
    assert (ckpt.checkpoint_dir(run) / "step_000004.corrupt").is_dir()


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint_and_stops_clearly(run, monkeypatch):
    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem, "_write_item", no_space)
    trainer = Trainer(config(steps=6), run)
    with pytest.raises(ckpt.CheckpointError) as raised:
        trainer.fit()
    message = str(raised.value)
    assert message.startswith("could not write checkpoint step_000006: no space left on device (")
    assert f"free space in '{ckpt.checkpoint_dir(run)}'" in message
    assert f"the previous checkpoint '{ckpt.step_path(run, 4)}' is intact" in message
    assert "\n" not in message
    assert sorted(p.name for p in ckpt.checkpoint_dir(run).iterdir()) == [
        "step_000002",
        "step_000004",
    ]  # no .tmp
    assert ckpt.verify_checkpoint(ckpt.step_path(run, 4)) == []


def test_checkpoint_verify_names_the_bad_file_and_fails(run, capsys):
    assert main(["checkpoint", "verify", str(run)]) == 0
    assert "step_000004: ok (2 files" in capsys.readouterr().out
    truncate(shard(run))
    assert main(["checkpoint", "verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "step_000002: ok" in out
    assert "step_000004: BAD: __0_0.distcp: " in out and "(truncated or overwritten)" in out
    assert out.rstrip().endswith("1 of 2 checkpoints good")


def test_a_garbled_meta_file_is_a_one_line_error_naming_it(run, capsys):
    meta = ckpt.step_path(run, STEPS) / ckpt.META_FILE
    meta.write_text('{"step": 4')
    assert main(["generate", "--checkpoint", str(run), "--max-new-tokens", "1"]) == 1
    reason = "Expecting ',' delimiter: line 1 column 11 (char 10)"
    assert capsys.readouterr().err == f"moeforge generate: error: {meta}: unreadable ({reason})\n"
    assert main(["checkpoint", "verify", str(run)]) == 1
    assert "step_000004: BAD: meta.json: unreadable (Expecting ',' delimiter" in capsys.readouterr().out


def test_a_meta_file_edited_in_valid_json_is_set_aside_and_the_run_continues_as_if_uninterrupted(run, capsys):
    uninterrupted = losses(run)
    meta = ckpt.step_path(run, STEPS) / ckpt.META_FILE
    edited = json.loads(meta.read_text())
    edited["extra"]["data"]["sequences_consumed"] = 0  # would resume on other data
    meta.write_text(json.dumps(edited, indent=1))
    resumed = Trainer(config(), run)
    assert resumed.resume_if_possible()
    assert resumed.step == 2
    err = capsys.readouterr().err
    assert f"checkpoint '{ckpt.step_path(run, STEPS)}' is bad: meta.json: its SHA-256 differs from the one " in err
    assert "set aside as step_000004.corrupt" in err
    resumed.fit()
    assert losses(run) == uninterrupted
