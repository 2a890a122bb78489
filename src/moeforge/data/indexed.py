"""Megatron-LM's indexed dataset: token ids in `PREFIX.bin`, their index in `PREFIX.idx`.

The format (megatron/core/datasets/indexed_dataset.py, version 1), all little-endian:

    PREFIX.bin  the tokens of every sequence, back to back, in the index's dtype
    PREFIX.idx  b"MMIDIDX\\x00\\x00"           9 bytes, the magic
                version                      uint64, = 1
                dtype code                   uint8 (uint8=1 int8=2 int16=3 int32=4 int64=5
                                             float64=6 float32=7 uint16=8)
                S, the sequence count        uint64
                D, the document-index count  uint64 (documents + 1)
                sequence lengths             int32 x S, in tokens
                sequence pointers            int64 x S, byte offsets into .bin (running sums)
                document indices             int64 x D: 0, then the sequence count at the end of
                                             each document (document d = sequences [i_d, i_d+1))
                sequence modes (optional)    int8 x S, written only by multimodal builders

Megatron's preprocess_data.py without `--split-sentences` writes one sequence per document, as
`IndexedDatasetWriter` does. Tokens are uint16 when the vocabulary has fewer than 65,500 entries,
else int32 (Megatron's `DType.optimal_dtype`; its threshold is 65,500, not 65,536).

The writer streams tokens to disk and keeps neither tokens nor lengths in memory; the pair appears
under its final names only when complete (`.idx` last), so an existing `.idx` means a finished pair.
The reader maps both files: opening reads the 34-byte header and checks the index against itself
and the `.bin` in chunks, never reading a token.
"""

from __future__ import annotations

import bisect
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType

import numpy as np

from moeforge.durable import fsync_directory
from moeforge.errors import MoeforgeError

MAGIC = b"MMIDIDX\x00\x00"
VERSION = 1
HEADER = struct.Struct("<9sQBQQ")
"""magic, version, dtype code, sequence count, document-index count: 34 bytes"""
DTYPE_CODES = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 6: "<f8", 7: "<f4", 8: "<u2"}
"""Megatron's `DType` enum: code -> numpy dtype"""
UINT16_VOCAB_LIMIT = 65_500
"""vocabularies smaller than this are stored as uint16 (Megatron's `DType.optimal_dtype`)"""
CHUNK = 1 << 20
"""entries per chunk when copying or checking arrays: memory is bounded by this, never by the corpus"""


class DataFormatError(MoeforgeError, ValueError):
    """A prepared data file that cannot be used: one line naming the file and what is wrong."""


def bin_path(prefix: str | Path) -> Path:
    """PREFIX.bin (the suffix is appended: a prefix may itself contain dots)."""
    return Path(f"{prefix}.bin")


def idx_path(prefix: str | Path) -> Path:
    """PREFIX.idx."""
    return Path(f"{prefix}.idx")


def token_dtype(vocab_size: int) -> np.dtype:
    """The dtype Megatron stores a vocabulary of `vocab_size` ids in: uint16 below 65,500, else int32."""
    return np.dtype("<u2") if vocab_size < UINT16_VOCAB_LIMIT else np.dtype("<i4")


def dtype_code(dtype: np.dtype) -> int:
    """Megatron's code for `dtype` (the inverse of `DTYPE_CODES`)."""
    return next(code for code, name in DTYPE_CODES.items() if np.dtype(name) == dtype)


def _chunks(array: np.ndarray) -> Iterator[np.ndarray]:
    """`array` in consecutive slices of at most CHUNK entries."""
    for start in range(0, len(array), CHUNK):
        yield array[start : start + CHUNK]


def _read_chunks(path: Path, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The array stored raw in `path`, CHUNK entries at a time."""
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK * dtype.itemsize):
            yield np.frombuffer(chunk, dtype=dtype)


class IndexedDatasetWriter:
    """Writes PREFIX.bin and PREFIX.idx, one sequence per document, with bounded memory.

    Tokens go straight to `PREFIX.bin.tmp`; each document's length and the running document index
    go to two side files (4 and 8 bytes per document). `close()` writes the index from them in
    chunks, fsyncs, and renames `.bin` then `.idx` into place; leaving the `with` block on an
    exception removes every temporary file and publishes nothing. The same documents give
    byte-identical files.
    """

    def __init__(self, prefix: str | Path, vocab_size: int) -> None:
        self.prefix = Path(prefix)
        if not 0 < vocab_size <= np.iinfo(np.int32).max + 1:
            raise DataFormatError(
                f"{idx_path(prefix)}: vocab_size {vocab_size}; allowed: 1 to {np.iinfo(np.int32).max + 1}"
            )
        if not self.prefix.parent.is_dir():
            raise DataFormatError(f"{idx_path(prefix)}: directory {self.prefix.parent} does not exist")
        self.vocab_size = vocab_size
        self.dtype = token_dtype(vocab_size)
        self.n_sequences = 0
        self.n_documents = 0
        self.n_tokens = 0
        self._temps = {name: Path(f"{self.prefix}.{name}.tmp") for name in ("bin", "lengths", "docs", "idx")}
        self._files = {name: open(self._temps[name], "wb") for name in ("bin", "lengths", "docs")}
        self._files["docs"].write(struct.pack("<q", 0))
        self._closed = False

    def __enter__(self) -> IndexedDatasetWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def add_document(self, tokens: np.ndarray | Sequence[int]) -> None:
        """Append one document (a 1-D sequence of ids in [0, vocab_size)) as one sequence."""
        array = np.asarray(tokens)
        if array.size == 0:
            array = array.reshape(0).astype(self.dtype)
        if array.ndim != 1 or array.dtype.kind not in "iu":
            raise DataFormatError(
                f"{bin_path(self.prefix)}: document {self.n_documents} is {array.dtype} of shape "
                f"{array.shape}; allowed: a 1-D sequence of integer token ids"
            )
        if len(array) > np.iinfo(np.int32).max:
            raise DataFormatError(
                f"{bin_path(self.prefix)}: document {self.n_documents} has {len(array)} tokens; "
                f"allowed: at most {np.iinfo(np.int32).max} (Megatron's int32 lengths)"
            )
        self._write_tokens(array, f"document {self.n_documents}")
        self._files["lengths"].write(struct.pack("<i", len(array)))
        self.n_sequences += 1
        self._end_document()

    def add_dataset(self, dataset: IndexedDataset) -> None:
        """Append every document of `dataset` (of this writer's dtype) as it is, sequences included:
        Megatron's `add_index`, copying in chunks."""
        if dataset.dtype != self.dtype:
            raise DataFormatError(
                f"{dataset.idx_path}: tokens are {dataset.dtype}; allowed: {self.dtype}, the dtype of "
                f"{idx_path(self.prefix)} (vocab_size {self.vocab_size})"
            )
        # read, not mapped: touched pages of a map would count as resident memory for the whole copy
        for chunk in _read_chunks(dataset.bin_path, dataset.dtype):
            self._write_tokens(chunk, f"the tokens copied from {dataset.bin_path}")
        for chunk in _chunks(dataset.sequence_lengths):
            self._files["lengths"].write(chunk.astype("<i4").tobytes())
        for chunk in _chunks(dataset.document_indices[1:]):
            self._files["docs"].write((chunk.astype("<i8") + self.n_sequences).tobytes())
        self.n_sequences += dataset.n_sequences
        self.n_documents += dataset.n_documents

    def close(self) -> None:
        """Write the index, then publish PREFIX.bin and PREFIX.idx (the .idx last), each fsynced."""
        if self._closed:
            return
        for stream in self._files.values():
            stream.flush()
            os.fsync(stream.fileno())
            stream.close()
        self._closed = True
        try:
            self._write_index()
            final_idx = idx_path(self.prefix)
            final_idx.unlink(missing_ok=True)  # an old .idx must never describe the new .bin
            os.replace(self._temps["bin"], bin_path(self.prefix))
            os.replace(self._temps["idx"], final_idx)
            fsync_directory(self.prefix.parent)
        finally:
            self._remove_temps()

    def abort(self) -> None:
        """Close and delete every temporary file; the final names are left as they were."""
        if self._closed:
            return
        for stream in self._files.values():
            stream.close()
        self._remove_temps()
        self._closed = True

    def _remove_temps(self) -> None:
        for path in self._temps.values():
            path.unlink(missing_ok=True)

    def _write_tokens(self, array: np.ndarray, where: str) -> None:
        """Check that the ids fit the vocabulary and append them to .bin in the writer's dtype."""
        if len(array) and (array.min() < 0 or array.max() >= self.vocab_size):
            raise DataFormatError(
                f"{bin_path(self.prefix)}: {where} has token ids from "
                f"{array.min()} to {array.max()}; allowed: 0 to {self.vocab_size - 1} (vocab_size)"
            )
        self._files["bin"].write(array.astype(self.dtype, copy=False).tobytes())
        self.n_tokens += len(array)

    def _end_document(self) -> None:
        self._files["docs"].write(struct.pack("<q", self.n_sequences))
        self.n_documents += 1

    def _write_index(self) -> None:
        """The .idx from the side files: header, lengths, pointers (their running byte sums), document
        indices; chunk by chunk."""
        lengths_file, docs_file = self._temps["lengths"], self._temps["docs"]
        with open(self._temps["idx"], "wb") as out:
            out.write(
                HEADER.pack(MAGIC, VERSION, dtype_code(self.dtype), self.n_sequences, self.n_documents + 1)
            )
            with open(lengths_file, "rb") as stream:
                shutil.copyfileobj(stream, out)
            position = 0
            for lengths in _read_chunks(lengths_file, np.dtype("<i4")):
                ends = position + np.cumsum(lengths, dtype=np.int64) * self.dtype.itemsize
                out.write(np.concatenate(([position], ends[:-1])).astype("<i8").tobytes())
                position = int(ends[-1])
            with open(docs_file, "rb") as stream:
                shutil.copyfileobj(stream, out)
            out.flush()
            os.fsync(out.fileno())


def merge_indexed_datasets(shards: Sequence[str | Path], prefix: str | Path, vocab_size: int) -> None:
    """Write the documents of `shards` (prefixes, in order) as one dataset at `prefix`; the result is
    byte-identical to writing all their documents with one writer."""
    with IndexedDatasetWriter(prefix, vocab_size) as writer:
        for shard in shards:
            writer.add_dataset(IndexedDataset(shard))


class IndexedDataset:
    """A Megatron indexed dataset, memory-mapped: `ds[i]` is document i's tokens, a view into `.bin`.

    Opening reads the header, checks every count against the file sizes before mapping anything,
    then (with `verify`, the default) checks the index in chunks: lengths non-negative, pointers the
    running byte sums of the lengths, document indices from 0 to the sequence count, non-decreasing.
    That costs time in the number of documents, none in the number of tokens; `verify=False` keeps
    only the O(1) checks of the first and last entries. Any failure is a `DataFormatError`.
    """

    def __init__(self, prefix: str | Path, verify: bool = True) -> None:
        self.prefix = Path(prefix)
        self.idx_path, self.bin_path = idx_path(prefix), bin_path(prefix)
        self.dtype, self.n_sequences, n_entries = self._read_header()
        self.n_documents = n_entries - 1
        index = np.memmap(self.idx_path, dtype=np.uint8, mode="r")
        self.sequence_lengths = self._slice(index, HEADER.size, "<i4", self.n_sequences)
        self.sequence_pointers = self._slice(
            index, HEADER.size + 4 * self.n_sequences, "<i8", self.n_sequences
        )
        self.document_indices = self._slice(index, HEADER.size + 12 * self.n_sequences, "<i8", n_entries)
        modes_at = HEADER.size + 12 * self.n_sequences + 8 * n_entries
        has_modes = len(index) > modes_at
        self.sequence_modes = self._slice(index, modes_at, "i1", self.n_sequences) if has_modes else None
        self.total_tokens = self._check_bin_size()
        self.tokens = self._map_tokens()
        self._check_ends()
        if verify:
            self._check_index()

    def __reduce__(self) -> tuple[type, tuple[Path, bool]]:
        """Pickled as its prefix, reopened (with the O(1) checks) where it is loaded: a data-loader
        worker maps the files itself instead of receiving a copy of them."""
        return type(self), (self.prefix, False)

    def __len__(self) -> int:
        """The number of documents."""
        return self.n_documents

    def __getitem__(self, i: int) -> np.ndarray:
        """Document i's tokens (every sequence of it), a view into the memory-mapped .bin."""
        start, end = self.document_span(i)
        return self.tokens[start:end]

    def document_span(self, i: int) -> tuple[int, int]:
        """[start, end) of document i in `tokens`; a negative i counts from the end."""
        if not -self.n_documents <= i < self.n_documents:
            raise IndexError(f"{self.idx_path}: document {i} of {self.n_documents}")
        i %= self.n_documents
        first, last = int(self.document_indices[i]), int(self.document_indices[i + 1])
        return self._token_offset(first), self._token_offset(last)

    def document_starts(self, lo: int, hi: int) -> np.ndarray:
        """The token offsets (int64, ascending, distinct) in [lo, hi) of `tokens` where a document
        starts: what `--data.document-mask` needs of a window of the stream.

        Binary searches of the memory-mapped sequence pointers and document indices, then a read of
        only the entries inside the range: O(log n + documents in range), never a copy of the index.
        (Not np.searchsorted: the index's int64 arrays sit at unaligned offsets of the .idx, and
        numpy copies an unaligned array whole before searching it.)"""
        itemsize = self.dtype.itemsize
        first = bisect.bisect_left(self.sequence_pointers, lo * itemsize)  # first sequence at or after lo
        last = bisect.bisect_left(self.sequence_pointers, hi * itemsize, lo=first)
        # the document indices list the sequence each document begins with (non-decreasing)
        begin = bisect.bisect_left(self.document_indices, first, hi=self.n_documents)
        end = bisect.bisect_left(self.document_indices, last, lo=begin, hi=self.n_documents)
        sequences = np.asarray(self.document_indices[begin:end])
        return np.unique(np.asarray(self.sequence_pointers[sequences], dtype=np.int64) // itemsize)

    def _token_offset(self, sequence: int) -> int:
        """Where sequence `sequence` starts in `tokens` (the total at the end)."""
        if sequence == self.n_sequences:
            return self.total_tokens
        return int(self.sequence_pointers[sequence]) // self.dtype.itemsize

    def _fail(self, path: Path, what: str) -> DataFormatError:
        return DataFormatError(f"{path}: {what}")

    def _read_header(self) -> tuple[np.dtype, int, int]:
        """(dtype, sequence count, document-index count), each checked against the .idx's size."""
        try:
            with open(self.idx_path, "rb") as stream:
                raw = stream.read(HEADER.size)
                size = os.fstat(stream.fileno()).st_size
        except OSError as err:
            raise self._fail(self.idx_path, f"cannot be read ({err.strerror})") from None
        if len(raw) < HEADER.size:
            raise self._fail(self.idx_path, f"{size} bytes, shorter than the {HEADER.size}-byte header")
        magic, version, code, n_sequences, n_entries = HEADER.unpack(raw)
        if magic != MAGIC:
            raise self._fail(
                self.idx_path, f"not a Megatron indexed dataset (magic {magic!r}, expected {MAGIC!r})"
            )
        if version != VERSION:
            raise self._fail(self.idx_path, f"version {version}; allowed: {VERSION}")
        if code not in DTYPE_CODES:
            raise self._fail(self.idx_path, f"dtype code {code}; allowed: {sorted(DTYPE_CODES)}")
        expected = HEADER.size + 12 * n_sequences + 8 * n_entries
        if n_entries < 1 or size not in (expected, expected + n_sequences):
            raise self._fail(
                self.idx_path,
                f"{size} bytes, but its header's {n_sequences} sequences and {n_entries} document "
                f"indices need {expected} (or {expected + n_sequences} with sequence modes)",
            )
        return np.dtype(DTYPE_CODES[code]), n_sequences, n_entries

    @staticmethod
    def _slice(index: np.memmap, offset: int, dtype: str, count: int) -> np.memmap:
        """`count` entries of `dtype` at byte `offset` of the mapped .idx, still a memmap."""
        return index[offset : offset + count * np.dtype(dtype).itemsize].view(dtype)

    def _check_bin_size(self) -> int:
        """The token count that the .bin's size gives; it must be whole and match the index's end."""
        try:
            size = self.bin_path.stat().st_size
        except OSError as err:
            raise self._fail(self.bin_path, f"cannot be read ({err.strerror})") from None
        itemsize = self.dtype.itemsize
        expected = 0
        if self.n_sequences:
            expected = int(self.sequence_pointers[-1]) + int(self.sequence_lengths[-1]) * itemsize
        if size != expected:
            raise self._fail(
                self.bin_path,
                f"{size} bytes, but {self.idx_path.name} says {expected} (last pointer + last length "
                f"x {itemsize}); truncated or not its pair",
            )
        return size // itemsize

    def _map_tokens(self) -> np.ndarray:
        """The whole .bin as one 1-D array (a memmap; an empty array for an empty .bin, which cannot be
        mapped)."""
        if self.total_tokens == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.bin_path, dtype=self.dtype, mode="r", shape=(self.total_tokens,))

    def _check_ends(self) -> None:
        """O(1): the document indices run from 0 to the sequence count; the first pointer is 0."""
        first, last = int(self.document_indices[0]), int(self.document_indices[-1])
        if first != 0 or last != self.n_sequences:
            raise self._fail(
                self.idx_path,
                f"document indices run from {first} to {last}; allowed: 0 to {self.n_sequences} "
                "(the sequence count)",
            )
        if self.n_sequences and int(self.sequence_pointers[0]) != 0:
            raise self._fail(
                self.idx_path, f"the first sequence pointer is {self.sequence_pointers[0]}, not 0"
            )

    def _check_index(self) -> None:
        """O(documents), chunk by chunk: lengths >= 0, pointers their running byte sums, document
        indices non-decreasing."""
        position = 0
        for start in range(0, self.n_sequences, CHUNK):
            lengths = self.sequence_lengths[start : start + CHUNK].astype(np.int64)
            if (lengths < 0).any():
                bad = start + int(np.argmax(lengths < 0))
                raise self._fail(self.idx_path, f"sequence {bad} has length {lengths[bad - start]}")
            ends = position + np.cumsum(lengths) * self.dtype.itemsize
            expected = np.concatenate(([position], ends[:-1]))
            wrong = np.flatnonzero(self.sequence_pointers[start : start + CHUNK] != expected)
            if len(wrong):
                bad = start + int(wrong[0])
                raise self._fail(
                    self.idx_path,
                    f"sequence {bad} points at byte {self.sequence_pointers[bad]}, not "
                    f"{expected[bad - start]} (the running sum of the lengths)",
                )
            position = int(ends[-1])
        for start in range(0, self.n_documents, CHUNK):
            steps = np.diff(self.document_indices[start : start + CHUNK + 1])
            if (steps < 0).any():
                bad = start + int(np.argmax(steps < 0))
                raise self._fail(
                    self.idx_path,
                    f"document index {bad + 1} ({self.document_indices[bad + 1]}) is below the one "
                    f"before it ({self.document_indices[bad]}); allowed: non-decreasing",
                )
