"""The packed loader over any 1-D token array: the same batches as the loader that materialised
the stream as int64 (its logic is copied below as the reference), a memory-mapped uint16 file read
only where the batches fall, and a global order of windows that no world layout changes: every
rank's window ids per step, concatenated in data-parallel rank order, are the one-process batch,
also across a resume on another world size."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_config
from moeforge.data import PackedLoader, validation_batches
from moeforge.parallel import data_parallel_rank
from moeforge.run import read_metrics
from moeforge.train import run_data, trainer

# ---------------------------------------------------------------------------------------------
# The reference: the loader as it was before it read windows per batch (copied, shortened)


def reference_batches(tokens: torch.Tensor, seq_len: int, global_batch: int, seed: int, steps: int):
    n = len(tokens) // (seq_len + 1)
    windows = tokens[: n * (seq_len + 1)].long().view(n, seq_len + 1)
    order = []
    for epoch in range(steps * global_batch // n + 1):
        digest = hashlib.sha256(f"moeforge-data/{seed}/{epoch}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
        order.append(torch.randperm(n, generator=generator))
    order = torch.cat(order)
    for step in range(steps):
        w = windows[order[step * global_batch : (step + 1) * global_batch]]
        yield w[:, :-1].contiguous(), w[:, 1:].contiguous()


def reference_validation(tokens: torch.Tensor, batch_size: int, seq_len: int, n_batches: int):
    n = len(tokens) // (seq_len + 1)
    windows = tokens[: n * (seq_len + 1)].long().view(n, seq_len + 1)
    stop = min(n, batch_size * n_batches)
    return [(w[:, :-1].contiguous(), w[:, 1:].contiguous()) for w in windows[:stop].split(batch_size)]


def assert_same_batches(a, b) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert xa.dtype == xb.dtype == torch.int64
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


STREAM = torch.randint(0, 60_000, (1000,), generator=torch.Generator().manual_seed(0))
"""111 windows of 9 tokens (seq_len 8) and a tail of 1: batches of 16 cross epoch boundaries"""


@pytest.mark.parametrize("form", ["int64", "int32", "uint16 tensor", "uint16 numpy", "int32 numpy"])
def test_batches_equal_the_materialising_reference(form):
    as_form = {
        "int64": lambda t: t,
        "int32": lambda t: t.int(),
        "uint16 tensor": lambda t: t.to(torch.uint16),
        "uint16 numpy": lambda t: t.numpy().astype(np.uint16),
        "int32 numpy": lambda t: t.numpy().astype(np.int32),
    }[form]
    loader = PackedLoader(as_form(STREAM), 8, global_batch_size=16, seed=3)
    assert_same_batches([loader.next_batch() for _ in range(20)], reference_batches(STREAM, 8, 16, 3, 20))
    assert_same_batches(validation_batches(as_form(STREAM), 5, 8, 4), reference_validation(STREAM, 5, 8, 4))


def test_the_order_is_pinned():
    """The first global batches for a fixed (seed, n_windows), recorded: a change of the order (a
    torch upgrade changing randperm, a new order function) would move every run's metrics."""
    loader = PackedLoader(torch.arange(10 * 5), 4, global_batch_size=4, seed=0)
    assert [loader.next_batch_ids().tolist() for _ in range(4)] == RECORDED_ORDER


RECORDED_ORDER = [[3, 8, 0, 7], [1, 2, 6, 9], [4, 5, 3, 9], [6, 7, 4, 8]]
"""recorded with the loader that materialised the stream (commit 0a0c7ac)"""


def test_the_int32_epoch_order_is_randperms_int64_order():
    """The loader holds an epoch's order as int32; randperm draws the same permutation for it."""
    n = 1_000_000
    loader = PackedLoader(torch.zeros(2 * n, dtype=torch.uint8), 1, global_batch_size=1, seed=4)
    digest = hashlib.sha256(b"moeforge-data/4/1").digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    assert torch.equal(loader.window_ids(n, n), torch.randperm(n, generator=generator))


def test_batch_rows_are_the_windows_of_their_ids():
    loader = PackedLoader(torch.arange(1000), 8, global_batch_size=16, seed=1, rank=1, world_size=4)
    for _ in range(10):
        ids = loader.next_batch_ids()
        inputs, targets = loader.batch(ids)
        assert ids.dtype == torch.int64 and ids.shape == (4,)
        assert torch.equal(inputs[:, 0], ids * 9) and torch.equal(targets[:, -1], ids * 9 + 8)


# ---------------------------------------------------------------------------------------------
# World invariance: ids per step under layouts of (world size, pipeline stages, DiLoCo replicas)

GLOBAL_BATCH, SEQ_LEN, SEED = 8, 8, 11


def rank_loaders(world_size: int, pp: int = 1, replicas: int = 1) -> list[PackedLoader]:
    """One loader per rank of the world, placed as the trainer places them."""
    loaders = []
    for rank in range(world_size):
        data_rank, data_ranks = data_parallel_rank(rank, world_size, pp, replicas)
        loaders.append(PackedLoader(STREAM, SEQ_LEN, GLOBAL_BATCH, SEED, data_rank, data_ranks))
    return loaders


def global_ids(loaders: list[PackedLoader], steps: int) -> list[list[int]]:
    """Per step, the data-parallel ranks' ids in rank order, after checking that ranks sharing a
    data-parallel index (pipeline stages) drew the same ids."""
    per_step = []
    for _ in range(steps):
        by_data_rank: dict[int, list[int]] = {}
        for loader in loaders:
            ids = loader.next_batch_ids().tolist()
            assert by_data_rank.setdefault(loader.rank, ids) == ids
        assert sorted(by_data_rank) == list(range(loaders[0].world_size))
        per_step.append([i for r in sorted(by_data_rank) for i in by_data_rank[r]])
    states = [loader.state_dict() for loader in loaders]
    assert all(state == states[0] for state in states)
    return per_step


LAYOUTS = [  # (world size, pp, DiLoCo replicas)
    (1, 1, 1),
    (2, 1, 1),
    (4, 1, 1),
    (2, 2, 1),
    (4, 2, 1),
    (4, 4, 1),
    (2, 1, 2),
    (4, 1, 2),
    (4, 2, 2),
    (8, 2, 2),
]


@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda w: "world{}-pp{}-replicas{}".format(*w))
def test_every_layout_draws_the_one_process_global_batch(layout):
    steps = 30  # 240 windows: the run crosses two epoch boundaries mid-batch
    one_process = global_ids(rank_loaders(1), steps)
    assert global_ids(rank_loaders(*layout), steps) == one_process
    assert len({tuple(ids) for ids in one_process}) == steps


@pytest.mark.parametrize("after", [(2, 1, 1), (1, 1, 1), (2, 1, 2), (4, 2, 1)], ids=str)
def test_a_run_saved_on_4_ranks_resumes_elsewhere_with_the_windows_it_would_have_seen(after):
    steps, k = 30, 13
    uninterrupted = global_ids(rank_loaders(1), steps)
    before = rank_loaders(4, pp=1, replicas=1)
    assert global_ids(before, k) == uninterrupted[:k]
    resumed = rank_loaders(*after)
    for loader in resumed:
        loader.load_state_dict(before[0].state_dict())
    assert global_ids(resumed, steps - k) == uninterrupted[k:]


# ---------------------------------------------------------------------------------------------
# A memory-mapped uint16 token file


def memory_kb() -> dict[str, int]:
    """This process's peak and current resident memory, and its anonymous part, in kB."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) for key in ("VmHWM", "VmRSS", "RssAnon")}


def resident_kb_of(path: Path) -> int:
    """kB of `path`'s pages mapped into this process (its mappings' Rss in /proc/self/smaps)."""
    total, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"[0-9a-f]+-[0-9a-f]+ ", line):  # a mapping's first line: addresses ... path
            inside = line.rstrip().endswith(str(path))
        elif inside and line.startswith("Rss:"):
            total += int(line.split()[1])
    return total


def reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def test_a_memory_mapped_file_is_read_only_where_the_batches_fall(tmp_path):
    if not Path("/proc/self/smaps").exists():
        pytest.skip("reads the process's memory from /proc (Linux)")
    n_tokens, seq_len = 40_000_000, 1023  # an 80 MB file of 2 KB windows
    path = tmp_path / "tokens.bin"
    np.random.default_rng(0).integers(0, 65_536, n_tokens, dtype=np.uint16).tofile(path)

    measured_peak = reset_peak_rss()
    before = memory_kb()
    mapped = np.memmap(path, dtype=np.uint16, mode="r")
    cut = n_tokens - n_tokens // 100
    train, val = mapped[:cut], mapped[cut:]
    loader = PackedLoader(train, seq_len, global_batch_size=2, seed=0)
    first = [loader.next_batch() for _ in range(2)]
    validation = list(validation_batches(val, 2, seq_len, 1))
    after = memory_kb()

    # The file's pages mapped into this process: the kernel maps a window's whole page-cache folio
    # (up to 2 MB on ext4 with large folios), so each of the 6 windows read may bring up to 4 MB.
    file_kb, read_kb = path.stat().st_size // 1024, 6 * 4096
    assert isinstance(train, np.memmap) and isinstance(val, np.memmap)
    assert 0 < resident_kb_of(path) <= read_kb < file_kb / 3
    assert after["RssAnon"] - before["RssAnon"] < file_kb / 20  # no copy of the stream is kept
    if measured_peak:  # nor made on the way
        assert after["VmHWM"] - before["VmRSS"] < read_kb + file_kb / 20

    in_memory = torch.from_numpy(np.fromfile(path, dtype=np.uint16))
    in_memory_train, in_memory_val = in_memory[:cut], in_memory[cut:]
    reference = PackedLoader(in_memory_train, seq_len, global_batch_size=2, seed=0)
    assert_same_batches(first, [reference.next_batch() for _ in range(2)])
    assert_same_batches(validation, validation_batches(in_memory_val, 2, seq_len, 1))


def test_training_on_memory_mapped_tokens_matches_training_on_the_tensor(tmp_path, monkeypatch):
    """The trainer reads the corpus as uint16 memmaps of its prepared cache, and logs the same
    losses, validation included, as when given the same tokens as in-memory int64 tensors."""

    def cfg():
        return small_config(train__steps="3", train__eval_every="3")

    mapped_run = trainer.Trainer(cfg(), tmp_path / "mapped")
    val = mapped_run.val_sets[0][2]
    assert isinstance(mapped_run.loader.tokens, np.memmap) and isinstance(val.tokens, np.memmap)
    mapped_run.fit()
    memory_mapped = run_data.build_indexed_datasets

    def in_memory(data_cfg, seq_len, progress=True):
        tokenizer, train, val = memory_mapped(data_cfg, seq_len, progress)
        return tokenizer, torch.from_numpy(train.tokens.astype(np.int64)), torch.from_numpy(val.tokens.astype(np.int64))

    monkeypatch.setattr(run_data, "build_indexed_datasets", in_memory)
    trainer.Trainer(cfg(), tmp_path / "tensor").fit()
    losses = [
        [(r["loss"], r.get("val_loss")) for r in read_metrics(tmp_path / run)] for run in ("tensor", "mapped")
    ]
    assert losses[0] == losses[1] and losses[0][-1][1] is not None


def test_a_resume_on_other_tokens_of_the_same_size_is_refused_naming_data_path():
    """n_windows alone would pass: the fingerprint samples the tokens themselves."""
    from moeforge.config import ConfigError
    from moeforge.data.loader import PackedLoader, token_fingerprint

    tokens = torch.randint(0, 256, (50_000,))
    saved = PackedLoader(tokens, 16, 8)
    saved.next_batch()
    state = saved.state_dict()
    as_uint16 = np.asarray(tokens.numpy(), dtype=np.uint16)
    assert token_fingerprint(as_uint16) == state["fingerprint"]  # the same tokens, however stored
    PackedLoader(as_uint16, 16, 8).load_state_dict(state)
    other = tokens.clone()
    other[:100] = (other[:100] + 1) % 256
    with pytest.raises(ConfigError, match=r"^data.path: the checkpoint's data order was built with fingerprint="):
        PackedLoader(other, 16, 8).load_state_dict(state)
    legacy = {k: v for k, v in state.items() if k != "fingerprint"}  # written before it was recorded
    PackedLoader(other, 16, 8).load_state_dict(legacy)
