"""Autoregressive generation with a KV cache, and the roofline figure decoding is judged by.

Decoding one token reads every *active* weight once (the top-k routed experts and the shared
experts of each MoE layer, not all experts) plus the KV cache so far, so the memory bandwidth it
achieved is (active weight bytes + KV bytes read) x tokens/s.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from moeforge.config import ConfigError
from moeforge.model.flops import parameter_counts
from moeforge.model.transformer import Transformer


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    """0 = greedy"""
    top_k: int = 0
    """keep the k most likely tokens; 0 = all"""
    top_p: float = 1.0
    """keep the smallest set of tokens whose probability reaches p; 1 = all"""

    def __post_init__(self) -> None:
        """Checked once, when made (the command line makes one before it reads any checkpoint)."""
        if self.temperature < 0:
            raise ConfigError(f"--temperature: got {self.temperature}; allowed: a number >= 0")
        if self.top_k < 0:
            raise ConfigError(f"--top-k: got {self.top_k}; allowed: an integer >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p: got {self.top_p}; allowed: a number in (0, 1]")


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    new_tokens: list[int]
    prefill_s: float
    decode_s: float
    active_weight_bytes: int
    kv_bytes_per_token: int

    @property
    def tokens_per_s(self) -> float:
        """Decoded tokens per second, after the prompt (the first new token comes from the prefill)."""
        decoded = len(self.new_tokens) - 1
        return decoded / self.decode_s if decoded > 0 and self.decode_s > 0 else 0.0

    @property
    def bytes_per_token(self) -> float:
        """Mean bytes read per decoded token: active weights + the KV cache up to that position."""
        start = len(self.prompt_tokens) + 1
        end = len(self.prompt_tokens) + len(self.new_tokens)
        mean_context = (start + end - 1) / 2
        return self.active_weight_bytes + self.kv_bytes_per_token * mean_context

    @property
    def bandwidth_gb_s(self) -> float:
        return self.bytes_per_token * self.tokens_per_s / 1e9


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of logits [B, vocab]."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = token_probabilities(logits, sampling)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def token_probabilities(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """The distribution sampling draws from: temperature, then top-k, then top-p (nucleus) filtering."""
    logits = logits.float() / sampling.temperature
    if sampling.top_k:
        kth = torch.topk(logits, min(sampling.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= sampling.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def active_weight_bytes(model: Transformer) -> int:
    """Weight bytes one decoded token reads: active parameters, one embedding row instead of the table."""
    counts = parameter_counts(model.cfg)
    element = model.tok_embeddings.weight.element_size()
    return (counts.active - counts.embedding + model.cfg.dim) * element


def check_request(
    model: Transformer, prompt_tokens: list[int], max_new_tokens: int, sampling: SamplingConfig, lookahead: int = 0
) -> int:
    """Validate a generation request; returns the cache length it needs (`lookahead` positions more
    than prompt + new tokens, for the drafts speculative decoding verifies past the end)."""
    if not prompt_tokens:
        raise ConfigError("--prompt: got an empty prompt; allowed: at least one token of text")
    if max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens: got {max_new_tokens}; allowed: an integer >= 1")
    total = len(prompt_tokens) + max_new_tokens + lookahead
    if total > model.cfg.max_seq_len:
        drafts = f" + {lookahead} drafted" if lookahead else ""
        raise ConfigError(
            f"--max-new-tokens: prompt ({len(prompt_tokens)}) + {max_new_tokens} new tokens{drafts} exceed "
            f"model.max-seq-len={model.cfg.max_seq_len}"
        )
    return total


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_tokens: list[int],
    max_new_tokens: int,
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    eos_id: int | None = None,
) -> GenerationResult:
    """Continue `prompt_tokens` by up to `max_new_tokens` tokens (stops early at `eos_id`)."""
    total = check_request(model, prompt_tokens, max_new_tokens, sampling)
    model.eval()
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    kv_bytes = model.setup_caches(batch=1, max_len=total)
    try:
        started = time.perf_counter()
        logits = model(torch.tensor([prompt_tokens], device=device), start_pos=0).logits
        token = sample_next(logits[:, -1], sampling, generator)
        new_tokens = [int(token)]
        prefill_s = time.perf_counter() - started
        started = time.perf_counter()
        position = len(prompt_tokens)
        while len(new_tokens) < max_new_tokens and new_tokens[-1] != eos_id:
            logits = model(token.view(1, 1), start_pos=position).logits
            token = sample_next(logits[:, -1], sampling, generator)
            new_tokens.append(int(token))
            position += 1
        decode_s = time.perf_counter() - started
    finally:
        model.clear_caches()
    return GenerationResult(prompt_tokens, new_tokens, prefill_s, decode_s, active_weight_bytes(model), kv_bytes)
