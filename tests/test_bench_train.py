"""`moeforge bench train`: figures per case over the repeats, the ratio to transformers, the table,
and one-line errors for bad options (the measurements themselves run in `make bench`)."""

import pytest

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
