"""Files from someone else, or damaged: every path read from a file stays inside its directory, names a
regular file and is read with a bound; a checkpoint whose meta.json is missing, null or altered is
set aside like one with a damaged shard; a damaged safetensors header, a read-only checkpoints
directory and a full disk are each one line. Every hostile file is built here."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import time
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.checkpoint import filesystem

from conftest import small_config
from moeforge import checkpoint as ckpt
from moeforge.checkpoint import store
from moeforge.checkpoint.safe_load import SafeFileSystemReader, read_dcp_metadata
from moeforge.cli import main
from moeforge.interop.hf import HFInteropError
from moeforge.interop.hf.safetensors_io import INDEX_FILE, read_header, shard_files
from moeforge.model.transformer import Transformer
from moeforge.run import TOKENIZER_FILE, tokenizer_for_run
from moeforge.safe_paths import FileMissing, PathRefused, file_inside, read_inside

SHARD = "__0_0.distcp"
DATA = {"sequences_consumed": 8, "last_epoch": 0}


# ------------------------------------------------------------------------------------------------
# The helper


def one_line(err: BaseException) -> str:
    text = str(err)
    assert "\n" not in text, text
    return text


@pytest.fixture
def home(tmp_path):
    """A directory with a file, a subdirectory's file and a symlink inside; a secret beside it."""
    inside = tmp_path / "home"
    (inside / "sub").mkdir(parents=True)
    (inside / "a.bin").write_bytes(b"12345")
    (inside / "sub" / "b.bin").write_bytes(b"b")
    (inside / "link.bin").symlink_to(inside / "sub" / "b.bin")
    (tmp_path / "secret.bin").write_bytes(b"secret")
    (inside / "out.bin").symlink_to(tmp_path / "secret.bin")
    (inside / "pagemap").symlink_to("/proc/self/pagemap")
    os.mkfifo(inside / "fifo")
    return inside


@pytest.mark.parametrize("entry", ["a.bin", "sub/b.bin", "link.bin", "sub/../a.bin"])
def test_names_of_regular_files_inside_are_accepted(home, entry):
    assert file_inside(home, entry, home / "index.json") == (home / entry).resolve()


@pytest.mark.parametrize(
    "entry, reason",
    [
        ("../secret.bin", "resolves to .*secret.bin, outside .*home; refused"),
        ("sub/../../secret.bin", "resolves to .*secret.bin, outside .*home; refused"),
        ("/etc/passwd", "an absolute path; only files inside .*home are read"),
        ("/proc/self/pagemap", "an absolute path"),
        ("out.bin", "resolves to .*secret.bin, outside"),
        ("pagemap", "resolves to /proc/.*, outside"),
        ("sub", r"not a regular file \(a directory\)"),
        ("fifo", r"not a regular file \(a FIFO\)"),
        ("", "not a file name"),
        (None, "not a file name"),
        ("missing.bin", "missing"),
    ],
)
def test_anything_else_is_refused_in_one_line_naming_the_file_and_the_entry(home, entry, reason):
    source = home / "index.json"
    with pytest.raises(PathRefused, match=reason) as raised:
        file_inside(home, entry, source)
    assert one_line(raised.value).startswith(f"{source}: entry {entry!r}: ")
    assert isinstance(raised.value, FileMissing) == (entry == "missing.bin")


def test_reads_stop_at_their_bound_and_never_block(home):
    assert read_inside(home, "a.bin", home, max_bytes=5) == b"12345"
    with pytest.raises(PathRefused, match="more than the 4 bytes allowed"):
        read_inside(home, "a.bin", home, max_bytes=4)
    with pytest.raises(PathRefused, match=r"5 bytes, more than the 4 allowed"):
        file_inside(home, "a.bin", home, max_bytes=4)
    started = time.monotonic()
    with pytest.raises(PathRefused, match="a FIFO"):  # no writer: a plain open would wait forever
        read_inside(home, "fifo", home, max_bytes=10)
    assert time.monotonic() - started < 5


# ------------------------------------------------------------------------------------------------
# Checkpoints: names in meta.json and .metadata, meta.json itself


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run directory with two model-only checkpoints, steps 1 and 2 (copied by each test)."""
    run = tmp_path_factory.mktemp("saved") / "run"
    cfg = small_config()
    model = Transformer(cfg.model)
    for step in (1, 2):
        extra = {"data": {**DATA, "sequences_consumed": 4 * step}}
        ckpt.save_checkpoint(run, step, model, None, cfg.to_dict(), extra, keep=2)
    return run


@pytest.fixture
def run(saved, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(saved, copy, symlinks=True)
    return copy


def newest(run):
    return ckpt.step_path(run, 2)


def rewrite_meta(path, edit, rehash: bool = True) -> None:
    """Edit meta.json in valid JSON; with `rehash`, write meta.sha256 anew too (what a forger or a
    careful vandal does), so that only the other checks can catch it."""
    meta = json.loads((path / ckpt.META_FILE).read_text())
    edit(meta)
    data = json.dumps(meta).encode()
    (path / ckpt.META_FILE).write_bytes(data)
    if rehash:
        (path / ckpt.META_HASH_FILE).write_text(f"{hashlib.sha256(data).hexdigest()}  {ckpt.META_FILE}\n")


def record(path, entry: str, target) -> None:
    """meta.json lists `entry` with the real size and SHA-256 of `target` (hash rewritten)."""
    data = target.read_bytes()
    digest = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    rewrite_meta(path, lambda meta: meta["files"].update({entry: digest}))


def assert_resume_falls_back(run, capsys, said: str) -> None:
    """What a resume does with a bad step 2: names it, sets it aside, uses step 1; and `checkpoint
    verify`, run before, agreed."""
    assert main(["checkpoint", "verify", str(run)]) == 1
    out = capsys.readouterr().out
    assert "step_000001: ok" in out and f"step_000002: BAD: {said}" in out, out
    assert "a resume continues from step_000001" in out
    lines = []
    assert ckpt.newest_good_checkpoint(run, warn=lines.append) == ckpt.step_path(run, 1)
    assert len(lines) == 1 and f"is bad: {said}" in lines[0], lines
    assert lines[0].endswith("set aside as step_000002.corrupt, trying the one before")
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000001"]


def test_a_meta_file_entry_outside_the_checkpoint_is_refused_though_its_hash_matches(run, capsys, tmp_path):
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"root:x:0:0:root:/root:/bin/bash\n")
    escape = os.path.relpath(secret, newest(run))  # ../../../secret.bin
    record(newest(run), escape, secret)
    assert ckpt.verify_checkpoint(newest(run)) == [
        f"{escape}: resolves to {secret}, outside {newest(run)}; refused"
    ]
    assert_resume_falls_back(run, capsys, f"{escape}: resolves to")


def test_a_meta_file_entry_naming_proc_is_refused_without_reading_it(run, capsys):
    rewrite_meta(newest(run), lambda meta: meta["files"].update({"/proc/self/pagemap": {"bytes": 0, "sha256": "0" * 64}}))
    started = time.monotonic()
    assert_resume_falls_back(run, capsys, "/proc/self/pagemap: an absolute path")
    assert time.monotonic() - started < 10


def test_a_shard_replaced_by_a_symlink_to_outside_is_refused(run, capsys, tmp_path):
    outside = tmp_path / "elsewhere.distcp"
    shutil.move(newest(run) / SHARD, outside)  # the same bytes: its checksum still matches
    (newest(run) / SHARD).symlink_to(outside)
    assert_resume_falls_back(run, capsys, f"{SHARD}: resolves to {outside}, outside")


def hostile_metadata(path, tmp_path):
    """Rewrite `.metadata` of checkpoint `path` so that every storage record reads
    ../../../outside/secret.bin, a copy of the real shard (weights from outside would load), and
    record the new `.metadata` in meta.json: only the path check can catch it."""
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copyfile(path / SHARD, outside / "secret.bin")
    escape = os.path.relpath(outside / "secret.bin", path)
    metadata = read_dcp_metadata(io.BytesIO((path / ".metadata").read_bytes()))
    for index, info in metadata.storage_data.items():
        metadata.storage_data[index] = filesystem._StorageInfo(escape, info.offset, info.length)
    (path / ".metadata").write_bytes(pickle.dumps(metadata))
    record(path, ".metadata", path / ".metadata")
    return escape


def test_a_dcp_storage_record_outside_the_checkpoint_is_refused_before_any_read(run, capsys, tmp_path):
    escape = hostile_metadata(newest(run), tmp_path)
    # the control: DCP's own reader loads the weights from outside
    state = {"model": Transformer(small_config().model).state_dict()}
    dcp.load(state, storage_reader=filesystem.FileSystemReader(newest(run)), no_dist=True)

    with pytest.raises(PathRefused, match=f"entry '{escape}': resolves to .*secret.bin, outside"):
        SafeFileSystemReader(newest(run)).read_metadata()
    with pytest.raises(ckpt.CheckpointError, match=f"it is not safe to load: .*entry '{escape}'") as raised:
        ckpt.load_checkpoint(newest(run), Transformer(small_config().model))
    one_line(raised.value)
    assert main(["generate", "--checkpoint", str(newest(run)), "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"entry '{escape}': resolves to" in err
    assert_resume_falls_back(run, capsys, f"{newest(run) / '.metadata'}: entry '{escape}'")


@pytest.mark.parametrize(
    "edit, said",
    [
        (lambda meta: meta["extra"]["data"].update(sequences_consumed=0), "its SHA-256 differs from the one in meta.sha256"),
        (lambda meta: meta["extra"]["data"].update(last_epoch=3), "its SHA-256 differs from the one in meta.sha256"),
        (lambda meta: meta.update(files=None), "its SHA-256 differs"),
    ],
    ids=["sequences_consumed", "last_epoch", "files-null"],
)
def test_an_edited_meta_file_is_set_aside_like_a_damaged_shard(run, capsys, edit, said):
    rewrite_meta(newest(run), edit, rehash=False)
    assert_resume_falls_back(run, capsys, f"meta.json: {said}")


@pytest.mark.parametrize(
    "edit, said",
    [
        (lambda meta: meta.update(files=None), "meta.json: field 'files' is null; allowed: "),
        (lambda meta: meta.update(files=["x"]), "meta.json: field 'files' is [\"x\"]"),
        (lambda meta: meta.update(step="2"), "meta.json: field 'step' is \"2\"; allowed: an integer >= 0"),
        (lambda meta: meta.update(format=9), "meta.json: format 9; this moeforge reads formats 1 to 2"),
    ],
    ids=["files-null", "files-list", "step-string", "format"],
)
def test_a_meta_file_with_its_hash_recomputed_is_still_checked_field_by_field(run, capsys, edit, said):
    rewrite_meta(newest(run), edit)
    assert_resume_falls_back(run, capsys, said)


def write_null(path):
    (path / ckpt.META_FILE).write_text("null")


def write_null_and_its_hash(path):
    (path / ckpt.META_FILE).write_text("null")
    (path / ckpt.META_HASH_FILE).write_text(f"{hashlib.sha256(b'null').hexdigest()}  {ckpt.META_FILE}\n")


def delete_meta(path):
    (path / ckpt.META_FILE).unlink()


def delete_hash(path):
    (path / ckpt.META_HASH_FILE).unlink()


def meta_as_a_fifo(path):
    (path / ckpt.META_FILE).unlink()
    os.mkfifo(path / ckpt.META_FILE)


@pytest.mark.parametrize(
    "damage, said",
    [
        (write_null, "meta.json: its SHA-256 differs"),
        (write_null_and_its_hash, "meta.json: holds null, not a JSON object"),
        (delete_meta, "meta.json: missing"),
        (delete_hash, "meta.json: meta.sha256 is missing; a format-2 checkpoint always has one"),
        (meta_as_a_fifo, "meta.json: not a regular file (a FIFO)"),
    ],
    ids=["null", "null-rehashed", "meta-missing", "hash-missing", "fifo"],
)
def test_a_missing_or_null_meta_file_or_hash_is_set_aside_with_a_line(run, capsys, damage, said):
    damage(newest(run))
    assert_resume_falls_back(run, capsys, said)


def test_a_checkpoint_written_before_meta_sha256_is_accepted_as_legacy(run, capsys):
    for step in (1, 2):
        path = ckpt.step_path(run, step)
        rewrite_meta(path, lambda meta: meta.pop("format"), rehash=False)
        (path / ckpt.META_HASH_FILE).unlink()
    assert ckpt.read_meta(newest(run)).format == 1
    assert main(["checkpoint", "verify", str(run)]) == 0
    out = capsys.readouterr().out
    assert "step_000002: ok (2 files, " in out and "meta.json unhashed (written by an older moeforge)" in out
    # still checked field by field
    rewrite_meta(newest(run), lambda meta: meta.update(files="x"), rehash=False)
    assert_resume_falls_back(run, capsys, "meta.json: field 'files' is \"x\"")


def test_meta_sha256_is_what_sha256sum_checks(run):
    line = (newest(run) / ckpt.META_HASH_FILE).read_text()
    digest = hashlib.sha256((newest(run) / ckpt.META_FILE).read_bytes()).hexdigest()
    assert line == f"{digest}  meta.json\n"
    assert json.loads((newest(run) / ckpt.META_FILE).read_text())["format"] == 2


def test_a_tokenizer_file_outside_the_run_or_not_a_file_is_refused(run, tmp_path):
    cfg = small_config()
    (tmp_path / "tokenizer.json").write_text("{}")
    (run / TOKENIZER_FILE).symlink_to(tmp_path / "tokenizer.json")
    with pytest.raises(PathRefused, match=f"{run}: entry 'tokenizer.json': resolves to .*, outside"):
        tokenizer_for_run(run, cfg)
    (run / TOKENIZER_FILE).unlink()
    os.mkfifo(run / TOKENIZER_FILE)
    with pytest.raises(PathRefused, match=r"not a regular file \(a FIFO\)"):
        tokenizer_for_run(run, cfg)
    (run / TOKENIZER_FILE).unlink()
    assert tokenizer_for_run(run, cfg).vocab_size == 256  # none: the byte tokenizer


# ------------------------------------------------------------------------------------------------
# Writing: a read-only directory, a full disk


def refuse(*args, **kwargs):
    raise PermissionError(errno.EACCES, "Permission denied")


def test_a_read_only_checkpoints_directory_is_one_line_naming_it(run, monkeypatch):
    cfg = small_config()
    monkeypatch.setattr(store.Path, "mkdir", refuse)  # chmod would not stop root
    with pytest.raises(ckpt.CheckpointError) as raised:
        ckpt.save_checkpoint(run, 3, Transformer(cfg.model), None, cfg.to_dict(), {}, keep=2)
    message = one_line(raised.value)
    assert message.startswith("could not write checkpoint step_000003: [Errno 13] Permission denied; ")
    assert f"the previous checkpoint '{newest(run)}' is intact — make '{ckpt.checkpoint_dir(run)}' writable" in message


def test_a_bad_checkpoint_that_cannot_be_set_aside_is_one_line_naming_the_directory(run, monkeypatch):
    delete_meta(newest(run))
    monkeypatch.setattr(store.Path, "rename", refuse)
    with pytest.raises(ckpt.CheckpointError) as raised:
        ckpt.newest_good_checkpoint(run, warn=print)
    assert one_line(raised.value) == (
        f"checkpoint '{newest(run)}' is bad: meta.json: missing; could not set it aside as "
        f"step_000002.corrupt in '{ckpt.checkpoint_dir(run)}' (Permission denied): make the directory "
        "writable and rerun"
    )


def test_torch_short_write_on_a_full_disk_says_no_space_left_on_device(run, monkeypatch):
    def short_write(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos 4160 vs 4054")

    cfg = small_config()
    model = Transformer(cfg.model)
    monkeypatch.setattr(filesystem, "_write_item", short_write)
    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: SimpleNamespace(free=4096))
    with pytest.raises(ckpt.CheckpointError) as raised:
        ckpt.save_checkpoint(run, 3, model, None, cfg.to_dict(), {}, keep=2)
    message = one_line(raised.value)
    assert message.startswith("could not write checkpoint step_000003: no space left on device (0.0 MB free, ")
    assert f"free space in '{ckpt.checkpoint_dir(run)}'" in message
    assert not ckpt.step_path(run, 3).with_suffix(".tmp").exists()

    # with room to spare the same failure is not blamed on the disk
    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: SimpleNamespace(free=10**12))
    with pytest.raises(ckpt.CheckpointError, match=r"step_000003: \[enforce fail at inline_container.cc:672\]"):
        ckpt.save_checkpoint(run, 3, model, None, cfg.to_dict(), {}, keep=2)


# ------------------------------------------------------------------------------------------------
# Hugging Face directories: the index and the safetensors headers


@pytest.fixture
def hf_dir(tmp_path):
    """Two shards and their index, a secret shard beside the directory."""
    path = tmp_path / "hf"
    path.mkdir()
    save_file({"a": torch.ones(2, 3)}, str(path / "one.safetensors"))
    save_file({"b": torch.zeros(4, dtype=torch.bfloat16)}, str(path / "two.safetensors"))
    save_file({"c": torch.ones(1)}, str(tmp_path / "secret.safetensors"))
    write_index(path, {"a": "one.safetensors", "b": "two.safetensors"})
    return path


def write_index(path, weight_map) -> None:
    (path / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_shards_named_by_the_index_load_and_stay_inside(hf_dir):
    assert [f.name for f in shard_files(hf_dir)] == ["one.safetensors", "two.safetensors"]


@pytest.mark.parametrize(
    "shard, said",
    [
        ("../secret.safetensors", "entry '../secret.safetensors': resolves to .*, outside"),
        ("/etc/passwd", "entry '/etc/passwd': an absolute path"),
        (7, r"weight_map\['c'\] is 7; allowed: a shard's file name"),
        ("nothing.safetensors", "names shard 'nothing.safetensors', which does not exist"),
    ],
)
def test_an_index_naming_a_shard_outside_is_refused(hf_dir, shard, said):
    write_index(hf_dir, {"a": "one.safetensors", "c": shard})
    with pytest.raises(HFInteropError, match=f"^{hf_dir / INDEX_FILE}: {said}") as raised:
        shard_files(hf_dir)
    one_line(raised.value)


@pytest.mark.parametrize(
    "text, said",
    [
        ('{"weight_map": ', "not valid JSON"),
        ('{"metadata": {}}', "no 'weight_map' object"),
        ("[1, 2]", "no 'weight_map' object"),
        ("[" * 100_000, "not valid JSON"),
    ],
    ids=["truncated", "no-weight-map", "list", "deep"],
)
def test_a_damaged_index_is_one_line(hf_dir, text, said):
    (hf_dir / INDEX_FILE).write_text(text)
    with pytest.raises(HFInteropError, match=f"^{hf_dir / INDEX_FILE}: {said}") as raised:
        shard_files(hf_dir)
    one_line(raised.value)


def test_a_shard_symlinked_out_of_a_directory_without_index_is_refused(hf_dir, tmp_path):
    (hf_dir / INDEX_FILE).unlink()
    (hf_dir / "three.safetensors").symlink_to(tmp_path / "secret.safetensors")
    with pytest.raises(HFInteropError, match="entry 'three.safetensors': resolves to .*secret.safetensors, outside"):
        shard_files(hf_dir)


def test_a_hugging_face_cache_snapshot_may_link_into_its_blobs(tmp_path):
    """huggingface_hub stores files once under blobs/ and links them from snapshots/<revision>/."""
    entry = tmp_path / "models--org--tiny"
    (entry / "blobs").mkdir(parents=True)
    snapshot = entry / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({"a": torch.ones(2)}, str(entry / "blobs" / "f00d"))
    (snapshot / "model.safetensors").symlink_to("../../blobs/f00d")
    assert shard_files(snapshot) == [entry / "blobs" / "f00d"]
    assert read_header(entry / "blobs" / "f00d")["a"]["shape"] == [2]


def header_file(path, header, data: bytes = b"", length: int | None = None):
    """A safetensors file with this header (a dict, or raw bytes) and data region."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


F32_2x3 = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}


@pytest.mark.parametrize(
    "header, data, length, said",
    [
        ({"a": F32_2x3}, b"\0" * 24, 10**12, "its header length 1000000000000 does not fit in the file's"),
        (b"", b"", None, "its header is not JSON"),
        (b"{not json", b"", None, "its header is not JSON"),
        (b"[1]", b"", None, "its header is not a JSON object"),
        ({"a": {**F32_2x3, "dtype": "F33"}}, b"\0" * 24, None, "tensor 'a' has dtype 'F33'; known: BOOL, "),
        ({"a": {**F32_2x3, "shape": [2**40, 2**40]}}, b"\0" * 24, None, r"tensor 'a' of shape \[1099511627776, "),
        ({"a": {**F32_2x3, "shape": [-2, -3]}}, b"\0" * 24, None, r"tensor 'a' has shape \[-2, -3\]"),
        ({"a": {**F32_2x3, "shape": [2**70, 0]}}, b"", None, r"tensor 'a' has shape"),
        ({"a": {**F32_2x3, "data_offsets": [0, "24"]}}, b"\0" * 24, None, "has data_offsets"),
        ({"a": F32_2x3, "b": {**F32_2x3, "data_offsets": [12, 36]}}, b"\0" * 48, None, "tensor 'b' at \\[12, 36\\] overlaps"),
        ({"a": F32_2x3, "b": {**F32_2x3, "data_offsets": [28, 52]}}, b"\0" * 52, None, "leaves bytes 24..28 unused"),
        ({"a": {**F32_2x3, "data_offsets": [100, 124]}}, b"\0" * 24, None, r"\[100, 124\] runs past a data region of 24"),
        ({"a": F32_2x3}, b"\0" * 10, None, r"tensor 'a' at \[0, 24\] runs past a data region of 10 bytes"),
        ({"a": F32_2x3}, b"\0" * 30, None, "its tensors end at byte 24 of a data region of 30 bytes"),
        ({"__metadata__": {"format": 1}, "a": F32_2x3}, b"\0" * 24, None, "__metadata__ is not an object of strings"),
    ],
    ids=["length-past-end", "empty", "not-json", "not-object", "dtype", "absurd-shape", "negative-shape",
         "huge-dim", "offsets-type", "overlap", "gap", "out-of-range", "past-end", "trailing", "metadata"],
)  # fmt: skip
def test_a_damaged_safetensors_header_is_one_line_naming_the_file(tmp_path, header, data, length, said):
    file = header_file(tmp_path / "model.safetensors", header, data, length)
    with pytest.raises(HFInteropError, match=said) as raised:
        read_header(file)
    assert one_line(raised.value).startswith(f"{file}: damaged safetensors file: ")


def test_a_file_too_short_for_a_header_length_is_one_line(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"abc")
    with pytest.raises(HFInteropError, match="x.safetensors: damaged safetensors file: 3 bytes, fewer than the 8"):
        read_header(tmp_path / "x.safetensors")


def test_a_valid_header_reads_as_safetensors_wrote_it(tmp_path):
    tensors = {"a": torch.ones(2, 3), "b": torch.zeros(5, dtype=torch.bfloat16), "c": torch.zeros(0, 4)}
    save_file(tensors, str(tmp_path / "x.safetensors"), metadata={"format": "pt"})
    header = read_header(tmp_path / "x.safetensors")
    assert {name: (e["dtype"], e["shape"]) for name, e in header.items()} == {
        "a": ("F32", [2, 3]),
        "b": ("BF16", [5]),
        "c": ("F32", [0, 4]),
    }


def test_convert_from_a_directory_with_a_damaged_shard_is_one_line(tmp_path, capsys):
    hf_models = pytest.importorskip("hf_models")
    hf_models.save_hf_model(hf_models.qwen3_config(), tmp_path / "hf")
    shard = tmp_path / "hf" / "model.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[0:8] = struct.pack("<Q", len(raw))  # a header length past the end of the file
    shard.write_bytes(bytes(raw))
    capsys.readouterr()  # transformers' progress bar
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == f"moeforge convert: error: {shard}: damaged safetensors file: its header length {len(raw)} does " \
        f"not fit in the file's {len(raw)} bytes (or in 100 MB)\n"


def test_config_and_tokenizer_of_a_model_directory_symlinked_out_are_refused(hf_dir, tmp_path, monkeypatch):
    """`convert --from-hf` and `train.init-from-hf` read config.json and tokenizer.json from the model
    directory: a symlink out of it is refused, not followed."""
    from moeforge.config import load_config
    from moeforge.interop.hf.registry import read_hf_config
    from moeforge.interop.hf import training

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "config.json").write_text('{"model_type": "mixtral"}')
    (hf_dir / "config.json").unlink(missing_ok=True)
    (hf_dir / "config.json").symlink_to(outside / "config.json")
    with pytest.raises(HFInteropError, match="entry 'config.json': resolves to .*, outside") as raised:
        read_hf_config(hf_dir)
    one_line(raised.value)
    cfg = load_config()
    monkeypatch.setattr(training, "hf_model_config", lambda path: cfg.model)  # past the config: the tokenizer
    (outside / TOKENIZER_FILE).write_text("{}")
    (hf_dir / TOKENIZER_FILE).symlink_to(outside / TOKENIZER_FILE)
    with pytest.raises(PathRefused, match="entry 'tokenizer.json': resolves to .*, outside"):
        training.apply_hf_model(cfg, str(hf_dir))


@pytest.mark.parametrize("name", ["tokenizer_config.json", "chat_template.jinja"])
def test_a_chat_template_file_symlinked_out_of_the_model_is_not_copied(tmp_path, name):
    """convert copies tokenizer_config.json and chat_template.jinja beside the weights: one that
    resolves outside the model directory is refused, and one over the size bound too."""
    from moeforge.run import MAX_TEMPLATE_BYTES, copy_tokenizer_files

    model, outside, out = tmp_path / "model", tmp_path / "outside", tmp_path / "out"
    for directory in (model, outside, out):
        directory.mkdir()
    (outside / name).write_text("secret")
    (model / name).symlink_to(outside / name)
    with pytest.raises(PathRefused, match=f"entry '{name}': resolves to .*, outside") as raised:
        copy_tokenizer_files(model, out)
    one_line(raised.value)
    (model / name).unlink()
    with (model / name).open("wb") as stream:
        stream.truncate(MAX_TEMPLATE_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(PathRefused, match=f"entry '{name}'"):
        copy_tokenizer_files(model, out)
    assert not list(out.iterdir())


def test_a_run_config_that_is_not_json_or_not_a_file_is_one_line_in_report(tmp_path):
    from moeforge.run import CONFIG_FILE, read_run_config

    assert read_run_config(tmp_path) is None
    (tmp_path / CONFIG_FILE).write_text("{not json")
    with pytest.raises(PathRefused, match=f"^{tmp_path}: entry 'config.json': not valid JSON") as raised:
        read_run_config(tmp_path)
    one_line(raised.value)
    (tmp_path / CONFIG_FILE).unlink()
    os.mkfifo(tmp_path / CONFIG_FILE)
    with pytest.raises(PathRefused, match=r"not a regular file \(a FIFO\)"):
        read_run_config(tmp_path)
