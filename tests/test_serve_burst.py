"""Decoding bursts (`serve/decode_burst.py`): several forwards per engine step give the tokens and
log-probabilities of one forward per step — greedy ones those of each request decoded alone — with
stop tokens and `max_tokens` coming mid-burst, up to the end of the context; and a burst never keeps
a waiting request out of a batch that has room for it."""

import dataclasses

import pytest
from test_serve_engine import GREEDY, model_of, new_tokens, prompts, serve_all

from moeforge.infer import generate
from moeforge.serve.engine import Engine
from moeforge.serve.requests import EngineConfig, SamplingParams

CONFIG = EngineConfig(max_batch=8, cache_blocks=128, block_size=4, max_step_tokens=64, decode_steps=4)


def mixed_requests(model) -> dict[str, tuple[list[int], SamplingParams]]:
    """Greedy and seeded sampled requests with log-probabilities, max_tokens that are not multiples
    of the burst, one that reaches the end of the context and one that the test's stop token ends."""
    batch = prompts(6)
    requests = {}
    for i, prompt in enumerate(batch):
        temperature = 0 if i % 2 == 0 else 0.9
        requests[str(i)] = (prompt, SamplingParams(max_tokens=5 + 3 * i, temperature=temperature, seed=i, logprobs=2))
    long_prompt = prompts(11)[10][:50]
    requests["to the context's end"] = (long_prompt, SamplingParams(max_tokens=model.cfg.max_seq_len - 50, temperature=0))
    requests["stops"] = (batch[1], SamplingParams(max_tokens=20, temperature=0))
    return requests


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_bursts_give_the_tokens_and_logprobs_of_single_steps(attention):
    model = model_of(attention)
    plain_stop = generate(model, prompts(6)[1], 20, GREEDY).new_tokens
    eos_id = plain_stop[6]
    requests = mixed_requests(model)
    single = serve_all(Engine(model, dataclasses.replace(CONFIG, decode_steps=1), eos_id), requests)
    bursting_engine = Engine(model, CONFIG, eos_id)
    bursts = serve_all(bursting_engine, requests)

    for request_id, (prompt, params) in requests.items():
        assert new_tokens(bursts[request_id]) == new_tokens(single[request_id]), request_id
        assert bursts[request_id][-1].finish_reason == single[request_id][-1].finish_reason
        if params.logprobs is not None:
            got = [entry.logprob for output in bursts[request_id] for entry in output.logprobs]
            want = [entry.logprob for output in single[request_id] for entry in output.logprobs]
            assert got == pytest.approx(want, abs=1e-5)
        if params.greedy:  # an independent reference: the request decoded alone, cut at the stop token
            alone = generate(model, prompt, params.max_tokens, GREEDY).new_tokens
            cut = alone[: alone.index(eos_id) + 1] if eos_id in alone else alone
            assert new_tokens(bursts[request_id]) == cut, request_id
    assert bursts["stops"][-1].finish_reason == "stop" and len(new_tokens(bursts["stops"])) == plain_stop.index(eos_id) + 1
    sizes = [len(output.new_tokens) for outputs in bursts.values() for output in outputs]
    assert max(sizes) == CONFIG.decode_steps  # bursts ran, none longer than asked
    assert all(len(output.new_tokens) <= 1 for outputs in single.values() for output in outputs)
    stats = bursting_engine.stats()
    assert stats.cache_blocks_used == 0 and stats.generated_tokens == sum(map(len, map(new_tokens, bursts.values())))


def step_into(engine: Engine, collected: dict[str, list[int]]) -> list[int]:
    """One engine step; its outputs' new tokens added to `collected`; how many each output carried."""
    outputs = engine.step()
    for output in outputs:
        collected.setdefault(output.request_id, []).extend(output.new_tokens)
    return [len(output.new_tokens) for output in outputs]


def test_a_full_batch_bursts_and_a_batch_with_room_takes_a_waiting_request_at_once():
    model = model_of()
    batch = prompts(3)
    params = SamplingParams(max_tokens=24, temperature=0)
    for max_batch in (2, 3):
        engine = Engine(model, dataclasses.replace(CONFIG, max_batch=max_batch), None)
        collected: dict[str, list[int]] = {}
        for i in range(2):
            engine.add_request(str(i), batch[i], params)
        assert step_into(engine, collected) == [1, 1]  # the prompts prefill and give their first tokens
        assert step_into(engine, collected) == [4, 4]  # then decode in bursts
        engine.add_request("2", batch[2], params)
        if max_batch == 2:  # no room: the newcomer waits and the others go on bursting
            assert step_into(engine, collected) == [4, 4] and len(engine.scheduler.waiting) == 1
        else:  # room: the next step is one forward, the newcomer's prefill beside a token of each other
            assert step_into(engine, collected) == [1, 1, 1]
        while engine.has_work:
            step_into(engine, collected)
        assert [collected[str(i)] for i in range(3)] == [generate(model, p, 24, GREEDY).new_tokens for p in batch]


def test_a_burst_waits_for_the_blocks_it_needs_without_preempting():
    """Six blocks of 4 positions. A (8 prompt tokens, 3 new) and B (10 prompt tokens, 8 new) fit as
    single steps, but a burst of B would need a fourth block while A holds three: the engine takes
    single steps (no preemption) until A finishes, and then B bursts."""
    model = model_of()
    batch = {"A": (prompts(2)[1], 3), "B": (prompts(3)[2][:10], 8)}
    engine = Engine(model, EngineConfig(max_batch=2, cache_blocks=6, block_size=4, max_step_tokens=32, decode_steps=4), None)
    outputs = serve_all(engine, {name: (p, SamplingParams(max_tokens=n, temperature=0)) for name, (p, n) in batch.items()})
    for name, (prompt, count) in batch.items():
        assert new_tokens(outputs[name]) == generate(model, prompt, count, GREEDY).new_tokens
    assert [len(output.new_tokens) for output in outputs["A"]] == [1, 1, 1]
    assert [len(output.new_tokens) for output in outputs["B"]] == [1, 1, 1, 4, 1]
    stats = engine.stats()
    assert stats.preemptions == 0 and stats.cache_blocks_used == 0
