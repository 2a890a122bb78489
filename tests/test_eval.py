"""`moeforge eval`: a checkpoint's loss on prepared datasets equals a float64 reference computed a
window at a time, and the trainer's validation loss when the batches coincide; refusals are one line."""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import small_config
from moeforge.cli import main
from moeforge.data.indexed import IndexedDataset
from moeforge.data.prepare import MANIFEST_FILE, PrepareOptions, prepare
from moeforge.infer import load_model
from moeforge.infer.evaluate import evaluate
from moeforge.train.trainer import Trainer
from test_data import SENTENCES, write_bpe_tokenizer

SEQ_LEN = 16
EVAL_BATCHES = 2


def write_corpus(root: Path, n_documents: int, offset: int = 0) -> Path:
    root.mkdir(parents=True)
    records = [f"{SENTENCES[i % 3]} number {i}" for i in range(offset, offset + n_documents)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in records))
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """Two prepared directories (byte tokenizer, 30% held out) and a run trained 2 steps on the first,
    with the trainer's own validation loss at the end."""
    tmp = tmp_path_factory.mktemp("eval")
    for name, offset in (("web", 0), ("books", 100)):
        prepare(
            PrepareOptions(
                (str(write_corpus(tmp / f"{name}-text", 60, offset)),), tmp / name, val_fraction=0.3
            ),
            progress=False,
        )
    cfg = small_config(
        data__path=str(tmp / "web"),
        train__steps="2",
        train__seq_len=str(SEQ_LEN),
        train__eval_batches=str(EVAL_BATCHES),
    )
    trainer = Trainer(cfg, tmp / "run")
    trainer.fit()
    return {
        "tmp": tmp,
        "run": tmp / "run",
        "val_loss": trainer.validation_loss(),
        "micro_batch": trainer.micro_batch,
    }


def reference_loss(model: torch.nn.Module, tokens, seq_len: int, n_windows: int) -> float:
    """Mean next-token cross-entropy over the first `n_windows` windows of seq_len+1, one window a forward,
    log-softmax in float64."""
    total = 0.0
    with torch.no_grad():
        for i in range(n_windows):
            window = torch.from_numpy(tokens[i * (seq_len + 1) : (i + 1) * (seq_len + 1)].astype("int64"))
            logits = model(window[None, :-1]).logits[0].double()
            total += F.cross_entropy(logits, window[1:], reduction="sum").item()
    return total / (n_windows * seq_len)


@pytest.mark.parametrize("batch_size, max_batches", [(3, 0), (4, 2)])
def test_eval_loss_equals_a_float64_reference(trained, batch_size, max_batches):
    model = load_model(trained["run"]).model
    tokens = IndexedDataset(trained["tmp"] / "web" / "val").tokens
    all_windows = len(tokens) // (SEQ_LEN + 1)
    result = evaluate(model, tokens, SEQ_LEN, batch_size, max_batches)
    n_windows = min(all_windows, batch_size * max_batches) if max_batches else all_windows
    assert (result.windows, result.tokens) == (n_windows, n_windows * SEQ_LEN)
    assert abs(result.loss - reference_loss(model, tokens, SEQ_LEN, n_windows)) < 1e-6
    assert result.perplexity == pytest.approx(math.exp(result.loss))
    assert not model.training


def test_eval_on_the_runs_validation_split_is_the_trainers_validation_loss(trained):
    tokens = IndexedDataset(trained["tmp"] / "web" / "val").tokens
    result = evaluate(load_model(trained["run"]).model, tokens, SEQ_LEN, trained["micro_batch"], EVAL_BATCHES)
    assert result.loss == trained["val_loss"]


def test_the_command_prints_a_line_per_dataset_and_json(trained, capsys):
    tmp = trained["tmp"]
    paths = [str(tmp / "web"), str(tmp / "books")]
    assert (
        main(["eval", "--checkpoint", str(trained["run"]), *paths, "--batch-size", "2", "--max-batches", "3"])
        == 0
    )
    lines = capsys.readouterr().out.splitlines()
    pattern = (
        r"(.*) val: loss (\d+\.\d{4}) nats/token, perplexity (\d+\.\d\d) over 96 tokens \(6 windows of 16\)"
    )
    assert [re.fullmatch(pattern, line).group(1) for line in lines] == paths

    assert (
        main(
            [
                "eval",
                "--checkpoint",
                str(trained["run"]),
                *paths,
                "--split",
                "train",
                "--json",
                "--seq-len",
                "8",
            ]
        )
        == 0
    )
    report = json.loads(capsys.readouterr().out)
    assert (report["split"], report["seq_len"], report["step"]) == ("train", 8, 2)
    model = load_model(trained["run"]).model
    for path, entry in zip(paths, report["datasets"], strict=True):
        expected = evaluate(model, IndexedDataset(Path(path) / "train").tokens, 8)
        assert (
            entry["path"] == path and entry["loss"] == expected.loss and entry["windows"] == expected.windows
        )
        assert entry["perplexity"] == pytest.approx(math.exp(expected.loss))


def _other_tokenizer(tmp: Path) -> str:
    tokenizer = write_bpe_tokenizer(tmp / "tok.json", ["<|endoftext|>"])
    prepare(
        PrepareOptions((str(tmp / "web-text"),), tmp / "bpe", str(tokenizer), val_fraction=0.3),
        progress=False,
    )
    return str(tmp / "bpe")


def _larger_vocab(tmp: Path) -> str:
    shutil.copytree(tmp / "web", tmp / "wide")
    manifest = json.loads((tmp / "wide" / MANIFEST_FILE).read_text())
    manifest["vocab_size"] = 100_000
    (tmp / "wide" / MANIFEST_FILE).write_text(json.dumps(manifest))
    return str(tmp / "wide")


def _tiny_split(tmp: Path) -> str:
    (tmp / "tiny.txt").write_text("hi")
    prepare(
        PrepareOptions((str(tmp / "web-text"),), tmp / "tiny", val_inputs=(str(tmp / "tiny.txt"),)),
        progress=False,
    )
    return str(tmp / "tiny")


def _truncated(tmp: Path) -> str:
    shutil.copytree(tmp / "web", tmp / "cut")
    with (tmp / "cut" / "val.bin").open("r+b") as stream:
        stream.truncate(10)
    return str(tmp / "cut")


@pytest.mark.parametrize(
    "make, flags, said",
    [
        (lambda tmp: str(tmp / "nowhere"), [], "DATA_DIR: '"),
        (lambda tmp: str(tmp / "web-text"), [], f"has no {MANIFEST_FILE}"),
        (_other_tokenizer, [], "prepared with the tokenizer tokenizer.json sha256"),
        (_larger_vocab, [], "vocab_size 100000; allowed: at most the model's vocab-size"),
        (_tiny_split, [], "tokens in split 'val'; allowed: at least one window of --seq-len+1 = 17"),
        (_truncated, [], "val.bin: 10 bytes, the manifest recorded"),
        (
            lambda tmp: str(tmp / "web"),
            ["--seq-len", "1000"],
            "--seq-len: got 1000; allowed: 1 to the model's",
        ),
        (lambda tmp: str(tmp / "web"), ["--batch-size", "0"], "--batch-size: got 0"),
        (lambda tmp: str(tmp / "web"), ["--max-batches", "-1"], "--max-batches: got -1"),
        (lambda tmp: str(tmp / "web"), ["--device", "gpu"], "--device: got 'gpu'"),
    ],
)
def test_refusals_are_one_line(trained, capsys, make, flags, said):
    data_dir = make(trained["tmp"])
    capsys.readouterr()
    assert (
        main(["eval", "--checkpoint", str(trained["run"]), str(trained["tmp"] / "web"), data_dir, *flags])
        == 2
    )
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert said in err and "\n" not in err and err.startswith("moeforge eval: error: ")
    assert captured.out == ""  # nothing is scored before every dataset passed its checks


def test_evaluate_refuses_a_stream_shorter_than_one_window(trained):
    from moeforge.config import ConfigError

    with pytest.raises(ConfigError, match="--seq-len: got 16; allowed: at most 9"):
        evaluate(load_model(trained["run"]).model, torch.arange(10), SEQ_LEN)
