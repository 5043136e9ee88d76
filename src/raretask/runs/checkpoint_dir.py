"""A group's checkpoint as one unit: a directory that wholly exists or does not.

A checkpoint is several files (an LM's weights, optimizer and data position; a toy group's
tensors) that are only right together. Written one after another, a kill between two of them
resumed new weights with an old optimizer and step. So they are written as one directory::

    groups/gNNNN/ckpt/                 the last checkpoint
        <the study's files>
        manifest.json                  every file's size and sha256; written last
    groups/gNNNN/ckpt.old/             the checkpoint before, only while a save swaps them

A save writes the files into a fresh ``.raretask-tmp.ckpt.XXXX.tmp/`` beside ``ckpt/`` (each file
fsynced, then the manifest, then the directory), renames ``ckpt/`` aside to ``ckpt.old/``,
renames the new directory to ``ckpt/``, fsyncs the group directory and discards ``ckpt.old/``
(renamed to a temporary name first, so a kill while deleting it leaves only a temporary name).
Whatever moment a kill comes, ``ckpt/`` or ``ckpt.old/`` is a whole checkpoint, and
``ckpt/`` is read when both exist; leftover temporary directories are never read and are
removed by the next save (and by :mod:`raretask.runs.store`'s sweep of its ``.raretask-tmp.``
prefix).

:func:`read` checks every file against the manifest before anything is deserialized: a missing
or damaged file is a one-line :class:`~raretask.errors.UserError` naming it, never a silent
resume. Files are produced in memory (``bytes``), hashed as they are written, and written by this
module alone: no library writes its own temporary files into the group directory.

Example
-------
>>> import tempfile, pathlib
>>> gdir = pathlib.Path(tempfile.mkdtemp())
>>> save(gdir, {"state.bin": b"step 7"})
>>> read(gdir)
{'state.bin': b'step 7'}
>>> sorted(p.name for p in (gdir / NAME).iterdir())
['manifest.json', 'state.bin']
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from raretask.errors import UserError
from raretask.runs import store

NAME, ASIDE, MANIFEST = "ckpt", "ckpt.old", "manifest.json"
FORMAT = "raretask-checkpoint"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "xb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def _temp_dir(parent: Path, name: str) -> Path:
    """A new empty directory named as the store's temporaries are (``.raretask-tmp.NAME.X.tmp``),
    so the run's sweep removes it if a kill leaves it."""
    return Path(tempfile.mkdtemp(prefix=f"{store.TEMP_PREFIX}{name}.", suffix=store.TEMP_SUFFIX,
                                 dir=parent))


def _discard(path: Path) -> None:
    """Remove a checkpoint directory: renamed to a temporary name first, so that a kill part-way
    through the deletion leaves a name nobody reads."""
    doomed = _temp_dir(path.parent, f"{NAME}-old")
    os.replace(path, doomed)  # onto the empty directory just made: atomic
    shutil.rmtree(doomed)


def sweep(gdir: Path) -> int:
    """Remove temporary checkpoint directories left in ``gdir`` by a killed save (call only
    while holding the group: its run lock or claim); returns how many."""
    n = 0
    for left in Path(gdir).glob(f"{store.TEMP_PREFIX}{NAME}*"):
        if store.is_temp(left.name) and left.is_dir() and not left.is_symlink():
            shutil.rmtree(left, ignore_errors=True)
            n += 1
    return n


def location(gdir: Path) -> Path | None:
    """The checkpoint directory a resume reads: ``ckpt/``, or ``ckpt.old/`` when a kill came
    between a save's two renames; None without one."""
    for name in (NAME, ASIDE):
        if (Path(gdir) / name).is_dir():
            return Path(gdir) / name
    return None


def save(gdir: Path, files: dict[str, bytes]) -> None:
    """Write ``files`` (name -> contents) as ``gdir``'s checkpoint, replacing the last one in one
    step; an OSError (disk full, ...) is a one-line UserError and leaves the last one whole."""
    gdir = Path(gdir)
    final, aside = gdir / NAME, gdir / ASIDE
    tmp: Path | None = None
    try:
        if not gdir.is_dir():
            gdir.mkdir(parents=True)
            _fsync_dir(gdir.parent)
        sweep(gdir)
        tmp = _temp_dir(gdir, NAME)
        entries = {}
        for name, data in files.items():
            _write_synced(tmp / name, data)
            entries[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        manifest = {"format": FORMAT, "version": 1, "files": entries}
        _write_synced(tmp / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        _fsync_dir(tmp)
        if final.is_dir():
            if aside.exists():  # a kill after the last save's swap: ckpt/ is the newer one
                _discard(aside)
            os.rename(final, aside)
        os.rename(tmp, final)
        tmp = None
        _fsync_dir(gdir)
        if aside.exists():
            _discard(aside)
    except OSError as err:
        raise store.io_error(final, err) from None
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def read(gdir: Path) -> dict[str, bytes] | None:
    """The files of ``gdir``'s checkpoint, each checked against the manifest; None without a
    checkpoint. A missing, extra-short or altered file is a one-line UserError naming it."""
    where = location(gdir)
    if where is None:
        return None
    hint = f"delete {where} to restart group {Path(gdir).name} from step 0"
    manifest = where / MANIFEST
    try:
        meta = json.loads(manifest.read_bytes())
        if meta.get("format") != FORMAT:
            raise ValueError(meta.get("format"))
        entries = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in meta["files"].items()}
    except FileNotFoundError:
        raise UserError(f"{manifest}: missing, so the checkpoint cannot be verified; "
                        f"{hint}") from None
    except OSError as err:
        raise store.io_error(manifest, err, "cannot read") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{manifest}: not a raretask checkpoint manifest; {hint}") from None
    out = {}
    for name, (size, digest) in entries.items():
        path = where / name
        if Path(name).name != name or name.startswith("."):
            raise UserError(f"{manifest}: names {name!r}, not a file of the checkpoint; {hint}")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise UserError(f"{path}: missing (named by {MANIFEST}); {hint}") from None
        except OSError as err:
            raise store.io_error(path, err, "cannot read") from None
        if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
            what = f"{len(data)} bytes, {size} expected" if len(data) != size else "sha256"
            raise UserError(f"{path}: damaged (does not match {MANIFEST}: {what}); "
                            f"{hint}") from None
        out[name] = data
    return out


def remove(gdir: Path) -> int:
    """Delete ``gdir``'s checkpoint (both names) and any temporary leftovers; returns how many
    entries went."""
    n = sweep(gdir)
    for name in (NAME, ASIDE):
        path = Path(gdir) / name
        if path.is_dir():
            try:
                _discard(path)
            except OSError as err:
                raise store.io_error(path, err, "cannot remove") from None
            n += 1
    return n
