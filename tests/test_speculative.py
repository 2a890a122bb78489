"""Speculative decoding with MTP drafts: the acceptance rules, the drafter's caches, and identity with
plain greedy decoding on random and on briefly trained models."""

import copy
import json

import pytest
import torch
from test_cli import moeforge
from test_transformer import MLA_SHAPES, tiny_model_config

from moeforge.infer import SamplingConfig, generate, load_model
from moeforge.infer.speculative import MTPDrafter, accept_greedy, accept_sampled, speculative_generate
from moeforge.model.transformer import Transformer

GREEDY = SamplingConfig(temperature=0)
# Greedy acceptance of the MTP draft on the briefly trained fixture (conftest's `trained_run`), measured on a 2-core CPU
# (torch 2.13): 0.99 over the prompts; the same model untrained: 0.0. The fixture trains with a fixed
# thread count: 150 steps amplify the last-bit differences of another count into another model (one
# thread: 0.56), so the figure would otherwise depend on the machine's cores. The floor leaves room
# for other BLAS builds and CPUs.
ACCEPTANCE_FLOOR = 0.6
UNTRAINED_CEILING = 0.2


def test_greedy_rule_keeps_the_agreeing_prefix_then_the_main_models_token():
    assert accept_greedy([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accept_greedy([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accept_greedy([5], [4, 1]) == [4]


@pytest.mark.parametrize("n_drafts", [1, 2])
def test_rejection_rule_leaves_the_first_token_distributed_as_the_target(n_drafts):
    """Drafts from q, kept with min(1, p/q), else resampled from norm(max(0, p - q)): the emitted
    token is distributed as p whatever q is (Leviathan et al. 2023, appendix A.1)."""
    p = torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05])
    q = torch.tensor([0.1, 0.4, 0.1, 0.3, 0.1])
    draft_probs = q.expand(n_drafts, -1)
    target_probs = p.expand(n_drafts + 1, -1)
    generator = torch.Generator().manual_seed(0)
    trials = 10000
    counts = torch.zeros(5)
    for _ in range(trials):
        drafts = torch.multinomial(draft_probs, 1, generator=generator).squeeze(1).tolist()
        counts[accept_sampled(drafts, draft_probs, target_probs, generator)[0]] += 1
    torch.testing.assert_close(counts / trials, p, atol=0.02, rtol=0)  # 4 standard errors at p = 0.5


def random_model(attention: str, mtp_depth: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = tiny_model_config(mtp_depth=mtp_depth, max_seq_len=128, **(MLA_SHAPES if attention == "mla" else {}))
    return Transformer(cfg).eval()


@pytest.mark.parametrize("attention", ["gqa", "mla"])
@pytest.mark.parametrize("mtp_depth", [1, 2, 3])
def test_greedy_speculative_equals_greedy_plain_on_random_models(attention, mtp_depth):
    """Random weights make drafts mostly wrong: every rejection and cache-overwrite path runs."""
    model = random_model(attention, mtp_depth)
    for prompt in ([3], [1, 2, 3, 4, 5, 6, 7]):
        plain = generate(model, prompt, 24, GREEDY)
        speculative = speculative_generate(model, prompt, 24, GREEDY)
        assert speculative.new_tokens == plain.new_tokens
        assert speculative.drafted == speculative.rounds * mtp_depth
        eos = plain.new_tokens[10]
        stopped = generate(model, prompt, 24, GREEDY, eos_id=eos).new_tokens
        assert speculative_generate(model, prompt, 24, GREEDY, eos_id=eos).new_tokens == stopped
        assert stopped[-1] == eos and len(stopped) <= 11


def test_incremental_drafts_equal_drafting_from_scratch():
    """The drafter recomputes only its unsettled positions each round; its drafts must be those of a
    drafter that processes the whole sequence at once."""
    model = random_model("mla", mtp_depth=3)
    tokens = torch.randint(0, 50, (1, 30))
    hidden = model(tokens).hidden
    sampling = SamplingConfig(temperature=1.0)
    incremental_model = copy.deepcopy(model)
    incremental_model.setup_caches(batch=1, max_len=40, with_mtp=True)
    incremental = MTPDrafter(incremental_model, 40)
    incremental.record_main_hidden(0, hidden[0])
    for n in (4, 5, 8, 9, 13, 20, 21):
        prefix = tokens[0, : n + 1].tolist()
        drafts, probs = incremental.draft(prefix, sampling, torch.Generator().manual_seed(n))
        model.setup_caches(batch=1, max_len=40, with_mtp=True)
        scratch = MTPDrafter(model, 40)
        scratch.record_main_hidden(0, hidden[0, :n])
        scratch_drafts, scratch_probs = scratch.draft(prefix, sampling, torch.Generator().manual_seed(n))
        assert drafts == scratch_drafts
        torch.testing.assert_close(probs, scratch_probs, rtol=1e-4, atol=1e-6)


def test_sampled_speculative_decoding_is_reproducible_and_needs_mtp():
    model = random_model("mla", mtp_depth=2)
    a = speculative_generate(model, [1, 2, 3], 25, SamplingConfig(temperature=0.9, top_k=20), seed=4)
    b = speculative_generate(model, [1, 2, 3], 25, SamplingConfig(temperature=0.9, top_k=20), seed=4)
    assert a.new_tokens == b.new_tokens and len(a.new_tokens) == 25
    with pytest.raises(ValueError, match="--speculative: this model has model.mtp-depth=0"):
        speculative_generate(random_model("gqa", mtp_depth=0), [1], 4)
    with pytest.raises(ValueError, match=r"--max-new-tokens: .* \+ 2 drafted exceed model.max-seq-len=128"):
        speculative_generate(model, [1] * 100, 27)


PROMPTS = ["The ", "def f(x):\n    return ", "In Python, a list "]


def greedy_acceptance(model: Transformer, prompts: list[list[int]]) -> float:
    """Accepted / drafted over greedy speculative runs, each checked against plain greedy decoding."""
    drafted = accepted = 0
    for prompt in prompts:
        plain = generate(model, prompt, 80, GREEDY)
        speculative = speculative_generate(model, prompt, 80, GREEDY)
        assert speculative.new_tokens == plain.new_tokens, prompt
        drafted, accepted = drafted + speculative.drafted, accepted + speculative.accepted
    return accepted / drafted


@pytest.mark.slow
def test_greedy_speculative_equals_plain_on_a_trained_model_with_high_acceptance(trained_run):
    loaded = load_model(trained_run)
    prompts = [loaded.tokenizer.encode(text) for text in PROMPTS]
    trained = greedy_acceptance(loaded.model, prompts)
    torch.manual_seed(0)
    untrained = greedy_acceptance(Transformer(loaded.config.model).eval(), prompts)
    print(f"greedy MTP acceptance: trained {trained:.3f}, untrained {untrained:.3f}")
    assert trained > ACCEPTANCE_FLOOR, trained
    assert untrained < UNTRAINED_CEILING, untrained


@pytest.mark.slow
def test_generate_speculative_json_reports_acceptance_and_speedup(trained_run):
    result = moeforge(
        "generate", "--checkpoint", str(trained_run), "--speculative", "--temperature", "0",
        "--max-new-tokens", "40", "--json",
    )
    report = json.loads(result.stdout)
    assert report["identical_to_plain"] is True and report["new_tokens"] == 40
    assert 0 <= report["acceptance_rate"] <= 1 and report["tokens_per_s"] > 0 and report["speedup"] > 0
    kv = report["kv_bytes_per_token_by_attention"]
    assert report["kv_bytes_per_token"] == kv["mla"] < kv["gqa"] < kv["mha"]
