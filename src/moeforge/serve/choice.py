"""One choice of an answer, built as the engine's outputs arrive: its text decoded incrementally and
cut at the first stop string, each token's log-probability placed at its offset in the text, and why
it finished.

The engine stops on token ids only. Stop strings are found here, in the decoded text: a stop string
can span tokens, and a token can hold the end of the answer and the start of a stop string, so text
that could still become a stop string is held back (not streamed) until the next token decides. At a
match the text ends where the stop string starts, the finish reason is "stop", and the caller aborts
the request. A token's log-probability entry is released with the text it starts in, so a stream
never reports a token whose text it later withdraws.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from moeforge.data.tokenizer import Tokenizer
from moeforge.serve.detokenize import IncrementalDecoder, decode_with_offsets, token_bytes, token_text
from moeforge.serve.requests import TokenLogprob, RequestOutput

MIN_LOGPROB = -9999.0
"""what a log-probability of -inf is reported as (JSON has no infinity; vLLM uses the same)"""


@dataclass(frozen=True)
class TokenEntry:
    """One token of the answer (the echoed prompt included) with its log-probability (None for the
    first prompt token, which nothing predicts) and the most likely alternatives."""

    text: str
    bytes: bytes
    logprob: float | None
    top: tuple[tuple[str, bytes, float], ...]
    offset: int
    """characters of the choice's text before this token"""


@dataclass
class Delta:
    """What one engine output added to a choice."""

    text: str = ""
    entries: list[TokenEntry] = field(default_factory=list)
    finish_reason: str | None = None
    stop_string: bool = False
    """the text reached a stop string: the caller aborts the request"""


class ChoiceState:
    """The answer of one engine request. `end_ids`: tokens that end it without being part of its
    text (end of text, stop token ids); `keep_generated` False scores the prompt only (echo with
    max_tokens 0: the one token generated is dropped)."""

    def __init__(
        self,
        index: int,
        request_id: str,
        prompt_tokens: Sequence[int],
        tokenizer: Tokenizer,
        *,
        stop: Sequence[str] = (),
        end_ids: Sequence[int] = (),
        echo: bool = False,
        logprobs: bool = False,
        keep_generated: bool = True,
    ) -> None:
        self.index, self.request_id, self.prompt_tokens = index, request_id, list(prompt_tokens)
        self._tokenizer = tokenizer
        self._stop, self._end_ids, self._echo = tuple(stop), frozenset(end_ids), echo
        self._logprobs, self._keep_generated = logprobs, keep_generated
        self._decoder = IncrementalDecoder(tokenizer, prompt_tokens)
        self._prompt_text, self._prompt_offsets = decode_with_offsets(tokenizer, prompt_tokens) if echo else ("", [])
        self._base = len(self._prompt_text)
        self.text = ""
        """the text released so far (the echoed prompt first)"""
        self._held = ""
        self._pending: list[TokenEntry] = []
        self.entries: list[TokenEntry] = []
        """every entry released so far"""
        self.generated = 0
        self.finish_reason: str | None = None
        self._started = False

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def update(self, output: RequestOutput) -> Delta:
        delta = Delta()
        if self.finished or not (output.new_tokens or output.prompt_logprobs is not None or output.finished):
            return delta  # a prefill chunk: nothing to say yet
        if not self._started:
            self._start(output, delta)
        tokens = output.new_tokens if self._keep_generated else []
        for i, token in enumerate(tokens):
            self.generated += 1
            ends = i == len(tokens) - 1 and output.finish_reason == "stop" and token in self._end_ids
            lp = output.logprobs[i] if self._logprobs and output.logprobs else None
            self._pending.append(self._entry(token, lp, len(self.text) + len(self._held)))
            if not ends:
                self._held += self._decoder.push(token)
            cut = self._stop_at()
            if cut is not None:
                return self._finish(delta, "stop", cut - (len(self.text) - self._base), stop_string=True)
        if output.finished:
            self._held += self._decoder.flush()
            return self._finish(delta, output.finish_reason if self._keep_generated else "length", len(self._held))
        self._release(delta, len(self._held) - self._stop_prefix_len())
        return delta

    def _start(self, output: RequestOutput, delta: Delta) -> None:
        """The echoed prompt and its entries, with the first output (which carries its log-probabilities)."""
        self._started = True
        if not self._echo:
            return
        self.text = self._prompt_text
        delta.text = self._prompt_text
        if self._logprobs:
            given = output.prompt_logprobs or [None] * len(self.prompt_tokens)
            entries = [self._entry(t, lp, o) for t, lp, o in zip(self.prompt_tokens, given, self._prompt_offsets)]
            self.entries += entries
            delta.entries += entries

    def _entry(self, token: int, lp: TokenLogprob | None, offset: int) -> TokenEntry:
        tok = self._tokenizer
        top = tuple((token_text(tok, t), token_bytes(tok, t), max(v, MIN_LOGPROB)) for t, v in lp.top) if lp else ()
        value = None if lp is None else max(lp.logprob, MIN_LOGPROB)
        return TokenEntry(token_text(tok, token), token_bytes(tok, token), value, top, offset)

    def _stop_at(self) -> int | None:
        """Where the first stop string starts in the generated text (held text included), if any."""
        text = self.text[self._base :] + self._held
        found = [
            at
            for s in self._stop
            if (at := text.find(s, max(0, len(text) - len(self._held) - len(s) + 1))) >= 0
        ]
        return min(found) if found else None

    def _stop_prefix_len(self) -> int:
        """The longest end of the held text that a stop string starts with: it must wait."""
        longest = 0
        for s in self._stop:
            for n in range(min(len(s) - 1, len(self._held)), longest, -1):
                if self._held.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _finish(self, delta: Delta, reason: str | None, chars: int, stop_string: bool = False) -> Delta:
        """The answer ends with `chars` more of the held text."""
        self.finish_reason = reason
        delta.finish_reason, delta.stop_string = reason, stop_string
        self._release(delta, chars, final=True, everything=not stop_string)
        return delta

    def _release(self, delta: Delta, chars: int, final: bool = False, everything: bool = False) -> None:
        """`chars` of the held text become the answer's, with the entries of the tokens that start in
        what is released (`everything`: every entry, at the natural end of the answer)."""
        chars = max(chars, 0)
        self.text += self._held[:chars]
        delta.text += self._held[:chars]
        self._held = "" if final else self._held[chars:]
        ready = len(self._pending) if everything else sum(e.offset < len(self.text) for e in self._pending)
        released, self._pending = self._pending[:ready], self._pending[ready:]
        self.entries += released
        delta.entries += released
