"""A serving step's forwards (`moeforge.serve.rows`): requests grouped into rows by length, padded rows
and tokens kept out of every real token's reads, the MoE layer's static-shape inference paths, and a
compiled engine that serves what the eager one serves without compiling while it serves."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_serve_engine import model_of, new_tokens, prompts, serve_all
from test_moe_layer import config, make_layer

from moeforge.infer.decode import grouped_moe_output, moe_output
from moeforge.serve.engine import Engine
from moeforge.serve.requests import EngineConfig, SamplingParams
from moeforge.serve.paged_cache import attach_paged_caches
from moeforge.serve.rows import (
    PAD_SLACK,
    Row,
    Segment,
    StepForward,
    forward_segments,
    group_rows,
    row_batch,
    row_groups,
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(1, 200), min_size=1, max_size=40))
def test_row_groups_cover_every_request_once_and_bound_the_padding(lengths):
    groups = row_groups(lengths)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert lengths[group[0]] == longest  # the first row sets the group's length
        padded = longest * len(group)
        assert padded - sum(lengths[i] for i in group) <= max(PAD_SLACK, padded // 4)


def test_a_prefill_chunk_gets_a_forward_of_its_own_beside_decodes():
    groups = row_groups([1] * 15 + [64])
    assert sorted(map(sorted, groups)) == [list(range(15)), [15]]
    assert row_groups([2, 1, 2, 2, 1]) == [[0, 2, 3, 1, 4]]  # verify rows of 1 or 2 tokens: one forward


def test_row_batch_reads_and_writes_what_a_loop_over_tokens_gives():
    """Each real token: its own position, written at its table's row, reading exactly its request's
    positions 0..p; padding tokens and rows: written to the scratch block, reading nothing a real
    token writes after it."""
    block, scratch = 4, 9
    segments = [Segment([5, 6, 7], 5, [3, 1]), Segment([8], 2, [0]), Segment([9, 9], 0, [2])]
    whole = [Row(i, 0, len(s.tokens)) for i, s in enumerate(segments)]
    batch = row_batch(segments, whole, block, scratch, torch.device("cpu"), min_rows=4)
    positions, slots = batch.positions, batch.slots
    rows, length = batch.tokens.shape
    assert (rows, length) == (4, 3) and slots.read.shape == (4, 8)  # context: the longest end, 8
    written = slots.index.view(rows, length)
    for r, segment in enumerate(segments + [Segment([], 0, [])]):
        for j in range(length):
            p = int(positions[r, j])
            visible = slots.read[r][slots.mask[r, 0, j]].tolist()
            if j < len(segment.tokens):  # a real token
                assert p == segment.start + j and batch.tokens[r, j] == segment.tokens[j]
                own_row = segment.table[p // block] * block + p % block
                assert written[r, j] == own_row
                assert visible == [segment.table[q // block] * block + q % block for q in range(p + 1)]
            else:
                assert written[r, j] // block == scratch
                assert len(visible) >= 1  # never an empty mask row (NaNs)


def test_a_lone_prefill_chunk_is_split_over_rows_and_a_lone_decode_is_not():
    segments = [Segment(list(range(7)), 3, [0, 1, 2]), Segment([5], 9, [3, 4, 5])]
    assert group_rows(segments, [0], 2) == [Row(0, 0, 4), Row(0, 4, 7)]
    assert group_rows(segments, [1], 2) == [Row(1, 0, 1)]
    assert group_rows(segments, [0, 1], 2) == [Row(0, 0, 7), Row(1, 0, 1)]
    assert group_rows(segments, [0], 1) == [Row(0, 0, 7)]


@pytest.mark.parametrize("attention", ["mla", "gqa"])
def test_a_prefill_chunk_split_over_two_rows_computes_what_one_row_computes(attention):
    """The second row reads the keys and values the first writes in the same forward."""
    model = model_of(attention)
    block, scratch = 4, 8
    attach_paged_caches(model, scratch + 1, block, with_mtp=False)
    segment = Segment([3, 1, 4, 1, 5, 9, 2, 6, 5], 0, [2, 0, 5])
    shapes = []

    def forward(batch):
        shapes.append(tuple(batch.tokens.shape))
        return StepForward(compile=False, device=torch.device("cpu"))(model, batch)

    with torch.no_grad():
        (whole,) = forward_segments([segment], forward, block, scratch, torch.device("cpu"), min_rows=1)
        (split,) = forward_segments([segment], forward, block, scratch, torch.device("cpu"), min_rows=2)
        reference = model(torch.tensor([segment.tokens])).hidden
    assert shapes == [(1, 9), (2, 5)]
    torch.testing.assert_close(split, whole, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(whole, reference[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tokens", [3, 40])
def test_the_static_shape_moe_paths_equal_the_layers_forward(tokens, dtype):
    """Shared experts, group-limited routing, a bias that changes the choice but not the gates; fp32
    runs the grouped GEMM, fp64 (which it does not take) the loop over experts."""
    layer = make_layer(config()).to(dtype).eval()
    x = torch.randn(2, tokens, layer.cfg.dim, dtype=dtype, generator=torch.Generator().manual_seed(1))
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    with torch.no_grad():
        expected = layer(x)[0]
        torch.testing.assert_close(grouped_moe_output(layer, x), expected, rtol=tolerance, atol=tolerance)
        torch.testing.assert_close(moe_output(layer, x), expected, rtol=tolerance, atol=tolerance)


@pytest.mark.slow
def test_a_compiled_engine_serves_the_eager_engines_tokens_and_compiles_only_while_warming_up():
    from torch._dynamo.utils import counters

    model = model_of("mla")
    batch = prompts(6)
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=2)
    # chunked prefill beside decodes, and more requests than the batch: rows of every kind
    config = EngineConfig(max_batch=4, cache_blocks=64, block_size=4, max_step_tokens=16)
    requests = {str(i): (p, params) for i, p in enumerate(batch)}
    eager = serve_all(Engine(model, config, None), requests)
    compiled_engine = Engine(model, dataclasses.replace(config, compile=True), None)
    graphs = counters["stats"]["unique_graphs"]
    compiled = serve_all(compiled_engine, requests)
    assert counters["stats"]["unique_graphs"] == graphs  # warm_up compiled every graph the steps took
    assert max(len(output.new_tokens) for outputs in compiled.values() for output in outputs) > 1  # bursts ran
    for request_id in requests:
        assert new_tokens(compiled[request_id]) == new_tokens(eager[request_id])
        got = [entry.logprob for output in compiled[request_id] for entry in output.logprobs]
        want = [entry.logprob for output in eager[request_id] for entry in output.logprobs]
        assert got == pytest.approx(want, abs=1e-4)
