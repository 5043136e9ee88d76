"""Atomic files, the run-directory lock and group claims.

Every file a run writes goes through a temporary file in the same directory and ``os.replace``,
so a reader (or a resumed run) sees the old file or the new one, never half of one. Each commit
syncs the file, renames it, then syncs its directory, so what a rename made visible survives a
power cut too. Files are created like ``open()`` creates them: mode ``0o666`` less the umask,
whichever library writes them. A finished group is marked by its ``summary.json``, written last.

A write that fails (disk full, permission denied, read-only file system) raises a one-line
:class:`~raretask.errors.UserError` naming the file (:func:`io_error`); its temporary file is
removed and the previous version of the file, if any, is untouched.

raretask touches only what it names itself. Its temporary files (and the temporary directories
safetensors writes in) are ``.raretask-tmp.NAME.RANDOM.tmp`` (:data:`TEMP_PREFIX`); those orphaned
by a killed process are never read and are swept by :func:`remove_stale_temps`, which looks at
nothing else and never descends into another run directory. :func:`check_run_dir` refuses a run
directory holding files raretask did not write, before anything is written there.

Parquet files carry page checksums; :func:`read_parquet` verifies them and names a damaged file
in one line (:class:`DamagedFile`), so flipped bytes are never read as numbers.

Locks are ``flock``s: the kernel drops them when their process dies, so a killed run leaves no
stale lock or claim behind. The run lock is held by one process per job (rank 0 under torchrun,
:mod:`raretask.runs.distributed`); group claims let the ranks of one job share out the groups.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pyarrow as pa
import pyarrow.parquet as pq

from raretask.errors import UserError

TEMP_PREFIX = ".raretask-tmp."
"""Every temporary file or directory raretask creates starts with this; nothing else is swept."""
TEMP_SUFFIX = ".tmp"

LOCK = ".lock"
"""The run lock's file (:func:`run_lock`); a directory holding one is a run of its own."""

RUN_FILES = frozenset({
    "config.yaml", "profile.yaml", "cells.json", "log.txt", LOCK, ".claims", "groups",
    "metrics.parquet", "summary.json",  # the merged tables of a finished grid
    "fix.json", "plan.json", "results.json",  # `raretask fix` writes its files beside the grid
    "manifest.json",  # the run's identity and file hashes
    "figures",  # the demo's PNGs of the run
    "report.html",  # `raretask report RUN --out RUN/report.html`
})
"""The names raretask writes at the top of a run directory (see :mod:`raretask.runs.grid`)."""
RUN_MARKERS = frozenset({"config.yaml", "cells.json", "log.txt", "manifest.json", "groups"})
"""Names only a run writes: a directory holding files but none of these is not a run."""
_RUN_DIRS = frozenset({"groups", ".claims", "figures"})
_GROUP_DIR = re.compile(r"g\d{4,}")


def io_error(path: Path | str, err: OSError, verb: str = "cannot write") -> UserError:
    """One line for an environment error on ``path``: ``PATH: cannot write (No space left...)``."""
    if err.errno:  # the system's words, not a library's long wrapping of them
        reason = os.strerror(err.errno)
    else:
        reason = (str(err.strerror or err).splitlines() or [""])[0][:120] or type(err).__name__
    return UserError(f"{path}: {verb} ({reason})")


class DamagedFile(UserError):
    """A file raretask wrote that no longer reads back (torn, flipped bytes, a bad checksum).

    ``path`` names it, so a caller that can recompute the file (a group that re-runs) can catch
    this and do so; otherwise it is the usual one-line error.
    """

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        super().__init__(f"{path}: damaged ({reason}); it was changed outside raretask, delete "
                         "it to have it recomputed")


# -- temporary names and commits -------------------------------------------------------------


def is_temp(name: str) -> bool:
    """Whether ``name`` is one of raretask's temporary files or directories."""
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def _temp_name(name: str) -> str:
    return f"{TEMP_PREFIX}{name[:180]}.{secrets.token_hex(4)}{TEMP_SUFFIX}"


def _new_temp(parent: Path, name: str, directory: bool = False) -> Path:
    """Create a new empty temporary file (or directory) for ``name`` in ``parent``.

    A file is created as ``open()`` creates one (mode 0o666 less the umask), never 0600 as
    ``mkstemp`` would: the committed file keeps this mode.
    """
    while True:  # 32 random bits: a clash is all but impossible, and only retried
        tmp = parent / _temp_name(name)
        try:
            if directory:
                tmp.mkdir()
            else:
                os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                                 0o666))
        except FileExistsError:
            continue
        return tmp


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _make_dirs(directory: Path) -> None:
    """``mkdir -p``, syncing the parent of each directory it creates (so the entry is durable)."""
    missing = []
    while not directory.is_dir():
        missing.append(directory)
        if directory.parent == directory:
            break
        directory = directory.parent
    for d in reversed(missing):
        try:
            d.mkdir()
        except FileExistsError:
            if not d.is_dir():
                raise
            continue  # made meanwhile by another process
        _fsync_path(d.parent, directory=True)


@contextlib.contextmanager
def _atomic_path(path: Path, library_writes: bool = False) -> Iterator[Path]:
    """A temporary path beside ``path`` for the block to write; committed when the block ends.

    The commit syncs the file, renames it over ``path`` and syncs the directory. On any error
    the temporary is removed, ``path`` is untouched and an ``OSError`` becomes one line naming
    ``path``. ``library_writes``: the writer replaces the file by one it makes itself (with its
    own temporary name and mode, as safetensors does), so the path given lies in a temporary
    directory of ours, which a sweep can remove whole.
    """
    path = Path(path)
    tmp = tmp_dir = None
    try:
        _make_dirs(path.parent)
        if library_writes:
            tmp_dir = _new_temp(path.parent, path.name, directory=True)
            tmp = tmp_dir / path.name
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666))
        else:
            tmp = _new_temp(path.parent, path.name)
        mode = os.stat(tmp).st_mode & 0o7777  # 0o666 less the umask
        yield tmp
        if library_writes:
            os.chmod(tmp, mode)
        _fsync_path(tmp)
        os.replace(tmp, path)
        tmp = None
        _fsync_path(path.parent, directory=True)
    except OSError as err:
        raise io_error(path, err) from None
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if tmp_dir is not None:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _os_error_in(err: Exception) -> OSError | None:
    """The system error inside a library's own exception (``... (os error 28)``), if any."""
    found = re.search(r"os error (\d+)", str(err))
    return OSError(int(found[1]), os.strerror(int(found[1]))) if found else None


# -- the run directory: whose files, and the sweep -------------------------------------------


def _legacy_temp(name: str) -> bool:
    """A temporary file of raretask before TEMP_PREFIX (``.summary.json.k3j_x9q2.tmp``)."""
    found = re.fullmatch(r"\.(.+)\.[a-z0-9_]{8}\.tmp", name)
    return bool(found) and found[1] in RUN_FILES


def _foreign_entry(directory: Path) -> str | None:
    """The first entry of a run directory that raretask did not write, or None."""
    top = sorted(os.listdir(directory))
    for name in top:
        p = directory / name
        if is_temp(name) or _legacy_temp(name):
            continue
        if name not in RUN_FILES or p.is_symlink():
            return name + ("/" if p.is_dir() else "")
        if (name in _RUN_DIRS) != p.is_dir():
            return name
    if (directory / "groups").is_dir():
        for name in sorted(os.listdir(directory / "groups")):
            p = directory / "groups" / name
            if not is_temp(name) and (not _GROUP_DIR.fullmatch(name) or p.is_symlink()
                                      or not p.is_dir()):
                return f"groups/{name}" + ("/" if p.is_dir() else "")
    run_files = [n for n in top if n != LOCK and not is_temp(n) and not _legacy_temp(n)]
    if run_files and not RUN_MARKERS.intersection(run_files):
        return run_files[0]  # summary.json alone, say: a user's file, not a run
    return None


def _enclosing_run(directory: Path) -> Path | None:
    """The raretask run directory above ``directory`` (its lock and cells.json), or None."""
    for parent in directory.absolute().parents:
        with contextlib.suppress(OSError):
            if (parent / LOCK).is_file() and (parent / "cells.json").is_file():
                return parent
    return None


def check_run_dir(directory: Path) -> None:
    """Refuse (one line) a run directory that holds files raretask did not write.

    A missing or empty directory passes, and so does a raretask run directory (whether it holds
    the same experiment is :class:`raretask.runs.grid.GridRun`'s check), unless it lies inside
    another run: there the outer run's groups would mix with its files (or overwrite them).
    Reads only: call it before anything is written there, the run lock included.
    """
    directory = Path(directory)
    outer = _enclosing_run(directory)
    if outer is not None:
        raise UserError(f"--out: {directory} is inside the raretask run {outer}; give a "
                        "directory outside it")
    if not directory.exists() and not directory.is_symlink():
        return
    if not directory.is_dir():
        raise UserError(f"--out: {directory} is not a directory")
    try:
        foreign = _foreign_entry(directory)
    except OSError as err:
        raise io_error(directory, err, "cannot read") from None
    if foreign is not None:
        raise UserError(f"{directory}: holds files raretask did not write (such as {foreign}); "
                        "give --out an empty directory or a raretask run of this experiment")


def remove_stale_temps(directory: Path) -> int:
    """Delete the temporary files and directories of interrupted writes in a run directory.

    Only raretask's own names (:data:`TEMP_PREFIX`), only in the run's own levels: the top,
    ``groups/``, and each group's directory with what the study made below it. It never follows
    a link and never enters a directory holding a run lock of its own (another run nested
    below). Returns how many it removed. Call only while holding the directory's
    :func:`run_lock` (no live writer can own them).
    """
    n = 0

    def sweep(d: Path, level: int) -> None:
        nonlocal n
        try:
            entries = sorted(d.iterdir())
        except OSError:
            return
        for p in entries:
            if is_temp(p.name):
                with contextlib.suppress(OSError):
                    if p.is_dir() and not p.is_symlink():
                        shutil.rmtree(p)
                    else:
                        p.unlink()
                    n += 1
            elif (p.is_dir() and not p.is_symlink() and not (p / LOCK).exists()
                  and (level >= 2 or (level == 0 and p.name == "groups")
                       or (level == 1 and _GROUP_DIR.fullmatch(p.name)))):
                sweep(p, level + 1)  # 0: the run, 1: groups/, 2+: a group's own files

    sweep(Path(directory), 0)
    return n


# -- writing and reading ---------------------------------------------------------------------


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


def write_text(path: Path, text: str) -> None:
    with open_atomic(path, "w") as fh:
        fh.write(text)


def write_bytes(path: Path, data: bytes) -> None:
    with open_atomic(path, "wb") as fh:
        fh.write(data)


def write_json(path: Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def write_parquet(path: Path, rows: list[dict] | pa.Table) -> None:
    """A Parquet table with page checksums (:func:`read_parquet` verifies them)."""
    table = rows if isinstance(rows, pa.Table) else pa.Table.from_pylist(rows)
    with _atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd", write_page_checksum=True)


def write_safetensors(path: Path, tensors: dict) -> None:
    """Tensors as safetensors. The library writes its own ``.tmpXXXXXX`` and renames it; it does
    so inside a temporary directory of ours, so a kill leaves nothing the sweep cannot name."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    with _atomic_path(path, library_writes=True) as tmp:
        try:
            save_file(tensors, str(tmp))
        except SafetensorError as err:  # disk full arrives as "... (os error 28)"
            os_err = _os_error_in(err)
            if os_err is None:
                raise
            raise os_err from None


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def read_cells(out: Path | str) -> dict[int, dict]:
    """Run directory ``out``'s ``cells.json``: each cell's fields (and group) by cell id; one
    line naming the file when it is missing or malformed."""
    path = Path(out) / "cells.json"
    try:
        return {int(c["cell"]): c for c in read_json(path)}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: missing or malformed ({type(err).__name__})") from None


def read_parquet(path: Path | str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet table, its page checksums verified.

    A file that is torn, not Parquet, or fails a checksum is a :class:`DamagedFile` naming it;
    one that cannot be opened (missing, no permission) a one-line :class:`UserError`. Files
    written before checksums read as before (their pages carry none to check).
    """
    try:
        os.stat(path)  # pyarrow names a missing file without its errno
    except OSError as err:
        raise io_error(path, err, "cannot read") from None
    try:
        return pq.read_table(path, columns=columns, page_checksum_verification=True)
    except (OSError, pa.ArrowException, ValueError) as err:
        if isinstance(err, OSError) and err.errno:
            raise io_error(path, err, "cannot read") from None
        reason = (str(err).splitlines() or [""])[0][:120] or type(err).__name__
        raise DamagedFile(path, reason) from None


def file_sha256(path: Path | str) -> str:
    """The SHA-256 of a file's bytes, in hex (for a manifest of what a run wrote)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise io_error(path, err, "cannot read") from None
    return digest.hexdigest()


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
