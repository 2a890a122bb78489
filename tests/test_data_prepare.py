"""`moeforge data prepare`: the prepared datasets hold every document's tokens, in input order, the
same bytes whatever the number of workers or interruptions, with a manifest that names them."""

from __future__ import annotations

import filecmp
import json
import subprocess
import sys
from pathlib import Path

import pytest

from moeforge.cli import main
from moeforge.data import prepare as prepare_module
from moeforge.data.indexed import IndexedDataset
from moeforge.data.prepare import MANIFEST_FILE, PrepareOptions, _is_held_out, prepare
from moeforge.data.tokenizer import ByteTokenizer, HFTokenizer, document_separator
from test_data import SENTENCES, write_bpe_tokenizer

OUTPUTS = ("train.bin", "train.idx", "val.bin", "val.idx", MANIFEST_FILE)


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    """A directory of .jsonl and .txt files and its documents in the order a prepare reads them."""
    root = tmp_path / "corpus"
    root.mkdir()
    records = [f"{SENTENCES[i % 3]} number {i}" for i in range(60)]
    (root / "a.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records[:40]))
    (root / "b.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records[40:]))
    (root / "c.txt").write_text("one whole text file, one document\n")
    return root, [*records, "one whole text file, one document\n"]


def documents(dataset: IndexedDataset) -> list[list[int]]:
    return [dataset[i].tolist() for i in range(dataset.n_documents)]


def run(corpus_dir: Path, out: Path, **options) -> dict:
    return prepare(PrepareOptions((str(corpus_dir),), out, **options), progress=False)


@pytest.mark.parametrize("tokenizer", ["byte", "bpe"])
def test_every_document_is_its_tokens_and_a_separator_in_input_order(corpus, tmp_path, tokenizer):
    root, docs = corpus
    if tokenizer == "bpe":
        tokenizer = str(write_bpe_tokenizer(tmp_path / "tok.json", ["<|endoftext|>"]))
        tok = HFTokenizer(tokenizer)
    else:
        tok = ByteTokenizer()
    manifest = run(root, tmp_path / "out", tokenizer=tokenizer, val_fraction=0.2)
    held = [_is_held_out(doc, 0.2) for doc in docs]
    assert 0 < sum(held) < len(docs)  # both splits have documents
    expected = {split: [tok.encode(d) + document_separator(tok) for d, h in zip(docs, held) if h == (split == "val")]
                for split in ("train", "val")}  # fmt: skip
    for split in ("train", "val"):
        dataset = IndexedDataset(tmp_path / "out" / split)
        assert documents(dataset) == expected[split]
        assert manifest["splits"][split] == {
            "documents": len(expected[split]),
            "tokens": sum(map(len, expected[split])),
        }
    assert manifest["vocab_size"] == tok.vocab_size
    assert not (tmp_path / "out" / "parts").exists()


def test_workers_and_chunk_sizes_do_not_change_a_byte(corpus, tmp_path):
    root, _ = corpus
    run(root, tmp_path / "one", val_fraction=0.1)
    run(root, tmp_path / "two", val_fraction=0.1, workers=2, chunk_bytes=1 << 10)
    for name in OUTPUTS:
        assert filecmp.cmp(tmp_path / "one" / name, tmp_path / "two" / name, shallow=False), name


def test_an_interrupted_prepare_reruns_only_the_unfinished_chunks(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    run(root, tmp_path / "straight", chunk_bytes=1 << 10)
    calls, done = [], []
    real = prepare_module._tokenize_job

    class Killed(Exception):
        """the prepare stops here, as a kill would stop it"""

    def dies_on_the_third(args):
        calls.append(args[0].name)
        if len(calls) == 3 and not done:
            raise Killed
        return real(args)

    monkeypatch.setattr(prepare_module, "_tokenize_job", dies_on_the_third)
    with pytest.raises(Killed):
        run(root, tmp_path / "out", chunk_bytes=1 << 10)
    done += calls[:2]
    calls.clear()
    run(root, tmp_path / "out", chunk_bytes=1 << 10)
    assert calls and not set(done) & set(calls)  # the finished chunks were not tokenized again
    for name in OUTPUTS:
        assert filecmp.cmp(tmp_path / "straight" / name, tmp_path / "out" / name, shallow=False), name


def test_whole_files_held_out_and_the_command_line(corpus, tmp_path, capsys):
    root, docs = corpus
    held = tmp_path / "held.txt"
    held.write_text("a held-out document\n")
    code = main(["data", "prepare", str(root), "--val", str(held), "--out", str(tmp_path / "out")])
    assert code == 0
    assert f"prepared {tmp_path / 'out'}: train {len(docs)} documents" in capsys.readouterr().out
    val = IndexedDataset(tmp_path / "out" / "val")
    assert documents(val) == [list(b"a held-out document\n") + document_separator(ByteTokenizer())]


@pytest.mark.parametrize(
    "flags, said",
    [
        (["--val-fraction", "1"], "--val-fraction: got 1.0; allowed: a number in [0, 1)"),
        (["--workers", "0"], "--workers: got 0; allowed: an integer >= 1"),
    ],
)
def test_bad_flags_are_one_line(corpus, tmp_path, capsys, flags, said):
    root, _ = corpus
    assert main(["data", "prepare", str(root), "--out", str(tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and "\n" not in err


# ------------------------------------------------------------------------------------------------
# Training on a prepared directory


def test_training_reads_a_prepared_directory_through_memory_maps(corpus, tmp_path):
    import numpy as np

    from conftest import small_config
    from moeforge.train.trainer import Trainer
    from moeforge.run import read_metrics

    root, _ = corpus
    run(root, tmp_path / "data", val_fraction=0.3)
    cfg = small_config(data__path=str(tmp_path / "data"), train__steps="2", train__seq_len="16")
    trainer = Trainer(cfg, tmp_path / "run")
    assert isinstance(trainer.loader.tokens, np.memmap) and isinstance(trainer.val_sets[0][2].tokens, np.memmap)
    train = IndexedDataset(tmp_path / "data" / "train").tokens
    assert trainer.loader.n_windows == len(train) // 17
    trainer.fit()
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2]


def test_a_prepared_directory_that_does_not_match_is_one_line(corpus, tmp_path, capsys):
    root, _ = corpus
    run(root, tmp_path / "data", val_fraction=0.3)
    tokenizer = write_bpe_tokenizer(tmp_path / "tok.json", ["<|endoftext|>"])
    base = ["train", "--out", str(tmp_path / "run"), "--data.path", str(tmp_path / "data"), "--train.steps", "1"]
    assert main([*base, "--data.tokenizer", str(tokenizer)]) == 2
    assert "data.tokenizer: got" in capsys.readouterr().err
    with (tmp_path / "data" / "train.bin").open("r+b") as stream:
        stream.truncate(10)
    assert main(base) == 2
    err = capsys.readouterr().err.strip()
    assert "train.bin: 10 bytes, the manifest recorded" in err and "\n" not in err


PEAK_OF_PREPARE = """
import json, sys, tracemalloc
from pathlib import Path
from moeforge.data.prepare import PrepareOptions, prepare

tmp = Path(sys.argv[1])
line = json.dumps({"text": "a document of moderate length; " * 30}) + "\\n"
peaks = []
for megabytes in (2, 8):
    corpus = tmp / f"{megabytes}.jsonl"
    corpus.write_text(line * (megabytes * 1_000_000 // len(line)))
    tracemalloc.start()
    prepare(PrepareOptions((str(corpus),), tmp / f"out{megabytes}", chunk_bytes=32 << 10), progress=False)
    peaks.append(tracemalloc.get_traced_memory()[1])
    tracemalloc.stop()
print(json.dumps(peaks))
"""


def test_memory_is_bounded_by_the_chunk_not_by_the_corpus(tmp_path):
    """2 MB and 8 MB of input in chunks of 32 KB take the same peak of Python memory (before, the
    prepare listed every chunk's documents first: a 2 GB corpus took 5 GB).

    Measured in a fresh interpreter: in a long-lived one (this test session) the peak also holds
    whatever the interpreter's own tables happen to allocate meanwhile, e.g. the table of interned
    strings doubling (7.7 MB after ~1,600 tests) when pathlib interns one more shard name."""
    run = subprocess.run(
        [sys.executable, "-c", PEAK_OF_PREPARE, str(tmp_path)], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr
    peaks = json.loads(run.stdout)
    assert peaks[1] < 1.2 * peaks[0] and peaks[1] < 8e6, f"peaks {peaks} for 2 and 8 MB of input"
