"""Raw text and the embedded corpus, prepared once into a cache and then read like any prepared
directory: training has one data path, the memory-mapped one (prepared.py).

`--data.path` naming text files (or nothing: the embedded corpus) is prepared by `prepare` into

    CACHE/prepared/KEY/          a prepared directory (prepare.py), reused by every later run
    CACHE/prepared/KEY.lock      held while preparing: concurrent ranks and runs prepare it once
    CACHE/embedded/HASH.jsonl    the embedded corpus written out as a file, one record per topic

where CACHE is $MOEFORGE_CACHE_DIR, else $XDG_CACHE_HOME/moeforge, else ~/.cache/moeforge, and KEY
hashes what the tokens depend on: each input file's resolved path, size and modification time (an
edited file gets a new entry; its contents are not hashed, that would read the corpus at every
start), the tokenizer's identity, the text field and the held-out fraction. The last
`data.val-fraction` of the token stream is held out, as the trainer always did for raw text: a
contiguous tail, the document where it starts cut in two. Old entries are never removed: the cache
directory can be deleted at any time.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from moeforge.config import ConfigError, DataConfig
from moeforge.data.corpus import embedded_corpus
from moeforge.data.prepare import FORMAT, PrepareOptions, prepare, tokenizer_identity
from moeforge.data.prepared import is_prepared
from moeforge.data.sources import DataSourceError, list_sources
from moeforge.durable import fsync_directory, write_synced
from moeforge.errors import print_line

CACHE_ENV = "MOEFORGE_CACHE_DIR"
TRAINER_FLAGS = {"input": "data.path", "text-field": "data.text-field"}
"""the trainer's names for the flags that `sources` errors name"""


def cache_root() -> Path:
    """$MOEFORGE_CACHE_DIR, else $XDG_CACHE_HOME/moeforge, else ~/.cache/moeforge."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moeforge"


def prepared_cache(cfg: DataConfig, progress: bool = True) -> Path:
    """The prepared directory of `cfg.path`'s text files (the embedded corpus when it is ''), made
    now when the cache lacks it. Errors in the inputs name the trainer's flags (data.path, ...)."""
    try:
        inputs = [str(_embedded_corpus_file())] if not cfg.path else [cfg.path]
        text_field = cfg.text_field if cfg.path else "text"
        out = cache_root() / "prepared" / _key(inputs, cfg.tokenizer, text_field, cfg.val_fraction)
        if is_prepared(out):
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        with _locked(out.with_name(out.name + ".lock")):
            if not is_prepared(out):  # another process may have prepared it while this one waited
                if progress:
                    print_line(f"data: preparing {cfg.path or 'the embedded corpus'} once, into {out}", sys.stdout)
                options = PrepareOptions(
                    tuple(inputs), out, cfg.tokenizer, text_field, val_tail=cfg.val_fraction
                )
                prepare(options, progress)
        return out
    except DataSourceError as err:
        raise err.renamed(TRAINER_FLAGS) from None
    except OSError as err:  # the inputs' read errors are DataSourceErrors: this is the cache's side
        raise ConfigError(
            f"data.path: cannot write the data cache {cache_root()} ({err.strerror}: {err.filename}); "
            f"set {CACHE_ENV} to a writable directory with room for the prepared tokens"
        ) from None


def _key(inputs: list[str], tokenizer: str, text_field: str, val_tail: float) -> str:
    """A hash of everything the prepared tokens depend on (module docstring)."""
    files = []
    for source in list_sources(inputs):
        stat = source.path.stat()
        files.append([str(source.path.resolve()), stat.st_size, stat.st_mtime_ns])
    identity = {
        "format": FORMAT,
        "files": files,
        "tokenizer": tokenizer_identity(tokenizer),
        "text_field": text_field,
        "val_tail": val_tail,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _embedded_corpus_file() -> Path:
    """The embedded corpus as a .jsonl file in the cache (written once per distinct text), so that it
    is prepared like any user's corpus. Empty topics are left out, as every reader leaves out empty
    documents."""
    text = "".join(json.dumps({"text": doc}) + "\n" for doc in embedded_corpus() if doc)
    digest = hashlib.sha256(text.encode()).hexdigest()[:24]
    path = cache_root() / "embedded" / f"{digest}.jsonl"
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):  # written once: its time stamp is in the key
        if not path.is_file():
            tmp = path.with_name(path.name + ".tmp")
            write_synced(tmp, text.encode())
            tmp.replace(path)
            fsync_directory(path.parent)
    return path


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block; released when the
    process dies, so a killed preparer never blocks the next one."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
