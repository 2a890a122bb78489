"""`moeforge bench decode`: a short run end to end (eager only, a few tokens), and the tie rule."""

import pytest
import torch

from moeforge.bench.decode import DecodeBenchSettings, compare_tokens, format_table, run_decode_bench
from moeforge.config import ConfigError

pytest.importorskip("transformers")


@pytest.mark.slow  # ~20 s: two models made, saved and imported, and two 512 MB copies timed
def test_short_bench_gives_identical_tokens_ratios_and_bandwidth():
    settings = DecodeBenchSettings(new_tokens=6, prompt_len=4, repeats=1, compile=False)
    result = run_decode_bench(settings)
    assert [row["model"] for row in result["models"]] == ["deepseek-v3", "qwen3-moe"]
    for row in result["models"]:
        assert set(row["tokens_per_s"]) == {"transformers", "eager"}
        assert row["tokens"]["eager"]["identical"], row["tokens"]
        assert row["vs_transformers"]["eager"] > 0 and row["bandwidth_gb_s"]["eager"] > 0
    assert result["copy_gb_s"] > 0
    assert "identical" in format_table(result)


def test_a_difference_is_a_tie_only_when_the_top_two_logits_are_within_the_gap():
    logits = torch.tensor([[0.0, 5.0, 1.0], [2.0, 2.0 + 5e-5, 0.0], [0.0, 1.0, 3.0]])
    assert compare_tokens([1, 1, 2], [1, 1, 2], logits) == {"identical": True, "first_difference": None}
    tie = compare_tokens([1, 1, 2], [1, 0, 2], logits)
    assert tie["first_difference"] == 1 and tie["tie"] and tie["top2_gap"] == pytest.approx(5e-5, rel=1e-2)
    assert not compare_tokens([1, 1, 2], [2, 1, 2], logits)["tie"]


def test_bad_settings_name_the_flag():
    with pytest.raises(ConfigError, match="--models: got llama"):
        DecodeBenchSettings(models=("llama",)).validate()
    with pytest.raises(ConfigError, match="--new-tokens: got 0"):
        DecodeBenchSettings(new_tokens=0).validate()
