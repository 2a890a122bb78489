"""Generation: greedy decoding with the cache equals a naive loop; sampling filters match by hand."""

import pytest
import torch

from moeforge.infer.generate import SamplingConfig, generate, token_probabilities
from moeforge.model.transformer import Transformer

from test_transformer import tiny_model_config


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
