"""The serving engine without HTTP: continuous batching over the paged cache gives what one request
alone gives (`infer.generate`, the trainer's forward), under chunked prefill, preemption and
speculation; seeded sampling is independent of the batch; speculation keeps the distribution."""

import itertools

import pytest
import torch
from test_transformer import MLA_SHAPES, tiny_model_config

from moeforge.infer import SamplingConfig, generate
from moeforge.model.transformer import Transformer
from moeforge.serve.block_pool import BlockPool
from moeforge.serve.engine import Engine
from moeforge.serve.requests import EngineConfig, RequestError, SamplingParams

GREEDY = SamplingConfig(temperature=0)


def model_of(attention: str = "gqa", mtp_depth: int = 0, seed: int = 0, **shape) -> Transformer:
    torch.manual_seed(seed)
    extra = MLA_SHAPES if attention == "mla" else {}
    return Transformer(tiny_model_config(mtp_depth=mtp_depth, **extra, **shape)).eval()


def prompts(count: int, vocab: int = 50) -> list[list[int]]:
    """Prompts of 3 to 3 + 5 * (count - 1) tokens, different in content."""
    return [[(7 * i + 3 * j) % (vocab - 1) + 1 for j in range(3 + 5 * i)] for i in range(count)]


def serve_all(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Submit every request at once and step until done; each request's outputs, in order."""
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    outputs = {request_id: [] for request_id in requests}
    while engine.has_work:
        for output in engine.step():
            outputs[output.request_id].append(output)
    return outputs


def new_tokens(outputs: list) -> list[int]:
    return [token for output in outputs for token in output.new_tokens]


LAYOUTS = {
    # name: (EngineConfig, whether the cache is small enough that requests must be preempted)
    "roomy": (EngineConfig(max_batch=8, cache_blocks=64, block_size=4, max_step_tokens=64), False),
    "chunked prefill": (EngineConfig(max_batch=4, cache_blocks=64, block_size=4, max_step_tokens=8), False),
    "preempted": (EngineConfig(max_batch=6, cache_blocks=12, block_size=4, max_step_tokens=32), True),
}


@pytest.mark.parametrize("attention", ["gqa", "mla"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_batched_tokens_equal_each_request_alone(attention, layout):
    config, preempts = LAYOUTS[layout]
    model = model_of(attention)
    batch = prompts(6)
    expected = [generate(model, prompt, 16, GREEDY).new_tokens for prompt in batch]
    engine = Engine(model, config, eos_id=None)
    outputs = serve_all(engine, {str(i): (p, SamplingParams(max_tokens=16, temperature=0)) for i, p in enumerate(batch)})
    assert [new_tokens(outputs[str(i)]) for i in range(len(batch))] == expected
    assert all(outputs[str(i)][-1].finish_reason == "length" for i in range(len(batch)))
    stats = engine.stats()
    assert (stats.preemptions > 0) == preempts
    assert stats.cache_blocks_used == 0 and stats.running == stats.waiting == 0
    assert stats.generated_tokens == 16 * len(batch)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_logprobs_equal_the_trainers_forward_whatever_the_batch(attention):
    """Prompt and generated tokens' log-probabilities (echo) equal the log-softmax of one plain forward
    of the whole text, served alone and among others (chunked, preempted)."""
    model = model_of(attention)
    batch = prompts(5)
    params = SamplingParams(max_tokens=10, temperature=0.8, seed=3, logprobs=3, prompt_logprobs=True)
    alone = serve_all(Engine(model, LAYOUTS["roomy"][0], None), {"x": (batch[3], params)})["x"]
    crowded_engine = Engine(model, LAYOUTS["preempted"][0], None)
    crowd = serve_all(crowded_engine, {str(i): (p, params if i == 3 else SamplingParams(max_tokens=12)) for i, p in enumerate(batch)})
    assert crowded_engine.stats().preemptions > 0
    for outputs in (alone, crowd["3"]):
        text = batch[3] + new_tokens(outputs)
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([text])).logits[0].double(), dim=-1)
        prompt_logprobs = outputs[0].prompt_logprobs
        assert prompt_logprobs[0] is None and len(prompt_logprobs) == len(batch[3])
        generated = [entry for output in outputs for entry in output.logprobs]
        for position, entry in enumerate(prompt_logprobs[1:] + generated, start=1):
            assert entry.token == text[position]
            assert entry.logprob == pytest.approx(float(reference[position - 1, entry.token]), abs=1e-4)
            best = reference[position - 1].topk(3)
            assert [token for token, _ in entry.top] == best.indices.tolist()
    assert new_tokens(alone) == new_tokens(crowd["3"])  # seeded: the same draws whatever the batch


def test_a_stop_token_ends_a_request_and_max_tokens_cuts_it():
    model = model_of()
    prompt = prompts(2)[1]
    plain = generate(model, prompt, 12, GREEDY).new_tokens
    stop = plain[5]
    outputs = serve_all(
        Engine(model, LAYOUTS["roomy"][0], eos_id=stop),
        {"eos": (prompt, SamplingParams(max_tokens=12, temperature=0)),
         "ignored": (prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)),
         "listed": (prompt, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=(plain[2],)))},
    )
    assert new_tokens(outputs["eos"]) == plain[: plain.index(stop) + 1] and outputs["eos"][-1].finish_reason == "stop"
    assert new_tokens(outputs["ignored"]) == plain and outputs["ignored"][-1].finish_reason == "length"
    assert new_tokens(outputs["listed"]) == plain[: plain.index(plain[2]) + 1]


def test_abort_frees_the_blocks_at_once():
    engine = Engine(model_of(), LAYOUTS["roomy"][0], None)
    for i, prompt in enumerate(prompts(3)):
        engine.add_request(str(i), prompt, SamplingParams(max_tokens=20))
    engine.step()
    engine.step()
    assert engine.stats().cache_blocks_used > 0
    for i in range(3):
        engine.abort(str(i))
    engine.abort("unknown")
    assert engine.stats().cache_blocks_used == 0 and not engine.has_work


@pytest.mark.parametrize(
    "prompt, params, field",
    [
        ([], SamplingParams(), "prompt"),
        ([50], SamplingParams(), "prompt"),  # the vocabulary is 50
        ([1] * 64, SamplingParams(), "prompt"),  # the context is 64
        ([1] * 60, SamplingParams(max_tokens=5), "max_tokens"),
        ([1] * 10, SamplingParams(max_tokens=30), "max_tokens"),  # 40 positions > 8 blocks of 4
    ],
)
def test_requests_that_cannot_be_served_name_the_field(prompt, params, field):
    engine = Engine(model_of(), EngineConfig(max_batch=2, cache_blocks=8, block_size=4, max_step_tokens=8), None)
    with pytest.raises(RequestError, match=f"^{field}: ") as raised:
        engine.add_request("a", prompt, params)
    assert raised.value.field == field


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"temperature": float("nan")}, "^temperature: "),
        ({"top_p": 0.0}, "^top_p: "),
        ({"max_tokens": 0}, "^max_tokens: "),
        ({"logprobs": 21}, "^logprobs: "),
        ({"seed": 2**63}, "^seed: "),
    ],
)
def test_sampling_settings_are_checked_when_made(settings, message):
    with pytest.raises(RequestError, match=message):
        SamplingParams(**settings)


def test_engine_settings_are_checked():
    with pytest.raises(RequestError, match="^--speculative: "):
        Engine(model_of(), EngineConfig(speculative=True), None)
    with pytest.raises(RequestError, match="^--max-step-tokens: "):
        Engine(model_of(mtp_depth=2), EngineConfig(max_batch=16, max_step_tokens=40, speculative=True), None)
    with pytest.raises(RequestError, match="^--cache-blocks: "):
        EngineConfig(cache_blocks=0)


@pytest.mark.parametrize("attention, depth, layout", [("gqa", 1, "roomy"), ("mla", 2, "preempted"), ("mla", 3, "chunked prefill")])
def test_greedy_speculation_equals_plain_greedy(attention, depth, layout):
    """Random weights: drafts are mostly rejected, so every rollback path runs, in a batch where each
    request keeps a different number of drafts."""
    config, _ = LAYOUTS[layout]
    config = EngineConfig(**{**config.__dict__, "speculative": True, "max_step_tokens": max(config.max_step_tokens, config.max_batch * (1 + depth))})
    model = model_of(attention, mtp_depth=depth)
    batch = prompts(5)
    expected = [generate(model, prompt, 14, GREEDY).new_tokens for prompt in batch]
    engine = Engine(model, config, eos_id=None)
    outputs = serve_all(engine, {str(i): (p, SamplingParams(max_tokens=14, temperature=0)) for i, p in enumerate(batch)})
    assert [new_tokens(outputs[str(i)]) for i in range(len(batch))] == expected
    stats = engine.stats()
    assert stats.verify_rounds > 0 and stats.drafted_tokens == depth * stats.verify_rounds


@pytest.mark.slow
def test_speculation_keeps_the_sampled_distribution():
    """On a vocabulary of 6 with drafts that disagree with the model: the first two tokens produced by
    speculation (after the prefill's) are distributed as exact sampling from the model's own
    probabilities, computed by full forwards of every continuation."""
    vocab, prompt, trials = 6, [1, 4, 2], 1200
    model = model_of("mla", mtp_depth=1, vocab_size=vocab, seed=5)
    model.output.weight.data *= 8  # sharper than a random model's near-uniform distributions
    for module in model.mtp:
        module.proj.weight.data *= -3  # and drafts that are often wrong
    temperature = SamplingParams(max_tokens=3, temperature=0.7, top_k=0)
    config = EngineConfig(max_batch=128, cache_blocks=256, block_size=4, max_step_tokens=512, speculative=True)
    engine = Engine(model, config, None)
    requests = {str(seed): (prompt, SamplingParams(**{**temperature.__dict__, "seed": seed})) for seed in range(trials)}
    outputs = serve_all(engine, requests)
    counts = torch.zeros(vocab, vocab, dtype=torch.float64)
    for request in outputs.values():
        _, second, third = new_tokens(request)
        counts[second, third] += 1
    stats = engine.stats()
    assert 0.2 < stats.accepted_tokens / stats.drafted_tokens < 0.9  # both rules of the round ran

    def next_probs(tokens: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.softmax(model(torch.tensor([tokens])).logits[0, -1].double() / 0.7, dim=-1)

    exact = torch.zeros(vocab, vocab, dtype=torch.float64)
    first = next_probs(prompt)
    for a, b in itertools.product(range(vocab), repeat=2):
        second = next_probs([*prompt, a])
        exact[b] += first[a] * second[b] * next_probs([*prompt, a, b])
    empirical = counts / trials
    tolerance = 4 * (exact * (1 - exact) / trials).sqrt() + 1e-3  # 4 standard errors per cell
    assert ((empirical - exact).abs() <= tolerance).all(), (empirical - exact).abs().max()


@pytest.mark.slow
def test_batched_speculation_on_a_trained_model_accepts_most_drafts_and_stays_greedy(trained_run):
    """The briefly trained MLA + MTP fixture: many requests at once, each greedy output equal to plain
    decoding alone, and the batch accepting drafts as often as one request does (test_speculative)."""
    from test_speculative import ACCEPTANCE_FLOOR, PROMPTS

    from moeforge.infer import load_model

    loaded = load_model(trained_run)
    batch = [loaded.tokenizer.encode(text) for text in PROMPTS * 2]
    expected = [generate(loaded.model, prompt, 40, GREEDY).new_tokens for prompt in batch]
    config = EngineConfig(max_batch=6, cache_blocks=64, block_size=8, max_step_tokens=24, speculative=True)
    engine = Engine(loaded.model, config, eos_id=None)
    outputs = serve_all(engine, {str(i): (p, SamplingParams(max_tokens=40, temperature=0)) for i, p in enumerate(batch)})
    assert [new_tokens(outputs[str(i)]) for i in range(len(batch))] == expected
    stats = engine.stats()
    assert stats.accepted_tokens / stats.drafted_tokens > ACCEPTANCE_FLOOR
    assert stats.generated_tokens / stats.steps > 2  # more than one token per request and step, on average


def test_block_pool_reuses_indexed_prefixes_and_evicts_the_least_recently_released():
    pool = BlockPool(4, block_size=2)
    first = pool.allocate(3)
    pool.index([1, 2, 3, 4, 5, 6], first, computed=5, digests=(digests := []))
    assert len(digests) == 2  # blocks [1, 2] and [3, 4]; the third is not full of computed positions
    assert pool.match([1, 2, 3, 4, 9]) == first[:2] and pool.used == 3  # held twice now
    assert pool.match([1, 2, 3, 4]) == first[:1]  # the last token is always left to compute
    assert pool.match([1, 9, 3, 4, 5]) == []  # a prefix, not a set of blocks
    pool.release(first)
    pool.release(first[:2])
    pool.release(first[:1])
    assert pool.used == 0 and pool.free == 4
    assert sorted(pool.allocate(2)) == [first[2], 3]  # free blocks first, the indexed ones kept
    assert pool.allocate(1) == [first[1]]  # then the least recently released indexed block: [3, 4]
    assert pool.match([1, 2, 3, 4, 5]) == [first[0]]  # [1, 2] still indexed
    pool.release([first[0]])
    assert pool.allocate(1) == [first[0]] and pool.match([1, 2, 3]) == []  # evicted: no longer found


def test_shared_prefixes_are_computed_once_and_give_the_same_tokens():
    model = model_of("mla")
    system = [(5 * j) % 47 + 1 for j in range(21)]
    batch = [system + [i + 1, i + 2] for i in range(4)]
    expected = [generate(model, prompt, 8, GREEDY).new_tokens for prompt in batch]
    engine = Engine(model, EngineConfig(max_batch=4, cache_blocks=40, block_size=4, max_step_tokens=64), None)
    first = serve_all(engine, {"0": (batch[0], SamplingParams(max_tokens=8, temperature=0))})
    rest = serve_all(engine, {str(i): (p, SamplingParams(max_tokens=8, temperature=0)) for i, p in enumerate(batch[1:], 1)})
    assert [new_tokens(first["0"])] + [new_tokens(rest[str(i)]) for i in range(1, 4)] == expected
    assert engine.stats().prefix_hit_tokens == 3 * 20  # five full blocks of the shared 21 tokens each
    off = Engine(model, EngineConfig(max_batch=4, cache_blocks=40, block_size=4, max_step_tokens=64, prefix_reuse=False), None)
    serve_all(off, {str(i): (p, SamplingParams(max_tokens=8, temperature=0)) for i, p in enumerate(batch)})
    assert off.stats().prefix_hit_tokens == 0


def test_prefix_reuse_under_eviction_and_preemption_keeps_every_output():
    """A cache too small for the batch: indexed blocks are evicted and overwritten with other requests'
    keys while requests are preempted and resume from whatever prefix is still cached."""
    model = model_of()
    base = prompts(6)
    batch = [base[i % 3] + [i + 1] for i in range(6)]  # pairs that share all but their last token
    expected = [generate(model, prompt, 12, GREEDY).new_tokens for prompt in batch]
    engine = Engine(model, LAYOUTS["preempted"][0], eos_id=None)
    outputs = serve_all(engine, {str(i): (p, SamplingParams(max_tokens=12, temperature=0)) for i, p in enumerate(batch)})
    assert [new_tokens(outputs[str(i)]) for i in range(len(batch))] == expected
    stats = engine.stats()
    assert stats.preemptions > 0 and stats.prefix_hit_tokens > 0 and stats.cache_blocks_used == 0
