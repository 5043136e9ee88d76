"""Write a command's several output files as one set: a kill leaves the old set or the new one.

``plan --out DIR`` writes plan.json and six exports, ``analyze --out DIR`` a JSON and a PNG. Each
file is atomic on its own (:mod:`raretask.runs.store`), but a kill between two of them used to
leave a new ``plan.json`` beside an old ``megatron.txt``. :func:`output_set` builds the set in a
temporary directory beside ``DIR`` (``.raretask-out.<DIR name>.XXXX``), writes a manifest
(``.raretask-set.json``: the command and the files) last, and swaps the directory in:

* with Linux ``renameat2(RENAME_EXCHANGE)`` the old and new directories trade places in one step,
  so ``DIR`` always holds a whole set;
* where the file system lacks it, ``DIR`` is renamed aside (``.raretask-out.<name>.old.XXXX``)
  and the new one renamed in; a kill between the two renames leaves ``DIR`` missing and the old
  set aside, which the next ``output_set`` on ``DIR`` renames back before anything else.

Only raretask's own files are replaced: ``DIR`` must be new, empty, hold a set whose manifest
names this command and every file in it, or (sets written before manifests) hold nothing but the
files this command writes. Anything else is refused in one line and left untouched. The sweep of
leftovers from killed runs looks only at this ``DIR``'s own ``.raretask-out.<name>.*`` names and
skips any that a live process holds (each is ``flock``ed while in use).

Example
-------
>>> import tempfile, pathlib
>>> out = pathlib.Path(tempfile.mkdtemp()) / "plan"
>>> with output_set(out, "plan", ["a.txt"]) as tmp:
...     _ = (tmp / "a.txt").write_text("new")
>>> sorted(p.name for p in out.iterdir())
['.raretask-set.json', 'a.txt']
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from raretask.errors import UserError
from raretask.runs import store

MANIFEST = ".raretask-set.json"
LOCK = ".lock"  # what store.run_lock leaves in a directory: ours, and honoured as a lock
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _prefix(out: Path) -> str:
    return f".raretask-out.{out.name}."


def _busy(out: Path) -> UserError:
    return UserError(f"{out}: another raretask process is running in this directory")


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _open_dir(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY)


def _fsync_dir(path: Path) -> None:
    fd = _open_dir(path)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two directories in one step; False where the system cannot (then nothing moved)."""
    fn = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _ours(out: Path, command: str, names: Sequence[str]) -> None:
    """Refuse (one line) unless every entry of ``out`` is raretask's own output of ``command``."""
    entries = {p.name for p in out.iterdir()}
    allowed = {LOCK}
    manifest = out / MANIFEST
    if manifest.exists():
        try:
            meta = store.read_json(manifest)
            made_by = meta["command"]
            allowed |= {MANIFEST, *(str(f).split("/")[0] for f in meta["files"])}
        except (ValueError, KeyError, TypeError, OSError):
            raise UserError(f"{manifest}: not a raretask output manifest; give --out a new or "
                            "empty directory") from None
        if made_by != command:
            raise UserError(f"{out}: holds the output of `raretask {made_by}`; give "
                            f"`{command} --out` a directory of its own")
    else:  # a set from before manifests: only this command's own file names (and their temps)
        allowed |= set(names)
        allowed |= {e for e in entries if e.endswith(".tmp") and any(
            e.startswith((f".{n}.", f"{store.TEMP_PREFIX}{n}.")) for n in names)}
    foreign = sorted(entries - allowed)
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise UserError(f"{out}: holds files raretask did not write ({foreign[0]!r}{more}); "
                        "give --out a new or empty directory")


def _recover(out: Path) -> None:
    """A kill between the fallback's two renames left ``out`` missing and the old set aside."""
    if out.exists() or out.is_symlink():
        return
    for aside in sorted(out.parent.glob(_prefix(out) + "old.*")):
        fd = _open_dir(aside)
        try:
            if _try_lock(fd):
                os.rename(aside, out)
                return
        finally:
            os.close(fd)


def _sweep(out: Path) -> None:
    """Remove this ``out``'s leftover build directories that no live process holds."""
    for left in out.parent.glob(_prefix(out) + "*"):
        if not left.is_dir() or left.is_symlink():
            continue
        try:
            fd = _open_dir(left)
        except OSError:
            continue
        try:
            if _try_lock(fd):
                shutil.rmtree(left, ignore_errors=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def output_set(out: Path | str, command: str, names: Sequence[str]) -> Iterator[Path]:
    """Yield an empty directory to write ``command``'s files into; swap it in as ``out``.

    ``names`` are the files the command writes (accepted in an ``out`` written before
    manifests). On an exception in the block nothing of the new set is kept and ``out`` is
    untouched. Raises :class:`UserError` (one line) for an ``out`` holding other files, or one
    another raretask process is writing.
    """
    out = Path(out)
    if out.is_symlink():
        out = out.resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--out: {out} is a file, expected a directory")
    held: list[int] = []
    made = False
    tmp: Path | None = None
    try:
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            _recover(out)
            made = not out.exists()
            out.mkdir(exist_ok=True)
            held.append(_open_dir(out))
        except OSError as err:
            raise store.io_error(out, err, "cannot use as an output directory") from None
        if not _try_lock(held[-1]):
            raise _busy(out)
        if (out / LOCK).exists():  # store.run_lock's lock: a `fix`/`run` may be writing here
            held.append(os.open(out / LOCK, os.O_RDONLY))
            if not _try_lock(held[-1]):
                raise _busy(out)
        _ours(out, command, names)
        _sweep(out)
        tmp = _make_build_dir(out)
        held.append(_open_dir(tmp))
        _try_lock(held[-1])  # new and unique: free
        try:
            yield tmp
            files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
            store.write_json(tmp / MANIFEST, {"command": command, "files": files})
        except UserError as err:  # name the file as the user knows it, not the build directory
            raise UserError(str(err).replace(str(tmp), str(out))) from None
        try:
            os.chmod(tmp, stat.S_IMODE(os.stat(out).st_mode))
            _fsync_dir(tmp)
            if not _exchange(tmp, out):
                aside = out.parent / (_prefix(out) + "old." + secrets.token_hex(4))
                os.rename(out, aside)
                os.rename(tmp, out)
                tmp = aside
            _fsync_dir(out.parent)
        except OSError as err:
            raise store.io_error(out, err) from None
        made = False
    finally:
        if tmp is not None:  # the new set that failed, or the old set after the swap
            shutil.rmtree(tmp, ignore_errors=True)
        for fd in held:
            os.close(fd)
        if made:  # created here for nothing: leave no empty directory behind
            with contextlib.suppress(OSError):
                out.rmdir()


def _make_build_dir(out: Path) -> Path:
    while True:  # 32 random bits: a clash is all but impossible, and only retried
        tmp = out.parent / (_prefix(out) + secrets.token_hex(4))
        try:
            tmp.mkdir()
        except FileExistsError:
            continue
        except OSError as err:
            raise store.io_error(tmp, err, "cannot create") from None
        return tmp
