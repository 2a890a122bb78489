"""The streaming readers of `moeforge data prepare`: every format reads back what was written, in a
deterministic order, in chunks that concatenate to the documents, in bounded memory, and every bad
input is refused in one line naming the file."""

import gzip
import json
import pickle
import random
import re
import sys
import tracemalloc
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from moeforge.config import ConfigError, DataConfig
from conftest import trainer_documents
from moeforge.data.sources import (
    Chunk,
    DataSourceError,
    Source,
    iter_chunks,
    iter_documents,
    list_sources,
    utf8_size,
)

DOCS = [
    "The quick brown fox jumps over the lazy dog.",
    "Two lines\nin one document,\r\nwith a tab\tand a line separator\u2028inside.",
    "Ünïcödé: café, naïve, 日本語, a snake 🐍.",
    '{"not": "parsed"} — JSON inside the text',
]


def jsonl_bytes(docs, field="text"):
    return "".join(json.dumps({field: doc, "id": n}) + "\n" for n, doc in enumerate(docs)).encode()


def write_source(path: Path, docs, field="text"):
    """`docs` written to `path` in the format its name ends with, by the format's own library."""
    name = path.name.lower()
    if name.endswith(".txt"):
        assert len(docs) == 1
        path.write_text(docs[0], encoding="utf-8")
    elif name.endswith(".jsonl"):
        path.write_bytes(jsonl_bytes(docs, field))
    elif name.endswith(".jsonl.gz"):
        path.write_bytes(gzip.compress(jsonl_bytes(docs, field)))
    elif name.endswith(".jsonl.zst"):
        path.write_bytes(zstandard.ZstdCompressor().compress(jsonl_bytes(docs, field)))
    elif name.endswith(".parquet"):
        pq.write_table(pa.table({"id": list(range(len(docs))), field: docs}), path, row_group_size=2)
    return path


def documents(inputs, text_field="text"):
    return [doc for source in list_sources(inputs) for doc in iter_documents(source, text_field)]


def refusal(inputs, text_field="text") -> str:
    """The one-line message that reading `inputs` fails with."""
    with pytest.raises(DataSourceError) as err:
        documents(inputs, text_field)
    message = str(err.value)
    assert "\n" not in message
    return message


# ---------------------------------------------------------------------------------------------
# Formats and order


@pytest.mark.parametrize("name", ["d.jsonl", "d.jsonl.gz", "d.jsonl.zst", "d.parquet", "D.JSONL.GZ"])
def test_every_format_reads_back_the_documents_written(tmp_path, name):
    path = write_source(tmp_path / name, DOCS, field="body")
    (source,) = list_sources([path])
    assert source == Source(path, name.lower().removeprefix("d."), path.stat().st_size)
    assert list(iter_documents(source, "body")) == DOCS


def test_txt_is_one_document_and_loses_only_its_byte_order_mark(tmp_path):
    path = write_source(tmp_path / "a.txt", [DOCS[1]])
    assert documents([path]) == [DOCS[1]]
    path.write_bytes(b"\xef\xbb\xbf" + DOCS[2].encode())
    assert documents([path]) == [DOCS[2]]


def test_jsonl_skips_blank_lines_and_empty_texts_and_takes_a_byte_order_mark(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + jsonl_bytes(DOCS[:1]) + b"\n  \r\n" + jsonl_bytes(["", DOCS[1]]))
    assert documents([path]) == DOCS[:2]


def test_several_gzip_members_and_zstd_frames_are_one_stream(tmp_path):
    gz = tmp_path / "d.jsonl.gz"
    gz.write_bytes(gzip.compress(jsonl_bytes(DOCS[:2])) + gzip.compress(jsonl_bytes(DOCS[2:])))
    zst = tmp_path / "d.jsonl.zst"
    compress = zstandard.ZstdCompressor(write_checksum=True).compress
    skippable = (0x184D2A50).to_bytes(4, "little") + (3).to_bytes(4, "little") + b"abc"
    zst.write_bytes(compress(jsonl_bytes(DOCS[:1])) + skippable + compress(jsonl_bytes(DOCS[1:])))
    assert documents([gz]) == DOCS
    assert documents([zst]) == DOCS


def test_a_streamed_zstd_frame_of_many_blocks_reads_back(tmp_path):
    docs = [f"document {n} " + "x" * (n % 977) for n in range(3000)]
    path = tmp_path / "d.jsonl.zst"
    with open(path, "wb") as file, zstandard.ZstdCompressor().stream_writer(file) as writer:
        for n in range(0, len(docs), 100):
            writer.write(jsonl_bytes(docs[n : n + 100]))
    assert documents([path]) == docs


def test_directories_are_read_recursively_in_sorted_order_whatever_the_formats(tmp_path):
    root = tmp_path / "corpus"
    (root / "b" / "deep").mkdir(parents=True)
    (root / ".cache").mkdir()
    write_source(root / "b" / "deep" / "z.txt", ["Z"])
    write_source(root / "b" / "a.parquet", ["P1", "P2", "P3"])
    write_source(root / "a.jsonl.zst", ["S1", "S2"])
    write_source(root / "c.jsonl.gz", ["G"])
    write_source(root / "a.jsonl", ["J"])
    (root / "notes.md").write_text("not a data file")
    write_source(root / ".hidden.jsonl", ["hidden"])
    write_source(root / ".cache" / "x.txt", ["cached"])
    sources = list_sources([root])
    relative = [str(s.path.relative_to(root)) for s in sources]
    assert relative == ["a.jsonl", "a.jsonl.zst", "b/a.parquet", "b/deep/z.txt", "c.jsonl.gz"]
    assert [s.format for s in sources] == ["jsonl", "jsonl.zst", "parquet", "txt", "jsonl.gz"]
    assert documents([root]) == ["J", "S1", "S2", "P1", "P2", "P3", "Z", "G"]
    assert list_sources([root]) == sources


def test_inputs_keep_the_order_given_and_a_file_named_twice_is_refused(tmp_path):
    a = write_source(tmp_path / "a.txt", ["A"])
    b = write_source(tmp_path / "b.jsonl", ["B1", "B2"])
    assert documents([b, str(a)]) == ["B1", "B2", "A"]
    assert "is named twice" in refusal([tmp_path, a])


# ---------------------------------------------------------------------------------------------
# Chunks


@pytest.mark.parametrize("chunk_bytes", [1, 40, 100, 1 << 20])
def test_chunks_concatenate_to_the_documents_within_the_byte_bound(tmp_path, chunk_bytes):
    write_source(tmp_path / "a.jsonl", DOCS * 5)
    write_source(tmp_path / "b.parquet", DOCS[::-1] * 3)
    write_source(tmp_path / "c.txt", [DOCS[2]])
    sources = list_sources([tmp_path])
    chunks = list(iter_chunks(sources, chunk_bytes=chunk_bytes))
    assert [doc for chunk in chunks for doc in chunk.documents] == documents([tmp_path])
    assert [c.id for c in chunks] == sorted(c.id for c in chunks)
    for index in range(len(sources)):
        ordinals = [c.ordinal for c in chunks if c.source == index]
        assert ordinals == list(range(len(ordinals)))
    for chunk in chunks:
        assert chunk.nbytes == sum(len(doc.encode()) for doc in chunk.documents)
        assert chunk.nbytes <= chunk_bytes or len(chunk.documents) == 1
    assert list(iter_chunks(sources, chunk_bytes=chunk_bytes)) == chunks


def test_chunks_fill_up_to_the_bound_and_skip_finished_sources(tmp_path):
    write_source(tmp_path / "a.jsonl", ["aaaa"] * 10)
    write_source(tmp_path / "b.jsonl", ["bbbb"] * 3)
    sources = list_sources([tmp_path])
    chunks = list(iter_chunks(sources, chunk_bytes=12))
    assert [(c.id, len(c.documents), c.nbytes) for c in chunks] == [
        ((0, 0), 3, 12),
        ((0, 1), 3, 12),
        ((0, 2), 3, 12),
        ((0, 3), 1, 4),
        ((1, 0), 3, 12),
    ]
    assert list(iter_chunks(sources, chunk_bytes=12, done_sources={0})) == chunks[-1:]
    with pytest.raises(ConfigError, match=r"^chunk-bytes: got 0; allowed: "):
        next(iter_chunks(sources, chunk_bytes=0))


def test_chunks_and_errors_cross_process_boundaries():
    chunk = Chunk(2, 5, ["a", "é"], 3)
    assert pickle.loads(pickle.dumps(chunk)) == chunk
    err = pickle.loads(pickle.dumps(DataSourceError("input", "'x.jsonl' line 3 is not valid JSON")))
    assert (type(err), str(err)) == (DataSourceError, "input: 'x.jsonl' line 3 is not valid JSON")
    assert str(err.renamed({"input": "data.path"})) == "data.path: 'x.jsonl' line 3 is not valid JSON"
    assert utf8_size("aé🐍") == 7


# ---------------------------------------------------------------------------------------------
# Bad input: one line naming the file (and the line or row)

ZST = zstandard.ZstdCompressor().compress(jsonl_bytes(DOCS * 50))


def parquet_bytes(tmp_path, table) -> bytes:
    pq.write_table(table, tmp_path / "scratch.parquet")
    return (tmp_path / "scratch.parquet").read_bytes()


def unchecked_strings(values: list[bytes]) -> pa.Array:
    """A string array of `values` as another writer might store them: not checked to be UTF-8."""
    binary = pa.array(values, pa.binary())
    return pa.Array.from_buffers(pa.string(), len(binary), binary.buffers())


@pytest.mark.parametrize(
    "name, content, expected",
    [
        (
            "d.jsonl",
            b'{"text": "ok"}\n{not json\n',
            r"^input: '.*d\.jsonl' line 2 is not valid JSON: Expecting",
        ),
        (
            "d.jsonl",
            b'{"text": "ok"}\n\n["a list"]\n',
            r"^input: '.*d\.jsonl' line 3 is a JSON list, not an object$",
        ),
        (
            "d.jsonl",
            b'{"text": "ok"}\n{"body": "x"}\n',
            r"^text-field: '.*d\.jsonl' line 2 has no field 'text'$",
        ),
        ("d.jsonl", b'{"text": 3}\n', r"^text-field: '.*d\.jsonl' line 1 has a int in 'text', not a string$"),
        (
            "d.jsonl",
            b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
            r"^input: '.*d\.jsonl' line 2 is not UTF-8 text \(byte 30 of the file\)$",
        ),
        (
            "d.jsonl",
            b'{"text": "half an emoji \\ud83d"}\n',
            r"^input: '.*d\.jsonl' line 1 has a lone surrogate \\ud83d in 'text' \(not UTF-8 text\)$",
        ),
        (
            "d.jsonl.gz",
            gzip.compress(b'{"text": "a"}\n{"text": "\xff"}\n'),
            r"^input: '.*d\.jsonl\.gz' line 2 is not UTF-8 text \(byte 24 of the decompressed stream\)$",
        ),
        (
            "d.txt",
            b"one\ntwo \xc3(\n",
            r"^input: '.*d\.txt' line 2 is not UTF-8 text \(byte 8 of the file\)$",
        ),
        (
            "d.jsonl.gz",
            gzip.compress(jsonl_bytes(DOCS * 50))[:-30],
            r"^input: '.*d\.jsonl\.gz' is not a valid gzip file \(after line \d+\): Compressed file ended",
        ),
        (
            "d.jsonl.gz",
            jsonl_bytes(DOCS),
            r"^input: '.*d\.jsonl\.gz' is not a valid gzip file \(after line 0\): ",
        ),
        (
            "d.jsonl.zst",
            ZST[: len(ZST) // 2],
            r"^input: '.*d\.jsonl\.zst' is not a valid zstd file \(after line \d+\): the file ends inside a frame",
        ),
        (
            "d.jsonl.zst",
            b"\x28\xb5\x2f\xfd" + b"garbage" * 10,
            r"^input: '.*d\.jsonl\.zst' is not a valid zstd file \(after line 0\): ",
        ),
        ("d.parquet", b"PAR1 not really", r"^input: '.*d\.parquet' is not a Parquet file: "),
        (
            "d.parquet",
            lambda tmp: parquet_bytes(tmp, pa.table({"id": [1], "body": ["x"]})),
            r"^text-field: '.*d\.parquet' has no column 'text'; its columns: 'id', 'body'$",
        ),
        (
            "d.parquet",
            lambda tmp: parquet_bytes(tmp, pa.table({"text": [1, 2]})),
            r"^text-field: '.*d\.parquet' column 'text' holds int64, not strings$",
        ),
        (
            "d.parquet",
            lambda tmp: parquet_bytes(
                tmp, pa.table({"text": unchecked_strings([b"ok"] * 300 + [b"caf\xe9"])})
            ),
            r"^input: '.*d\.parquet' row 300 is not UTF-8 text \(byte 3 of its 'text'\)$",
        ),
        (
            "d.parquet",
            lambda tmp: parquet_bytes(tmp, pa.table({"text": ["a"] * 300 + [None]})),
            r"^text-field: '.*d\.parquet' row 300 has no text \(null in 'text'\)$",
        ),
        ("d.txt", b"", r"^input: '.*d\.txt' is empty \(a \.txt file is one document\)$"),
        ("d.jsonl", b"\n \n", r"^input: '.*d\.jsonl' has no records \(an empty \.jsonl file\)$"),
        (
            "d.jsonl.gz",
            gzip.compress(b""),
            r"^input: '.*d\.jsonl\.gz' has no records \(an empty \.jsonl\.gz file\)$",
        ),
        ("d.jsonl.zst", b"", r"^input: '.*d\.jsonl\.zst' has no records \(an empty \.jsonl\.zst file\)$"),
        (
            "d.jsonl",
            b'{"text": ""}\n{"text": ""}\n',
            r"^input: '.*d\.jsonl' has no documents: all 2 records have an empty 'text'$",
        ),
        (
            "d.parquet",
            lambda tmp: parquet_bytes(tmp, pa.table({"text": pa.array([], pa.string())})),
            r"^input: '.*d\.parquet' has no records \(an empty \.parquet file\)$",
        ),
    ],
    ids=[
        "not-json",
        "not-an-object",
        "missing-field",
        "field-not-string",
        "jsonl-bad-utf8",
        "lone-surrogate",
        "gz-bad-utf8",
        "txt-bad-utf8",
        "gz-truncated",
        "gz-not-gzip",
        "zst-truncated",
        "zst-garbage",
        "parquet-garbage",
        "parquet-no-column",
        "parquet-not-strings",
        "parquet-bad-utf8",
        "parquet-null",
        "empty-txt",
        "empty-jsonl",
        "empty-gz",
        "empty-zst",
        "only-empty-texts",
        "empty-parquet",
    ],
)
def test_bad_input_is_one_line_naming_the_file(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content(tmp_path) if callable(content) else content)
    message = refusal([path])
    assert str(path) in message
    assert re.search(expected, message), message


@pytest.mark.parametrize(
    "make, expected",
    [
        (
            lambda tmp: tmp / "missing.jsonl",
            r"^input: got '.*missing\.jsonl'; allowed: an existing file or directory$",
        ),
        (
            lambda tmp: tmp / "data.csv",
            r"^input: got '.*data\.csv'; allowed: a \.txt, \.jsonl, .* or \.parquet file",
        ),
        (lambda tmp: tmp / "dir", r"^input: no \.txt, .* files under '.*dir'$"),
    ],
)
def test_bad_paths_are_refused_in_one_line(tmp_path, make, expected):
    (tmp_path / "data.csv").write_text("a,b\n")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "notes.md").write_text("no data here")
    with pytest.raises(DataSourceError, match=expected):
        list_sources([make(tmp_path)])
    with pytest.raises(DataSourceError, match=r"^input: none given"):
        list_sources([])


@pytest.mark.parametrize("name, package", [("d.parquet", "pyarrow"), ("d.jsonl.zst", "zstandard")])
def test_a_missing_extra_is_named(tmp_path, monkeypatch, name, package):
    path = write_source(tmp_path / name, DOCS)
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    assert refusal([path]).endswith(f"needs {package}: pip install 'moeforge[data]'")


def test_the_trainer_reads_every_format_and_names_its_own_flags(tmp_path):
    write_source(tmp_path / "a.parquet", DOCS[:2], field="body")
    write_source(tmp_path / "b.jsonl.zst", DOCS[2:], field="body")
    assert trainer_documents(DataConfig(path=str(tmp_path), text_field="body")) == DOCS
    with pytest.raises(ConfigError, match=r"^data\.text-field: '.*a\.parquet' has no column 'text'; its col"):
        trainer_documents(DataConfig(path=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"^data\.path: got '.*missing'; allowed: an existing file"):
        trainer_documents(DataConfig(path=str(tmp_path / "missing")))


# ---------------------------------------------------------------------------------------------
# Memory: bounded by a document, not by the file

DOC_BYTES = 1000


def corpus_lines(total_bytes: int):
    """JSON lines of ~1 KB of varied words (a fixed seed) adding up to `total_bytes`, made lazily."""
    rng = random.Random(0)
    words = [f"w{n}" for n in range(9973)]
    texts = [" ".join(rng.choices(words, k=200))[: DOC_BYTES - 40] for _ in range(512)]
    for n in range(total_bytes // DOC_BYTES):
        yield b'{"text": "document %d: %s"}\n' % (n, texts[n % len(texts)].encode())


def peak_while_reading(path: Path) -> tuple[int, int]:
    """(documents read, tracemalloc's peak in bytes while reading them)."""
    (source,) = list_sources([path])
    tracemalloc.start()
    try:
        count = sum(1 for _ in iter_documents(source))
        return count, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("name", ["big.jsonl", "big.jsonl.gz", "big.jsonl.zst"])
def test_a_50_mb_jsonl_is_read_in_bounded_memory(tmp_path, name):
    path = tmp_path / name
    total = 50 << 20
    with open(path, "wb") as raw:
        if name.endswith(".gz"):
            file = gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=1)
        elif name.endswith(".zst"):
            file = zstandard.ZstdCompressor(level=1).stream_writer(raw)
        else:
            file = raw
        for line in corpus_lines(total):
            file.write(line)
        file.close()
    count, peak = peak_while_reading(path)
    assert count == total // DOC_BYTES
    assert peak < 2 << 20, f"{peak / 2**20:.1f} MiB"


def test_parquet_is_read_in_bounded_memory(tmp_path):
    path = tmp_path / "big.parquet"
    texts = [json.loads(line)["text"] for line in corpus_lines(20 << 20)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=len(texts))  # one 20 MiB row group
    (source,) = list_sources([path])
    start, peak, count = pa.total_allocated_bytes(), 0, 0
    for _ in iter_documents(source):  # Arrow's memory, which tracemalloc does not see
        count += 1
        peak = max(peak, pa.total_allocated_bytes() - start)
    assert count == len(texts)
    assert peak < 6 << 20, f"{peak / 2**20:.1f} MiB"
