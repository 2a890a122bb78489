"""The `[data]` section: where a run's tokens come from, and mixtures of prepared datasets."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from moeforge.config.checks import _check, _check_values


@dataclass
class DataConfig:
    """Where tokens come from."""

    path: str = ""
    """a directory made by `moeforge data prepare` (memory-mapped), or a local .txt, .jsonl(.gz/.zst)
    or .parquet file or a directory of them (prepared into a cache the first time); '' = the embedded
    corpus; a mixture of prepared directories with positive weights: 'a:0.7,b:0.3' (weights
    normalised), in a TOML file also as a table [data.path] of "directory" = weight"""
    tokenizer: str = "byte"
    """'byte' (256 symbols, no files) or the path of a Hugging Face tokenizer.json"""
    text_field: str = "text"
    """the key holding the text in .jsonl records"""
    val_fraction: float = 0.05
    """fraction of the corpus held out for validation loss"""
    document_mask: bool = False
    """attend only within each document of a packed training window (block-diagonal causal attention,
    positions restarting at each document), as if each were trained on alone; the documents are the
    prepared dataset's"""

    def validate(self) -> None:
        _check_values(self, "data")
        _check(0 < self.val_fraction < 1, "data.val-fraction", self.val_fraction, "a number in (0, 1)")
        if is_mixture(self.path):
            for name, _ in mixture_sources(self.path):
                _check(Path(name).is_dir(), "data.path", name, "a directory made by `moeforge data prepare`")
        elif self.path:
            _check(Path(self.path).exists(), "data.path", self.path, "an existing file or directory")
        if self.tokenizer != "byte":
            _check(
                Path(self.tokenizer).is_file(),
                "data.tokenizer",
                self.tokenizer,
                "'byte' or the path of an existing tokenizer.json",
            )


def is_mixture(path: str) -> bool:
    """Whether `data.path` is a mixture 'a:0.7,b:0.3' rather than one file or directory (an
    existing path is never read as a mixture, whatever its name)."""
    return bool(path) and not Path(path).exists() and ("," in path or ":" in path)


def mixture_sources(path: str) -> list[tuple[str, float]]:
    """(directory, weight) of each source of the mixture `path` ('a:0.7,b:0.3'), weights normalised
    to sum to 1; each weight must be a positive finite number."""
    sources = []
    for item in path.split(","):
        name, _, text = item.rpartition(":")
        try:
            weight = float(text)
        except ValueError:
            weight = math.nan
        allowed = "SOURCE:WEIGHT items with a positive finite weight, e.g. 'a:0.7,b:0.3'"
        _check(bool(name) and math.isfinite(weight) and weight > 0, "data.path", item, allowed)
        sources.append((name, weight))
    total = sum(weight for _, weight in sources)
    _check(math.isfinite(total), "data.path", path, "weights whose sum is a finite number")
    return [(name, weight / total) for name, weight in sources]


def mixture_text(table: dict[str, object], where: str = "data.path") -> str:
    """A mixture given as a TOML table {directory: weight} in its flag form 'a:0.7,b:0.3' (the
    weights are checked by `mixture_sources` when the config is validated)."""
    _check(bool(table), where, table, "a table of at least one directory = weight")
    items = []
    for name, weight in table.items():
        number = isinstance(weight, int | float) and not isinstance(weight, bool)
        _check(number, where, f"{name} = {weight!r}", "a number as each directory's weight")
        _check("," not in name, where, name, "a directory whose name has no ','")
        items.append(f"{name}:{weight!r}")
    return ",".join(items)
