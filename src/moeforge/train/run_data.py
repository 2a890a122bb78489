"""A run's data: its tokenizer, its loader of training windows and its validation splits, from one
prepared directory (or text prepared into the cache) or a mixture of prepared directories."""

from __future__ import annotations

from dataclasses import dataclass

from moeforge.config import Config
from moeforge.config.data import is_mixture
from moeforge.data import PackedLoader, Tokenizer, TokenArray, build_indexed_datasets, build_tokenizer
from moeforge.data.blend import BlendedLoader, open_mixture
from moeforge.data.indexed import IndexedDataset


@dataclass
class RunData:
    tokenizer: Tokenizer
    loader: PackedLoader | BlendedLoader
    """this rank's part of each global batch, in the world-free order (data/loader.py)"""
    val_sets: list[tuple[str, float, TokenArray | IndexedDataset]]
    """(source path, weight, validation split) of each source; one ('', 1.0, ...) without a mixture"""


def build_run_data(cfg: Config, data_rank: int, data_ranks: int, progress: bool) -> RunData:
    """The data of `cfg` for the data-parallel rank `data_rank` of `data_ranks` (pipeline stages of
    one slice share a rank, DiLoCo replicas each have their own: `parallel.data_parallel_rank`)."""
    tcfg, dcfg = cfg.train, cfg.data
    order = (tcfg.seq_len, tcfg.global_batch_size, tcfg.seed, data_rank, data_ranks, dcfg.document_mask)
    if is_mixture(dcfg.path):
        sources = open_mixture(dcfg, tcfg.seq_len)
        loader = BlendedLoader([s.train for s in sources], [s.weight for s in sources], *order)
        return RunData(build_tokenizer(dcfg), loader, [(s.path, s.weight, s.val) for s in sources])
    tokenizer, train, val = build_indexed_datasets(dcfg, tcfg.seq_len, progress=progress)
    return RunData(tokenizer, PackedLoader(train, *order), [("", 1.0, val)])
