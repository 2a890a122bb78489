"""Packed, shuffled, sharded and resumable batches from a 1-D token stream.

The stream is cut into non-overlapping windows of seq_len+1 tokens; a window gives one training
sequence (inputs = window[:-1], targets = window[1:]). Sequences cross document boundaries, with
the separator token in between, so no token is spent on padding.

The stream is any 1-D integer array: a torch tensor, or a numpy array such as a `numpy.memmap` of
uint16 or int32 over a prepared token file. It is kept as given and only the windows of a batch are
read from it (then widened to int64), so a memory-mapped corpus costs each rank the pages its batches
touch, not a copy of the file.

Given a prepared dataset (`IndexedDataset`) instead, the loader also knows where its documents start,
and with `document_mask` gives each window's document ids (`document_ids`): the model then keeps
attention inside each document (`--data.document-mask`). They come from binary searches of the
mapped index per window, never from a table over the corpus.
"""

from __future__ import annotations

import abc
import functools
import hashlib
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch

from moeforge.config import ConfigError
from moeforge.data.indexed import IndexedDataset

Batch = tuple[torch.Tensor, torch.Tensor]
TokenArray = torch.Tensor | np.ndarray
"""A 1-D array of token ids: a torch tensor or a numpy array (a `numpy.memmap` included)."""


def count_windows(n_tokens: int, seq_len: int) -> int:
    """Training sequences of `seq_len` tokens (windows of seq_len+1) that `n_tokens` make."""
    return n_tokens // (seq_len + 1)


def _gather_windows(tokens: TokenArray, ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[len(ids), seq_len+1] int64: row j is window ids[j], tokens[i*(seq_len+1) : (i+1)*(seq_len+1)]
    for i = ids[j]. Only those tokens are read from `tokens`."""
    width = seq_len + 1
    index = ids.long()[:, None] * width + torch.arange(width)
    if isinstance(tokens, torch.Tensor):
        return tokens[index].long()
    return torch.from_numpy(np.asarray(tokens[index.numpy()], dtype=np.int64))


def _consecutive_windows(tokens: TokenArray, start: int, stop: int, seq_len: int) -> torch.Tensor:
    """[stop-start, seq_len+1] int64: windows start..stop-1, read as one slice of the stream."""
    part = tokens[start * (seq_len + 1) : stop * (seq_len + 1)]
    rows = part.long() if isinstance(part, torch.Tensor) else torch.from_numpy(np.array(part, dtype=np.int64))
    return rows.reshape(stop - start, seq_len + 1)


def _window_document_ids(index: IndexedDataset, ids: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[len(ids), seq_len] int64: the document id of each input token of the windows `ids` of
    `index.tokens`, counted from 0 at each window's first token (which begins a document for the
    model, whether or not it begins one in the corpus) up by one at each document start."""
    width = seq_len + 1
    marks = np.zeros((len(ids), width), dtype=np.int64)
    for row, window in enumerate(ids.tolist()):
        lo = window * width
        marks[row, index.document_starts(lo + 1, lo + width) - lo] = 1
    return torch.from_numpy(marks.cumsum(axis=1)[:, :-1])


def _refuse_plain_tokens(document_mask: bool, index: IndexedDataset | None) -> None:
    if document_mask and index is None:
        raise ConfigError(
            "data.document-mask: needs a prepared dataset's document index; these tokens came without one"
        )


def _as_batch(windows: torch.Tensor) -> Batch:
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 64-bit generator seed for (seed, epoch), stable across processes and Python versions."""
    digest = hashlib.sha256(f"moeforge-data/{seed}/{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


class GlobalBatches(abc.ABC):
    """What the loaders share: this rank's contiguous slice of each global batch, read from the
    subclass's `window_ids(position, count)` and `batch(ids)` at the world's position
    `sequences_consumed`, its only training state."""

    sequences_consumed: int
    document_mask: bool
    global_batch_size: int
    local_batch_size: int
    rank: int

    def next_batch(self) -> Batch:
        """This rank's (inputs, targets) of the next global batch, each [local_batch_size, seq_len]."""
        return self.batch(self.next_batch_ids())

    def next_training_batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """`next_batch` and the document ids of its inputs [local_batch_size, seq_len] when the loader
        keeps documents apart (`document_mask`), else None."""
        ids = self.next_batch_ids()
        inputs, targets = self.batch(ids)
        return inputs, targets, self.document_ids(ids) if self.document_mask else None

    def next_batch_ids(self) -> torch.Tensor:
        """The ids of this rank's part of the next global batch; consumes the batch.

        The ranks' parts, concatenated in rank order, are the global batch, the same whatever the
        world size."""
        start = self.sequences_consumed + self.rank * self.local_batch_size
        ids = self.window_ids(start, self.local_batch_size)
        self.sequences_consumed += self.global_batch_size
        return ids

    @abc.abstractmethod
    def window_ids(self, position: int, count: int) -> torch.Tensor:
        """The ids of the windows at global positions [position, position+count): each loader's order."""

    @abc.abstractmethod
    def batch(self, ids: torch.Tensor) -> Batch:
        """(inputs, targets) of the windows `ids`: each loader's windows."""

    @abc.abstractmethod
    def document_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """[len(ids), seq_len] int64 document ids of the inputs of the windows `ids` (equal ids: one
        document); needs the loader's data to have a document index."""


def refuse_changed_setup(state: dict[str, Any], checked: Iterable[tuple[str, str, Any]], needs: str) -> None:
    """A one-line `ConfigError` naming the flag when a saved loader's (key, flag, this run's value)
    differs from this run's; `needs` says what a resume must keep."""
    for key, where, mine in checked:
        if state.get(key) != mine:
            raise ConfigError(
                f"{where}: the checkpoint's data order was built with {key}={state.get(key)}, this run has "
                f"{mine}; resuming needs the same {needs}"
            )


class PackedLoader(GlobalBatches):
    """Global batches of `global_batch_size` sequences, each rank getting its contiguous slice.

    Epoch e visits every window once, in the order `randperm` gives with a generator seeded by
    (seed, e). Batches are consecutive runs of `global_batch_size` entries of the concatenated
    epoch orders, so a batch may span two epochs. The only state is how many sequences the whole
    world has consumed, so a run resumes on any world size that divides the global batch, with
    exactly the global batches it would have seen.

    `rank` and `world_size` are the data-parallel index and count (`data_parallel_rank`: pipeline
    stages of one slice share a rank, DiLoCo replicas each have their own). `tokens` is kept as
    given (module docstring): nothing proportional to the corpus is read or held but the epoch
    order, n_windows entries (int32 below 2**31 windows), drawn in O(n_windows) time at the first
    batch of each epoch. For a 1 TB uint16 token file (5.5e11 tokens) at seq_len 4096 that is 1.3e8
    windows: 0.5 GB on every rank.

    `tokens` may be a prepared `IndexedDataset`, whose documents `document_ids` then reads; with
    `document_mask` `next_training_batch` gives them (plain tokens have no documents: refused).
    """

    def __init__(
        self,
        tokens: TokenArray | IndexedDataset,
        seq_len: int,
        global_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        document_mask: bool = False,
    ) -> None:
        self.index = tokens if isinstance(tokens, IndexedDataset) else None
        """the document index of the tokens, when they came with one"""
        _refuse_plain_tokens(document_mask, self.index)
        tokens = self.index.tokens if self.index is not None else tokens
        if global_batch_size % world_size:
            raise ConfigError(
                f"train.global-batch-size: got {global_batch_size}; allowed: a multiple of the "
                f"data-parallel world size {world_size}"
            )
        if count_windows(len(tokens), seq_len) == 0:
            raise ConfigError(
                f"train.seq-len: got {seq_len}; allowed: at most {len(tokens) - 1} "
                f"(the training split has {len(tokens)} tokens)"
            )
        assert 0 <= rank < world_size, f"rank {rank} outside world size {world_size}"
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.local_batch_size = global_batch_size // world_size
        self.tokens = tokens
        self.document_mask = document_mask
        self.n_windows = count_windows(len(tokens), seq_len)
        self.sequences_consumed = 0
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    @property
    def epoch(self) -> float:
        """Fractional passes over the training windows so far."""
        return self.sequences_consumed / self.n_windows

    def batch(self, ids: torch.Tensor) -> Batch:
        """(inputs, targets) of the windows `ids` ([count] window ids), each [len(ids), seq_len] int64."""
        return _as_batch(_gather_windows(self.tokens, ids, self.seq_len))

    def document_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """[len(ids), seq_len] int64 document ids of the inputs of the windows `ids` [count]."""
        _refuse_plain_tokens(True, self.index)
        return _window_document_ids(self.index, ids, self.seq_len)

    def window_ids(self, position: int, count: int) -> torch.Tensor:
        """Window ids (int64) at global positions [position, position+count) of the concatenated epoch
        orders: a pure function of (seed, n_windows, position)."""
        parts = []
        while count:
            epoch, offset = divmod(position, self.n_windows)
            take = min(count, self.n_windows - offset)
            parts.append(self._epoch_order(epoch)[offset : offset + take])
            position += take
            count -= take
        return torch.cat(parts).long()

    def _epoch_order(self, epoch: int) -> torch.Tensor:
        if epoch != self._order_epoch:
            generator = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            # int32 halves the order's memory; randperm draws the same permutation for every dtype
            dtype = torch.int32 if self.n_windows < 2**31 else torch.int64
            self._order = torch.randperm(self.n_windows, generator=generator, dtype=dtype)
            self._order_epoch = epoch
        return self._order

    def state_dict(self) -> dict[str, Any]:
        """World-size-free state; seed, seq_len, n_windows and the tokens' fingerprint are kept to
        catch a changed setup."""
        return {
            "sequences_consumed": self.sequences_consumed,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "n_windows": self.n_windows,
            "fingerprint": self.fingerprint,
        }

    @functools.cached_property
    def fingerprint(self) -> str:
        """`token_fingerprint` of the training tokens (computed once, when first asked for)."""
        return token_fingerprint(self.tokens)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        keys = (("seed", "train.seed"), ("seq_len", "train.seq-len"), ("n_windows", "data.path"))
        # checkpoints written before the fingerprint was recorded are checked on the rest
        keys += (("fingerprint", "data.path"),) if "fingerprint" in state else ()
        checked = [(key, where, getattr(self, key)) for key, where in keys]
        refuse_changed_setup(state, checked, "data, tokenizer, val-fraction, seq-len and seed")
        self.sequences_consumed = int(state["sequences_consumed"])


FINGERPRINT_BLOCKS = 64
FINGERPRINT_BLOCK_TOKENS = 2048


def token_fingerprint(tokens: TokenArray) -> str:
    """A short hash of a token stream that costs the same for 1 MB and 1 TB: its length and
    FINGERPRINT_BLOCKS blocks of FINGERPRINT_BLOCK_TOKENS tokens spread evenly over it, as int64 (so
    the same tokens give the same hash as a uint16 memory map or an int64 tensor). Another corpus,
    tokenizer or split changes it; an edit between the sampled blocks would not (it is no checksum)."""
    n = len(tokens)
    digest = hashlib.sha256(str(n).encode())
    for block in range(FINGERPRINT_BLOCKS):
        start = n * block // FINGERPRINT_BLOCKS
        part = tokens[start : min(n, start + FINGERPRINT_BLOCK_TOKENS)]
        values = part.numpy() if isinstance(part, torch.Tensor) else np.asarray(part)
        digest.update(values.astype(np.int64).tobytes())
    return digest.hexdigest()[:16]


def validation_batches(
    val_tokens: TokenArray, batch_size: int, seq_len: int, n_batches: int
) -> Iterator[Batch]:
    """Up to `n_batches` batches of consecutive windows from the start of the validation split.

    Always the same batches, in the same order, on every rank. With fewer windows than
    batch_size*n_batches there are fewer batches and the last may be smaller than `batch_size`.
    """
    n_windows = count_windows(len(val_tokens), seq_len)
    if n_windows == 0:
        raise ConfigError(
            f"data.val-fraction: leaves {len(val_tokens)} validation tokens; allowed: a fraction leaving "
            f"at least train.seq-len+1={seq_len + 1}"
        )
    stop = min(n_windows, batch_size * n_batches)
    return (
        _as_batch(_consecutive_windows(val_tokens, i, min(i + batch_size, stop), seq_len))
        for i in range(0, stop, batch_size)
    )


def validation_document_ids(
    val: TokenArray | IndexedDataset, batch_size: int, seq_len: int, n_batches: int
) -> Iterator[torch.Tensor]:
    """The document ids [b, seq_len] of the inputs of each batch `validation_batches(val.tokens, ...)`
    gives, in the same order (`--data.document-mask`); `val` must be a prepared dataset."""
    _refuse_plain_tokens(True, val if isinstance(val, IndexedDataset) else None)
    stop = min(count_windows(len(val.tokens), seq_len), batch_size * n_batches)
    return (
        _window_document_ids(val, torch.arange(i, min(i + batch_size, stop)), seq_len)
        for i in range(0, stop, batch_size)
    )
