"""A weighted mixture of prepared datasets (`--data.path a:0.7,b:0.3`), blended deterministically.

Which source global position i draws from is chosen as Megatron-LM's blended datasets choose it
(`build_blending_indices`): greedily, the source whose weight*(i+1) - count_so_far is largest, ties
to the lower index, so every prefix of the run holds each source's share to within one sequence.
The k-th draw from source d is source d's k-th window in its own epoch order (a `PackedLoader`
order over its windows, seeded by (seed, d)). The whole order is a pure function of (seed, sources,
position): the loader's state stays the number of sequences consumed, and a run resumes on any
world size with the windows an uninterrupted run would have seen.

The greedy choice is sequential. No closed form for a source's count at position n was found, so
the loader carries the counts at its position (D integers) in its state: a resume sets them in
O(D); they are checked against the position (they sum to it, each within one of weight*n). Asked
for an earlier position than its own (not something training does), the loader replays from 0.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moeforge.config import ConfigError, DataConfig
from moeforge.config.data import mixture_sources
from moeforge.data.loader import (
    Batch,
    GlobalBatches,
    PackedLoader,
    TokenArray,
    _as_batch,
    _gather_windows,
    count_windows,
    refuse_changed_setup,
)
from moeforge.data.indexed import IndexedDataset
from moeforge.data.prepare import MANIFEST_FILE
from moeforge.data.prepared import is_prepared, open_prepared_datasets, read_manifest


@dataclass(frozen=True)
class BlendSource:
    """One source of a mixture: its directory, normalised weight and memory-mapped splits."""

    path: str
    weight: float
    train: IndexedDataset
    val: IndexedDataset


def open_mixture(cfg: DataConfig, seq_len: int) -> list[BlendSource]:
    """The sources of the mixture `cfg.path`, each a prepared directory of the same tokenizer whose
    train and val splits hold at least one window of `seq_len` each."""
    sources = mixture_sources(cfg.path)
    for name, _ in sources:
        if not is_prepared(name):
            raise ConfigError(
                f"data.path: {name!r} is not a prepared directory (no {MANIFEST_FILE}); a mixture reads "
                "only directories made by `moeforge data prepare`"
            )
    identities = {name: read_manifest(Path(name))["tokenizer"] for name, _ in sources}
    first = sources[0][0]
    for name, identity in identities.items():
        if identity != identities[first]:
            raise ConfigError(
                f"data.path: {name!r} was prepared with tokenizer {identity}, {first!r} with "
                f"{identities[first]}; a mixture needs one tokenizer"
            )
    opened = []
    for name, weight in sources:
        train, val = open_prepared_datasets(Path(name), cfg.tokenizer)
        for split, tokens, hint in (("training", train.tokens, ""), ("validation", val.tokens, " (prepare it with --val-fraction or --val)")):
            if count_windows(len(tokens), seq_len) == 0:
                raise ConfigError(
                    f"data.path: {name!r} holds {len(tokens)} {split} tokens; allowed: at least "
                    f"train.seq-len+1={seq_len + 1}{hint}"
                )
        opened.append(BlendSource(name, weight, train, val))
    return opened


def blend_sources(weights: np.ndarray, counts: np.ndarray, n: int) -> np.ndarray:
    """[n] int64: the source of each of the next n positions after the position sum(counts), where
    counts[d] positions went to source d so far (Megatron's greedy, module docstring). `counts` is
    advanced in place."""
    position = int(counts.sum())
    chosen = np.empty(n, dtype=np.int64)
    for j in range(n):
        # argmax returns the first maximum: ties go to the lower index
        source = int(np.argmax(weights * (position + j + 1) - counts))
        chosen[j] = source
        counts[source] += 1
    return chosen


def _source_seed(seed: int, source: int) -> int:
    """A 63-bit seed for source `source`'s window order in a run seeded by `seed`."""
    digest = hashlib.sha256(f"moeforge-blend/{seed}/{source}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class BlendedLoader(GlobalBatches):
    """Global batches drawn from several token streams in fixed proportions (module docstring),
    each rank getting its contiguous slice; the interface of `PackedLoader`, with window ids as
    [count, 2] rows of (source, window of that source). `document_mask` needs every source to be an
    `IndexedDataset` (as `PackedLoader`'s)."""

    def __init__(
        self,
        sources: Sequence[TokenArray | IndexedDataset],
        weights: Sequence[float],
        seq_len: int,
        global_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        document_mask: bool = False,
    ) -> None:
        assert len(sources) == len(weights) >= 1 and min(weights) > 0, "one positive weight per source"
        self.orders = [
            PackedLoader(tokens, seq_len, global_batch_size, _source_seed(seed, d), rank, world_size, document_mask)
            for d, tokens in enumerate(sources)
        ]
        self.document_mask = document_mask
        self.weights = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))
        self.seq_len, self.global_batch_size, self.seed = seq_len, global_batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = global_batch_size // world_size
        self.sequences_consumed = 0
        self._cursor = 0
        """the position `_counts` belong to"""
        self._counts = np.zeros(len(sources), dtype=np.int64)

    def batch(self, ids: torch.Tensor) -> Batch:
        """(inputs, targets) of the (source, window) rows `ids`, each [len(ids), seq_len] int64."""
        windows = torch.empty(len(ids), self.seq_len + 1, dtype=torch.long)
        for d, order in enumerate(self.orders):
            rows = ids[:, 0] == d
            if rows.any():
                windows[rows] = _gather_windows(order.tokens, ids[rows, 1], self.seq_len)
        return _as_batch(windows)

    def document_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """[len(ids), seq_len] int64 document ids of the inputs of the (source, window) rows `ids`."""
        documents = torch.empty(len(ids), self.seq_len, dtype=torch.long)
        for d, order in enumerate(self.orders):
            rows = ids[:, 0] == d
            if rows.any():
                documents[rows] = order.document_ids(ids[rows, 1])
        return documents

    def window_ids(self, position: int, count: int) -> torch.Tensor:
        """[count, 2] int64 (source, window) at global positions [position, position+count): a pure
        function of (seed, sources, weights, position)."""
        counts = self.counts_at(position).copy()
        starts = counts.copy()
        chosen = blend_sources(self.weights, counts, count)
        ids = torch.empty(count, 2, dtype=torch.long)
        ids[:, 0] = torch.from_numpy(chosen)
        for d, order in enumerate(self.orders):
            rows = torch.from_numpy(chosen == d)
            if rows.any():
                ids[rows, 1] = order.window_ids(int(starts[d]), int(rows.sum()))
        return ids

    def counts_at(self, position: int) -> np.ndarray:
        """[n_sources] int64: how many of the positions before `position` each source fills. Costs the
        distance from the last position asked for (forward), or a replay from 0 (backward)."""
        if position < self._cursor:
            self._cursor, self._counts = 0, np.zeros_like(self._counts)
        blend_sources(self.weights, self._counts, position - self._cursor)
        self._cursor = position
        return self._counts

    def tokens_per_source(self) -> list[int]:
        """Training tokens (seq_len per sequence) each source has given the whole world so far."""
        return [int(c) * self.seq_len for c in self.counts_at(self.sequences_consumed)]

    def state_dict(self) -> dict[str, Any]:
        """World-size-free state: the position, and the per-source counts there (a function of the
        position, kept so that a resume need not replay); the rest is kept to catch a changed setup."""
        return {
            "sequences_consumed": self.sequences_consumed,
            "source_counts": self.counts_at(self.sequences_consumed).tolist(),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "sources": self._identity(),
        }

    def _identity(self) -> list[dict[str, Any]]:
        return [
            {"weight": float(w), "n_windows": o.n_windows, "fingerprint": o.fingerprint}
            for w, o in zip(self.weights, self.orders)
        ]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        checked = (
            ("seed", "train.seed", self.seed),
            ("seq_len", "train.seq-len", self.seq_len),
            ("sources", "data.path", self._identity()),
        )
        refuse_changed_setup(state, checked, "sources, weights, tokenizer, seq-len and seed")
        position = int(state["sequences_consumed"])
        counts = np.asarray(state["source_counts"], dtype=np.int64)
        assert counts.sum() == position and np.all(np.abs(counts - self.weights * position) <= 1), (
            f"source counts {counts.tolist()} do not belong to position {position}"
        )
        self.sequences_consumed, self._cursor, self._counts = position, position, counts
