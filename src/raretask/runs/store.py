"""Atomic files, the run-directory lock and group claims.

Every file a run writes goes through a temporary file in the same directory and ``os.replace``,
so a reader (or a resumed run) sees the old file or the new one, never half of one. A finished
group is marked by its ``summary.json``, written last.

A write that fails (disk full, permission denied, read-only file system) raises a one-line
:class:`~raretask.errors.UserError` naming the file (:func:`io_error`); its temporary file is
removed and the previous version of the file, if any, is untouched. Temporary files orphaned by a
killed process (``.NAME.*.tmp``) are never read and are swept by :func:`remove_stale_temps`.

Locks are ``flock``s: the kernel drops them when their process dies, so a killed run leaves no
stale lock or claim behind. The run lock is held by one process per job (rank 0 under torchrun,
:mod:`raretask.runs.distributed`); group claims let the ranks of one job share out the groups.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from raretask.errors import UserError


def io_error(path: Path | str, err: OSError, verb: str = "cannot write") -> UserError:
    """One line for an environment error on ``path``: ``PATH: cannot write (No space left...)``."""
    reason = err.strerror or type(err).__name__
    return UserError(f"{path}: {verb} ({reason})")


@contextlib.contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        yield Path(tmp)
        os.replace(tmp, path)
    except OSError as err:
        raise io_error(path, err) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def remove_stale_temps(directory: Path) -> int:
    """Delete the temporary files of interrupted writes under ``directory``; returns how many.

    Call only while holding the directory's :func:`run_lock` (no live writer can own them).
    """
    n = 0
    for tmp in Path(directory).rglob(".*.tmp"):
        with contextlib.suppress(OSError):
            tmp.unlink()
            n += 1
    return n


@contextlib.contextmanager
def open_atomic(path: Path, mode: str = "wb") -> Iterator[IO]:
    """A file opened for writing (``"w"``: UTF-8 text, ``"wb"``: bytes) that becomes ``path``.

    It is a temporary file beside ``path``; when the block ends without an error it is synced
    and renamed over ``path``, else removed (``path`` untouched). For files written piece by
    piece, too large to hold in memory for :func:`write_bytes`.
    """
    encoding = None if "b" in mode else "utf-8"
    with _atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as fh:
        yield fh
        fh.flush()
        os.fsync(fh.fileno())


def write_text(path: Path, text: str) -> None:
    with open_atomic(path, "w") as fh:
        fh.write(text)


def write_bytes(path: Path, data: bytes) -> None:
    with open_atomic(path, "wb") as fh:
        fh.write(data)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def write_parquet(path: Path, rows: list[dict] | pa.Table) -> None:
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    with _atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def write_safetensors(path: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    with _atomic_path(path) as tmp:
        save_file(tensors, str(tmp))


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


@contextlib.contextmanager
def run_lock(directory: Path) -> Iterator[None]:
    """Hold an exclusive lock on a run directory: a second process pointed at it refuses."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        handle = open(directory / ".lock", "a+")  # noqa: SIM115 - held for the whole block
    except OSError as err:
        raise io_error(directory, err, "cannot use as a run directory") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"{directory}: another raretask process is running in this "
                            "directory") from None
        yield
    finally:
        handle.close()


@contextlib.contextmanager
def claim(path: Path) -> Iterator[bool]:
    """Try to claim ``path`` (an exclusive ``flock``, no waiting); yields whether we hold it.

    The claim lasts for the block; another process that tries meanwhile gets False.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        handle.close()


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` for the block, waiting until it is free.

    For work that several processes may start at once and only one should do (the ranks of one
    host building a cache entry): the first builds, the others wait and then find the result.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path, "a")  # noqa: SIM115 - held for the whole block
    except OSError as err:
        raise io_error(path, err, "cannot lock") from None
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield
