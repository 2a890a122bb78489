"""What a request asks of the engine and what the engine sends back: the types the HTTP layer and
the engine share, and nothing that runs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from moeforge.config.checks import INT64
from moeforge.errors import MoeforgeError
from moeforge.infer.generate import SamplingConfig

FinishReason = Literal["stop", "length", "abort"]


class RequestError(MoeforgeError, ValueError):
    """A request the engine cannot take as asked: one line naming the field (the API answers 400)."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.message = message

    def __reduce__(self):  # crosses the pipe from the engine process whole
        return (RequestError, (self.field, self.message))


class EngineFull(MoeforgeError):
    """The engine's queue of waiting requests is full (the API answers 429 with Retry-After)."""


@dataclass(frozen=True)
class SamplingParams:
    """One request's decoding settings, checked when made."""

    max_tokens: int = 16
    temperature: float = 1.0
    """0 = greedy"""
    top_p: float = 1.0
    top_k: int = 0
    """0 = every token"""
    seed: int | None = None
    """the request's own generator: the same seed gives the same tokens whatever else is served"""
    logprobs: int | None = None
    """None: no log-probabilities; k >= 0: each new token's log-probability and the k most likely"""
    prompt_logprobs: bool = False
    """the prompt tokens' log-probabilities too (OpenAI's `echo` with `logprobs`)"""
    stop_token_ids: tuple[int, ...] = ()
    """tokens that end the request (the tokenizer's end token is one unless `ignore_eos`)"""
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise RequestError("max_tokens", f"got {self.max_tokens}; allowed: an integer >= 1")
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 100):
            raise RequestError(
                "temperature", f"got {self.temperature}; allowed: a number in [0, 100] (0 = greedy)"
            )
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise RequestError("top_p", f"got {self.top_p}; allowed: a number in (0, 1]")
        if self.top_k < 0:
            raise RequestError("top_k", f"got {self.top_k}; allowed: an integer >= 0 (0 = every token)")
        if self.seed is not None and not INT64[0] <= self.seed <= INT64[1]:
            raise RequestError("seed", f"got {self.seed}; allowed: an integer within int64")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise RequestError("logprobs", f"got {self.logprobs}; allowed: an integer in [0, 20]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def sampling_config(self) -> SamplingConfig:
        """The filtering `infer.generate.token_probabilities` applies: temperature, top-k, top-p."""
        return SamplingConfig(self.temperature, self.top_k, self.top_p)


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model (log-softmax of its logits, before temperature and
    filtering: what the trainer's forward gives), and the `top` most likely tokens at that position."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RequestOutput:
    """What one engine step produced for one request: its new tokens (none when it only prefilled a
    chunk), their log-probabilities when asked, and whether it finished and why."""

    request_id: str
    new_tokens: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    """once, with the first new token: None for the first prompt token (nothing predicts it)"""
    finish_reason: FinishReason | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass(frozen=True)
class EngineConfig:
    """The engine's limits (the `serve` flags)."""

    max_batch: int = 16
    """requests in the running batch at once"""
    cache_blocks: int = 256
    """blocks of the paged KV cache (each holds `block_size` positions of every layer)"""
    block_size: int = 16
    """positions per cache block: a request holds ceil(positions / block_size) blocks"""
    max_step_tokens: int = 256
    """tokens one forward computes (decoding tokens first, then prefill chunks fill the rest)"""
    max_waiting: int = 64
    """requests queued before new ones are refused (429)"""
    decode_steps: int = 4
    """forwards one engine step runs while every running request is decoding and no waiting request
    could join, each feeding the tokens the last chose (1: one forward per step); fewer scheduling
    and output rounds per token, and a new request waits at most this many forwards to join"""
    speculative: bool = False
    """draft with the model's MTP modules and verify every running request in one forward"""
    compile: bool = False
    """run the main model's step forward through torch.compile (dynamic shapes: two graphs, compiled
    while the server warms up); the same tokens and log-probabilities up to float rounding"""
    prefix_reuse: bool = True
    """a request whose prompt starts with full cache blocks another request computed takes them and
    prefills only the rest (not with --speculative, nor for requests that ask for prompt
    log-probabilities: both need every prompt position computed)"""

    def __post_init__(self) -> None:
        for name in ("max_batch", "cache_blocks", "block_size", "max_step_tokens", "max_waiting", "decode_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise RequestError(f"--{name.replace('_', '-')}", f"got {value!r}; allowed: an integer >= 1")
        if self.max_step_tokens < self.max_batch:
            raise RequestError(
                "--max-step-tokens",
                f"got {self.max_step_tokens}; allowed: at least --max-batch ({self.max_batch}), one token per running request",
            )


@dataclass
class EngineStats:
    """Counters and gauges for /metrics and the benchmark."""

    running: int = 0
    waiting: int = 0
    cache_blocks_used: int = 0
    cache_blocks_total: int = 0
    requests_finished: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    steps: int = 0
    preemptions: int = 0
    prefix_hit_tokens: int = 0
    """prompt tokens taken from the cache instead of being computed (prefix reuse)"""
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    verify_rounds: int = 0
    """forwards of speculating requests; generated / rounds is tokens per step"""
