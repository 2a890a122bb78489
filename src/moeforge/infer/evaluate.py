"""Loss and perplexity of a trained model on prepared token datasets (`moeforge eval`).

The text is cut into the windows the trainer validates on (data/loader.py `validation_batches`:
consecutive, non-overlapping windows of seq_len+1 tokens from the start of the split, the tail that
does not fill a window left out) and the mean next-token cross-entropy over every target token is
summed by the same function as the trainer's validation (model/cross_entropy.py), so that the two
agree exactly when their batches coincide. Perplexity is exp(loss), loss in nats per token.

A dataset is checked before any is evaluated, each refusal one line naming the directory, its
manifest or the flag: it must be a prepared directory (`moeforge data prepare`) made with the
tokenizer of the checkpoint's run, with a vocabulary the model's embedding covers (the manifest's
vocab_size: every token id is below it, so no token is read to check), and a split of at least one
window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from moeforge.config import ConfigError
from moeforge.data.indexed import IndexedDataset
from moeforge.data.loader import TokenArray, count_windows, validation_batches, validation_document_ids
from moeforge.data.prepare import MANIFEST_FILE, SPLITS
from moeforge.data.prepared import checked_manifest, is_prepared
from moeforge.model.cross_entropy import summed_token_cross_entropy
from moeforge.model.transformer import Transformer


@dataclass
class EvalResult:
    """A model's mean next-token cross-entropy over the windows of one token stream."""

    loss: float
    """nats per target token"""
    tokens: int
    """target tokens scored: windows * seq_len"""
    windows: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss)


@torch.no_grad()
def evaluate(
    model: Transformer,
    data: TokenArray | IndexedDataset,
    seq_len: int,
    batch_size: int = 8,
    max_batches: int = 0,
    device: torch.device | str = "cpu",
    document_mask: bool = False,
) -> EvalResult:
    """`model`'s loss on the consecutive windows of seq_len+1 of the 1-D tokens `data` (or a prepared
    dataset's), `batch_size` windows a forward, the first `max_batches` batches (0: every window);
    with `document_mask` (a run's data.document-mask) attending inside the dataset's documents, as
    the trainer validates. The model is left in the mode it had."""
    tokens = data.tokens if isinstance(data, IndexedDataset) else data
    n_windows = count_windows(len(tokens), seq_len)
    if n_windows == 0:
        raise ConfigError(
            f"--seq-len: got {seq_len}; allowed: at most {len(tokens) - 1}, the tokens given less one"
        )
    shape = (batch_size, seq_len, max_batches or -(-n_windows // batch_size))
    documents = validation_document_ids(data, *shape) if document_mask else None

    def logits_of(inputs: torch.Tensor) -> torch.Tensor:
        ids = next(documents).to(device) if documents is not None else None  # in step with the batches
        return model(inputs, document_ids=ids).logits

    was_training = model.training
    model.eval()
    try:
        sums = summed_token_cross_entropy(validation_batches(tokens, *shape), logits_of, device)
    finally:
        model.train(was_training)
    return EvalResult(float(sums.total) / sums.tokens, sums.tokens, sums.windows)


def check_eval_flags(seq_len: int, batch_size: int, max_batches: int) -> None:
    """One-line errors for --seq-len (0: the run's), --batch-size and --max-batches (0: every window)."""
    if seq_len < 0:
        raise ConfigError(f"--seq-len: got {seq_len}; allowed: an integer >= 1 (0: the run's train.seq-len)")
    if batch_size < 1:
        raise ConfigError(f"--batch-size: got {batch_size}; allowed: an integer >= 1")
    if max_batches < 0:
        raise ConfigError(f"--max-batches: got {max_batches}; allowed: an integer >= 0 (0: every window)")


def check_seq_len(seq_len: int, max_seq_len: int) -> None:
    """--seq-len within the positions the model was built for."""
    if seq_len > max_seq_len:
        raise ConfigError(f"--seq-len: got {seq_len}; allowed: 1 to the model's max-seq-len {max_seq_len}")


def check_data_dir(path: str | Path) -> Path:
    """`path` as a prepared directory, or a one-line error (missing, or not made by `data prepare`)."""
    root = Path(path)
    if not root.is_dir():
        raise ConfigError(f"DATA_DIR: {str(path)!r} is not a directory")
    if not is_prepared(root):
        raise ConfigError(
            f"DATA_DIR: {str(path)!r} has no {MANIFEST_FILE}; make one with `moeforge data prepare`"
        )
    return root


def open_eval_split(root: Path, split: str, tokenizer: str, vocab_size: int, seq_len: int) -> IndexedDataset:
    """`split` of the prepared directory `root`, memory-mapped, after the checks of the
    module docstring against the run's `tokenizer` ('byte' or a tokenizer.json) and the model's
    `vocab_size`; reads the manifest and the index, not the tokens."""
    assert split in SPLITS, split
    manifest = checked_manifest(root, tokenizer)
    if manifest["vocab_size"] > vocab_size:
        raise ConfigError(
            f"{root / MANIFEST_FILE}: vocab_size {manifest['vocab_size']}; allowed: at most the model's "
            f"vocab-size {vocab_size}"
        )
    dataset = IndexedDataset(root / split)
    if count_windows(len(dataset.tokens), seq_len) == 0:
        raise ConfigError(
            f"{root / split}.bin: {len(dataset.tokens)} tokens in split {split!r}; allowed: at least one window of "
            f"--seq-len+1 = {seq_len + 1}"
        )
    return dataset

