"""`bench diloco` on 2 spawned gloo processes, a few steps of a small model: the table's structure and
its bytes against a count made here from the codecs' documented layout and the streaming schedule."""

import json
import math
import re

import pytest

from conftest import SMALL
from moeforge.bench.diloco import (
    PER_METHOD_KEYS,
    DilocoBenchSettings,
    format_table,
    method_config,
    methods,
    required_bandwidth,
    run_diloco_bench,
    write_plot,
)
from moeforge.config import ConfigError
from moeforge.model.transformer import Transformer

SETTINGS = DilocoBenchSettings(
    steps=8,
    sync_every=4,
    fragments=2,
    overlap_steps=1,
    eval_every=4,
    codecs=("fp4-e3m0",),
    overrides=tuple((k, v) for k, v in SMALL.items() if k not in PER_METHOD_KEYS),
)
BLOCK = 128  # diloco.quantize-block's default


def fragment_sizes(fragments: int) -> tuple[list[int], list[int]]:
    """(parameters, router-bias values) of each fragment: blocks dealt out strided, the embedding
    in the first fragment, everything else outside the blocks in the last."""
    model = Transformer(method_config(SETTINGS, methods(SETTINGS)[0], 2).model)
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
    return 4 * n + 4 * biases


def fp4_bytes(n: int, biases: int) -> int:
    """Two codes per byte, one fp32 scale per block of 128, then the router biases in fp32."""
    return math.ceil(n / 2) + 4 * math.ceil(n / BLOCK) + 4 * biases


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
    assert rows["Streaming P=2 fp4-e3m0"]["mean_quant_error"] > 0
    assert rows["Streaming P=2 fp32"]["mean_quant_error"] == 0

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
        ({"codecs": ("fp5",)}, r"^--codecs: got 'fp5'; allowed: a comma-separated list of"),
        ({"codecs": ("fp8", "fp8")}, r"^--codecs: got 'fp8'; allowed: a comma-separated list of distinct"),
        ({"overrides": (("train.log-every", "5"),)}, r"^--train.log-every: set by the bench per method"),
        ({"overrides": (("diloco.quantize", "fp8"),)}, r"^--diloco.quantize: set by the bench per method"),
        ({"fragments": 30}, r"diloco.fragments"),
    ],
)
def test_bench_diloco_rejects_bad_settings(change, message):
    with pytest.raises(ConfigError, match=message):
        run_diloco_bench(DilocoBenchSettings(**change))
