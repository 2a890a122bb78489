"""`moeforge bench decode`: a short run end to end (eager only, a few tokens), and the tie rule."""

from types import SimpleNamespace

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


SECONDS = {"transformers": [4.0, 12.0, 8.0], "eager": [2.0, 3.0, 8.0], "compiled": [1.0, 6.0, 2.0]}
"""each case's seconds for the 8 new tokens in repeats 1, 2, 3: per repeat transformers / eager is
2, 4, 1 and transformers / compiled 4, 2, 4"""


def test_speeds_ratios_and_bandwidth_follow_the_injected_times_of_each_case(monkeypatch):
    """transformers' `generate` advances a fake clock by its seconds; moeforge's `greedy` reports its
    own (prefill + decode, as `generate` measures them); the compiled case's first call (compilation)
    and the final untimed eager call cost 100 s and must not count. Best speed: 8 tokens over the
    fastest repeat; vs transformers: the ratio of the bests, and per repeat the median and range of
    transformers' seconds over the case's; bandwidth: bytes per token x the best speed."""
    from moeforge.bench import decode as bench_decode
    from moeforge.infer import GenerationResult

    clock = [0.0]
    monkeypatch.setattr(bench_decode, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    hf_seconds = iter(SECONDS["transformers"])
    prompt_len, n = 4, 8

    def hf_generate(prompt, max_new_tokens, **kwargs):
        clock[0] += next(hf_seconds)
        return torch.cat([prompt, torch.arange(max_new_tokens)[None]], dim=1)

    hf = SimpleNamespace(generate=hf_generate)
    model = SimpleNamespace(cfg=SimpleNamespace(attention="mla"))
    monkeypatch.setattr(bench_decode, "_same_weights", lambda transformers, name: (hf, model))
    monkeypatch.setattr(bench_decode, "_hf_logits", lambda hf, prompt, n: torch.zeros(n, 16))
    moeforge_seconds = {True: iter([100.0, *SECONDS["compiled"]]), False: iter([*SECONDS["eager"], 100.0])}

    def greedy(model, prompt, new_tokens, compile):
        seconds = next(moeforge_seconds[compile])
        # 60 MB of active weights, 5 MB of KV cache per token: 100 MB per token at the mean context of 8
        return GenerationResult(prompt, list(range(new_tokens)), seconds / 4, 3 * seconds / 4, 60_000_000,
                                5_000_000, compile_s=30.0)  # fmt: skip

    monkeypatch.setattr(bench_decode, "greedy", greedy)
    settings = DecodeBenchSettings(models=("qwen3-moe",), new_tokens=n, prompt_len=prompt_len, repeats=3)
    row = bench_decode._bench_model(None, "qwen3-moe", settings)
    assert row["tokens_per_s"] == pytest.approx({case: n / min(s) for case, s in SECONDS.items()})
    for case, seconds in SECONDS.items():
        assert row["tokens_per_s_range"][case] == pytest.approx([n / max(seconds), n / min(seconds)])
    assert row["vs_transformers"] == pytest.approx({"eager": 2.0, "compiled": 4.0})
    assert row["vs_transformers_per_repeat"] == {
        "eager": pytest.approx({"median": 2.0, "min": 1.0, "max": 4.0}),
        "compiled": pytest.approx({"median": 4.0, "min": 2.0, "max": 4.0}),
    }
    assert row["compiled_vs_eager"] == pytest.approx(2.0)
    assert row["compile_s"] == 30.0
    assert row["bytes_per_token"] == pytest.approx(1e8)
    assert row["bandwidth_gb_s"] == pytest.approx({"transformers": 0.2, "eager": 0.4, "compiled": 0.8})
    assert all(tokens["identical"] for tokens in row["tokens"].values())

    result = {"settings": {"new_tokens": n}, "copy_gb_s": 4.0, "cores": 2, "copy_at_threads_gb_s": 2.0,
              "threads": 1, "models": [row]}  # fmt: skip
    lines = format_table(result).splitlines()
    eager = next(line for line in lines if " eager " in line)
    assert "2.00x, 2.00x (1.00-4.00)" in eager and "10.0%" in eager  # 0.4 GB/s of the copy's 4
    compiled = next(line for line in lines if " compiled " in line)
    assert "4.00x, 4.00x (2.00-4.00)" in compiled and "20.0%" in compiled
    assert "compiled vs eager 2.00x" in format_table(result)


def test_the_copy_bandwidth_is_read_and_write_bytes_over_the_best_copy(monkeypatch):
    """A scripted clock: the copies take 3, 1 and 2 s; 2 x 4 MiB over 1 s (median or mean: 2 s)."""
    from moeforge.bench import decode as bench_decode

    ticks = iter([0.0, 3.0, 10.0, 11.0, 20.0, 22.0])
    monkeypatch.setattr(bench_decode, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    assert bench_decode.copy_bandwidth_gb_s(4 * 2**20, repeats=3) == pytest.approx(2 * 4 * 2**20 / 1.0 / 1e9)
