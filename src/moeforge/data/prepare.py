"""`moeforge data prepare`: text files in, memory-mappable token datasets out.

    DIR/train.bin, DIR/train.idx    Megatron-LM indexed dataset (indexed.py) of the training documents
    DIR/val.bin,   DIR/val.idx      the held-out documents, same format
    DIR/manifest.json               tokenizer hash and vocabulary, counts, sources, every file's SHA-256
    DIR/parts/                      one finished dataset per chunk of input while preparing (removed at the end)

The inputs are read in chunks of whole documents (sources.py) in a fixed order; worker processes
tokenize the chunks, each into a dataset of its own under parts/, named by the chunk's position. A
part is written under a temporary name and renamed when complete, so an interrupted prepare reruns
with the same command and skips every part that exists. The parts are then concatenated in chunk
order: the output depends on the inputs and the tokenizer only, never on the number of workers or
on interruptions (byte-identical files).

Each document is stored as its tokens followed by the document separator (the tokenizer's
end-of-document token, or a newline for the byte tokenizer), as Megatron's `--append-eod` does, so the
concatenated token file is the packed stream the loader cuts into windows. Held-out documents are
chosen by their text: a document goes to validation when the first 8 bytes of its SHA-256, read as a
fraction of 2^64, fall below `val_fraction` — independent of order and chunking, and an exact
duplicate never lands on both sides. Memory is bounded by `chunk_bytes` times the workers in flight.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import multiprocessing
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from moeforge.config import ConfigError, DataConfig
from moeforge.data.indexed import IndexedDataset, IndexedDatasetWriter, merge_indexed_datasets
from moeforge.data.sources import Chunk, iter_chunks, list_sources
from moeforge.data.tokenizer import Tokenizer, build_tokenizer, document_separator
from moeforge.durable import fsync_directory, write_synced

SPLITS = ("train", "val")
MANIFEST_FILE = "manifest.json"
PARTS_DIR = "parts"
FORMAT = "moeforge-prepared/1"


@dataclass(frozen=True)
class PrepareOptions:
    """What `moeforge data prepare` was asked for."""

    inputs: tuple[str, ...]
    out: Path
    tokenizer: str = "byte"
    """'byte' or the path of a Hugging Face tokenizer.json"""
    text_field: str = "text"
    val_fraction: float = 0.0
    """the share of documents held out (0: none, unless `val_inputs` are given)"""
    val_inputs: tuple[str, ...] = ()
    """files held out whole, instead of a fraction of `inputs`"""
    workers: int = 1
    chunk_bytes: int = 16 << 20
    val_tail: float = 0.0
    """instead: the last fraction of the token stream held out, the document where the cut falls split
    in two (the trainer's rule for raw text and the embedded corpus, cache.py)"""

    def validate(self) -> None:
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction: got {self.val_fraction}; allowed: a number in [0, 1)")
        if not 0 <= self.val_tail < 1:
            raise ConfigError(f"data.val-fraction: got {self.val_tail}; allowed: a number in [0, 1)")
        if sum(map(bool, (self.val_fraction, self.val_inputs, self.val_tail))) > 1:
            raise ConfigError("--val-fraction: set together with --val; allowed: one way to hold out documents")
        if self.workers < 1:
            raise ConfigError(f"--workers: got {self.workers}; allowed: an integer >= 1")
        if self.chunk_bytes < 1 << 10:
            raise ConfigError(f"--chunk-mb: got {self.chunk_bytes / 2**20:g}; allowed: at least 1 KiB")


def prepare(options: PrepareOptions, progress: bool = True) -> dict[str, Any]:
    """Prepare `options.inputs` into `options.out` (module docstring); returns the manifest."""
    options.validate()
    tokenizer = build_tokenizer(DataConfig(tokenizer=options.tokenizer))
    parts = options.out / PARTS_DIR
    parts.mkdir(parents=True, exist_ok=True)
    seen: list[_Job] = []  # every chunk's job as it streams past, its documents dropped
    total = sum(source.size for inputs, _ in _inputs(options) for source in list_sources(list(inputs)))
    with tqdm(total=total, unit="B", unit_scale=True, disable=not progress, desc="tokenizing") as bar:
        for nbytes, docs, tokens in _run(_unfinished(_jobs(options), parts, seen, bar), options, parts):
            bar.update(nbytes)
            bar.set_postfix(docs=docs, tokens=tokens)
    for split in SPLITS:
        shards = [parts / f"{job.name}.{split}" for job in seen]
        merge_indexed_datasets(shards, options.out / split, tokenizer.vocab_size)
    if options.val_tail:
        _hold_out_tail(options.out, options.val_tail, tokenizer.vocab_size)
    manifest = _manifest(options, tokenizer, seen)
    _write_atomically(options.out / MANIFEST_FILE, json.dumps(manifest, indent=1).encode())
    shutil.rmtree(parts)
    return manifest


def _unfinished(jobs: Iterator[_Job], parts: Path, seen: list[_Job], bar: tqdm) -> Iterator[_Job]:
    """The jobs whose parts a previous attempt did not finish; every job is recorded in `seen`
    without its documents (only its name and file are kept), the finished ones counted on `bar`."""
    for job in jobs:
        seen.append(dataclasses.replace(job, chunk=dataclasses.replace(job.chunk, documents=[])))
        if _part_done(parts, job.name):
            bar.update(job.chunk.nbytes)
        else:
            yield job


@dataclass(frozen=True)
class _Job:
    """One chunk of documents to tokenize, and which split its documents go to."""

    chunk: Chunk
    held_out: bool
    """every document to validation (a --val input); else by `val_fraction`"""
    path: Path
    """the file the chunk was read from"""

    @property
    def name(self) -> str:
        return f"{'val' if self.held_out else 'in'}-{self.chunk.source:05d}-{self.chunk.ordinal:07d}"


def _inputs(options: PrepareOptions) -> list[tuple[tuple[str, ...], bool]]:
    """(inputs, held out whole) of each kind of input given."""
    return [(inputs, held) for inputs, held in ((options.inputs, False), (options.val_inputs, True)) if inputs]


def _jobs(options: PrepareOptions) -> Iterator[_Job]:
    """The chunks of every input in order, read as they are asked for."""
    for inputs, held_out in _inputs(options):
        sources = list_sources(list(inputs))
        for chunk in iter_chunks(sources, options.text_field, options.chunk_bytes):
            yield _Job(chunk, held_out, sources[chunk.source].path)


def _run(jobs: Iterator[_Job], options: PrepareOptions, parts: Path) -> Iterator[tuple[int, int, int]]:
    """Tokenize `jobs` on `options.workers` processes, in order, with at most two chunks a worker read
    ahead (a pool's `imap` would read every chunk of the corpus into its queue); yields (bytes,
    documents, tokens) of each."""
    args = ((job, options.tokenizer, options.val_fraction, parts) for job in jobs)
    if options.workers == 1:
        yield from map(_tokenize_job, args)
        return
    with multiprocessing.get_context("spawn").Pool(options.workers) as pool:
        in_flight: collections.deque = collections.deque()
        for arg in args:
            in_flight.append(pool.apply_async(_tokenize_job, (arg,)))
            if len(in_flight) >= 2 * options.workers:
                yield in_flight.popleft().get()
        while in_flight:
            yield in_flight.popleft().get()


_TOKENIZERS: dict[str, Tokenizer] = {}
"""a worker process's tokenizer, built once per process"""


def _tokenize_job(args: tuple[_Job, str, float, Path]) -> tuple[int, int, int]:
    """Write the job's train and val parts; (input bytes, documents, tokens)."""
    job, tokenizer_name, val_fraction, parts = args
    if tokenizer_name not in _TOKENIZERS:
        _TOKENIZERS[tokenizer_name] = build_tokenizer(DataConfig(tokenizer=tokenizer_name))
    tokenizer = _TOKENIZERS[tokenizer_name]
    separator = document_separator(tokenizer)
    held_out = [job.held_out or _is_held_out(doc, val_fraction) for doc in job.chunk.documents]
    encoded = tokenizer.encode_batch(job.chunk.documents)
    tokens = 0
    for split, wanted in zip(SPLITS, (False, True), strict=True):
        prefix = parts / f"{job.name}.{split}"
        with IndexedDatasetWriter(prefix, tokenizer.vocab_size) as writer:
            for ids, out in zip(encoded, held_out, strict=True):
                if out == wanted:
                    writer.add_document(np.asarray(ids + separator))
                    tokens += len(ids) + len(separator)
    return job.chunk.nbytes, len(encoded), tokens


def _is_held_out(document: str, val_fraction: float) -> bool:
    """Whether a document goes to validation: by its text's SHA-256 (module docstring)."""
    if not val_fraction:
        return False
    digest = hashlib.sha256(document.encode("utf-8", errors="surrogatepass")).digest()
    return int.from_bytes(digest[:8], "little") < val_fraction * 2**64


def _hold_out_tail(out: Path, fraction: float, vocab_size: int) -> None:
    """Move the last `fraction` of the training tokens (every document went to training) to the
    validation split, cutting the document where the cut falls in two. Rerun from the start by an
    interrupted prepare: the merge before it writes the training split afresh."""
    whole = out / "whole"
    for suffix in (".bin", ".idx"):
        (out / f"train{suffix}").replace(f"{whole}{suffix}")
    stream = IndexedDataset(whole)
    cut = stream.total_tokens - int(stream.total_tokens * fraction)
    with IndexedDatasetWriter(out / "train", vocab_size) as train, IndexedDatasetWriter(out / "val", vocab_size) as val:
        for i in range(len(stream)):
            start, end = stream.document_span(i)
            if start < cut:
                train.add_document(stream.tokens[start : min(end, cut)])
            if end > cut:
                val.add_document(stream.tokens[max(start, cut) : end])
    del stream
    for suffix in (".bin", ".idx"):
        Path(f"{whole}{suffix}").unlink()


def _part_done(parts: Path, name: str) -> bool:
    """Both splits of a part were written to the end (the writer renames its index last)."""
    return all(Path(f"{parts / name}.{split}.idx").is_file() for split in SPLITS)


def _manifest(options: PrepareOptions, tokenizer: Tokenizer, jobs: list[_Job]) -> dict[str, Any]:
    """What was prepared, from what, and every output file's size and SHA-256 (no time stamps: the
    same inputs give the same manifest)."""
    files = {}
    splits = {}
    for split in SPLITS:
        dataset = IndexedDataset(options.out / split)
        splits[split] = {"documents": dataset.n_documents, "tokens": int(dataset.total_tokens)}
        for suffix in (".bin", ".idx"):
            path = options.out / f"{split}{suffix}"
            files[path.name] = {"bytes": path.stat().st_size, "sha256": _file_sha256(path)}
    sources = sorted({(str(job.path), job.held_out) for job in jobs})
    return {
        "format": FORMAT,
        "tokenizer": tokenizer_identity(options.tokenizer),
        "vocab_size": tokenizer.vocab_size,
        "eos_id": tokenizer.eos_id,
        "separator": document_separator(tokenizer),
        "text_field": options.text_field,
        "val_fraction": options.val_fraction,
        "val_tail": options.val_tail,
        "splits": splits,
        "sources": [{"path": path, "held_out": held_out} for path, held_out in sources],
        "files": files,
    }


def tokenizer_identity(name: str) -> dict[str, str]:
    """'byte', or the tokenizer.json's SHA-256: what a training run checks it tokenizes alike."""
    if name == "byte":
        return {"kind": "byte"}
    return {"kind": "tokenizer.json", "sha256": _file_sha256(Path(name))}


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write_synced(tmp, data)
    tmp.rename(path)
    fsync_directory(path.parent)
