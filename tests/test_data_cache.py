"""Raw text and the embedded corpus are prepared once into a cache (data/cache.py), keyed by the
inputs and the tokenizer, and read from there like any prepared directory."""

from __future__ import annotations

import json
import os
import threading

import numpy as np
import pytest

from moeforge.config import ConfigError, DataConfig
from moeforge.data import build_datasets, cache
from moeforge.data.prepared import is_prepared


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))


@pytest.fixture
def prepare_calls(monkeypatch):
    """The options of every `prepare` the cache ran."""
    calls = []
    real = cache.prepare

    def counted(options, progress=True):
        calls.append(options)
        return real(options, progress)

    monkeypatch.setattr(cache, "prepare", counted)
    return calls


def write_corpus(path, docs):
    path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
    return path


def stream_of(docs):
    """The byte tokens of `docs`, each followed by a newline: the reference prepared stream."""
    return list(b"".join(doc.encode() + b"\n" for doc in docs))


DOCS = [f"document number {n}: " + "words " * (n % 7 + 3) for n in range(60)]


def test_the_tail_is_held_out_cutting_the_document_it_falls_in(tmp_path):
    path = write_corpus(tmp_path / "d.jsonl", DOCS)
    _, train, val = build_datasets(DataConfig(path=str(path), val_fraction=0.1), seq_len=8)
    total = stream_of(DOCS)
    n_val = int(len(total) * 0.1)
    assert train.tolist() == total[: len(total) - n_val] and val.tolist() == total[len(total) - n_val :]
    root = cache.prepared_cache(DataConfig(path=str(path), val_fraction=0.1))
    manifest = json.loads((root / "manifest.json").read_text())
    # one document is cut in two, its head in training and its tail in validation
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == len(DOCS) + 1


def test_a_second_run_reuses_the_cache(tmp_path, prepare_calls):
    path = write_corpus(tmp_path / "d.jsonl", DOCS)
    cfg = DataConfig(path=str(path))
    first = cache.prepared_cache(cfg, progress=False)
    assert cache.prepared_cache(cfg, progress=False) == first and len(prepare_calls) == 1
    assert is_prepared(first) and not (first / "parts").exists()


def test_the_key_follows_the_files_the_tokenizer_and_the_split(tmp_path, prepare_calls):
    path = write_corpus(tmp_path / "d.jsonl", DOCS)
    cfg = DataConfig(path=str(path))
    first = cache.prepared_cache(cfg, progress=False)
    assert cache.prepared_cache(DataConfig(path=str(path), val_fraction=0.2), progress=False) != first
    write_corpus(path, DOCS[::-1])
    os.utime(path, ns=(1, 1))  # another time stamp, whatever the clock's resolution
    edited = cache.prepared_cache(cfg, progress=False)
    assert edited != first and len(prepare_calls) == 3
    _, train, val = build_datasets(cfg, seq_len=8)
    assert [*train.tolist(), *val.tolist()] == stream_of(DOCS[::-1])


def test_concurrent_runs_prepare_once(tmp_path, prepare_calls):
    path = write_corpus(tmp_path / "d.jsonl", DOCS)
    cfg = DataConfig(path=str(path))
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(cache.prepared_cache(cfg, progress=False)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 3 and len(set(results)) == 1 and len(prepare_calls) == 1


def test_an_interrupted_preparation_is_finished_by_the_next_run(tmp_path, monkeypatch):
    path = write_corpus(tmp_path / "d.jsonl", DOCS)
    cfg = DataConfig(path=str(path), val_fraction=0.1)
    real = cache.prepare.__globals__["_hold_out_tail"]

    class Killed(Exception):
        pass

    def killed(*args):
        raise Killed

    monkeypatch.setitem(cache.prepare.__globals__, "_hold_out_tail", killed)
    with pytest.raises(Killed):
        build_datasets(cfg, seq_len=8)
    monkeypatch.setitem(cache.prepare.__globals__, "_hold_out_tail", real)
    _, train, val = build_datasets(cfg, seq_len=8)
    assert [*train.tolist(), *val.tolist()] == stream_of(DOCS)


def test_the_embedded_corpus_is_prepared_once_per_text(prepare_calls):
    _, train, val = build_datasets(DataConfig(), seq_len=64)
    _, again, _ = build_datasets(DataConfig(), seq_len=64)
    assert isinstance(train, np.memmap) and len(prepare_calls) == 1
    assert np.array_equal(train, again)
    (embedded,) = (cache.cache_root() / "embedded").glob("*.jsonl")
    assert prepare_calls[0].inputs == (str(embedded),)


def test_a_cache_that_cannot_be_written_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("not a directory")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    with pytest.raises(ConfigError, match=r"^data\.path: cannot write the data cache .*MOEFORGE_CACHE_DIR"):
        build_datasets(DataConfig(), seq_len=64)
