"""Autoregressive generation with a KV cache, and the roofline figure decoding is judged by.

Decoding one token reads every *active* weight once (the top-k routed experts and the shared
experts of each MoE layer, not all experts) plus the KV cache so far, so the memory bandwidth it
achieved is (active weight bytes + KV bytes read) x tokens/s.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from moeforge.config import ConfigError
from moeforge.config.checks import INT64
from moeforge.infer.decode import DecodeStep, decode_step, steady_state
from moeforge.model.flops import kv_cache_bytes_per_token, parameter_counts
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
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ConfigError(f"--temperature: got {self.temperature}; allowed: a finite number >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ConfigError(f"--top-k: got {self.top_k}; allowed: an integer >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p: got {self.top_p}; allowed: a number in (0, 1]")


def check_prompt_text(text: str) -> None:
    """A prompt that is text: the command line hands bytes that are not UTF-8 over as lone surrogates
    (Python's surrogateescape), which no tokenizer can encode; a one-line error naming the first."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        code = ord(text[err.start])
        what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"character U+{code:04X}"
        raise ConfigError(f"--prompt: not valid UTF-8 ({what} at character {err.start}); allowed: UTF-8 text") from None


def check_seed(seed: int) -> None:
    """A seed `torch.Generator.manual_seed` takes: an integer within int64."""
    if not INT64[0] <= seed <= INT64[1]:
        raise ConfigError(f"--seed: got {seed}; allowed: an integer within int64 (|seed| < 2**63)")


def generation_device(name: str) -> torch.device:
    """The device `--device` names, checked to exist here: a one-line error for a name torch does not
    know ('gpu'), a kind moeforge does not decode on ('meta'), and CUDA where there is none."""
    allowed = "'cpu', 'cuda' or 'cuda:N'"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device: got {name!r}; allowed: {allowed}") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device: got {name!r}; allowed: {allowed}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device: got {name!r}; allowed: 'cpu' (CUDA is not available here)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"--device: got {name!r}; allowed: cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


@dataclass
class GenerationResult:
    prompt_tokens: list[int]
    new_tokens: list[int]
    prefill_s: float
    decode_s: float
    active_weight_bytes: int
    kv_bytes_per_token: int
    compile_s: float = 0.0
    """time of the untimed first call of a compiled step (compilation, and CUDA graph recording)"""

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


@dataclass
class BatchResult:
    """What `generate_batch` returns: each row's new tokens, cut at its own limit and end token."""

    prompts: list[list[int]]
    new_tokens: list[list[int]]
    prefill_s: float
    decode_s: float
    steps: int
    """decoding steps run (each computes one token of every row, finished or not)"""
    compile_s: float = 0.0

    @property
    def tokens_per_s(self) -> float:
        """Tokens the decoding steps kept, per second, over all rows."""
        kept = sum(max(len(tokens) - 1, 0) for tokens in self.new_tokens)
        return kept / self.decode_s if self.decode_s > 0 else 0.0


def sample_next(logits: torch.Tensor, sampling: SamplingConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One token id per row of logits [B, vocab], on their device, without a host sync.

    Sampling races exponential clocks: argmax of p / E with E ~ Exp(1) is distributed as p (the
    Gumbel-max trick in another form), and needs neither `multinomial` nor a sync."""
    if sampling.temperature == 0:
        return logits.argmax(dim=-1)
    probs = token_probabilities(logits, sampling)
    clocks = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / clocks).argmax(dim=-1)


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
    compile: bool = False,
) -> GenerationResult:
    """Continue `prompt_tokens` by up to `max_new_tokens` tokens (stops early at `eos_id`); with
    `compile` the decoding step runs compiled (`infer/decode.py`)."""
    batch = generate_batch(model, [prompt_tokens], max_new_tokens, sampling, seed, eos_id, compile)
    return GenerationResult(
        list(prompt_tokens),
        batch.new_tokens[0],
        batch.prefill_s,
        batch.decode_s,
        active_weight_bytes(model),
        model_kv_bytes_per_token(model),
        batch.compile_s,
    )


@torch.no_grad()
def generate_batch(
    model: Transformer,
    prompts: list[list[int]],
    max_new_tokens: int | list[int],
    sampling: SamplingConfig = SamplingConfig(),
    seed: int = 0,
    eos_id: int | None = None,
    compile: bool = False,
) -> BatchResult:
    """Continue several prompts at once, each by up to its own `max_new_tokens` (one int for all, or
    one per prompt), each row stopping at its own `eos_id`.

    Prompts are left-padded to the longest: every row writes the same cache slot at each step, row b's
    first `pad[b]` slots hold padding that the attention mask hides from its tokens, and its RoPE
    positions start at 0 on its first real token, so that each row computes what it would alone.
    Finished rows keep stepping with the others (the shapes stay static) and are cut afterwards.
    """
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if not prompts or len(limits) != len(prompts):
        raise ConfigError(f"--prompt: got {len(prompts)} prompts and {len(limits)} token limits; allowed: one each")
    longest = max(len(prompt) for prompt in prompts)
    for prompt, limit in zip(prompts, limits):
        check_request(model, [0] * (longest - len(prompt)) + prompt, limit, sampling)
    model.eval()
    device = model.tok_embeddings.weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    pad = torch.tensor([longest - len(prompt) for prompt in prompts], device=device)
    tokens = torch.tensor([[0] * (longest - len(p)) + p for p in prompts], device=device)
    model.setup_caches(batch=len(prompts), max_len=longest + max(limits))
    try:
        step = decode_step(compile, device)
        row_pad = pad if longest > min(len(p) for p in prompts) else None  # no padding: a simpler mask
        compile_s = warm_up(step, model, len(prompts), row_pad) if compile else 0.0
        started = _now(device)
        logits = model(tokens, input_pos=torch.arange(longest, device=device), pad=row_pad).logits
        first = sample_next(logits[:, -1], sampling, generator)
        prefill_s = _now(device) - started
        started = _now(device)
        with steady_state(compile):
            out = decode_loop(step, model, first, longest, max(limits), sampling, generator, eos_id, row_pad)
        decode_s = _now(device) - started
    finally:
        model.clear_caches()
    rows = [_cut(row, limit, eos_id) for row, limit in zip(out.tolist(), limits)]
    return BatchResult([list(p) for p in prompts], rows, prefill_s, decode_s, out.shape[1] - 1, compile_s)


EOS_CHECK_EVERY = 16
"""decoding steps between two looks (host syncs) at whether every row has produced its end token"""


def decode_loop(
    step: DecodeStep,
    model: Transformer,
    first: torch.Tensor,
    start: int,
    n_tokens: int,
    sampling: SamplingConfig,
    generator: torch.Generator,
    eos_id: int | None,
    pad: torch.Tensor | None = None,
) -> torch.Tensor:
    """Tokens [B, <= n_tokens] of every row, starting with `first` [B] (sampled from the prefill) at
    cache slot `start`. Everything stays on the device: the slot is a tensor advanced in place, the
    tokens go into a preallocated buffer, and the end token is looked for every `EOS_CHECK_EVERY`
    steps only (the loop may run a few steps past the last row's end; they are cut)."""
    out = torch.empty(first.shape[0], n_tokens, dtype=torch.long, device=first.device)
    out[:, 0] = first
    token, input_pos = first, torch.tensor([start], device=first.device)
    for i in range(1, n_tokens):
        logits, _ = step(model, token.view(-1, 1), input_pos, pad)
        token = sample_next(logits[:, -1], sampling, generator)
        out[:, i] = token
        input_pos += 1
        if eos_id is not None and i % EOS_CHECK_EVERY == 0 and bool((out[:, : i + 1] == eos_id).any(dim=1).all()):
            return out[:, : i + 1]
    return out


def warm_up(step: DecodeStep, model: Transformer, batch: int, pad: torch.Tensor | None) -> float:
    """Call a compiled step before timing (it compiles, and on CUDA records its graph: a few calls);
    it writes slot 0 of the caches, which the prefill overwrites. Returns the seconds it took."""
    device = model.tok_embeddings.weight.device
    started = _now(device)
    token = torch.zeros(batch, 1, dtype=torch.long, device=device)
    for _ in range(3 if device.type == "cuda" else 1):
        step(model, token, torch.zeros(1, dtype=torch.long, device=device), pad)
    return _now(device) - started


def _now(device: torch.device) -> float:
    """perf_counter after the device's queued work is done (CUDA runs asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def _cut(tokens: list[int], limit: int, eos_id: int | None) -> list[int]:
    """A row's first `limit` tokens, up to and including its first end token."""
    tokens = tokens[:limit]
    return tokens[: tokens.index(eos_id) + 1] if eos_id in tokens else tokens


def model_kv_bytes_per_token(model: Transformer) -> int:
    """KV cache bytes one token of one sequence takes in the main model's layers (see `setup_caches`)."""
    return kv_cache_bytes_per_token(model.cfg, model.tok_embeddings.weight.element_size())
