"""Stream records from a dataset file or directory, one dict at a time, with where each came from.

Formats, by suffix (or directory layout):

* ``.jsonl`` / ``.ndjson``: one JSON object per line (read line by line: errors name the line).
* ``.csv``: a header line, then rows (stdlib ``csv``, streamed; an error names the line).
  A UTF-8 byte-order mark (as Excel writes) is skipped, here and at the start of a JSONL file.
* ``.parquet``: record batches through ``pyarrow.parquet.ParquetFile.iter_batches`` (only the
  columns asked for are read); rows are numbered from 1.
* a directory written by Hugging Face ``datasets`` ``save_to_disk``: a ``Dataset`` (``state.json``
  listing Arrow stream files) or a ``DatasetDict`` (``dataset_dict.json`` listing split folders).
  The Arrow files are read with ``pyarrow.ipc``: the ``datasets`` package is not needed.

Why the line formats do not use pyarrow: a malformed row must be reported with its file and line,
and pyarrow's JSON/CSV readers fail a whole block without one. Everything columnar does.

Each yielded :class:`Record` carries ``where`` ("file line 7" or "file row 7") and either the
values of the requested fields (missing ones absent) or ``error`` (why the row is malformed).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from raretask.errors import UserError

LINE_SUFFIXES = (".jsonl", ".ndjson")
BATCH_ROWS = 65_536


@dataclass
class Record:
    """One row: ``values`` of the requested fields present in it, or an ``error``."""

    where: str
    values: dict = field(default_factory=dict)
    error: str | None = None


def dataset_files(path: Path) -> list[tuple[str, Path]]:
    """(kind, file) pairs to read for ``path``; kind is 'jsonl', 'csv', 'parquet' or 'arrow'."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "dataset_dict.json").exists():
            try:
                splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{path / 'dataset_dict.json'}: expected {{\"splits\": [...]}}")\
                    from None
            return [f for s in splits for f in dataset_files(path / str(s))]
        state = path / "state.json"
        if state.exists():
            try:
                names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
            except (ValueError, KeyError, TypeError):
                raise UserError(f"{state}: expected '_data_files' with file names "
                                "(a datasets save_to_disk directory)") from None
            return [("arrow", path / n) for n in names]
        raise UserError(f"{path}: a directory must be a Hugging Face save_to_disk dataset "
                        "(state.json or dataset_dict.json)")
    suffix = path.suffix.lower()
    if suffix in LINE_SUFFIXES:
        return [("jsonl", path)]
    if suffix == ".csv":
        return [("csv", path)]
    if suffix == ".parquet":
        return [("parquet", path)]
    raise UserError(f"{path}: unknown data format {suffix!r} (use .jsonl, .csv, .parquet or a "
                    "save_to_disk directory)")


def read_records(paths: Sequence[Path], fields: Sequence[str]) -> Iterator[Record]:
    """Every row of every file, in order, with the values of ``fields`` it has."""
    for p in paths:
        for kind, f in dataset_files(Path(p)):
            yield from _READERS[kind](f, tuple(fields))


def field_names(path: Path) -> list[str]:
    """The fields of the first file of ``path``: its CSV header, its schema, or the keys of its
    first JSON object (for messages naming what a file holds; [] where none can be read)."""
    try:
        kind, f = dataset_files(Path(path))[0]
        if kind == "csv":
            with open(f, newline="", encoding="utf-8-sig") as fh:
                return [h.strip() for h in next(csv.reader(fh), [])]
        if kind == "jsonl":
            with open(f, "rb") as fh:
                for raw in fh:
                    if raw.strip():
                        obj = json.loads(raw.removeprefix(b"\xef\xbb\xbf"))
                        return list(obj) if isinstance(obj, dict) else []
            return []
        if kind == "parquet":
            import pyarrow.parquet as pq

            return list(pq.ParquetFile(f).schema_arrow.names)
        import pyarrow as pa

        return list(pa.ipc.open_stream(pa.memory_map(str(f))).schema.names)
    except Exception:  # only for a message: an unreadable file is reported by the reader
        return []


def _jsonl(path: Path, fields: tuple[str, ...]) -> Iterator[Record]:
    with open(path, "rb") as fh:
        for i, raw in enumerate(fh, start=1):
            where = f"{path} line {i}"
            if i == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (ValueError, UnicodeDecodeError) as err:
                yield Record(where, error=f"not valid JSON ({str(err).split(':')[0]})")
                continue
            if not isinstance(obj, dict):
                yield Record(where, error="expected a JSON object")
                continue
            yield Record(where, {k: obj[k] for k in fields if k in obj and obj[k] is not None})


def _csv(path: Path, fields: tuple[str, ...]) -> Iterator[Record]:
    # utf-8-sig: a byte-order mark (Excel writes one) is not part of the first column's name
    with open(path, newline="", encoding="utf-8-sig", errors="strict") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            return
        except UnicodeDecodeError as err:
            raise UserError(f"{path} line 1: not UTF-8 text (byte {err.start})") from None
        header = [h.strip() for h in header]
        cols = {k: header.index(k) for k in fields if k in header}
        line = reader.line_num
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as err:
                yield Record(f"{path} line {line + 1}", error=f"unreadable CSV ({err})")
                return  # the reader cannot continue after this
            where = f"{path} line {line + 1}"
            line = reader.line_num
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(header):
                yield Record(where, error=f"expected {len(header)} fields, got {len(row)}")
                continue
            yield Record(where, {k: row[i] for k, i in cols.items() if row[i] != ""})


def _batches_to_records(path: Path, batches, fields: tuple[str, ...]) -> Iterator[Record]:
    n = 0
    for batch in batches:
        cols = {k: batch.column(k).to_pylist() for k in fields if k in batch.schema.names}
        for r in range(batch.num_rows):
            n += 1
            yield Record(f"{path} row {n}",
                         {k: v[r] for k, v in cols.items() if v[r] is not None})


def _parquet(path: Path, fields: tuple[str, ...]) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise UserError(f"{path}: not a readable Parquet file ({type(err).__name__})") from None
    present = [k for k in fields if k in pf.schema_arrow.names]
    yield from _batches_to_records(path, pf.iter_batches(batch_size=BATCH_ROWS, columns=present),
                                   fields)


def _arrow(path: Path, fields: tuple[str, ...]) -> Iterator[Record]:
    import pyarrow as pa

    if not path.exists():
        raise UserError(f"{path}: listed in state.json but missing")
    try:
        reader = pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        raise UserError(f"{path}: not an Arrow stream file") from None
    yield from _batches_to_records(path, reader, fields)


_READERS = {"jsonl": _jsonl, "csv": _csv, "parquet": _parquet, "arrow": _arrow}


def bad_field(source: str, field: str, expected: str, got) -> UserError:
    """The one-line error for a value in a file read back: ``source: field: expected ..., got
    ...`` (the value's repr cut to 40 characters: a hand-edited file may hold anything)."""
    text = repr(got) if len(repr(got)) <= 40 else repr(got)[:37] + "..."
    return UserError(f"{source}: {field}: expected {expected}, got {text}")


def check_task_names(names, source: str) -> None:
    """Each entry of ``tasks`` in a file read back (analysis.json, plan.json) names a task, once:
    a one-line UserError naming the entry otherwise (a repeated name would be lost in the
    exports, which key on it)."""
    seen: dict[str, int] = {}
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise bad_field(source, f"tasks.{i}.task", "a name", name)
        if name in seen:
            raise UserError(f"{source}: tasks.{i}.task: {name!r} repeats tasks.{seen[name]}.task "
                            "(task names must be unique)")
        seen[name] = i
