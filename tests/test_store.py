"""raretask's files: its own temp names and sweep, foreign --out refused, file modes, fsync order,
Parquet checksums, a full disk named in one line (issue 23 items 3, 4, 8)."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from cli_calls import fails

from raretask.cli import main
from raretask.errors import UserError
from raretask.runs import store

NO_SPACE = os.strerror(errno.ENOSPC)
# one group of one cell, a few hundred steps: a complete run in about a second on CPU
TINY = {"name": "store", "tasks": 4, "features": 4, "width": 2, "seed": 0, "beta": 1.5,
        "steps": 200, "batch_size": 16, "lr": 0.01, "eval_points": 4}

WRITERS = {  # name -> (file name, write it with these contents)
    "text": ("a.txt", lambda p, v: store.write_text(p, f"text {v}\n")),
    "bytes": ("a.bin", lambda p, v: store.write_bytes(p, bytes([v]) * 100)),
    "json": ("a.json", lambda p, v: store.write_json(p, {"v": v})),
    "open_atomic": ("b.txt", lambda p, v: _write_open_atomic(p, v)),
    "parquet": ("a.parquet", lambda p, v: store.write_parquet(p, [{"v": float(v)}] * 50)),
    "safetensors": ("a.safetensors",
                    lambda p, v: store.write_safetensors(p, {"w": torch.full((64,), float(v))})),
}


def _write_open_atomic(path: Path, v: int) -> None:
    with store.open_atomic(path, "w") as fh:
        for _ in range(3):
            fh.write(f"line {v}\n")


def _temps(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if store.TEMP_PREFIX in str(p) or
            p.name.startswith(".tmp")]


def _config(path: Path) -> Path:
    path.write_text(yaml.safe_dump(TINY))
    return path


def _fails(argv: list[str], capsys) -> str:
    return fails(argv, capsys)[len("error: "):]


def _listing(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): (p.read_bytes() if p.is_file() else b"")
            for p in sorted(directory.rglob("*"))}


# -- our own temporary names, and a sweep that touches nothing else ------------------------------


def test_the_sweep_removes_only_our_temps_in_the_runs_own_levels(tmp_path):
    run = tmp_path / "run"
    g = run / "groups" / "g0000"
    (g / "ckpt").mkdir(parents=True)
    (run / "config.yaml").write_text("name: x\n")
    ours = [run / f"{store.TEMP_PREFIX}summary.json.1a2b3c4d.tmp",
            run / "groups" / f"{store.TEMP_PREFIX}x.5e6f7a8b.tmp",
            g / f"{store.TEMP_PREFIX}metrics.parquet.0badc0de.tmp",
            g / "ckpt" / f"{store.TEMP_PREFIX}state.pt.01234567.tmp"]
    for p in ours:
        p.write_text("half")
    ours_dir = g / f"{store.TEMP_PREFIX}model.safetensors.89abcdef.tmp"  # safetensors' own temp
    ours_dir.mkdir()
    (ours_dir / ".tmpAbC123").write_bytes(b"\0" * 10)
    # not ours: other programs' temp names, an old-style name, a foreign tree, a nested run
    foreign = [run / ".x.tmp", run / ".summary.json.abc.tmp", g / ".editor-swap.tmp",
               g / ".tmpXyZ789", run / "src" / "deep" / "er" / f"{store.TEMP_PREFIX}a.1.tmp",
               run / "other" / f"{store.TEMP_PREFIX}b.2.tmp"]
    nested = g / "inner_run"  # another run directory below this one, holding its own lock
    foreign += [nested / store.LOCK, nested / f"{store.TEMP_PREFIX}summary.json.3.tmp",
                nested / "groups" / "g0000" / f"{store.TEMP_PREFIX}metrics.parquet.4.tmp"]
    for p in foreign:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("keep")
    assert store.remove_stale_temps(run) == len(ours) + 1
    assert not any(p.exists() for p in [*ours, ours_dir])
    assert all(p.read_text() == "keep" for p in foreign)
    assert (run / "config.yaml").read_text() == "name: x\n" and (g / "ckpt").is_dir()


def test_temps_are_named_with_the_prefix_and_none_survive(tmp_path, monkeypatch):
    """Every writer's temporary (safetensors' own `.tmpXXXXXX` included) lies under a name of
    ours while it exists, and is gone after the commit."""
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append((Path(src), Path(dst)))
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    for name, (fname, write) in WRITERS.items():
        write(tmp_path / fname, 1)
        src, dst = seen[-1]
        assert dst == tmp_path / fname, name
        assert src.relative_to(tmp_path).parts[0].startswith(store.TEMP_PREFIX), (name, src)
        assert store.is_temp(src.relative_to(tmp_path).parts[0]), name
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f for f, _ in WRITERS.values())


# -- --out holding files raretask did not write --------------------------------------------------


def test_run_into_a_directory_with_a_foreign_file_is_refused(tmp_path, capsys):
    cfg = _config(tmp_path / "tiny.yaml")
    out = tmp_path / "project"
    (out / "src" / "deep" / "er").mkdir(parents=True)
    (out / ".x.tmp").write_text("the user's")
    (out / "src" / "deep" / "er" / ".editor-swap.tmp").write_text("the user's too")
    (out / "summary.json").write_text('{"mine": 1}')
    before = _listing(out)
    err = _fails(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert err == (f"{out}: holds files raretask did not write (such as .x.tmp); give --out an "
                   "empty directory or a raretask run of this experiment")
    assert _listing(out) == before  # nothing written, not even the lock


def test_a_user_temp_inside_a_run_survives_the_rerun_sweep(tmp_path, capsys):
    torch.set_num_threads(1)
    cfg = _config(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:
        main(["run", str(cfg), "--out", str(out), "--quiet"])
    assert exc.value.code == 0
    gdir = out / "groups" / "g0000"
    assert {p.name for p in gdir.iterdir()} >= {"summary.json", "metrics.parquet"}
    mine = gdir / ".x.tmp"  # the group directories are not checked: a stray file is left be
    mine.write_text("keep")
    ours = gdir / f"{store.TEMP_PREFIX}summary.json.deadbeef.tmp"  # a kill's leftover
    ours.write_text('[{"cell": 0, "ta')
    summary = (out / "summary.json").read_bytes()
    with pytest.raises(SystemExit) as exc:
        main(["run", str(cfg), "--out", str(out), "--quiet"])
    assert exc.value.code == 0
    assert mine.read_text() == "keep" and not ours.exists()
    assert (out / "summary.json").read_bytes() == summary
    assert "removed 1 file(s) left by an interrupted run" in (out / "log.txt").read_text()
    # the parent of a run is not a run: refused, and the run below it is left alone
    before = _listing(tmp_path)
    err = _fails(["run", str(cfg), "--out", str(tmp_path), "--quiet"], capsys)
    assert err.startswith(f"{tmp_path}: holds files raretask did not write (such as run/)")
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("setup, example", [
    ({"notes.txt": "x"}, "notes.txt"),
    ({"summary.json": "[]"}, "summary.json"),  # a run's name, but no sign of a run
    ({"config.yaml": "a: 1", "groups/notes.txt": "x"}, "groups/notes.txt"),
    ({"config.yaml": "a: 1", "groups/g0000/x": "x", "groups/old/x": "x"}, "groups/old/"),
    ({"config.yaml": "a: 1", "groups": "not a directory"}, "groups"),
    ({"config.yaml": "a: 1", "src/main.py": "x"}, "src/"),
    ({".raretask-set.json": "{}", "plan.json": "{}"}, ".raretask-set.json"),  # a plan --out
])
def test_check_run_dir_names_a_foreign_entry(tmp_path, setup, example):
    for rel, text in setup.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    with pytest.raises(UserError) as exc:
        store.check_run_dir(tmp_path)
    assert str(exc.value) == (f"{tmp_path}: holds files raretask did not write (such as "
                              f"{example}); give --out an empty directory or a raretask run of "
                              "this experiment")


def test_check_run_dir_passes_empty_missing_and_runs(tmp_path):
    store.check_run_dir(tmp_path / "missing")
    store.check_run_dir(tmp_path)
    run = tmp_path / "run"
    for rel in ["config.yaml", "profile.yaml", "cells.json", "log.txt", ".lock", "summary.json",
                "metrics.parquet", "fix.json", "plan.json", "results.json",
                ".claims/g0001", "groups/g0000/summary.json", "groups/g0001/ckpt/state.pt",
                "manifest.json", "figures/phase_diagram.png", "report.html",
                f"{store.TEMP_PREFIX}cells.json.1.tmp", ".summary.json.k3j_x9q2.tmp"]:
        (run / rel).parent.mkdir(parents=True, exist_ok=True)
        (run / rel).write_text("x")
    store.check_run_dir(run)
    lock_only = tmp_path / "killed_at_start"  # a run killed right after taking its lock
    lock_only.mkdir()
    (lock_only / store.LOCK).write_text("")
    store.check_run_dir(lock_only)
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"file is not a directory"):
        store.check_run_dir(tmp_path / "file")


def test_an_out_inside_another_run_is_refused(tmp_path):
    """A run's groups/ (empty before its first checkpoint) or any folder below a run is not a
    place for another run: the outer run would write its group files over the inner's."""
    run = tmp_path / "run"
    (run / "groups" / "g0000").mkdir(parents=True)
    for name in (store.LOCK, "cells.json", "config.yaml"):
        (run / name).write_text("x")
    for inner in (run / "groups", run / "groups" / "g0000", run / "new" / "deeper"):
        with pytest.raises(UserError) as exc:
            store.check_run_dir(inner)
        assert str(exc.value) == (f"--out: {inner} is inside the raretask run {run}; give a "
                                  "directory outside it")
    assert not (run / "new").exists()
    store.check_run_dir(run)  # the run itself is fine
    (run / "cells.json").unlink()  # a lock alone (any program's .lock) does not make a run
    store.check_run_dir(run / "elsewhere")


# -- modes and syncs ----------------------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_every_file_is_created_as_open_would(tmp_path, umask):
    old = os.umask(umask)
    try:
        with open(tmp_path / "plain", "w") as fh:
            fh.write("x")
        for fname, write in WRITERS.values():
            write(tmp_path / "sub" / fname, 1)  # the first write creates sub/
            write(tmp_path / "sub" / fname, 2)  # a rewrite keeps the mode
    finally:
        os.umask(old)
    want = 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "plain").stat().st_mode) == want
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "sub").iterdir()}
    assert modes == {fname: want for fname, _ in WRITERS.values()}


def test_each_commit_syncs_the_file_then_renames_then_syncs_the_directory(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        target = os.readlink(f"/proc/self/fd/{fd}")
        events.append(("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file", Path(target)))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    for name, (fname, write) in WRITERS.items():
        path = tmp_path / name / fname  # a new directory each: its creation is synced too
        events.clear()
        write(path, 1)
        kinds = [k for k, _ in events]
        assert kinds == ["dir", "file", "replace", "dir"], (name, events)
        assert events[0][1] == tmp_path  # the new directory's entry in its parent
        assert events[1][1].parent.parent in (tmp_path, path.parent)  # the temporary's data
        assert events[2][1] == path and events[3][1] == path.parent


# -- disk full --------------------------------------------------------------------------------


class _FullFile:
    """A file whose writes stop half way with ENOSPC, as on a full disk."""

    def __init__(self, fh):
        self.fh = fh

    def write(self, data):
        self.fh.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, NO_SPACE)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.fh.close()


def _full_disk(monkeypatch):
    """Every writer's file fills the disk half way through (our own writes, pyarrow's and
    safetensors', each with its own way of reporting it)."""
    import safetensors.torch
    from safetensors import SafetensorError

    real_open = open
    monkeypatch.setattr(store, "open", lambda *a, **k: _FullFile(real_open(*a, **k)),
                        raising=False)

    def parquet(table, where, **kwargs):
        Path(where).write_bytes(b"PAR1" + b"\0" * 10)
        raise OSError(errno.ENOSPC, "Error writing bytes to file. Detail: [errno 28] No space "
                      "left on device")

    def save_file(tensors, filename, metadata=None):  # the library's own temp, beside the file
        (Path(filename).parent / ".tmpAbC123").write_bytes(b"\0" * 10)
        raise SafetensorError("Error while serializing: I/O error: No space left on device "
                              "(os error 28)")

    monkeypatch.setattr(pq, "write_table", parquet)
    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("name", list(WRITERS))
def test_disk_full_names_the_file_and_keeps_the_old_one(tmp_path, monkeypatch, name):
    fname, write = WRITERS[name]
    path = tmp_path / fname
    write(path, 1)
    before = path.read_bytes()
    _full_disk(monkeypatch)
    with pytest.raises(UserError) as exc:
        write(path, 2)
    assert str(exc.value) == f"{path}: cannot write ({NO_SPACE})"
    assert path.read_bytes() == before and _temps(tmp_path) == []
    assert sorted(tmp_path.iterdir()) == [path]


def test_a_real_write_limit_is_one_line_for_every_writer(tmp_path):
    """The kernel refuses the write (RLIMIT_FSIZE: "File too large"), so what pyarrow's C++ and
    safetensors' Rust raise is what the user would get on a full disk."""
    script = textwrap.dedent("""
        import resource, signal, sys
        from pathlib import Path
        sys.path.insert(0, sys.argv[2])
        from test_store import WRITERS
        from raretask.errors import UserError
        out = Path(sys.argv[1])
        for name, (fname, write) in WRITERS.items():
            write(out / fname, 1)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64, 64))
        for name, (fname, write) in WRITERS.items():
            try:
                write(out / fname, 2)
            except UserError as err:
                print(err)
    """)
    res = subprocess.run([sys.executable, "-c", script, str(tmp_path), str(Path(__file__).parent)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    # the small JSON files fit under the limit; the others stop at 64 bytes
    too_large = os.strerror(errno.EFBIG)
    assert res.stdout.splitlines() == [f"{tmp_path / f}: cannot write ({too_large})"
                                       for f in ("a.bin", "a.parquet", "a.safetensors")]
    assert _temps(tmp_path) == []
    assert store.read_parquet(tmp_path / "a.parquet").column("v").to_pylist() == [1.0] * 50
    assert (tmp_path / "a.bin").read_bytes() == bytes([1]) * 100


# -- Parquet page checksums ---------------------------------------------------------------------


def test_a_flipped_byte_in_a_parquet_file_is_named_never_read(tmp_path):
    path = tmp_path / "metrics.parquet"
    values = [0.926 + i / 1000 for i in range(2000)]
    store.write_parquet(path, pa.table({"value": values}))
    good = path.read_bytes()
    meta = pq.ParquetFile(path).metadata.row_group(0).column(0)
    start = meta.dictionary_page_offset or meta.data_page_offset
    named = garbage = 0
    for offset in range(start, start + meta.total_compressed_size, 23):
        bad = bytearray(good)
        bad[offset] ^= 0xFF
        path.write_bytes(bytes(bad))
        try:  # a flip in a page header's statistics changes no value: it may read
            assert store.read_parquet(path).column("value").to_pylist() == values
        except store.DamagedFile as err:
            assert str(err).startswith(f"{path}: damaged (") and err.path == path
            named += 1
        with contextlib.suppress(OSError, pa.ArrowException):
            garbage += pq.read_table(path).column("value").to_pylist() != values
    # never garbage with the checks; without them some of these flips read as wrong numbers
    assert named > 0 and garbage > 0, (named, garbage)
    path.write_bytes(good[: len(good) // 2])  # torn
    with pytest.raises(store.DamagedFile, match=r"metrics.parquet: damaged \("):
        store.read_parquet(path)
    path.write_bytes(good)
    assert store.read_parquet(path).column("value").to_pylist() == values


def test_read_parquet_reads_files_without_checksums_and_names_a_missing_one(tmp_path):
    old = tmp_path / "old.parquet"  # written before checksums
    pq.write_table(pa.table({"a": [1, 2]}), old)
    assert store.read_parquet(old, columns=["a"]).column("a").to_pylist() == [1, 2]
    with pytest.raises(UserError) as exc:
        store.read_parquet(tmp_path / "gone.parquet")
    assert not isinstance(exc.value, store.DamagedFile)
    assert str(exc.value) == (f"{tmp_path / 'gone.parquet'}: cannot read "
                              f"({os.strerror(errno.ENOENT)})")


def test_file_sha256(tmp_path):
    store.write_bytes(tmp_path / "x", b"abc")
    assert store.file_sha256(tmp_path / "x") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
