"""A mixture (`--data.path a:0.7,b:0.3`) trained on 2 processes and resumed on 1 sees what one
uninterrupted process sees.

Two prepared sources of generated documents; b is small enough that its windows run into a second
epoch during the run. The split run trains SPLIT_AT steps under dp-shard 2, then resumes the same run
directory in one process to the end. Against one uninterrupted process: the same losses at every
step (rel 1e-5: the same fp32 sums in another order, as tests/distributed/test_equivalence.py), the
same (source, window) ids at every step (the two ranks' parts in rank order, then the one process's),
and `tokens_per_source` in metrics.jsonl counts seq_len tokens for every window drawn from a source
so far, counted from the recorded ids.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from conftest import small_config
from moeforge.config import Config
from moeforge.data.prepare import PrepareOptions, prepare
from moeforge.parallel.spawn import run_on_processes
from moeforge.run import read_metrics
from moeforge.train.trainer import Trainer
from test_layout_matrix import record_draws

STEPS, SPLIT_AT = 6, 3
WORDS = "expert router token gate load balance shard stage replica window batch epoch loss".split()


def prepared_source(tmp_path: Path, name: str, train_docs: int) -> str:
    """A prepared directory (byte tokenizer) of `train_docs` generated training documents of ~70
    tokens each and 2 validation documents."""
    rng = random.Random(name)

    def write(file: str, n: int) -> str:
        docs = [" ".join([f"{name}{i}:", *rng.choices(WORDS, k=10)]) for i in range(n)]
        path = tmp_path / f"{name}-{file}.jsonl"
        path.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in docs))
        return str(path)

    out = tmp_path / name
    prepare(PrepareOptions((write("train", train_docs),), out, val_inputs=(write("val", 2),)), progress=False)
    return str(out)


def config(path: str, world: int) -> Config:
    parallel = {"parallel__dp_shard": "2"} if world == 2 else {}
    steps = {"train__steps": str(STEPS), "train__checkpoint_every": "100"}  # a checkpoint where a run stops
    return small_config(world, data__path=path, **steps, **parallel)


def train(rank: int, world: int, path: str, out: str, until: int, draws: str) -> None:
    """Resume `out` if it holds a checkpoint and train to step `until`; the (source, window) ids this
    rank drew at each step go to `draws`/rank{rank}.json."""
    trainer = Trainer(config(path, world), out)
    drawn = record_draws(trainer)
    trainer.fit(until_step=until)
    Path(draws, f"rank{rank}.json").write_text(json.dumps(drawn))


def global_batches(draws: Path, world: int) -> dict[int, list]:
    """{step: the ranks' drawn ids concatenated in rank order} of one `train` call."""
    by_rank = [json.loads((draws / f"rank{rank}.json").read_text()) for rank in range(world)]
    assert all(drawn.keys() == by_rank[0].keys() for drawn in by_rank)
    return {int(step): [row for drawn in by_rank for row in drawn[step]] for step in by_rank[0]}


@pytest.mark.slow
def test_a_mixture_resumed_from_two_processes_on_one_sees_the_uninterrupted_run(tmp_path):
    a, b = prepared_source(tmp_path, "a", 30), prepared_source(tmp_path, "b", 3)
    path = f"{a}:0.7,{b}:0.3"
    for name in ("whole", "split-2", "split-1"):
        (tmp_path / name).mkdir()

    train(0, 1, path, str(tmp_path / "whole-run"), STEPS, str(tmp_path / "whole"))
    split = tmp_path / "split-run"
    run_on_processes(2, train, 2, path, str(split), SPLIT_AT, str(tmp_path / "split-2"))
    train(0, 1, path, str(split), STEPS, str(tmp_path / "split-1"))

    whole = global_batches(tmp_path / "whole", 1)
    drawn = {**global_batches(tmp_path / "split-2", 2), **global_batches(tmp_path / "split-1", 1)}
    assert sorted(drawn) == sorted(whole) == list(range(1, STEPS + 1))
    assert drawn == whole
    b_draws = [window for step in drawn.values() for source, window in step if source == 1]
    assert len(set(b_draws)) < len(b_draws), "the setup: b's windows should run into a second epoch"

    records, reference = read_metrics(split), read_metrics(tmp_path / "whole-run")
    assert [r["step"] for r in records] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in records] == pytest.approx([r["loss"] for r in reference], rel=1e-5)
    seq_len = config(path, 1).train.seq_len
    for record in records:
        rows = [source for step in range(1, record["step"] + 1) for source, _ in drawn[step]]
        expected = {a: seq_len * rows.count(0), b: seq_len * rows.count(1)}
        assert record["tokens_per_source"] == expected, f"step {record['step']}"
