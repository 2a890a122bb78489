"""The request bodies of `/v1/completions` and `/v1/chat/completions`: OpenAI's fields, typed.

A field OpenAI defines that moeforge does not implement is refused like a misspelt one (400 naming
it), never silently ignored: an evaluation that asked for `logit_bias` must not get numbers computed
without it. Two exceptions, because common clients send them on every call at their neutral value:
`presence_penalty` and `frequency_penalty` are accepted when 0. Non-finite numbers (NaN, Infinity,
which Python's JSON reader accepts) are refused here; ranges are checked once, by `SamplingParams`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_CHOICES = 128
"""the most `n` one request may ask for"""
MAX_STOP_STRINGS = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: bool = False
    """a last chunk, before `data: [DONE]`, with the usage of the whole request"""


class GenerationFields(_Body):
    """The fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    """default 1; 0 = greedy"""
    top_p: float | None = None
    top_k: int | None = None
    """an extension (vLLM's): 0 or absent = every token"""
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False
    """an extension: keep generating past the end-of-text token (benchmarks)"""
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"{len(strings)} strings; allowed: at most {MAX_STOP_STRINGS}")
        if any(not s for s in strings):
            raise ValueError("an empty string; allowed: non-empty strings")
        return stop

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError(f"got {value}; allowed: 0 (penalties are not implemented)")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(GenerationFields):
    """POST /v1/completions: continue a prompt (text, token ids, or a list of either)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    """0 only with `echo`: score the prompt without generating (what evaluation harnesses ask)"""
    logprobs: int | None = None
    """the chosen token's log-probability and this many of the most likely, per position"""
    echo: bool = False
    """the prompt is returned before the completion (and its log-probabilities with `logprobs`)"""


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(GenerationFields):
    """POST /v1/chat/completions: answer a conversation, rendered by the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    """OpenAI's newer name for `max_tokens`; wins when both are given. Absent: up to the context."""
    logprobs: bool = False
    top_logprobs: int | None = None
    """with `logprobs`: this many of the most likely tokens per position"""
