"""Megatron's indexed dataset (data/indexed.py) against a reference built by hand with `struct` from
the documented layout, both ways; and against megatron-core's own builder and reader where it
imports (put a `pip install --no-deps --target DIR megatron-core` on PYTHONPATH)."""

from __future__ import annotations

import pickle
import resource
import struct
import time
from itertools import accumulate
from pathlib import Path

import numpy as np
import pytest

from moeforge.data.indexed import (
    CHUNK,
    DataFormatError,
    IndexedDataset,
    IndexedDatasetWriter,
    bin_path,
    idx_path,
    merge_indexed_datasets,
)

# Megatron's DType codes and the struct formats of their tokens, written out again here.
UINT16, INT32 = (8, "H", 2), (4, "i", 4)


def reference_pair(documents: list[list[int]], dtype: tuple[int, str, int]) -> tuple[bytes, bytes]:
    """(.bin, .idx) bytes for one sequence per document, from the layout alone."""
    code, fmt, itemsize = dtype
    lengths = [len(doc) for doc in documents]
    pointers = [0, *accumulate(length * itemsize for length in lengths)][: len(lengths)]
    n = len(documents)
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, n, n + 1)
    idx += struct.pack(f"<{n}i", *lengths) + struct.pack(f"<{n}q", *pointers)
    idx += struct.pack(f"<{n + 1}q", *range(n + 1))
    data = b"".join(struct.pack(f"<{len(doc)}{fmt}", *doc) for doc in documents)
    return data, idx


def random_documents(seed: int, n: int, vocab_size: int, max_len: int = 40) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, rng.integers(0, max_len)).tolist() for _ in range(n)]


def write(prefix: Path, documents: list[list[int]], vocab_size: int) -> Path:
    with IndexedDatasetWriter(prefix, vocab_size) as writer:
        for doc in documents:
            writer.add_document(doc)
    return prefix


def write_raw(prefix: Path, data: bytes, idx: bytes) -> Path:
    bin_path(prefix).write_bytes(data)
    idx_path(prefix).write_bytes(idx)
    return prefix


DOCS = [[5, 1, 7], [], [299], [0, 0, 298, 3]]


@pytest.mark.parametrize("vocab_size, dtype", [(300, UINT16), (100_000, INT32)])
def test_writer_produces_the_reference_bytes(tmp_path, vocab_size, dtype):
    prefix = write(tmp_path / "ds", DOCS, vocab_size)
    data, idx = reference_pair(DOCS, dtype)
    assert bin_path(prefix).read_bytes() == data
    assert idx_path(prefix).read_bytes() == idx
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds.bin", "ds.idx"]  # no temporaries left


@pytest.mark.parametrize("dtype, np_dtype", [(UINT16, np.uint16), (INT32, np.int32)])
def test_reader_reads_the_reference_bytes(tmp_path, dtype, np_dtype):
    ds = IndexedDataset(write_raw(tmp_path / "ref", *reference_pair(DOCS, dtype)))
    assert ds.dtype == np.dtype(np_dtype)
    assert (len(ds), ds.n_documents, ds.n_sequences, ds.total_tokens) == (4, 4, 4, 8)
    assert [ds[i].tolist() for i in range(len(ds))] == DOCS
    assert ds[-1].tolist() == DOCS[-1]
    assert ds.sequence_lengths.tolist() == [3, 0, 1, 4]
    assert ds.sequence_pointers.tolist() == [offset * np.dtype(np_dtype).itemsize for offset in (0, 3, 3, 4)]
    assert ds.document_indices.tolist() == [0, 1, 2, 3, 4]
    assert ds.tokens.tolist() == sum(DOCS, [])
    assert ds.sequence_modes is None
    with pytest.raises(IndexError):
        ds[4]


def test_reader_reads_documents_of_several_sequences(tmp_path):
    """Megatron's --split-sentences layout: document d is sequences [i_d, i_d+1)."""
    code, fmt, itemsize = UINT16
    lengths, docs = [2, 1, 3], [0, 2, 3]
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, 3, 3)
    idx += struct.pack("<3i", *lengths) + struct.pack("<3q", 0, 4, 6) + struct.pack("<3q", *docs)
    ds = IndexedDataset(write_raw(tmp_path / "s", struct.pack("<6H", *range(6)), idx))
    assert (len(ds), ds.n_sequences) == (2, 3)
    assert [ds[0].tolist(), ds[1].tolist()] == [[0, 1, 2], [3, 4, 5]]


def test_sequence_modes_are_read_when_present(tmp_path):
    data, idx = reference_pair(DOCS, UINT16)
    ds = IndexedDataset(write_raw(tmp_path / "m", data, idx + struct.pack("<4b", 0, 1, 0, 1)))
    assert ds.sequence_modes.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize(
    "vocab_size, itemsize, code", [(1, 2, 8), (65_499, 2, 8), (65_500, 4, 4), (65_536, 4, 4), (200_000, 4, 4)]
)
def test_uint16_below_65500_as_megatron_chooses(tmp_path, vocab_size, itemsize, code):
    """Megatron's `DType.optimal_dtype`: uint16 when the cardinality is below 65,500, else int32."""
    prefix = write(tmp_path / "v", [[0, vocab_size - 1]], vocab_size)
    assert idx_path(prefix).read_bytes()[17] == code
    assert bin_path(prefix).stat().st_size == 2 * itemsize
    assert IndexedDataset(prefix)[0].tolist() == [0, vocab_size - 1]


@pytest.mark.parametrize("as_array", [list, lambda doc: np.asarray(doc, dtype=np.uint32)])
def test_round_trip_of_random_documents(tmp_path, as_array):
    docs = random_documents(0, 300, 50_000)
    with IndexedDatasetWriter(tmp_path / "r", 50_000) as writer:
        for doc in docs:
            writer.add_document(as_array(doc))
    assert (writer.n_documents, writer.n_sequences, writer.n_tokens) == (300, 300, sum(map(len, docs)))
    ds = IndexedDataset(tmp_path / "r")
    assert [ds[i].tolist() for i in range(len(ds))] == docs
    assert ds.total_tokens == sum(map(len, docs)) == len(ds.tokens)


def test_arrays_are_memory_maps(tmp_path):
    ds = IndexedDataset(write(tmp_path / "mm", DOCS, 300))
    for array in (ds.tokens, ds.sequence_lengths, ds.sequence_pointers, ds.document_indices, ds[0]):
        assert isinstance(array, np.memmap)
        assert not array.flags.writeable


def test_opening_reads_no_tokens(tmp_path):
    """A 2 GiB .bin (sparse: no disk used) opens at once, and its one document is a view, not a read."""
    prefix = tmp_path / "big"
    n = 1 << 30
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, 1, 2) + struct.pack("<iqqq", n, 0, 0, 1)
    idx_path(prefix).write_bytes(idx)
    with open(bin_path(prefix), "wb") as stream:
        stream.truncate(2 * n)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    ds = IndexedDataset(prefix)
    document = ds[0]
    assert time.perf_counter() - start < 1.0
    assert (len(document), ds.total_tokens, int(document[n - 1])) == (n, n, 0)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 64 * 1024  # KiB on Linux


def test_pickles_as_its_prefix(tmp_path):
    ds = IndexedDataset(write(tmp_path / "p", DOCS, 300))
    payload = pickle.dumps(ds)
    assert len(payload) < 200 + len(str(tmp_path))
    again = pickle.loads(payload)
    assert isinstance(again.tokens, np.memmap) and [again[i].tolist() for i in range(4)] == DOCS


def test_the_same_documents_give_identical_files(tmp_path):
    docs = random_documents(1, 50, 1000)
    a, b = write(tmp_path / "a", docs, 1000), write(tmp_path / "b", docs, 1000)
    for path in (bin_path, idx_path):
        assert path(a).read_bytes() == path(b).read_bytes()


def test_merge_of_shards_equals_one_writer(tmp_path):
    docs = random_documents(2, 90, 70_000)
    shards = [write(tmp_path / f"shard-{i}", docs[i * 30 : (i + 1) * 30], 70_000) for i in range(3)]
    empty = write(tmp_path / "empty", [], 70_000)
    merge_indexed_datasets([shards[0], empty, shards[1], shards[2]], tmp_path / "merged", 70_000)
    whole = write(tmp_path / "whole", docs, 70_000)
    for path in (bin_path, idx_path):
        assert path(tmp_path / "merged").read_bytes() == path(whole).read_bytes()


def test_merge_refuses_another_dtype(tmp_path):
    shard = write(tmp_path / "small", [[1, 2]], 300)
    with pytest.raises(DataFormatError, match="small.idx.*uint16.*int32"):
        merge_indexed_datasets([shard], tmp_path / "big", 100_000)
    assert not idx_path(tmp_path / "big").exists() and not list(tmp_path.glob("*.tmp"))


def test_chunked_paths_cross_chunk_boundaries(tmp_path, monkeypatch):
    """Index writing, merging and checking go chunk by chunk; a tiny CHUNK exercises the seams."""
    monkeypatch.setattr("moeforge.data.indexed.CHUNK", 3)
    docs = random_documents(3, 20, 300, max_len=6)
    shards = [write(tmp_path / "x", docs[:7], 300), write(tmp_path / "y", docs[7:], 300)]
    merge_indexed_datasets(shards, tmp_path / "merged", 300)
    monkeypatch.setattr("moeforge.data.indexed.CHUNK", CHUNK)
    data, idx = reference_pair(docs, UINT16)
    assert bin_path(tmp_path / "merged").read_bytes() == data
    assert idx_path(tmp_path / "merged").read_bytes() == idx


def test_a_failed_write_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError), IndexedDatasetWriter(tmp_path / "f", 300) as writer:
        writer.add_document([1, 2, 3])
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "document, match",
    [
        ([1, 300], r"token ids from 1 to 300; allowed: 0 to 299"),
        ([-1], "from -1"),
        ([[1, 2]], "1-D"),
        ([0.5], "integer"),
    ],
)
def test_writer_refuses_bad_documents(tmp_path, document, match):
    with pytest.raises(DataFormatError, match=match) as err, IndexedDatasetWriter(tmp_path / "w", 300) as w:
        w.add_document(np.asarray(document))
    assert "w.bin" in str(err.value) and "\n" not in str(err.value)
    assert list(tmp_path.iterdir()) == []


def header(
    code: int = 8,
    n_sequences: int = 4,
    n_entries: int = 5,
    version: int = 1,
    magic: bytes = b"MMIDIDX\x00\x00",
):
    return magic + struct.pack("<QBQQ", version, code, n_sequences, n_entries)


def corrupt_pair(case: str) -> tuple[bytes, bytes]:
    """The reference pair of DOCS (4 sequences of 3, 0, 1, 4 uint16 tokens) broken one way."""
    data, idx = reference_pair(DOCS, UINT16)
    body = idx[34:]
    lengths, pointers, documents = body[:16], body[16:48], body[48:]
    return {
        "magic": (data, header(magic=b"MMIDIDX\x00\x01") + body),
        "version": (data, header(version=2) + body),
        "dtype code": (data, header(code=9) + body),
        "dtype code 0": (data, header(code=0) + body),
        "huge counts": (data, header(n_sequences=2**60) + body),
        "huge document count": (data, header(n_entries=2**62) + body),
        "no document entries": (data, header(n_entries=0) + body),
        "short header": (data, idx[:20]),
        "truncated idx": (data, idx[:-8]),
        "truncated bin": (data[:-2], idx),
        "odd bin": (data[:-1], idx),
        "long bin": (data + b"\x00\x00", idx),
        "pointers": (data, idx[:34] + lengths + struct.pack("<4q", 0, 6, 4, 8) + documents),
        "first pointer": (data, idx[:34] + lengths + struct.pack("<4q", 2, 6, 6, 8) + documents),
        "negative length": (data, idx[:34] + struct.pack("<4i", 3, -1, 2, 4) + pointers + documents),
        "decreasing documents": (data, idx[:34] + lengths + pointers + struct.pack("<5q", 0, 2, 1, 3, 4)),
        "documents not ending at the count": (
            data,
            idx[:34] + lengths + pointers + struct.pack("<5q", 0, 1, 2, 3, 3),
        ),
        "documents not starting at 0": (
            data,
            idx[:34] + lengths + pointers + struct.pack("<5q", 1, 1, 2, 3, 4),
        ),
    }[case]


CORRUPT = {
    "magic": ("idx", "magic"),
    "version": ("idx", "version 2"),
    "dtype code": ("idx", "dtype code 9"),
    "dtype code 0": ("idx", "dtype code 0"),
    "huge counts": ("idx", "need"),
    "huge document count": ("idx", "need"),
    "no document entries": ("idx", "need"),
    "short header": ("idx", "header"),
    "truncated idx": ("idx", "need"),
    "truncated bin": ("bin", "truncated"),
    "odd bin": ("bin", "truncated"),
    "long bin": ("bin", "not its pair"),
    "pointers": ("idx", "sequence 2 points at byte 4, not 6"),
    "first pointer": ("idx", "first sequence pointer"),
    "negative length": ("idx", "sequence 1 has length -1"),
    "decreasing documents": ("idx", "document index 2"),
    "documents not ending at the count": ("idx", "0 to 3"),
    "documents not starting at 0": ("idx", "from 1 to 4"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_files_are_refused_in_one_line_naming_the_file(tmp_path, case):
    prefix = write_raw(tmp_path / "bad", *corrupt_pair(case))
    suffix, match = CORRUPT[case]
    with pytest.raises(DataFormatError, match=match) as err:
        IndexedDataset(prefix)
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'bad'}.{suffix}: ") and "\n" not in message


@pytest.mark.parametrize("missing", ["bin", "idx"])
def test_missing_files_are_refused_naming_them(tmp_path, missing):
    prefix = write(tmp_path / "ds", DOCS, 300)
    Path(f"{prefix}.{missing}").unlink()
    with pytest.raises(DataFormatError, match=rf"ds\.{missing}: cannot be read"):
        IndexedDataset(prefix)


def test_verify_false_keeps_the_constant_time_checks(tmp_path):
    prefix = write_raw(tmp_path / "bad", *corrupt_pair("pointers"))
    assert IndexedDataset(prefix, verify=False).n_documents == 4
    with pytest.raises(DataFormatError, match="truncated"):
        IndexedDataset(write_raw(tmp_path / "short", *corrupt_pair("truncated bin")), verify=False)


@pytest.fixture(scope="module")
def megatron():
    """megatron-core's indexed_dataset module (it needs torch, which we have, and nothing compiled)."""
    return pytest.importorskip("megatron.core.datasets.indexed_dataset")


@pytest.mark.parametrize("vocab_size", [300, 65_500])
def test_megatron_core_builder_writes_our_bytes(tmp_path, megatron, vocab_size):
    """As tools/preprocess_data.py calls it: a document's ids as a list, its sequence lengths."""
    docs = random_documents(4, 40, vocab_size)
    builder = megatron.IndexedDatasetBuilder(
        str(bin_path(tmp_path / "meg")), dtype=megatron.DType.optimal_dtype(vocab_size)
    )
    for doc in docs:
        builder.add_document(doc, [len(doc)])
    builder.finalize(str(idx_path(tmp_path / "meg")))
    ours = IndexedDataset(tmp_path / "meg")
    assert [ours[i].tolist() for i in range(len(ours))] == docs
    write(tmp_path / "ours", docs, vocab_size)
    for path in (bin_path, idx_path):
        assert path(tmp_path / "ours").read_bytes() == path(tmp_path / "meg").read_bytes()


def test_megatron_core_reads_our_files(tmp_path, megatron):
    docs = random_documents(5, 40, 70_000)
    merge_indexed_datasets(
        [write(tmp_path / "a", docs[:25], 70_000), write(tmp_path / "b", docs[25:], 70_000)],
        tmp_path / "ds",
        70_000,
    )
    theirs = megatron.IndexedDataset(str(tmp_path / "ds"))
    assert len(theirs) == len(docs)
    assert [theirs[i].tolist() for i in range(len(docs))] == docs
    assert theirs.document_indices.tolist() == list(range(len(docs) + 1))


def test_document_starts_in_a_token_range_match_a_plain_scan(tmp_path):
    """Every [lo, hi) of a corpus with empty documents: the starts of the non-empty documents, as a
    running count of the lengths gives them."""
    documents = random_documents(3, 60, 300, max_len=9)
    documents[5] = documents[6] = []
    ds = IndexedDataset(write(tmp_path / "d", documents, 300))
    offsets = [0, *accumulate(len(doc) for doc in documents)]
    starts = sorted({offset for offset, doc in zip(offsets, documents) if doc})
    total = offsets[-1]
    for lo in range(0, total + 1, 7):
        for hi in (lo, lo + 1, lo + 13, total):
            expected = [s for s in starts if lo <= s < hi]
            assert ds.document_starts(lo, hi).tolist() == expected, (lo, hi)


def test_document_starts_skip_sequences_inside_a_document(tmp_path):
    """Megatron's --split-sentences layout: the second sequence of a document starts none."""
    code, fmt, itemsize = UINT16
    idx = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, code, 3, 3)
    idx += struct.pack("<3i", 2, 1, 3) + struct.pack("<3q", 0, 4, 6) + struct.pack("<3q", 0, 2, 3)
    ds = IndexedDataset(write_raw(tmp_path / "s", struct.pack("<6H", *range(6)), idx))
    assert ds.document_starts(0, 6).tolist() == [0, 3]
    assert ds.document_starts(1, 3).tolist() == []
    assert ds.document_starts(3, 4).tolist() == [3]
