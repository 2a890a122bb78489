"""Data: the embedded corpus or user files -> tokens -> packed, sharded, resumable batches."""

from __future__ import annotations

from moeforge.config import ConfigError, DataConfig
from moeforge.config.data import is_mixture
from moeforge.data.corpus import embedded_corpus, load_documents, read_documents
from moeforge.data.prepared import is_prepared, open_prepared
from moeforge.data.loader import PackedLoader, TokenArray, count_windows, split_train_val, validation_batches
from moeforge.data.tokenizer import (
    ByteTokenizer,
    HFTokenizer,
    Tokenizer,
    build_tokenizer,
    document_separator,
    encode_documents,
)

__all__ = [
    "ByteTokenizer",
    "HFTokenizer",
    "PackedLoader",
    "TokenArray",
    "Tokenizer",
    "build_datasets",
    "build_tokenizer",
    "count_windows",
    "document_separator",
    "embedded_corpus",
    "encode_documents",
    "load_documents",
    "read_documents",
    "split_train_val",
    "validation_batches",
]


def build_datasets(data_cfg: DataConfig, seq_len: int) -> tuple[Tokenizer, TokenArray, TokenArray]:
    """(tokenizer, train tokens, val tokens) for a run; the validation split is checked to hold one
    window of `seq_len` here, the training split by `PackedLoader`, which reads it. A prepared
    directory (`moeforge data prepare`) is opened as memory maps of its train and val files; text
    files and the embedded corpus are tokenized in memory, the last `data.val-fraction` held out."""
    if is_mixture(data_cfg.path):
        raise ConfigError(
            f"data.path: got the mixture {data_cfg.path!r}; allowed here: one path (mixtures are read by "
            "moeforge.data.blend.open_mixture, which the trainer uses)"
        )
    tokenizer = build_tokenizer(data_cfg)
    if is_prepared(data_cfg.path):
        train, val = open_prepared(data_cfg)
        if count_windows(len(val), seq_len) == 0:
            raise ConfigError(
                f"data.path: {data_cfg.path!r} holds {len(val)} validation tokens; allowed: at least "
                f"train.seq-len+1={seq_len + 1} (prepare it with --val-fraction or --val)"
            )
        return tokenizer, train, val
    tokens = encode_documents(tokenizer, load_documents(data_cfg))
    train, val = split_train_val(tokens, data_cfg.val_fraction)
    if count_windows(len(val), seq_len) == 0:
        raise ConfigError(
            f"data.val-fraction: got {data_cfg.val_fraction}; allowed: a fraction leaving at least "
            f"train.seq-len+1={seq_len + 1} of the corpus's {len(tokens)} tokens for validation"
        )
    return tokenizer, train, val
