"""The embedded corpus, which `moeforge train` trains on when no `data.path` is given.

The embedded corpus is the text of Python's own reference manual as shipped in
`pydoc_data.topics` (~465 KB of English and grammar, PSF licence). Every CPython carries it, so
`moeforge train` works with no download. Its text belongs to the interpreter: another Python
version gives a (slightly) different corpus, the same interpreter always the same one.
"""

from __future__ import annotations

from pydoc_data.topics import topics

def embedded_corpus() -> list[str]:
    """One document per reference-manual topic, in sorted topic order."""
    return [topics[key] for key in sorted(topics)]
