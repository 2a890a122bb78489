"""Generation: greedy decoding over the static caches equals a full-forward argmax loop for GQA and MLA,
batched equals one prompt at a time, the decoding step equals the model's forward, the loop does not
sync with the host, compiled equals eager; sampling filters match by hand."""

import pytest
import torch

from moeforge.infer.decode import decode_forward, decode_step, moe_output
from moeforge.infer.generate import (
    EOS_CHECK_EVERY,
    SamplingConfig,
    check_prompt_text,
    check_seed,
    decode_loop,
    generate,
    generate_batch,
    generation_device,
    token_probabilities,
)
from moeforge.infer.speculative import speculative_generate
from moeforge.model.moe import MoE
from moeforge.model.transformer import Transformer

from test_step_syncs import conversions  # noqa: F401  (the fixture, counting tensor-to-Python calls)
from test_transformer import MLA_SHAPES, tiny_model_config


def test_greedy_generation_equals_naive_argmax_loop():
    torch.manual_seed(0)
    model = Transformer(tiny_model_config()).eval()
    prompt = [3, 14, 15, 9, 2]
    result = generate(model, prompt, max_new_tokens=12, sampling=SamplingConfig(temperature=0))
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    assert result.new_tokens == tokens[len(prompt) :]
    assert result.tokens_per_s > 0 and result.bandwidth_gb_s > 0


def test_sampling_is_reproducible_with_a_seed():
    torch.manual_seed(0)
    model = Transformer(tiny_model_config()).eval()
    a = generate(model, [1, 2, 3], 10, SamplingConfig(temperature=1.0), seed=7)
    b = generate(model, [1, 2, 3], 10, SamplingConfig(temperature=1.0), seed=7)
    assert a.new_tokens == b.new_tokens


def test_top_k_and_top_p_filters_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    top2 = token_probabilities(logits, SamplingConfig(temperature=1.0, top_k=2))
    torch.testing.assert_close(top2, torch.tensor([[2 / 3, 1 / 3, 0.0, 0.0]]))
    # nucleus 0.8: 0.5 + 0.25 = 0.75 < 0.8, so 0.15 is needed too; 0.1 is dropped.
    nucleus = token_probabilities(logits, SamplingConfig(temperature=1.0, top_p=0.8))
    torch.testing.assert_close(nucleus, torch.tensor([[0.5, 0.25, 0.15, 0.0]]) / 0.9)
    hot = token_probabilities(logits, SamplingConfig(temperature=2.0))
    expected = torch.tensor([0.5, 0.25, 0.15, 0.1]).sqrt()
    torch.testing.assert_close(hot, (expected / expected.sum())[None])


def test_bad_generation_arguments_name_the_flag():
    model = Transformer(tiny_model_config()).eval()
    with pytest.raises(ValueError, match="--max-new-tokens"):
        generate(model, [1] * 60, 10)
    with pytest.raises(ValueError, match="--top-p"):
        generate(model, [1], 2, SamplingConfig(top_p=0))
    with pytest.raises(ValueError, match="--prompt"):
        generate(model, [], 2)


@pytest.mark.parametrize("temperature", [float("nan"), float("inf"), -0.5])
def test_a_temperature_sampling_cannot_divide_by_is_refused(temperature):
    """nan logits would all be argmax 0: token 0 (a NUL byte) forever, and exit 0."""
    with pytest.raises(ValueError, match=rf"^--temperature: got {temperature}; allowed: a finite number >= 0"):
        SamplingConfig(temperature=temperature)
    with pytest.raises(ValueError, match=r"^--top-p: got nan; allowed: a number in \(0, 1\]$"):
        SamplingConfig(top_p=float("nan"))


def test_prompt_seed_and_device_are_checked_before_any_model():
    check_prompt_text("naïve ☃")
    with pytest.raises(ValueError, match=r"^--prompt: not valid UTF-8 \(byte 0xff at character 1\)"):
        check_prompt_text("a\udcffb")  # what argv holds for the bytes b"a\xffb"
    with pytest.raises(ValueError, match=r"^--prompt: not valid UTF-8 \(character U\+D800 at character 0\)"):
        check_prompt_text("\ud800")
    check_seed(2**63 - 1)
    with pytest.raises(ValueError, match=r"^--seed: got 9223372036854775808; allowed: an integer within int64"):
        check_seed(2**63)
    assert generation_device("cpu") == torch.device("cpu")
    for name in ("gpu", "meta", ""):
        with pytest.raises(ValueError, match=rf"^--device: got '{name}'; allowed: 'cpu', 'cuda' or 'cuda:N'$"):
            generation_device(name)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"^--device: got 'cuda'; allowed: 'cpu' \(CUDA is not available here\)$"):
            generation_device("cuda")


# --- static caches, the compilable step, batches -------------------------------------------------

GREEDY = SamplingConfig(temperature=0)


def model_of(attention: str, seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(tiny_model_config(**(MLA_SHAPES if attention == "mla" else {}), **kw)).eval()


def full_forward_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The reference: argmax of a full forward (no cache) over the whole sequence, token by token."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_static_cache_greedy_decoding_equals_full_forward_argmax(attention):
    model = model_of(attention)
    for prompt in ([7], [3, 14, 15, 9, 2, 6, 5, 3]):
        assert generate(model, prompt, 12, GREEDY).new_tokens == full_forward_greedy(model, prompt, 12)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_decode_step_logits_equal_the_model_forward_over_the_same_cache(attention):
    """The step (gathered experts, no statistics) against `Transformer.forward` (dispatch, grouped
    experts), chunk by chunk over a static cache: same logits up to rounding."""
    model = model_of(attention)
    tokens = torch.randint(0, 50, (2, 12))
    with torch.no_grad():
        full = model(tokens).logits
        model.setup_caches(batch=2, max_len=20)
        chunks = [decode_forward(model, tokens[:, :5], torch.arange(5))[0]]
        chunks += [decode_forward(model, tokens[:, i : i + 1], torch.tensor([i]))[0] for i in range(5, 12)]
        model.clear_caches()
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("n_tokens", [1, 3, 16])
def test_decoding_moe_equals_the_moe_layer(n_tokens):
    model = model_of("gqa")
    moe = next(model.moe_layers())
    assert isinstance(moe, MoE) and moe.cfg.n_experts == 8 and moe.cfg.top_k == 2
    x = torch.randn(1, n_tokens, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe_output(moe, x), moe(x)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_batched_generation_equals_generating_each_prompt_alone(attention):
    """Prompts of different lengths (left-padded), each with its own token limit and its own end."""
    model = model_of(attention)
    prompts = [[5], [3, 14, 15, 9, 2, 6, 5, 3, 5], [8, 9, 7, 9]]
    limits = [12, 6, 12]
    alone = [generate(model, p, n, GREEDY).new_tokens for p, n in zip(prompts, limits)]
    assert generate_batch(model, prompts, limits, GREEDY).new_tokens == alone
    eos = alone[0][-3]  # row 0 stops at its first such token, the others at theirs if they produce it
    stopped = [row[: row.index(eos) + 1] if eos in row else row for row in alone]
    assert generate(model, prompts[0], limits[0], GREEDY, eos_id=eos).new_tokens == stopped[0]
    assert generate_batch(model, prompts, limits, GREEDY, eos_id=eos).new_tokens == stopped


def test_decode_loop_looks_at_the_host_only_to_check_for_the_end_token(conversions):  # noqa: F811
    model = model_of("mla")
    sampling = SamplingConfig(temperature=0.9, top_k=10)
    generator = torch.Generator().manual_seed(0)
    model.setup_caches(batch=2, max_len=50)
    with torch.no_grad():
        first = torch.tensor([1, 2])
        model(first.view(2, 1), input_pos=torch.tensor([0]))
        conversions.clear()
        out = decode_loop(decode_step(False, first.device), model, first, 1, 40, sampling, generator, eos_id=-1)
    model.clear_caches()
    assert out.shape == (2, 40)
    assert len(conversions) == (40 - 1) // EOS_CHECK_EVERY, conversions


def test_sampled_batch_rows_are_reproducible():
    model = model_of("gqa")
    sampling = SamplingConfig(temperature=1.0, top_k=20)
    a = generate_batch(model, [[1, 2, 3], [4]], 12, sampling, seed=3).new_tokens
    assert a == generate_batch(model, [[1, 2, 3], [4]], 12, sampling, seed=3).new_tokens
    assert all(len(row) == 12 for row in a) and a[0] != a[1]


@pytest.mark.slow
@pytest.mark.parametrize("attention", ["gqa", "mla"])
def test_compiled_decoding_and_speculative_verifying_equal_eager(attention):
    """Slow: compiling two graphs (the one-token step, the verify) takes 35-70 s on the 2-core VM."""
    model = model_of(attention, mtp_depth=1)
    prompt = [3, 14, 15, 9, 2]
    eager = generate(model, prompt, 24, GREEDY)
    compiled = generate(model, prompt, 24, GREEDY, compile=True)
    assert compiled.new_tokens == eager.new_tokens
    assert compiled.compile_s > 0
    assert speculative_generate(model, prompt, 24, GREEDY, compile=True).new_tokens == eager.new_tokens
