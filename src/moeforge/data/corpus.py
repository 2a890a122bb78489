"""Documents to train on: the embedded corpus, or the user's .txt / .jsonl files.

The embedded corpus is the text of Python's own reference manual as shipped in
`pydoc_data.topics` (~465 KB of English and grammar, PSF licence). Every CPython carries it, so
`moeforge train` works with no download. Its text belongs to the interpreter: another Python
version gives a (slightly) different corpus, the same interpreter always the same one.
"""

from __future__ import annotations

import json
from pathlib import Path
from pydoc_data.topics import topics

from moeforge.config import ConfigError, DataConfig

SUFFIXES = (".txt", ".jsonl")


def embedded_corpus() -> list[str]:
    """One document per reference-manual topic, in sorted topic order."""
    return [topics[key] for key in sorted(topics)]


def load_documents(cfg: DataConfig) -> list[str]:
    """The documents `cfg` names: its `path` if set, else the embedded corpus."""
    if not cfg.path:
        return embedded_corpus()
    return read_documents(cfg.path, cfg.text_field)


def read_documents(path: str | Path, text_field: str = "text") -> list[str]:
    """Non-empty documents of a .txt file (one document), a .jsonl file (one per record) or a
    directory (every .txt/.jsonl file under it, in sorted path order)."""
    root = Path(path)
    if not root.exists():
        raise ConfigError(f"data.path: got {str(root)!r}; allowed: an existing file or directory")
    files = _data_files(root)
    docs = [doc for file in files for doc in _read_file(file, text_field) if doc]
    if not docs:
        raise ConfigError(f"data.path: {str(root)!r} holds no text")
    return docs


def _data_files(root: Path) -> list[Path]:
    if root.is_file():
        if root.suffix.lower() not in SUFFIXES:
            raise ConfigError(
                f"data.path: got {str(root)!r}; allowed: a .txt or .jsonl file, or a directory of them"
            )
        return [root]
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
    if not files:
        raise ConfigError(f"data.path: no .txt or .jsonl files under {str(root)!r}")
    return files


def _read_file(file: Path, text_field: str) -> list[str]:
    text = _read_utf8(file)
    if file.suffix.lower() == ".txt":
        return [text]
    records = [
        _jsonl_text(line, text_field, file, n) for n, line in enumerate(text.splitlines(), 1) if line.strip()
    ]
    if not records:
        raise ConfigError(f"data.path: {str(file)!r} has no records (an empty .jsonl file)")
    return records


def _read_utf8(file: Path) -> str:
    data = file.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise ConfigError(
            f"data.path: {str(file)!r} line {line} is not UTF-8 text (byte {err.start} of the file)"
        ) from None


def _jsonl_text(line: str, text_field: str, file: Path, line_no: int) -> str:
    where = f"{str(file)!r} line {line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"data.path: {where} is not valid JSON: {err.msg}") from None
    if not isinstance(record, dict) or text_field not in record:
        raise ConfigError(f"data.text-field: {where} has no field {text_field!r}")
    value = record[text_field]
    if not isinstance(value, str):
        raise ConfigError(
            f"data.text-field: {where} has a {type(value).__name__} in {text_field!r}, not a string"
        )
    return value
