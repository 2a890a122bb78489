"""Token ids to text as they arrive, and the text and bytes of one token for log-probabilities.

Decoding one token at a time is wrong for most tokenizers: a character can span several tokens (a
UTF-8 byte per token for the byte tokenizer, byte-level BPE pieces for others) and a token's text can
depend on the one before it (SentencePiece's leading space). `IncrementalDecoder` decodes a short
window that starts at the previous boundary and emits only what the window added, holding it back
while it ends in an incomplete character (U+FFFD), which is the approach of vLLM's and Hugging Face's
streaming detokenizers. Each token is decoded a bounded number of times, so a long answer costs
linear time, not quadratic.
"""

from __future__ import annotations

from collections.abc import Sequence

from moeforge.data.tokenizer import ByteTokenizer, Tokenizer

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5
"""prompt tokens decoded before the first new one, so that it decodes as it would in the text"""


class IncrementalDecoder:
    """Text of a growing token sequence, in pieces: `push` each token, `flush` at the end."""

    def __init__(self, tokenizer: Tokenizer, context: Sequence[int] = ()) -> None:
        self._tokenizer = tokenizer
        self._ids = list(context[-CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token: int) -> str:
        """The text `token` completes ('' while a character is still incomplete)."""
        self._ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """What is still held back, decoded as it is (an incomplete character as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self._tokenizer.decode(self._ids[self._prefix : self._read])
        after = self._tokenizer.decode(self._ids[self._prefix :])
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and not final):
            return ""
        # the window moves to the new boundary; tokens before it are never decoded again
        del self._ids[: self._read]
        self._prefix, self._read = 0, len(self._ids)
        return after[len(before) :]


def decode_with_offsets(tokenizer: Tokenizer, tokens: Sequence[int]) -> tuple[str, list[int]]:
    """The text of `tokens` and, for each token, the number of characters before it (OpenAI's
    `text_offset`: the tokens of one multi-token character all start where it starts)."""
    decoder = IncrementalDecoder(tokenizer)
    text, offsets = "", []
    for token in tokens:
        offsets.append(len(text))
        text += decoder.push(token)
    return text + decoder.flush(), offsets


def token_bytes(tokenizer: Tokenizer, token: int) -> bytes:
    """The bytes `token` stands for: itself for the byte tokenizer; otherwise its decoded text in
    UTF-8 (a byte-level BPE piece that is part of a character decodes to U+FFFD)."""
    if isinstance(tokenizer, ByteTokenizer):
        return bytes([token])
    return tokenizer.decode([token]).encode("utf-8")


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """`token` as a string for log-probability listings: its text, or OpenAI's `bytes:\\xNN...` form
    when its bytes are not a whole UTF-8 text."""
    raw = token_bytes(tokenizer, token)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = REPLACEMENT
    if REPLACEMENT in text and REPLACEMENT.encode() not in raw:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text
