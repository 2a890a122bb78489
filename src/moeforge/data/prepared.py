"""A directory made by `moeforge data prepare` (prepare.py), opened for training: memory maps of its
train and val token files, after checks that cost no time proportional to the corpus.

Checked when opened, each a one-line error naming the file: the manifest is one this version writes;
the run's tokenizer is the one the data was prepared with (the byte tokenizer, or a tokenizer.json
with the same SHA-256); every file has the size the manifest recorded; the indexed datasets' headers
and indices are consistent (indexed.py). The files' SHA-256 sums are in the manifest for a full check
by hand (`sha256sum`); reading every byte at each start is what preparing the data avoids.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from moeforge.config import ConfigError
from moeforge.data.indexed import IndexedDataset
from moeforge.data.prepare import FORMAT, MANIFEST_FILE, SPLITS, tokenizer_identity
from moeforge.safe_paths import FileMissing, PathRefused, file_inside, read_inside

MAX_MANIFEST_BYTES = 64 << 20


def is_prepared(path: str | Path) -> bool:
    """Whether `path` is a prepared directory (it holds a manifest)."""
    return bool(path) and (Path(path) / MANIFEST_FILE).is_file()


def open_prepared_datasets(root: Path, tokenizer: str) -> tuple[IndexedDataset, IndexedDataset]:
    """(train, val) of the prepared directory `root` as memory-mapped indexed datasets (their tokens
    and where their documents start), after the checks of the module docstring against `tokenizer`
    ('byte' or a tokenizer.json)."""
    checked_manifest(root, tokenizer)
    train, val = (IndexedDataset(root / split) for split in SPLITS)
    return train, val


def checked_manifest(root: Path, tokenizer: str) -> dict[str, Any]:
    """The manifest of the prepared directory `root`, after the checks of the module docstring
    against `tokenizer` ('byte' or a tokenizer.json): what training and `moeforge eval` both open."""
    manifest = read_manifest(root)
    wanted = tokenizer_identity(tokenizer)
    if manifest["tokenizer"] != wanted:
        raise ConfigError(
            f"data.tokenizer: got {tokenizer!r} ({_describe(wanted)}), but {root / MANIFEST_FILE} was prepared "
            f"with the tokenizer {_describe(manifest['tokenizer'])}; allowed: that tokenizer, or the data "
            f"prepared again with --tokenizer {tokenizer}"
        )
    _check_file_sizes(root, manifest)
    return manifest


def _describe(identity: dict[str, str]) -> str:
    """'byte', or 'tokenizer.json sha256 0123456789ab...' for a manifest's tokenizer identity."""
    if identity.get("kind") == "byte":
        return "'byte'"
    return f"{identity.get('kind')} sha256 {str(identity.get('sha256'))[:12]}..."


def _check_file_sizes(root: Path, manifest: dict[str, Any]) -> None:
    """Every file the manifest lists is inside `root` with the size it recorded (a cheap check for a
    changed or truncated file; the SHA-256 sums are for a full check by hand)."""
    where = root / MANIFEST_FILE
    for name, entry in manifest["files"].items():
        try:
            size = file_inside(root, name, where).stat().st_size
        except (FileMissing, PathRefused) as err:
            raise ConfigError(str(err)) from None
        if size != entry["bytes"]:
            raise ConfigError(f"{root / name}: {size} bytes, the manifest recorded {entry['bytes']} (changed or truncated)")


def read_manifest(root: Path) -> dict[str, Any]:
    """The manifest of a prepared directory, checked to be one this version writes."""
    where = root / MANIFEST_FILE
    try:
        manifest = json.loads(read_inside(root, MANIFEST_FILE, root, MAX_MANIFEST_BYTES))
    except PathRefused as err:
        raise ConfigError(str(err)) from None
    except ValueError as err:
        raise ConfigError(f"{where}: not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ConfigError(f"{where}: format {found!r}; allowed: {FORMAT!r}")
    return manifest
