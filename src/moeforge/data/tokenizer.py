"""Tokenizers: raw UTF-8 bytes (no files needed) or a local Hugging Face tokenizer.json."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import tokenizers

from moeforge.config import ConfigError, DataConfig
from moeforge.errors import first_line

# End-of-document tokens of common tokenizer families, most common first
# (GPT-2/Qwen, Llama/Mistral, Gemma, Llama-3, DeepSeek-V3).
EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>", "<｜end▁of▁sentence｜>")


class Tokenizer(Protocol):
    """What training and generation need from a tokenizer; `eos_id` is None when it has none."""

    vocab_size: int
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def encode_batch(self, texts: list[str]) -> list[list[int]]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """Each UTF-8 byte is a token: 256 symbols, nothing to train or ship.

    It has no end-of-document token (`eos_id` is None): documents are joined with a newline byte
    instead (see `document_separator`). A newline keeps the vocabulary at exactly 256, decodes to
    readable text, and is what a document boundary looks like in plain text anyway: the
    embedded corpus's documents end in a newline, so the separator makes a blank line between them.
    """

    vocab_size = 256
    eos_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(text) for text in texts]

    def decode(self, ids: list[int]) -> str:
        """Bytes to text; a sampled byte sequence may be invalid UTF-8, shown as U+FFFD."""
        return bytes(ids).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizers` tokenizer loaded from a local tokenizer.json.

    Text is encoded without the tokenizer's post-processing (no BOS/EOS added per call): the packed
    training stream places its own separators, and a prompt is continued as written.
    """

    def __init__(self, path: str | Path) -> None:
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # noqa: BLE001 -- tokenizers raises a bare Exception for any failure
            reason = first_line(err)
            raise ConfigError(
                f"data.tokenizer: cannot load {str(path)!r} as a tokenizer.json: {reason}"
            ) from None
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_id: int | None = _find_eos(self._tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [enc.ids for enc in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)


def _find_eos(tok: tokenizers.Tokenizer) -> int | None:
    special = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    return next((special[name] for name in EOS_CANDIDATES if name in special), None)


def build_tokenizer(cfg: DataConfig) -> Tokenizer:
    """`ByteTokenizer` for 'byte', else the tokenizer.json at `cfg.tokenizer`."""
    if cfg.tokenizer == "byte":
        return ByteTokenizer()
    return HFTokenizer(cfg.tokenizer)


def document_separator(tok: Tokenizer) -> list[int]:
    """Tokens placed between two documents: the end-of-document token, or else a newline."""
    return [tok.eos_id] if tok.eos_id is not None else tok.encode("\n")
