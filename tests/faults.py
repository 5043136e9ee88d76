"""Fault injection: kill a raretask command at its N-th durable step, for every N, and check what
it leaves behind.

A *durable step* is a call that changes what a later process reads: ``os.replace``,
``os.rename``, ``os.unlink``, ``os.remove``, ``os.rmdir`` (renames into place, the deletion of
old checkpoints and temporaries) and ``os.fsync`` (the end of every file's write). A *kill point*
is (N, phase): ``before`` SIGKILLs the process instead of its N-th step; ``torn``, for an
``fsync`` of a regular file, first cuts the file to half its length (a write cut short), then
kills.

For a command that runs a grid (``kind: "run"``) every kill point is followed by a plain re-run
in the same directory, and the directory must then equal an uninterrupted run's: every file byte
for byte (Parquet tables compared as tables; ``log.txt`` and ``.lock`` aside) and nothing else,
no temporary or checkpoint left. For a command that writes a set of files (``kind: "set"``,
``plan --out``), the directory starts as the old set and, right after the kill, must hold the
old set or the new set, never a mix; the re-run must then leave the new set.

The tests run this file as a script, ``python tests/faults.py SPEC.json RESULT.json``: it imports
raretask and torch once and forks a child for every run (a fresh interpreter per run would spend
most of the sweep importing torch). Children run ``raretask.cli.main`` with one thread. ``SPEC``
says what to run (see :func:`main`); ``RESULT`` gets the steps of an uninterrupted run and one
record per kill point.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import sys
import time
import traceback
from pathlib import Path

OPS = ("replace", "rename", "unlink", "remove", "rmdir", "fsync")
IGNORED = {"log.txt", ".lock"}  # the log says when and how often it ran; the lock is a flock
CHILD_SECONDS = 300


# -- in the child: count the durable steps, kill at one ---------------------------------------
def _fd_path(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _describe(name: str, args: tuple, kwargs: dict) -> str:
    if name == "fsync":  # "file PATH" or "dir PATH": only a file can be torn
        fd = args[0] if isinstance(args[0], int) else args[0].fileno()
        return ("file " if stat.S_ISREG(os.fstat(fd).st_mode) else "dir ") + _fd_path(fd)
    paths = [str(a) for a in args[:2]]
    if kwargs.get("dir_fd") is not None:  # shutil.rmtree works relative to directory fds
        paths = [os.path.join(_fd_path(kwargs["dir_fd"]), p) for p in paths]
    return " -> ".join(paths)


def _tear(fd_or_file) -> None:
    """Cut the file being synced to half its length, as a write cut short leaves it."""
    fd = fd_or_file if isinstance(fd_or_file, int) else fd_or_file.fileno()
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode) and st.st_size:
        os.truncate(_fd_path(fd), st.st_size // 2)


def _install(kill_at: int | None, phase: str, journal: list | None, scope: str) -> None:
    """Wrap the durable steps: count those on paths under ``scope`` (not a cache elsewhere,
    which a first run fills and later ones only read), note them, kill at the ``kill_at``-th."""
    count = [0]

    def wrap(name, real):
        def step(*args, **kwargs):
            what = _describe(name, args, kwargs)
            path = what.split(" ", 1)[1] if name == "fsync" else what  # fsync: "file PATH"
            if path.startswith(scope):
                count[0] += 1
                if journal is not None:
                    journal.append([name, what])
            if count[0] == kill_at:
                if phase == "torn":
                    _tear(args[0])
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)
        return step

    for name in OPS:
        setattr(os, name, wrap(name, getattr(os, name)))


def _child(argv: list[str], log: Path, kill_at: int | None = None, phase: str = "before",
           journal_path: Path | None = None) -> int:
    """Fork; the child runs ``raretask ARGV`` (killed at its ``kill_at``-th step in the parent
    of ``--out``). Returns the wait status as an exit code (negative: the signal)."""
    scope = str(Path(argv[argv.index("--out") + 1]).parent) + "/"
    pid = os.fork()
    if pid == 0:  # the child: never returns
        code = 1
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            journal = [] if journal_path is not None else None
            _install(kill_at, phase, journal, scope)
            from raretask.cli import main

            try:
                main(argv)
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
            if journal is not None:
                journal_path.write_text(json.dumps(journal))
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return _wait(pid)


def _wait(pid: int, seconds: float = CHILD_SECONDS) -> int:
    deadline = time.monotonic() + seconds
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return -999  # hung
        time.sleep(0.02)


# -- what a directory holds --------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (but :data:`IGNORED`) by relative path; Parquet files as their
    table's rows (the bytes hold no more than the table, and a table compares exactly)."""
    import pyarrow.parquet as pq

    out = {}
    for p in sorted(root.rglob("*")):
        if p.name in IGNORED or p.is_dir():
            continue
        rel = str(p.relative_to(root))
        if p.suffix == ".parquet":
            try:
                out[rel] = json.dumps(pq.read_table(p).to_pylist(), default=str).encode()
            except Exception as err:  # a torn table is a difference, not a crash
                out[rel] = f"unreadable parquet: {err}".encode()
        else:
            out[rel] = p.read_bytes()
    for p in root.rglob("*"):  # empty directories (a checkpoint's leftover, say) count too
        if p.is_dir() and not any(p.iterdir()):
            out[str(p.relative_to(root)) + "/"] = b""
    return out


def differences(got: dict[str, bytes], want: dict[str, bytes]) -> list[str]:
    diff = [f"extra {k}" for k in sorted(set(got) - set(want))]
    diff += [f"missing {k}" for k in sorted(set(want) - set(got))]
    diff += [f"differs {k}" for k in sorted(set(got) & set(want)) if got[k] != want[k]]
    return diff


# -- the sweeps ---------------------------------------------------------------------------------
def _points(journal: list, phases: list[str]) -> list[tuple[int, str]]:
    points = []
    for n, (op, path) in enumerate(journal, start=1):
        for phase in phases:
            if phase == "torn" and not (op == "fsync" and path.startswith("file ")):
                continue  # only a file being written can be torn
            points.append((n, phase))
    return points


def _run_point(spec: dict, work: Path, n: int, phase: str) -> dict:
    """One kill point of a grid run: kill, re-run, compare with the uninterrupted run."""
    here = work / f"p{n:04d}-{phase}"
    out = here / "run"
    here.mkdir(parents=True)
    argv = [*spec["argv"], "--out", str(out)]
    killed = _child(argv, here / "child.log", n, phase)
    rc = _child(argv, here / "child.log")
    diff = (differences(snapshot(out), snapshot(work / "ref" / "run")) if rc == 0
            else ["re-run failed"])
    log = (out / "log.txt").read_text() if (out / "log.txt").exists() else ""
    return {"killed": killed == -signal.SIGKILL, "exit": killed, "rerun": rc, "diff": diff,
            "resumed": "resumed from step" in log}


def _run_set_point(spec: dict, work: Path, n: int, phase: str) -> dict:
    """One kill point of a set-writing command over the old set: old or new after the kill,
    the new set after the re-run, nothing of its own left beside it."""
    here = work / f"p{n:04d}-{phase}"
    out = here / "out"
    here.mkdir(parents=True)
    shutil.copytree(work / "old" / "out", out)
    argv = [*spec["argv"], "--out", str(out)]
    killed = _child(argv, here / "child.log", n, phase)
    old, new = snapshot(work / "old" / "out"), snapshot(work / "new" / "out")
    if out.is_dir():
        now, where = snapshot(out), "out"
    else:  # killed between the two renames of a swap: the old set waits aside for the re-run
        aside = [p for p in here.iterdir() if p.is_dir() and p.name != "out"
                 and snapshot(p) == old]
        now, where = (old, "aside") if aside else ({}, "missing")
    state = "old" if now == old else "new" if now == new else "mix"
    rc = _child(argv, here / "child.log")
    diff = differences(snapshot(out), new) if rc == 0 else ["re-run failed"]
    diff += [f"left {p.name}" for p in here.iterdir() if p.name not in ("out", "child.log")]
    return {"killed": killed == -signal.SIGKILL, "exit": killed, "rerun": rc, "diff": diff,
            "after_kill": state, "where": where,
            "mix": [] if state != "mix" else differences(now, old)[:5]}


def _parallel(jobs: int, tasks: list, fn) -> list:
    """``fn(*task)`` for each task in forked workers, ``jobs`` at a time; results in order."""
    results: dict[int, dict] = {}
    running: dict[int, tuple[int, Path]] = {}
    pending = list(enumerate(tasks))
    tmp = Path(os.environ.get("TMPDIR", "/tmp"))
    while pending or running:
        while pending and len(running) < jobs:
            i, task = pending.pop(0)
            path = tmp / f"raretask-fault-{os.getpid()}-{i}.json"
            pid = os.fork()
            if pid == 0:
                code = 0
                try:
                    path.write_text(json.dumps(fn(*task)))
                except BaseException:
                    traceback.print_exc()
                    code = 1
                finally:
                    os._exit(code)
            running[pid] = (i, path)
        pid, _ = os.wait()
        if pid in running:
            i, path = running.pop(pid)
            results[i] = json.loads(path.read_text()) if path.exists() else {"error": "crashed"}
            path.unlink(missing_ok=True)
    return [results[i] for i in range(len(tasks))]


def sweep(spec: dict) -> dict:
    """Run ``spec`` (see :func:`main`); returns the journal of an uninterrupted run and one
    record per kill point."""
    started = time.monotonic()
    work = Path(spec["work"])
    work.mkdir(parents=True, exist_ok=True)
    argv = spec["argv"]
    if spec.get("warm"):  # in this process: the children fork with its lazy imports done
        _warm([*spec["argv"], "--out", str(work / "warm")])
    journal_path = work / "journal.json"
    for name in ("ref", "old", "new", "count"):  # each in a directory of its own: the scope
        (work / name).mkdir()
    if spec["kind"] == "run":
        rc = _child([*argv, "--out", str(work / "ref" / "run")], work / "ref.log",
                    journal_path=journal_path)
        point_fn = _run_point
    else:
        assert _child([*spec["old_argv"], "--out", str(work / "old" / "out")],
                      work / "old.log") == 0
        assert _child([*argv, "--out", str(work / "new" / "out")], work / "new.log") == 0
        shutil.copytree(work / "old" / "out", work / "count" / "out")
        rc = _child([*argv, "--out", str(work / "count" / "out")], work / "count.log",
                    journal_path=journal_path)
        point_fn = _run_set_point
    if rc != 0:
        raise RuntimeError(f"the uninterrupted run failed ({rc}): see {work}")
    journal = json.loads(journal_path.read_text())
    uninterrupted = time.monotonic() - started
    points = _points(journal, spec.get("phases", ["before", "torn"]))
    if spec.get("select"):
        points = [p for p in points if _selected(p, journal, spec["select"])]
    lo, hi = spec.get("range", [1, len(journal)])
    points = [(n, ph) for n, ph in points if lo <= n <= hi]
    records = _parallel(int(spec.get("jobs", 1)), [(spec, work, n, ph) for n, ph in points],
                        point_fn)
    for (n, phase), rec in zip(points, records, strict=True):
        rec.update(n=n, phase=phase, op=journal[n - 1][0], path=journal[n - 1][1])
        if rec.get("diff") == [] and spec.get("clean", True):
            shutil.rmtree(work / f"p{n:04d}-{phase}", ignore_errors=True)
    return {"steps": len(journal), "journal": journal, "points": records,
            "seconds": {"uninterrupted": uninterrupted,
                        "total": time.monotonic() - started}}


def _warm(argv: list[str]) -> None:
    """Run ``raretask ARGV`` here once: what it imports on first use (torch's optimizer and
    compiler modules, tokenizers, pandas: seconds) is then imported in every forked child, and
    caches outside the run directory are filled."""
    from raretask.cli import main

    try:
        main(argv)
    except SystemExit as exc:
        if exc.code:
            raise RuntimeError(f"warm-up run failed ({exc.code}): {argv}") from None


def _selected(point: tuple[int, str], journal: list, select: list[dict]) -> bool:
    """A point matches a selector {op, phase, contains, nth} when its step is the ``nth`` (0
    first) of the steps with that op whose path contains ``contains``."""
    n, phase = point
    for sel in select:
        if sel.get("phase", "before") != phase:
            continue
        hits = [i for i, (op, path) in enumerate(journal, start=1)
                if op == sel["op"] and sel.get("contains", "") in path
                and sel.get("endswith", "") == path[len(path) - len(sel.get("endswith", "")):]]
        nth = sel.get("nth", 0)
        if -len(hits) <= nth < len(hits) and hits[nth] == n:
            return True
    return False


def main(spec_path: str, result_path: str) -> None:
    """``SPEC`` (one, or a list run one after the other): ``kind`` ("run" or "set"), ``argv``
    (the command, without ``--out``), ``old_argv`` (set: the command that wrote the old set),
    ``work`` (a new directory), ``warm`` (run the command once in this process first),
    ``phases``, ``select`` (kill points to keep,
    :func:`_selected`; default all), ``range`` ([first, last] steps to kill at), ``jobs`` (kill
    points at once), ``clean`` (delete the directories of kill points that passed)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    # import what the children run once, here, so that each fork starts warm
    import raretask.cli  # noqa: F401
    import raretask.mixing.cli  # noqa: F401
    import raretask.runs.grid  # noqa: F401
    import raretask.studies.lm  # noqa: F401
    import raretask.studies.toy  # noqa: F401
    import raretask.toy.trainer  # noqa: F401

    spec = json.loads(Path(spec_path).read_text())
    specs = spec if isinstance(spec, list) else [spec]
    results = [sweep(s) for s in specs]
    Path(result_path).write_text(json.dumps(results if isinstance(spec, list) else results[0],
                                            indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
