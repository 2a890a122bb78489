"""Documents to train on: the embedded corpus, or the user's files (read by `sources`).

The embedded corpus is the text of Python's own reference manual as shipped in
`pydoc_data.topics` (~465 KB of English and grammar, PSF licence). Every CPython carries it, so
`moeforge train` works with no download. Its text belongs to the interpreter: another Python
version gives a (slightly) different corpus, the same interpreter always the same one.
"""

from __future__ import annotations

from pathlib import Path
from pydoc_data.topics import topics

from moeforge.config import DataConfig
from moeforge.data.sources import DataSourceError, iter_documents, list_sources

TRAINER_FLAGS = {"input": "data.path", "text-field": "data.text-field"}
"""the trainer's names for the flags that `sources` errors name"""


def embedded_corpus() -> list[str]:
    """One document per reference-manual topic, in sorted topic order."""
    return [topics[key] for key in sorted(topics)]


def load_documents(cfg: DataConfig) -> list[str]:
    """The documents `cfg` names: its `path` if set, else the embedded corpus."""
    if not cfg.path:
        return embedded_corpus()
    return read_documents(cfg.path, cfg.text_field)


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """The non-empty documents of a file or a directory of files (any format `sources` reads), in
    memory: the trainer's path for small corpora. Errors name the trainer's flags (`data.path`)."""
    try:
        return [doc for source in list_sources([path]) for doc in iter_documents(source, text_field)]
    except DataSourceError as err:
        raise err.renamed(TRAINER_FLAGS) from None
