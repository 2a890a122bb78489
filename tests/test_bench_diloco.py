"""`bench diloco` on 2 spawned gloo processes, a few steps of a small model: the table's structure and
its bytes against a count made here from the codecs' documented layout and the streaming schedule."""

import dataclasses
import json
import math
import re

import pytest

from conftest import SMALL
from moeforge.bench.diloco import (
    PER_METHOD_KEYS,
    DilocoBenchSettings,
    Variant,
    parse_variant,
    run_config,
    run_diloco_bench,
    runs,
)
from moeforge.bench.diloco_results import format_table, required_bandwidth, summarize, write_plot
from moeforge.config import ConfigError
from moeforge.model.transformer import Transformer

SETTINGS = DilocoBenchSettings(
    steps=8,
    sync_every=4,
    fragments=2,
    overlap_steps=1,
    eval_every=4,
    codecs=("fp4-e3m0",),
    optimizers=("adamw",),
    seeds=(0,),
    overrides=tuple((k, v) for k, v in SMALL.items() if k not in PER_METHOD_KEYS),
)
BLOCK = 128  # diloco.quantize-block's default


def fragment_sizes(fragments: int) -> tuple[list[int], list[int]]:
    """(parameters, router-bias values) of each fragment: blocks dealt out strided, the embedding
    in the first fragment, everything else outside the blocks in the last."""
    model = Transformer(run_config(SETTINGS, runs(SETTINGS)[0], 2).model)
    params, biases = [0] * fragments, [0] * fragments

    def fragment(name: str) -> int:
        block = re.match(r"layers\.(\d+)\.", name)
        if block:
            return int(block[1]) % fragments
        return 0 if name.startswith("tok_embeddings.") else fragments - 1

    for name, param in model.named_parameters():  # a tied weight once
        params[fragment(name)] += param.numel()
    for name, buffer in model.named_buffers():
        if name.endswith("router.expert_bias"):
            biases[fragment(name)] += buffer.numel()
    return params, biases


def syncs_per_fragment(steps: int, h: int, fragments: int, overlap: int) -> list[int]:
    """Fragment p syncs after the steps s = p*H/P (mod H); at the end every fragment syncs once more
    unless its last sync was sent at the last step (in flight, it then lands by replacement)."""
    counts = []
    for p in range(fragments):
        due = [s for s in range(1, steps + 1) if s % h == p * h // fragments]
        counts.append(len(due) + (0 if due and due[-1] == steps else 1))
    return counts


def fp32_bytes(n: int, biases: int) -> int:
    """fp32 values, the router biases in fp32, the stop byte."""
    return 4 * n + 4 * biases + 1


def fp4_bytes(n: int, biases: int) -> int:
    """Two codes per byte, one fp32 scale per block of 128, then the router biases in fp32 and the
    stop byte."""
    return math.ceil(n / 2) + 4 * math.ceil(n / BLOCK) + 4 * biases + 1


def expected_bytes(steps: int, h: int, fragments: int, overlap: int, size) -> int:
    params, biases = fragment_sizes(fragments)
    counts = syncs_per_fragment(steps, h, fragments, overlap)
    return sum(c * size(n, b) for c, n, b in zip(counts, params, biases))


def test_bench_diloco_table_and_bytes(tmp_path):
    result = run_diloco_bench(SETTINGS, tmp_path / "runs")
    json.dumps(result)
    rows = {row["method"]: row for row in result["methods"]}
    assert list(rows) == ["data parallel", "DiLoCo H=4", "Streaming P=2 fp32", "Streaming P=2 fp4-e3m0"]

    params, _ = fragment_sizes(2)
    n = sum(params)
    assert result["config"]["parameters"] == n
    dp_bytes = 4 * n * SETTINGS.steps
    assert rows["data parallel"]["bytes_per_replica"] == dp_bytes
    assert rows["DiLoCo H=4"]["bytes_per_replica"] == expected_bytes(8, 4, 1, 0, fp32_bytes)
    assert rows["Streaming P=2 fp32"]["bytes_per_replica"] == expected_bytes(8, 4, 2, 1, fp32_bytes)
    assert rows["Streaming P=2 fp4-e3m0"]["bytes_per_replica"] == expected_bytes(8, 4, 2, 1, fp4_bytes)
    assert [row["syncs"] for row in rows.values()] == [8, 2, 5, 5]

    dp_val = rows["data parallel"]["val_loss"]
    for row in rows.values():
        assert row["ratio_to_dp"] == pytest.approx(dp_bytes / row["bytes_per_replica"])
        assert row["val_loss_gap_pct"] == pytest.approx(100 * (row["val_loss"] - dp_val) / dp_val)
        # validation at steps 4 and 8, the tokens of both ranks counted
        assert [t for t, _ in row["val_curve"]] == [4 * 4 * 32, 8 * 4 * 32]
        assert len(row["train_curve"]) == SETTINGS.steps
        assert all(math.isfinite(loss) for _, loss in row["train_curve"])
        # every exchange's bytes over the parameters it covered: fp32 32 bits and a little more
        # (router biases, the stop byte); FP4 4 bits, a fp32 scale per 128 values
        assert row["bits_per_param_per_sync"] == pytest.approx(8 * row["bytes_per_replica"] / row["synced_parameters"])
    assert rows["Streaming P=2 fp4-e3m0"]["mean_quant_error"] > 0
    assert rows["Streaming P=2 fp32"]["mean_quant_error"] == 0
    assert rows["data parallel"]["bits_per_param_per_sync"] == 32
    assert 32 < rows["Streaming P=2 fp32"]["bits_per_param_per_sync"] < 32.1
    assert 4 + 32 / BLOCK < rows["Streaming P=2 fp4-e3m0"]["bits_per_param_per_sync"] < 4 + 32 / BLOCK + 0.1
    # the syncs of fragment 0 and 1 cover the whole model as often as each fragment was sent
    counts = syncs_per_fragment(8, 4, 2, 1)
    assert rows["Streaming P=2 fp32"]["synced_parameters"] == sum(c * p for c, p in zip(counts, params))

    # the bandwidth columns follow the formula; data parallelism needs the most
    t = result["config"]["bandwidth_at"]["reference"]["step_s"]
    scale = SETTINGS.ref_params / n
    fp4 = rows["Streaming P=2 fp4-e3m0"]
    assert fp4["bandwidth_gbit_s"]["reference"] == pytest.approx(
        8e-9 * fp4["peak_sync_bytes"] * scale / (1 * t + 2 * t * (1 - 0.9) / 0.9)
    )
    needs = [row["bandwidth_gbit_s"]["measured"] for row in rows.values()]
    assert needs[0] == max(needs)

    table = format_table(result)
    assert all(name in table for name in rows)
    assert write_plot(result, tmp_path / "loss.png").stat().st_size > 0


def test_required_bandwidth_hides_the_exchange_behind_overlap():
    # 100 bytes every 10 steps of 1 s with 1 step of overlap: at u = 1 the exchange must fit in 1 s
    assert required_bandwidth(100, 10, 1, 1.0, 1 - 1e-12) == pytest.approx(100)
    # without overlap, u = 0.5 allows the exchange as long as the 10 compute steps
    assert required_bandwidth(100, 10, 0, 1.0, 0.5) == pytest.approx(10)
    # an overlap beyond the interval hides no more: one exchange per step still has to get through
    assert required_bandwidth(100, 1, 3, 1.0, 0.5) == pytest.approx(50)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"steps": 0}, r"^--steps: got 0; allowed: an integer >= 1$"),
        ({"codecs": ("fp5",)}, r"^--codecs: got 'fp5'; allowed: a comma-separated list of distinct"),
        ({"codecs": ("fp8", "fp8")}, r"^--codecs: got 'fp8' twice; allowed: a comma-separated list of distinct"),
        ({"codecs": ("none",)}, r"^--codecs: got 'none'; allowed: .* \(none only after topF\)"),
        ({"codecs": ("top1.5+int2",)}, r"^--codecs: got 'top1.5\+int2'; allowed: .*F in \(0, 1\), sparseloco"),
        ({"codecs": ("int2+ef+ef",)}, r"^--codecs: got 'int2\+ef\+ef'; allowed:"),
        ({"codecs": ("int2+sparseloco",)}, r"^--codecs: got 'int2\+sparseloco'; allowed: .*sparseloco only with ef$"),
        ({"optimizers": ("adamw", "lion")}, r"^--optimizers: got 'adamw,lion'; allowed: distinct names of adamw, muon$"),
        ({"optimizers": ()}, r"^--optimizers: got ''; allowed:"),
        ({"seeds": (0, 0)}, r"^--seeds: got \[0, 0\]; allowed: distinct integers >= 0, at least one$"),
        ({"overrides": (("train.optimizer", "muon"),)}, r"^--train.optimizer: set by the bench per method"),
        ({"overrides": (("train.log-every", "5"),)}, r"^--train.log-every: set by the bench per method"),
        ({"overrides": (("diloco.quantize", "fp8"),)}, r"^--diloco.quantize: set by the bench per method"),
        ({"fragments": 30}, r"diloco.fragments"),
    ],
)
def test_bench_diloco_rejects_bad_settings(change, message):
    with pytest.raises(ConfigError, match=message):
        run_diloco_bench(DilocoBenchSettings(**change))


def test_variants_are_written_topk_codec_ef():
    assert parse_variant("fp4-e3m0") == Variant("fp4-e3m0", False, 1.0)
    assert parse_variant("int2+ef") == Variant("int2", True, 1.0)
    assert parse_variant("top0.02+int2+ef") == Variant("int2", True, 0.02)
    assert parse_variant("top0.1+none") == Variant("none", False, 0.1)
    assert parse_variant("top0.02+int2+ef+sparseloco") == Variant("int2", True, 0.02, sparseloco=True)
    assert parse_variant("top0.02+int2+ef+sparseloco").diloco["outer"] == "sparseloco"
    for text in ("fp4-e3m0", "int2+ef", "top0.02+int2+ef", "top0.1+none", "top0.02+int2+ef+sparseloco"):
        assert parse_variant(text).label == text
    assert parse_variant("top0.02+int2+ef").diloco == {
        "quantize": "int2", "error-feedback": "true", "topk-fraction": "0.02"
    }  # fmt: skip
    slugs = [r.path for r in runs(DilocoBenchSettings(codecs=("int2+ef",), plain=False, optimizers=("adamw", "muon"), seeds=(0, 1)))]
    assert slugs[:3] == ["adamw/seed0/dp", "adamw/seed0/streaming-fp32", "adamw/seed0/streaming-int2+ef"]
    assert len(slugs) == 12 and slugs[-1] == "muon/seed1/streaming-int2+ef"


STEP_SECONDS = {"dp": 3.0, "diloco": 2.0, "streaming-fp32": 1.0, "streaming-fp4-e3m0": 1.5}
"""each method's step on this machine, injected; the 3rd step of every run is 10 times slower"""


def _metrics(method, steps: int, tokens_per_step: int, parameters: int) -> list[dict]:
    """metrics.jsonl of a run as the trainer writes it (tokens_per_s = tokens per step over that
    step's seconds), at STEP_SECONDS; the exchanges of a DiLoCo method, every k steps and at the
    end: 1000 bytes each, 2000 the last, each waited on for 0.25 s."""
    records = []
    every = method.sync_interval
    syncs = [] if method.slug == "dp" else [s for s in range(1, steps + 1) if s % every == 0 or s == steps]
    for step in range(1, steps + 1):
        seconds = STEP_SECONDS[method.slug] * (10 if step == 3 else 1)
        record = {"step": step, "tokens_seen": step * tokens_per_step,
                  "tokens_per_s": tokens_per_step / seconds, "lm_loss": 5.0 - step / 10}  # fmt: skip
        if step % 3 == 0:
            record["val_loss"] = 4.0 + len(method.slug) / 100
        if step in syncs:
            sent = 2000 if step == steps else 1000
            record["diloco"] = [{"bytes_per_replica": sent, "parameters": 250, "quant_error": 0.0, "wait_s": 0.25}]
        if step == steps and syncs:
            record["diloco_total"] = {
                "bytes_per_replica": 1000 * (len(syncs) - 1) + 2000,
                "data_parallel_bytes_per_replica": 4 * parameters * steps,
            }
        records.append(record)
    return records


def test_the_bandwidth_columns_follow_the_injected_step_times(tmp_path):
    """The runs' metrics are written by hand with known step times: a method's step is the median
    of its steps (the slow 3rd one ignored), and the measured bandwidth column uses DiLoCo's inner
    step T = 2 s (not data parallelism's 3 s, nor a mean): W = B / (tau T + k T (1 - u) / u) from
    each method's largest exchange B, k and tau, checked here by hand."""
    settings = dataclasses.replace(SETTINGS, steps=6, sync_every=4, eval_every=3, utilisation=0.8)
    parameters, tokens_per_step = 1000, 128
    for run in runs(settings):
        (tmp_path / run.path).mkdir(parents=True)
        lines = [json.dumps(r) for r in _metrics(run.method, settings.steps, tokens_per_step, parameters)]
        (tmp_path / run.path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    result = summarize(settings, tmp_path)
    rows = {row["method"]: row for row in result["methods"]}
    for run in runs(settings):
        assert rows[run.method.name]["median_step_s"] == pytest.approx(STEP_SECONDS[run.method.slug])
    measured_at = result["config"]["bandwidth_at"]["measured"]
    assert measured_at == {"step_s": pytest.approx(2.0), "params": parameters}

    # (largest exchange B, k, tau): data parallelism 4 bytes per parameter each step; DiLoCo every
    # H = 4 steps; Streaming DiLoCo P = 2 fragments: every 2 steps, overlapped with 1
    b_k_tau = {
        "data parallel": (4 * parameters, 1, 0),
        "DiLoCo H=4": (2000, 4, 0),
        "Streaming P=2 fp32": (2000, 2, 1),
        "Streaming P=2 fp4-e3m0": (2000, 2, 1),
    }
    u, ref_scale = 0.8, settings.ref_params / parameters
    for name, (b, k, tau) in b_k_tau.items():
        assert rows[name]["bandwidth_gbit_s"] == pytest.approx({
            "measured": 8e-9 * b / (tau * 2.0 + k * 2.0 * (1 - u) / u),
            "reference": 8e-9 * b * ref_scale / (tau * 1.0 + k * 1.0 * (1 - u) / u),
        })  # fmt: skip
    dp_bytes = 4 * parameters * settings.steps
    assert rows["DiLoCo H=4"]["ratio_to_dp"] == pytest.approx(dp_bytes / 3000)  # syncs at steps 4 and 6
    assert rows["Streaming P=2 fp32"]["ratio_to_dp"] == pytest.approx(dp_bytes / 4000)  # 2, 4, 6
    assert rows["Streaming P=2 fp32"]["wait_s"] == pytest.approx(3 * 0.25)
    assert "T = 2.000 s (median DiLoCo inner step" in format_table(result)


def test_statistics_over_seeds_and_the_gap_to_fp32(tmp_path):
    """Injected runs of 2 optimizers x 2 seeds whose final validation losses are known: each run's
    gaps to data parallelism and to fp32 Streaming DiLoCo of its own optimizer and seed, by hand,
    and each (method, optimizer)'s median, min and max over the seeds."""
    settings = dataclasses.replace(
        SETTINGS, steps=6, sync_every=4, eval_every=3, plain=False, optimizers=("adamw", "muon"), seeds=(3, 5)
    )
    final = {"dp": 2.0, "streaming-fp32": 2.2, "streaming-fp4-e3m0": 2.3}

    def loss(run):
        return final[run.method.slug] + (0.1 if run.seed == 5 else 0.0) + (0.5 if run.optimizer == "muon" else 0.0)

    for run in runs(settings):
        records = _metrics(run.method, settings.steps, 128, 1000)
        records[-1]["val_loss"] = loss(run)
        (tmp_path / run.path).mkdir(parents=True)
        (tmp_path / run.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = summarize(settings, tmp_path)
    for row, run in zip(result["methods"], runs(settings), strict=True):
        dp = 2.0 + (0.1 if run.seed == 5 else 0.0) + (0.5 if run.optimizer == "muon" else 0.0)
        assert (row["optimizer"], row["seed"], row["val_loss"]) == (run.optimizer, run.seed, loss(run))
        assert row["val_loss_gap_pct"] == pytest.approx(100 * (loss(run) - dp) / dp)
        assert row["gap_to_fp32_pct"] == pytest.approx(100 * (loss(run) - dp - 0.2) / (dp + 0.2))
    summary = {(row["method"], row["optimizer"]): row for row in result["over_seeds"]}
    assert len(summary) == 6
    fp4 = summary[("Streaming P=2 fp4-e3m0", "muon")]
    assert fp4["seeds"] == [3, 5]
    assert fp4["val_loss"] == {"median": pytest.approx(2.85), "min": 2.8, "max": 2.9, "values": [2.8, 2.9]}
    gaps = [100 * 0.3 / 2.5, 100 * 0.3 / 2.6]
    assert fp4["val_loss_gap_pct"]["min"] == pytest.approx(min(gaps))
    assert fp4["val_loss_gap_pct"]["median"] == pytest.approx(sum(gaps) / 2)
    table = format_table(result)
    assert "over seeds 3, 5: median (min to max)" in table
    assert "T = 1.000 s (median fp32 Streaming inner step" in table
    assert write_plot(result, tmp_path / "grid.png").stat().st_size > 0


def test_a_grid_resumes_in_its_out_and_refuses_other_settings(tmp_path):
    """Muon inside, top-k + int2 + error feedback, one seed, on 2 processes; run again into the same
    --out, every run is found finished and the result is the same; other settings are refused."""
    settings = dataclasses.replace(
        SETTINGS, steps=4, sync_every=2, eval_every=4, plain=False, codecs=("top0.1+int2+ef",),
        optimizers=("muon",), seeds=(1,),
    )  # fmt: skip
    first = run_diloco_bench(settings, tmp_path / "grid")
    rows = {row["method"]: row for row in first["methods"]}
    assert list(rows) == ["data parallel", "Streaming P=2 fp32", "Streaming P=2 top0.1+int2+ef"]
    sparse = rows["Streaming P=2 top0.1+int2+ef"]
    # a tenth of the values at 2 bits each, with their indices and scales: far below fp32's 32
    assert sparse["bits_per_param_per_sync"] < 3
    assert (tmp_path / "grid" / "muon" / "seed1" / "dp" / "metrics.jsonl").is_file()
    again = run_diloco_bench(settings, tmp_path / "grid")
    assert [(r["val_loss"], r["bytes_per_replica"]) for r in again["methods"]] == [
        (r["val_loss"], r["bytes_per_replica"]) for r in first["methods"]
    ]
    with pytest.raises(ConfigError, match=r"^--out: '.*grid' holds a grid of other settings"):
        run_diloco_bench(dataclasses.replace(settings, steps=5), tmp_path / "grid")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^--out: '.*other' is not empty and holds no bench-settings.json"):
        run_diloco_bench(settings, tmp_path / "other")
