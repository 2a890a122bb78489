"""`moeforge bench train`: figures per case over the repeats, the ratio to transformers, the table,
and one-line errors for bad options (the measurements themselves run in `make bench`)."""

from types import SimpleNamespace

import pytest
import torch

from moeforge.bench.train import TrainBenchSettings, format_table, peer_ratios, run_train_bench, summarise
from moeforge.cli import build_parser
from moeforge.config import ConfigError


def _run(step_s, memory=100 * 2**20):
    return {"step_s": step_s, "tokens_per_step": 1000, "peak_memory": {"bytes": memory, "kind": "peak RSS"},
            "flops_per_token": 1e6}  # fmt: skip


def test_summary_takes_each_runs_median_step_and_the_range_over_runs():
    case = summarise([_run([1.0, 2.0, 1.0]), _run([0.5, 0.5, 0.9])], peak=1e10)
    assert case["tokens_per_s_range"] == [1000.0, 2000.0]
    assert case["tokens_per_s"] == 1500.0
    assert case["mfu"] == pytest.approx(1500.0 * 1e6 / 1e10)
    assert summarise([{"error": "boom"}], peak=None) == {"error": "boom"}


def test_peer_ratio_is_moeforge_over_transformers():
    cases = {
        "qwen3-moe/transformers": summarise([_run([2.0]), _run([2.0])], None),
        "qwen3-moe/moeforge-eager": summarise([_run([1.0]), _run([1.0])], None),
    }
    ratios = peer_ratios(cases)
    assert ratios["qwen3-moe/eager"]["ratio"] == pytest.approx(2.0)
    result = {"preset": "tiny", "overrides": {}, "device": "cpu", "steps": 1, "warmup": 0, "repeats": 2,
              "peak_flops": None, "cases": cases, "peers": ratios}  # fmt: skip
    assert "qwen3-moe/eager: 2.00x transformers' tokens/s" in format_table(result)


@pytest.mark.parametrize(
    "settings, message",
    [
        (TrainBenchSettings(variants=("eager", "jit")), r"^--variants: got 'eager,jit'; allowed"),
        (TrainBenchSettings(steps=0), r"^--steps: got 0; allowed: an integer >= 1"),
        (TrainBenchSettings(overrides=(("train.activation-checkpoint", "all"),)), r"^train\.activation-checkpoint"),
    ],
)
def test_bad_options_are_one_line_errors(settings, message):
    with pytest.raises(ConfigError, match=message):
        run_train_bench(settings)


def test_the_command_takes_dotted_overrides():
    args, rest = build_parser().parse_known_args(["bench", "train", "--variants", "eager", "--train.seq-len", "64"])
    assert args.variants == "eager" and rest == ["--train.seq-len", "64"]


def test_a_bf16_variant_is_compared_with_transformers_as_run_by_default_and_under_bf16():
    cases = {
        "deepseek-v3/transformers": summarise([_run([3.0])], None),
        "deepseek-v3/transformers-bf16": summarise([_run([2.0])], None),
        "deepseek-v3/moeforge-compile+bf16": summarise([_run([1.0])], None),
    }
    ratios = peer_ratios(cases)
    assert ratios["deepseek-v3/compile+bf16"]["ratio"] == pytest.approx(3.0)
    assert ratios["deepseek-v3/compile+bf16 vs bf16"]["ratio"] == pytest.approx(2.0)
    assert ratios["deepseek-v3/compile+bf16 vs bf16"]["baseline"] == "transformers-bf16"


def test_bf16_on_the_cpu_warms_up_longer_than_fp32():
    from moeforge.bench.train import CPU_BF16_WARMUP, bench_config, warmup_steps

    settings = TrainBenchSettings(warmup=2)
    fp32, bf16 = (bench_config(settings, variant) for variant in ("eager", "bf16"))
    assert warmup_steps(settings, fp32, "cpu") == 2
    assert warmup_steps(settings, bf16, "cpu") == CPU_BF16_WARMUP
    assert warmup_steps(TrainBenchSettings(warmup=20), bf16, "cpu") == 20


class _Clock:
    """perf_counter for bench/train.py: moves when a fake training step says so."""

    now = 0.0

    @classmethod
    def perf_counter(cls) -> float:
        return cls.now


STEP_COST_S = {"eager": 4.0, "compile": 2.0, "bf16": 1.0}
"""each variant's step; a warm-up step costs x 100, the timed steps x 1, 1, 10, and each round x 1, 2, 8"""
ROUND_FACTORS = (1.0, 2.0, 8.0)


class _CostedTrainer:
    """In the Trainer's place: each step advances the fake clock by its variant's cost; the steps of
    the warm-up (2, or 10 for bf16 on the CPU) cost 100 times more, the timed ones 1, 1 and 10 times;
    every new trainer of a variant (a new round) costs more, by ROUND_FACTORS."""

    rounds: dict[str, int] = {}

    def __init__(self, cfg, out, init_weights=None):
        variant = "bf16" if cfg.train.dtype == "bf16" else "compile" if cfg.train.compile else "eager"
        self.round = _CostedTrainer.rounds.get(variant, 0)
        _CostedTrainer.rounds[variant] = self.round + 1
        warmup = 10 if variant == "bf16" else 2
        self.costs = [100.0] * warmup + [1.0, 1.0, 10.0]
        self.cost = STEP_COST_S[variant] * ROUND_FACTORS[self.round]
        self.steps = 0

    def train_step(self):
        _Clock.now += self.cost * self.costs[self.steps]
        self.steps += 1


def test_tokens_per_s_and_mfu_follow_the_injected_step_costs(monkeypatch):
    """Every measurement in this process on a fake clock: a case's tokens/s is its tokens per step
    over the median timed step of each round, the median of the rounds (range: the rounds' extremes);
    MFU is that rate x FLOPs per token over the peak of the case's precision (injected: fp32 1 TFLOP/s,
    bf16 4). So compile is 2x eager's tokens/s, bf16 4x, whatever the rounds' factors."""
    from moeforge.bench import train as bench_train
    from moeforge.model.flops import training_flops_per_token

    peaks = {torch.float32: 1e12, torch.bfloat16: 4e12}
    monkeypatch.setattr(bench_train, "time", _Clock)
    monkeypatch.setattr(bench_train, "Trainer", _CostedTrainer)
    monkeypatch.setattr(_CostedTrainer, "rounds", {})
    monkeypatch.setattr(bench_train, "_in_fresh_process", lambda fn, args: fn(*args))
    monkeypatch.setattr(
        bench_train, "measured_peak", lambda device, size, dtype=torch.float32: (peaks[dtype], "injected")
    )
    monkeypatch.setattr(bench_train, "reset_peak_memory", lambda: None)
    monkeypatch.setattr(bench_train, "peak_memory", lambda: {"bytes": 2**20, "kind": "injected"})
    settings = TrainBenchSettings(variants=tuple(STEP_COST_S), steps=3, warmup=2, repeats=3)
    result = run_train_bench(settings)
    for variant, cost in STEP_COST_S.items():
        cfg = bench_train.bench_config(settings, variant).train
        tokens = cfg.global_batch_size * cfg.seq_len
        rates = [tokens / (cost * factor) for factor in ROUND_FACTORS]  # each round's median step: x 1
        case = result["cases"][variant]
        assert case["tokens_per_s"] == pytest.approx(rates[1])
        assert case["tokens_per_s_range"] == pytest.approx([rates[2], rates[0]])
        flops = training_flops_per_token(bench_train.bench_config(settings, variant).model, cfg.seq_len)
        peak = peaks[torch.bfloat16 if variant == "bf16" else torch.float32]
        assert case["mfu"] == pytest.approx(rates[1] * flops / peak)
    cases = result["cases"]
    assert cases["compile"]["tokens_per_s"] / cases["eager"]["tokens_per_s"] == pytest.approx(2.0)
    assert cases["bf16"]["tokens_per_s"] / cases["eager"]["tokens_per_s"] == pytest.approx(4.0)
    assert result["peak_flops"] == 1e12 and result["peak_flops_bf16"] == 4e12


def test_the_peak_is_the_best_of_the_timed_matmuls(monkeypatch):
    """A scripted clock: the matmuls (after an untimed one) take 3, 1 and 2 s: 2 n^3 FLOPs over 1 s
    (the median would give half, the mean half too)."""
    from moeforge.bench import train as bench_train

    ticks = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])
    monkeypatch.setattr(bench_train, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    peak, source = bench_train.measured_peak("cpu", 16, repeats=3)
    assert peak == pytest.approx(2 * 16**3 / 1.0)
    assert source.startswith("fp32 16^3 matmul")
