"""Documents streamed from the user's files: what `moeforge data prepare` reads, for itself and for
the trainer's cache of raw text (cache.py), so that each format has one reader.

Formats, recognised by the name's ending and mixed freely:

    .txt         one document per file (UTF-8; a leading byte-order mark is dropped)
    .jsonl       one JSON object per line, the document in its `text_field` (blank lines skipped)
    .jsonl.gz    the same, gzip-compressed (several members are fine)
    .jsonl.zst   the same, zstandard-compressed (several frames are fine)
    .parquet     the document in the string column `text_field` (needs pyarrow)

A directory stands for every file of those formats under it, recursively, in sorted path order
(hidden files and folders, whose names start with '.', are skipped); the document order of a list
of inputs is therefore a pure function of the file tree. Empty documents are dropped.

Memory is bounded by one document, never by a file: .jsonl is read line by line, compressed
streams are decompressed as they are read, Parquet by record batches of `PARQUET_BATCH_ROWS` read
page by page (not a row group at a time).
`iter_chunks` groups the documents of each source into chunks of about `chunk_bytes` with a stable
id, (source index, ordinal within the source), for a parallel prepare that hands chunks to worker
processes and restarts without redoing the finished ones.

A bad input raises `DataSourceError`, one line naming the file, and the line (or row) for a record.
"""

from __future__ import annotations

import gzip
import importlib
import io
import json
import re
import zlib
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import BinaryIO

from moeforge.config import ConfigError
from moeforge.errors import first_line

FORMATS = {
    ".jsonl.gz": "jsonl.gz",
    ".jsonl.zst": "jsonl.zst",
    ".jsonl": "jsonl",
    ".txt": "txt",
    ".parquet": "parquet",
}
"""name ending -> format; the longer endings first, so that the first match is the right one"""
ALLOWED = ".txt, .jsonl, .jsonl.gz, .jsonl.zst or .parquet"
PARQUET_BATCH_ROWS = 256
"""rows per Parquet record batch: the memory a Parquet source holds is this many documents"""
PARQUET_READ_BYTES = 256 * 1024
"""bytes per read of a Parquet column chunk; with its pages, what a Parquet source holds besides a batch"""
ZSTD_READ_BYTES = 16 * 1024
"""compressed bytes fed to zstd per call: what it returns at once is this times the compression ratio"""
BOM = b"\xef\xbb\xbf"
SURROGATE = re.compile("[\ud800-\udfff]")


class DataSourceError(ConfigError):
    """A bad input file or text field, in one line: `FLAG: DETAIL`, where FLAG is `input` (the
    file is at fault) or `text-field` (the field or column is missing or holds no strings), the
    names `moeforge data prepare` gives them. `renamed` maps them to another command's names."""

    def __init__(self, flag: str, detail: str) -> None:
        super().__init__(f"{flag}: {detail}")
        self.flag, self.detail = flag, detail

    def __reduce__(self):
        """Pickled with both parts, so that the error crosses from a worker process intact."""
        return type(self), (self.flag, self.detail)

    def renamed(self, names: dict[str, str]) -> DataSourceError:
        """The same error under other flag names, e.g. {"input": "data.path"} for the trainer."""
        return DataSourceError(names.get(self.flag, self.flag), self.detail)


@dataclass(frozen=True)
class Source:
    """One input file: its path, its format (a value of `FORMATS`) and its size on disk in bytes."""

    path: Path
    format: str
    size: int

    @property
    def name(self) -> str:
        """The path as error messages quote it."""
        return repr(str(self.path))


@dataclass(frozen=True)
class Chunk:
    """Consecutive documents of one source: the `ordinal`-th chunk of source number `source`.
    `nbytes` is their UTF-8 size; chunks in `id` order concatenate to all documents in order."""

    source: int
    ordinal: int
    documents: list[str]
    nbytes: int

    @property
    def id(self) -> tuple[int, int]:
        """(source index, ordinal): stable across runs for the same inputs and `chunk_bytes`."""
        return (self.source, self.ordinal)


# ---------------------------------------------------------------------------------------------
# Listing the inputs


def list_sources(inputs: Sequence[str | Path]) -> list[Source]:
    """The files `inputs` name, in order: a file as itself, a directory as its data files in
    sorted path order. Refuses a missing path, a file of another format, a directory without data
    files and a file named twice (its documents would be read twice)."""
    if not inputs:
        raise DataSourceError("input", f"none given; allowed: {ALLOWED} files or directories of them")
    sources, seen = [], {}
    for path in (file for given in inputs for file in _input_files(Path(given))):
        first = seen.setdefault(path.resolve(), path)
        if first is not path:
            raise DataSourceError("input", f"{str(path)!r} is named twice (also as {str(first)!r})")
        sources.append(Source(path, _format_of(path), path.stat().st_size))
    return sources


def _input_files(path: Path) -> list[Path]:
    """`path` itself if it is a data file, else the data files under it in sorted order."""
    if not path.exists():
        raise DataSourceError("input", f"got {str(path)!r}; allowed: an existing file or directory")
    if path.is_file():
        if _format_of(path) is None:
            raise DataSourceError(
                "input", f"got {str(path)!r}; allowed: a {ALLOWED} file, or a directory of them"
            )
        return [path]
    relative = (file.relative_to(path) for file in path.rglob("*") if file.is_file() and _format_of(file))
    files = [path / file for file in sorted((file for file in relative if not _hidden(file)), key=_path_key)]
    if not files:
        raise DataSourceError("input", f"no {ALLOWED} files under {str(path)!r}")
    return files


def _format_of(path: Path) -> str | None:
    """The format `path`'s name ends with (case-insensitive), or None."""
    name = path.name.lower()
    return next((fmt for ending, fmt in FORMATS.items() if name.endswith(ending)), None)


def _path_key(relative: Path) -> tuple[str, ...]:
    """The sort key of a file under a listed directory: its path's parts, compared as strings
    (so 'a/b' sorts before 'a-b', whatever Python's own ordering of paths)."""
    return relative.parts


def _hidden(relative: Path) -> bool:
    """Whether a file or a folder on its way from the listed directory is hidden ('.name')."""
    return any(part.startswith(".") for part in relative.parts)


# ---------------------------------------------------------------------------------------------
# Reading documents


def iter_documents(source: Source, text_field: str = "text") -> Iterator[str]:
    """The non-empty documents of `source` in file order, streamed: memory holds one document
    (one record batch for Parquet). Refuses, once reading reaches it, bad input and a source
    without a document."""
    records = documents = 0
    try:
        for text in _READERS[source.format](source, text_field):
            records += 1
            if text:
                documents += 1
                yield text
    except OSError as err:
        raise DataSourceError(
            "input", f"cannot read {source.name}: {err.strerror or first_line(err)}"
        ) from None
    if not documents:
        raise DataSourceError("input", _no_documents(source, records, text_field))


def _no_documents(source: Source, records: int, text_field: str) -> str:
    """Why `source` gave no document: it holds no records, or only empty ones."""
    if source.format == "txt":
        return f"{source.name} is empty (a .txt file is one document)"
    if not records:
        return f"{source.name} has no records (an empty .{source.format} file)"
    return f"{source.name} has no documents: all {records} records have an empty {text_field!r}"


def _txt_documents(source: Source, text_field: str) -> Iterator[str]:
    """The file's text: one document."""
    data = source.path.read_bytes()
    start = len(BOM) if data.startswith(BOM) else 0
    try:
        text = data[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = start + err.start
        line = data.count(b"\n", 0, at) + 1
        raise DataSourceError(
            "input", f"{source.name} line {line} is not UTF-8 text (byte {at} of the file)"
        ) from None
    yield text


def _jsonl_documents(source: Source, text_field: str) -> Iterator[str]:
    """The `text_field` of each record, line by line through the file's (de)compression."""
    stream, errors, kind = _open_jsonl(source)
    where = "file" if source.format == "jsonl" else "decompressed stream"
    offset = 0
    with stream:
        for line_no, raw in enumerate(_checked(stream, errors, source.name, kind, "line"), 1):
            start = len(BOM) if offset == 0 and raw.startswith(BOM) else 0
            if raw[start:].strip():
                yield _record_text(
                    _utf8_line(raw, start, offset, where, source, line_no), text_field, source, line_no
                )
            offset += len(raw)


def _open_jsonl(source: Source) -> tuple[BinaryIO, tuple[type[BaseException], ...], str]:
    """(a binary stream of the decompressed lines, the errors that mean a corrupt stream, its name)."""
    if source.format == "jsonl.gz":
        return gzip.open(source.path, "rb"), (gzip.BadGzipFile, EOFError, zlib.error), "gzip"
    if source.format == "jsonl.zst":
        zstd = _optional("zstandard", source)
        raw = _ZstdStream(open(source.path, "rb"), zstd.ZstdDecompressor())
        return io.BufferedReader(raw), (zstd.ZstdError, EOFError), "zstd"
    return open(source.path, "rb"), (), "jsonl"


def _checked(
    items: Iterable, errors: tuple[type[BaseException], ...], name: str, kind: str, unit: str
) -> Iterator:
    """`items`, with a failure of the kinds in `errors` while producing one turned into a one-line
    error naming the file and the last good line or row."""
    done, iterator = 0, iter(items)
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except errors as err:
            raise DataSourceError(
                "input", f"{name} is not a valid {kind} file (after {unit} {done}): {first_line(err)}"
            ) from None
        done += 1
        yield item


def _utf8_line(raw: bytes, start: int, offset: int, where: str, source: Source, line_no: int) -> str:
    """`raw[start:]` decoded; invalid UTF-8 is refused with its byte offset in `where`."""
    try:
        return raw[start:].decode("utf-8")
    except UnicodeDecodeError as err:
        at = offset + start + err.start
        raise DataSourceError(
            "input", f"{source.name} line {line_no} is not UTF-8 text (byte {at} of the {where})"
        ) from None


def _record_text(line: str, text_field: str, source: Source, line_no: int) -> str:
    """The string in `text_field` of the JSON object on `line`."""
    where = f"{source.name} line {line_no}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataSourceError("input", f"{where} is not valid JSON: {err.msg} (column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataSourceError("input", f"{where} is a JSON {type(record).__name__}, not an object")
    if text_field not in record:
        raise DataSourceError("text-field", f"{where} has no field {text_field!r}")
    text = record[text_field]
    if not isinstance(text, str):
        raise DataSourceError(
            "text-field", f"{where} has a {type(text).__name__} in {text_field!r}, not a string"
        )
    if not text.isascii() and (bad := SURROGATE.search(text)):
        raise DataSourceError(
            "input", f"{where} has a lone surrogate \\u{ord(bad[0]):04x} in {text_field!r} (not UTF-8 text)"
        )
    return text


def _parquet_documents(source: Source, text_field: str) -> Iterator[str]:
    """The string column `text_field`, record batch by record batch."""
    pa = _optional("pyarrow", source)
    parquet = _optional("pyarrow.parquet", source)
    try:
        # Unbuffered reads would hold a whole column chunk, pre-buffering several row groups
        file = parquet.ParquetFile(source.path, pre_buffer=False, buffer_size=PARQUET_READ_BYTES)
    except pa.ArrowException as err:
        raise DataSourceError("input", f"{source.name} is not a Parquet file: {first_line(err)}") from None
    with file:
        _check_text_column(file.schema_arrow, text_field, source)
        batches = file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field])
        row = 0
        for batch in _checked(batches, (pa.ArrowException,), source.name, "Parquet", "record batch"):
            yield from _column_texts(batch.column(0), row, text_field, source)
            row += batch.num_rows


def _column_texts(column, row: int, text_field: str, source: Source) -> list[str]:
    """The strings of a batch's text column, whose first row is row `row` of the file; a null or
    invalid UTF-8 (which Arrow does not check when reading) is refused with its row."""
    if column.null_count:
        null = row + column.is_null().to_pylist().index(True)
        raise DataSourceError("text-field", f"{source.name} row {null} has no text (null in {text_field!r})")
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        values = column.cast(_optional("pyarrow", source).large_binary()).to_pylist()
    n, at = next((n, at) for n, value in enumerate(values) if (at := _utf8_error_at(value)) is not None)
    raise DataSourceError(
        "input", f"{source.name} row {row + n} is not UTF-8 text (byte {at} of its {text_field!r})"
    )


def _utf8_error_at(value: bytes) -> int | None:
    """The offset of the first byte of `value` that is not UTF-8, or None if it all is."""
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as err:
        return err.start
    return None


def _check_text_column(schema, text_field: str, source: Source) -> None:
    """Refuses a Parquet schema without a string column `text_field`, listing the columns it has."""
    if text_field not in schema.names:
        columns = ", ".join(map(repr, schema.names)) or "none"
        raise DataSourceError(
            "text-field", f"{source.name} has no column {text_field!r}; its columns: {columns}"
        )
    kind = schema.field(text_field).type
    if str(kind) not in ("string", "large_string", "string_view"):  # Arrow's UTF-8 string types
        raise DataSourceError("text-field", f"{source.name} column {text_field!r} holds {kind}, not strings")


_READERS = {
    "txt": _txt_documents,
    "jsonl": _jsonl_documents,
    "jsonl.gz": _jsonl_documents,
    "jsonl.zst": _jsonl_documents,
    "parquet": _parquet_documents,
}


def _optional(module: str, source: Source) -> ModuleType:
    """`module`, imported on first use; missing, a one-line error naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        package = module.split(".")[0]
        raise DataSourceError(
            "input", f"reading {source.name} needs {package}: pip install 'moeforge[data]'"
        ) from None


class _ZstdStream(io.RawIOBase):
    """The decompressed bytes of a zstd file, frame after frame. zstandard's own `stream_reader`
    ends quietly at a truncated frame; this one raises EOFError there. Compressed input is fed
    `ZSTD_READ_BYTES` at a time, so what is held at once is bounded by that times the ratio."""

    def __init__(self, file: BinaryIO, decompressor) -> None:
        super().__init__()
        self._file, self._decompressor = file, decompressor
        self._frame, self._fed = decompressor.decompressobj(), False
        self._pending, self._at = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        """Copies the next decompressed bytes into `buffer`; 0 at the end of the last frame."""
        while self._at == len(self._pending):
            compressed = self._file.read(ZSTD_READ_BYTES)
            if not compressed:
                if self._fed:
                    raise EOFError("the file ends inside a frame (truncated)")
                return 0
            self._pending, self._at = self._decompress(compressed), 0
        size = min(len(buffer), len(self._pending) - self._at)
        buffer[:size] = self._pending[self._at : self._at + size]
        self._at += size
        return size

    def _decompress(self, compressed: bytes) -> bytes:
        """The output of `compressed`, starting a new frame wherever the current one ends."""
        out = []
        while compressed:
            out.append(self._frame.decompress(compressed))
            self._fed = True
            if not self._frame.eof:
                break
            compressed = self._frame.unused_data
            self._frame, self._fed = self._decompressor.decompressobj(), False
        return b"".join(out)

    def close(self) -> None:
        self._file.close()
        super().close()


# ---------------------------------------------------------------------------------------------
# Chunks


def iter_chunks(
    sources: Sequence[Source],
    text_field: str = "text",
    chunk_bytes: int = 8 << 20,
    done_sources: Collection[int] = (),
) -> Iterator[Chunk]:
    """The documents of `sources` in order, in chunks of at most `chunk_bytes` of UTF-8 (a larger
    document is a chunk of its own); a chunk never spans two sources. The sources whose index is
    in `done_sources` (every chunk of them finished by an earlier run) are skipped unread."""
    if chunk_bytes < 1:
        raise ConfigError(f"chunk-bytes: got {chunk_bytes}; allowed: a positive number of bytes")
    todo = [(index, source) for index, source in enumerate(sources) if index not in done_sources]
    return (
        chunk for index, source in todo for chunk in _source_chunks(index, source, text_field, chunk_bytes)
    )


def _source_chunks(index: int, source: Source, text_field: str, chunk_bytes: int) -> Iterator[Chunk]:
    """The chunks of one source, numbered from 0."""
    documents, size, ordinal = [], 0, 0
    for document in iter_documents(source, text_field):
        length = utf8_size(document)
        if documents and size + length > chunk_bytes:
            yield Chunk(index, ordinal, documents, size)
            documents, size, ordinal = [], 0, ordinal + 1
        documents.append(document)
        size += length
    yield Chunk(index, ordinal, documents, size)


def utf8_size(text: str) -> int:
    """The length of `text` in UTF-8, without encoding it when it is ASCII."""
    return len(text) if text.isascii() else len(text.encode("utf-8"))
