"""Data: the embedded corpus or user files -> prepared token files -> packed, sharded, resumable batches."""

from __future__ import annotations

from pathlib import Path

from moeforge.config import ConfigError, DataConfig
from moeforge.config.data import is_mixture
from moeforge.data.cache import prepared_cache
from moeforge.data.corpus import embedded_corpus
from moeforge.data.indexed import IndexedDataset
from moeforge.data.prepared import is_prepared, open_prepared_datasets
from moeforge.data.loader import PackedLoader, TokenArray, count_windows, validation_batches
from moeforge.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    document_separator,
)

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "PackedLoader",
    "TokenArray",
    "Tokenizer",
    "build_datasets",
    "build_indexed_datasets",
    "build_tokenizer",
    "count_windows",
    "document_separator",
    "embedded_corpus",
    "validation_batches",
]


def build_datasets(
    data_cfg: DataConfig, seq_len: int, progress: bool = True
) -> tuple[Tokenizer, TokenArray, TokenArray]:
    """(tokenizer, train tokens, val tokens) for a run, memory maps of a prepared directory: the one
    `data.path` names, or for text files and the embedded corpus the one `prepared_cache` makes
    once (the last `data.val-fraction` of their tokens held out). The validation split is checked
    to hold one window of `seq_len` here, the training split by `PackedLoader`, which reads it."""
    tokenizer, train, val = build_indexed_datasets(data_cfg, seq_len, progress)
    return tokenizer, train.tokens, val.tokens


def build_indexed_datasets(
    data_cfg: DataConfig, seq_len: int, progress: bool = True
) -> tuple[Tokenizer, IndexedDataset, IndexedDataset]:
    """`build_datasets` with each split as its whole indexed dataset, document index included (what
    `--data.document-mask` reads; the loaders take either)."""
    if is_mixture(data_cfg.path):
        raise ConfigError(
            f"data.path: got the mixture {data_cfg.path!r}; allowed here: one path (mixtures are read by "
            "moeforge.data.blend.open_mixture, which the trainer uses)"
        )
    tokenizer = build_tokenizer(data_cfg)
    prepared = is_prepared(data_cfg.path)
    root = Path(data_cfg.path) if prepared else prepared_cache(data_cfg, progress)
    train, val = open_prepared_datasets(root, data_cfg.tokenizer)
    n_train, n_val = len(train.tokens), len(val.tokens)
    if count_windows(n_val, seq_len) == 0:
        allowed = (
            "prepare it with --val-fraction or --val"
            if prepared
            else f"a data.val-fraction leaving them of the corpus's {n_train + n_val} tokens"
        )
        raise ConfigError(
            f"{'data.path' if prepared else 'data.val-fraction'}: {data_cfg.path or 'the embedded corpus'!r} "
            f"holds {n_val} validation tokens; allowed: at least train.seq-len+1={seq_len + 1} ({allowed})"
        )
    return tokenizer, train, val
