"""Mixtures (`--data.path a:0.7,b:0.3`): the blend keeps every source's share at every prefix, its
order equals an independent reference (a plain-Python greedy and each source's own epoch order), it
is the same for every world size and across a resume, a training run logs tokens per source, and
each bad mixture is one line naming data.path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import small_config
from moeforge.cli import main
from moeforge.config import ConfigError
from moeforge.config.data import mixture_sources
from moeforge.data import PackedLoader
from moeforge.data.blend import BlendedLoader, _source_seed, blend_sources
from moeforge.data.prepare import PrepareOptions, prepare
from moeforge.run import read_metrics
from test_data import SENTENCES, write_bpe_tokenizer

# ---------------------------------------------------------------------------------------------
# The blend order


def reference_sources(weights: list[float], n: int) -> list[int]:
    """Megatron's greedy in plain Python: position i goes to the first source with the largest
    weight*(i+1) - count."""
    counts = [0] * len(weights)
    chosen = []
    for i in range(n):
        errors = [w * (i + 1) - c for w, c in zip(weights, counts)]
        d = errors.index(max(errors))
        counts[d] += 1
        chosen.append(d)
    return chosen


def test_every_prefix_holds_each_share_within_one_sequence():
    rng = np.random.default_rng(0)
    for _ in range(60):
        weights = rng.random(rng.integers(1, 7)) + 1e-3
        weights /= weights.sum()
        chosen = blend_sources(weights, np.zeros(len(weights), dtype=np.int64), 1500)
        assert chosen.tolist() == reference_sources(weights.tolist(), 1500)
        counts = np.cumsum(np.eye(len(weights), dtype=np.int64)[chosen], axis=0)
        prefix = np.arange(1, 1501)[:, None]
        assert np.all(np.abs(counts - weights * prefix) <= 1)


STREAMS = [torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(n)) for n in (400, 250, 130)]
"""44, 27 and 14 windows of 9 tokens (seq_len 8): the smaller sources wrap into new epochs"""
WEIGHTS = [0.5, 0.3, 0.2]


def reference_ids(seed: int, n: int) -> list[tuple[int, int]]:
    """(source, window) of the first n positions: the k-th draw of source d is window k of d's own
    epoch order."""
    drawn = [0] * len(STREAMS)
    ids = []
    for d in reference_sources(WEIGHTS, n):
        order = PackedLoader(STREAMS[d], 8, 1, _source_seed(seed, d))
        ids.append((d, int(order.window_ids(drawn[d], 1))))
        drawn[d] += 1
    return ids


def test_the_order_and_batches_equal_the_reference():
    loader = BlendedLoader(STREAMS, WEIGHTS, 8, global_batch_size=12, seed=5)
    ids = [loader.next_batch_ids() for _ in range(10)]
    assert [tuple(row) for step in ids for row in step.tolist()] == reference_ids(5, 120)
    inputs, targets = loader.batch(ids[3])
    for row, (d, w) in enumerate(ids[3].tolist()):
        window = STREAMS[d][w * 9 : (w + 1) * 9]
        assert torch.equal(inputs[row], window[:-1]) and torch.equal(targets[row], window[1:])


def test_the_order_is_deterministic_and_depends_on_the_seed():
    def first(seed: int) -> torch.Tensor:
        return BlendedLoader(STREAMS, WEIGHTS, 8, 12, seed).window_ids(0, 60)

    assert torch.equal(first(1), first(1)) and not torch.equal(first(1), first(2))


def test_ranks_slices_are_the_one_process_batch_and_resume_on_any_world():
    steps, resume_at = 8, 3
    one = BlendedLoader(STREAMS, WEIGHTS, 8, 12, seed=7)
    uninterrupted = [one.next_batch_ids() for _ in range(steps)]
    ranks = [BlendedLoader(STREAMS, WEIGHTS, 8, 12, seed=7, rank=r, world_size=4) for r in range(4)]
    for step in range(resume_at):
        assert torch.equal(torch.cat([loader.next_batch_ids() for loader in ranks]), uninterrupted[step])
    state = json.loads(json.dumps(ranks[2].state_dict()))  # a checkpoint's meta is JSON
    assert state["sequences_consumed"] == resume_at * 12 and sum(state["source_counts"]) == resume_at * 12
    for world in (2, 1, 3):
        resumed = [
            BlendedLoader(STREAMS, WEIGHTS, 8, 12, seed=7, rank=r, world_size=world) for r in range(world)
        ]
        for loader in resumed:
            loader.load_state_dict(state)
        for step in range(resume_at, steps):
            assert torch.equal(
                torch.cat([loader.next_batch_ids() for loader in resumed]), uninterrupted[step]
            )
    # asked for an earlier position, the loader replays from 0 and gives the same windows
    assert torch.equal(one.window_ids(24, 12), uninterrupted[2])


def test_a_changed_mixture_does_not_resume():
    state = BlendedLoader(STREAMS, WEIGHTS, 8, 12).state_dict()
    with pytest.raises(ConfigError, match="^data.path: the checkpoint's data order"):
        BlendedLoader(STREAMS, [0.4, 0.4, 0.2], 8, 12).load_state_dict(state)


# ---------------------------------------------------------------------------------------------
# Training on a mixture


def prepared(tmp_path: Path, name: str, sentence: str, tokenizer: str = "byte") -> str:
    """A prepared directory of 40 documents built on `sentence`, 30% held out."""
    corpus = tmp_path / f"{name}-corpus"
    corpus.mkdir()
    lines = [json.dumps({"text": f"{sentence} number {i}"}) for i in range(40)]
    (corpus / "docs.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / name
    prepare(PrepareOptions((str(corpus),), out, tokenizer=tokenizer, val_fraction=0.3), progress=False)
    return str(out)


@pytest.fixture
def two_sources(tmp_path) -> tuple[str, str]:
    return prepared(tmp_path, "a", SENTENCES[0]), prepared(tmp_path, "b", SENTENCES[1])


def test_a_two_source_run_logs_tokens_and_validation_per_source(two_sources, tmp_path):
    from moeforge.train.trainer import Trainer

    a, b = two_sources
    cfg = small_config(data__path=f"{a}:3,{b}:1", train__steps="3", train__seq_len="16", train__log_every="1")
    trainer = Trainer(cfg, tmp_path / "run")
    trainer.fit()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2, 3]
    for record in records:
        per_source = record["tokens_per_source"]
        assert sum(per_source.values()) == record["tokens_seen"]
        sequences = record["tokens_seen"] // 16
        assert abs(per_source[a] // 16 - 0.75 * sequences) <= 1
    last = records[-1]
    assert set(last["val_loss_per_source"]) == {a, b}
    mean = 0.75 * last["val_loss_per_source"][a] + 0.25 * last["val_loss_per_source"][b]
    assert last["val_loss"] == pytest.approx(mean, rel=1e-12)


def test_a_single_source_run_logs_no_sources(two_sources, tmp_path):
    from moeforge.train.trainer import Trainer

    cfg = small_config(data__path=two_sources[0], train__steps="1", train__seq_len="16")
    Trainer(cfg, tmp_path / "run").fit()
    assert all("tokens_per_source" not in r for r in read_metrics(tmp_path / "run"))


@pytest.mark.parametrize("weight", ["0", "-1", "nan", "inf", "heavy", ""])
def test_a_weight_that_is_not_positive_and_finite_is_one_line(two_sources, tmp_path, capsys, weight):
    a, b = two_sources
    assert main(["train", "--out", str(tmp_path / "run"), "--data.path", f"{a}:0.5,{b}:{weight}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("data.path: got") == 1 and "positive finite weight" in err and "\n" not in err


def test_a_source_that_is_not_prepared_is_one_line(two_sources, tmp_path, capsys):
    a, _ = two_sources
    raw = tmp_path / "a-corpus"
    for b, said in ((raw, "is not a prepared directory"), (tmp_path / "missing", "a directory made by")):
        assert main(["train", "--out", str(tmp_path / "run"), "--data.path", f"{a}:1,{b}:1"]) == 2
        err = capsys.readouterr().err.strip()
        assert "error: data.path: " in err and said in err and "\n" not in err


def test_sources_of_different_tokenizers_are_one_line(two_sources, tmp_path, capsys):
    a, _ = two_sources
    tokenizer = write_bpe_tokenizer(tmp_path / "tok.json", ["<|endoftext|>"])
    c = prepared(tmp_path, "c", SENTENCES[2], tokenizer=str(tokenizer))
    assert main(["train", "--out", str(tmp_path / "run"), "--data.path", f"{a}:1,{c}:1"]) == 2
    err = capsys.readouterr().err.strip()
    assert "error: data.path: " in err and "a mixture needs one tokenizer" in err and "\n" not in err


def test_a_source_too_short_for_one_window_is_named(two_sources, tmp_path, capsys):
    """The sources' splits hold one or two thousand tokens each: at seq-len 2000 neither makes one window,
    and the line names the first source and its split (not the loader's anonymous train.seq-len line)."""
    a, b = two_sources
    flags = ["--data.path", f"{a}:1,{b}:1", "--model.max-seq-len", "2048", "--train.seq-len", "2000"]
    assert main(["train", "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert f"data.path: {a!r} holds" in err and "training tokens; allowed: at least train.seq-len+1=2001" in err
    assert "\n" not in err


def test_a_resumed_mixture_run_sees_what_an_uninterrupted_one_sees(two_sources, tmp_path):
    from moeforge.train.trainer import Trainer

    a, b = two_sources
    cfg = lambda: small_config(data__path=f"{a}:0.6,{b}:0.4", train__steps="3", train__seq_len="16")  # noqa: E731
    Trainer(cfg(), tmp_path / "whole").fit()
    Trainer(cfg(), tmp_path / "split").fit(until_step=2)
    resumed = Trainer(cfg(), tmp_path / "split")
    resumed.fit()
    assert resumed.loader.sequences_consumed == 3 * resumed.cfg.train.global_batch_size
    whole, split = read_metrics(tmp_path / "whole")[-1], read_metrics(tmp_path / "split")[-1]
    assert split["tokens_per_source"] == whole["tokens_per_source"] and split["loss"] == whole["loss"]


def test_a_toml_table_is_the_same_mixture_as_the_flag(two_sources, tmp_path):
    from moeforge.config import load_config

    a, b = two_sources
    toml = tmp_path / "mix.toml"
    toml.write_text(f'[data.path]\n"{a}" = 3\n"{b}" = 1.0\n')
    from_table = load_config(config_file=toml)
    assert from_table.data.path == f"{a}:3,{b}:1.0"
    assert mixture_sources(from_table.data.path) == [(a, 0.75), (b, 0.25)]
    for table, said in [("", "at least one"), (f'"{a}" = "heavy"', "a number"), (f'"{a}" = -1', "positive")]:
        toml.write_text(f"[data.path]\n{table}\n")
        with pytest.raises(ConfigError, match=rf"^data\.path: .*{said}"):
            load_config(config_file=toml).validate()
