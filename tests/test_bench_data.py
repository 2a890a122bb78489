"""`moeforge bench data` run tiny: its JSON, and proof that each ratio moves when a known cost is
injected into one side (a baseline tokenizer that sleeps per batch, a loader that sleeps per batch, a
training step of known length). The start-up part spawns fresh interpreters: one slow test."""

import json
import re
import statistics
import time

import pytest

from conftest import SMALL
from moeforge.bench import data as bench_data
from moeforge.bench.data import DataBenchSettings, format_table, run_data_bench, write_corpus
from moeforge.cli import build_parser, main
from moeforge.config import ConfigError
from moeforge.data import ByteTokenizer, PackedLoader

TINY = dict(size_mb=0.2, chunk_mb=0.05, repeats=2, loader_batches=20, train_steps=2, startup_mb=(),
            overrides=tuple(SMALL.items()))  # fmt: skip

STEP_S = 0.05
"""the fake training step's length"""


class SleepingStep:
    """A trainer whose step takes STEP_S: training consumes a known number of tokens per second
    (put in the bench's place of `Trainer` by the fixture `sleeping_trainer`)."""

    def __init__(self, cfg, out):
        pass

    def train_step(self):
        time.sleep(STEP_S)
        return {}


@pytest.fixture
def sleeping_trainer(monkeypatch):
    monkeypatch.setattr(bench_data, "Trainer", SleepingStep)


class SleepingTokenizer(ByteTokenizer):
    """The byte tokenizer, `cost_s` slower per `encode_batch` call, counting its calls."""

    def __init__(self, cost_s: float):
        self.cost_s, self.calls = cost_s, 0

    def encode_batch(self, texts):
        self.calls += 1
        time.sleep(self.cost_s)
        return super().encode_batch(texts)


class SleepingLoader(PackedLoader):
    """PackedLoader, BATCH_COST_S slower per batch."""

    BATCH_COST_S = 0.01

    def next_batch(self):
        time.sleep(self.BATCH_COST_S)
        return super().next_batch()


def test_the_bench_runs_tiny_with_a_real_trainer_and_prints_its_figures():
    result = run_data_bench(DataBenchSettings(**TINY))
    json.dumps(result)
    config, prep, load = result["config"], result["prepare"], result["loader"]
    assert config["seq_len"] == 32 and config["global_batch_size"] == 4 and len(config["load_average_before"]) == 3
    assert prep["corpus_bytes"] >= 0.2e6 and prep["documents"] > 0 and prep["tokens"] > prep["corpus_bytes"] * 0.9
    for figures in (prep, load):
        assert len(figures["rounds"]) == 2
        low, high = figures["ratio_range"]
        assert 0 < low <= figures["ratio"] <= high
    per_round = [(r["tokens"] / r["prepare_s"]) / (r["encode_tokens"] / r["encode_s"]) for r in prep["rounds"]]
    assert prep["ratio"] == pytest.approx(statistics.median(per_round))
    assert all(r["encode_tokens"] <= r["tokens"] for r in prep["rounds"])  # prepare adds the separators
    assert load["ratio"] > 1  # reading 4 x 33 tokens from the page cache is faster than a training step
    assert result["startup"] == {}
    table = format_table(result)
    assert "prepare / encode_batch:" in table and "loader / training needs:" in table


@pytest.mark.usefixtures("sleeping_trainer")
def test_a_slower_baseline_tokenizer_raises_the_prepare_ratio_by_the_injected_time():
    clean = run_data_bench(DataBenchSettings(**TINY))["prepare"]
    slow = SleepingTokenizer(cost_s=0.1)
    injected = run_data_bench(DataBenchSettings(**TINY), baseline_tokenizer=slow)["prepare"]
    per_round = slow.calls / 2 * slow.cost_s  # seconds added to each round's baseline
    assert slow.calls >= 2 * 4  # 0.2 MB in 0.05 MB chunks: at least 4 batches a round
    for clean_round, slow_round in zip(clean["rounds"], injected["rounds"]):
        assert per_round <= slow_round["encode_s"] <= per_round + clean_round["encode_s"] + 0.5
    # the ratio prepare/encode is the baseline's time over prepare's: now mostly the injected time
    expected = per_round / min(r["prepare_s"] for r in injected["rounds"])
    assert injected["ratio"] > 3 * clean["ratio"]
    assert 0.5 * expected <= injected["ratio"] <= 2 * expected


@pytest.mark.usefixtures("sleeping_trainer")
def test_a_slower_loader_lowers_the_loader_ratio_to_the_injected_costs_ratio():
    result = run_data_bench(DataBenchSettings(**TINY))["loader"]
    assert result["training_tokens_per_s"] == pytest.approx(4 * 32 / STEP_S, rel=0.3)
    assert result["ratio"] > 20  # an unhindered loader is far faster than a 50 ms step
    injected = run_data_bench(DataBenchSettings(**TINY), loader=SleepingLoader)["loader"]
    # tokens per batch are the same on both sides: the ratio is the step's time over the batch's
    assert injected["ratio"] == pytest.approx(STEP_S / SleepingLoader.BATCH_COST_S, rel=0.3)


@pytest.mark.slow
def test_startup_on_a_corpus_20x_larger_reports_the_ratios(tmp_path):
    settings = DataBenchSettings(**{**TINY, "repeats": 1, "startup_mb": (0.2, 4.0)})
    startup = run_data_bench(settings)["startup"]
    small, large, ratios = startup["1"]["small"], startup["1"]["large"], startup["1"]["ratios"]
    assert ratios["tokens"] == pytest.approx(20, rel=0.2)
    for case in (small, large):
        assert 0 < case["first_step_s"] < 120
        assert case["peak_rss_mb"] >= case["anonymous_mb"] > 0 and case["file_backed_mb"] > 0
    assert ratios["peak_rss_mb"] == pytest.approx(large["peak_rss_mb"] / small["peak_rss_mb"])


def test_the_corpus_is_the_same_for_the_same_size_and_seed(tmp_path):
    first = write_corpus(tmp_path / "a.jsonl", 0.05)
    assert write_corpus(tmp_path / "b.jsonl", 0.05) == first
    assert (tmp_path / "a.jsonl").read_bytes() == (tmp_path / "b.jsonl").read_bytes()
    write_corpus(tmp_path / "c.jsonl", 0.05, seed=1)
    assert (tmp_path / "c.jsonl").read_bytes() != (tmp_path / "a.jsonl").read_bytes()


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--startup-mb", "50,2"], r"--startup-mb: got 50.0,2.0; allowed: SMALL,LARGE"),
        (["--startup-mb", "a,b"], r"--startup-mb: got 'a,b'; allowed"),
        (["--repeats", "0"], r"--repeats: got 0; allowed: an integer >= 1"),
        (["--workers", "0"], r"--workers: got 0; allowed"),
        (["--work-dir", "/no/such/dir"], r"--work-dir: '/no/such/dir' is not a directory"),
    ],
)
def test_bad_options_are_one_line_errors(argv, message, capsys):
    assert main(["bench", "data", *argv]) == ConfigError.exit_code
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert re.search(message, err), err


def test_the_command_takes_dotted_overrides():
    args, rest = build_parser().parse_known_args(["bench", "data", "--size-mb", "8", "--train.seq-len", "64"])
    assert args.size_mb == 8 and args.startup_mb == "2,50" and rest == ["--train.seq-len", "64"]
