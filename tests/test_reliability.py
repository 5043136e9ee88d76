"""Runs survive kills, a second process, a full disk and a read-only directory; nothing is lost.

The kill test SIGKILLs a CPU toy grid at seeded moments (mid-training, while a file is half
written, just before and just after a rename, during the final merge) and re-runs it until it
finishes: every group is written exactly once and the results equal an uninterrupted run's.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from raretask.cli import main
from raretask.config import load_experiment
from raretask.runs import store
from raretask.runs.grid import GridRun

# 3 groups of 2 cells; a checkpoint at every eval step (--checkpoint-seconds 0): ~30 writes
TINY = {"name": "kills", "tasks": 4, "features": 4, "width": [2, 4, 8], "seed": [0, 1],
        "beta": 1.5, "steps": 600, "batch_size": 32, "lr": 0.01, "eval_points": 8,
        "profile": {"group_size": 2}}

# Runs one `raretask run` with a planned SIGKILL of itself (argv[1]); each rename of a group's
# summary.json is appended to argv[2] (which groups were finished, and how often).
KILLER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    plan, journal, out = sys.argv[1].split(":"), sys.argv[2], Path(sys.argv[3])
    kind = plan[0]

    def die():
        os.kill(os.getpid(), signal.SIGKILL)

    real_replace, writes = os.replace, [0]
    def replace(src, dst):
        writes[0] += 1
        dst = Path(dst)
        hit = ((kind == "write" and writes[0] == int(plan[1]))
               or (kind == "merge" and dst.parent == out and dst.name == "summary.json"))
        phase = plan[-1]
        if hit and phase == "torn":  # the temporary file half written, never renamed
            size = os.path.getsize(src)
            with open(src, "r+b") as fh:
                fh.truncate(size // 2)
            die()
        if hit and phase == "before":
            die()
        real_replace(src, dst)
        if dst.name == "summary.json" and dst.parent.parent.name == "groups":
            with open(journal, "a") as fh:
                fh.write(dst.parent.name + "\\n")
        if hit and phase == "after":
            die()
    os.replace = replace

    if kind == "step":  # mid-training: at this process's n-th optimizer step
        from raretask.toy.trainer import ToyTrainer
        real_step, steps = ToyTrainer._train_step, [0]
        def train_step(self):
            steps[0] += 1
            if steps[0] == int(plan[1]):
                die()
            real_step(self)
        ToyTrainer._train_step = train_step

    from raretask.cli import main
    main(["run", sys.argv[4], "--out", str(out), "--checkpoint-seconds", "0", "--quiet"])
""")


def _config(path: Path, overrides: dict | None = None) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({**TINY, **(overrides or {})}))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (in-process, one thread)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("ref")
    out = base / "run"
    GridRun(load_experiment(_config(base / "tiny.yaml")), out).run()
    torch.set_num_threads(before)
    return out


def _show_json(out: Path, capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["show", str(out), "--json"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def _kill_plan(seed: int) -> list[str]:
    """Seven kills, in an order that keeps each one reachable by the process it is planned for
    (a process makes >= 10 writes and >= 200 steps until the grid's last group)."""
    rng = np.random.default_rng(seed)
    plan = [f"step:{rng.integers(1, 200)}",
            f"write:{rng.integers(3, 10)}:torn",  # config, cells, then checkpoints mostly
            f"write:{rng.integers(3, 10)}:after",
            f"step:{rng.integers(1, 200)}",
            f"write:{rng.integers(3, 10)}:before"]
    rng.shuffle(plan)
    return [*plan, "merge:torn", "merge:after"]  # the last two: inside the final merge


def test_random_sigkills_then_identical_results(reference, tmp_path, capsys):
    cfg = _config(tmp_path / "tiny.yaml")
    out, journal = tmp_path / "run", tmp_path / "journal"
    script = tmp_path / "killer.py"
    script.write_text(KILLER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    plan = _kill_plan(seed=9)
    kills = []
    for spec in [*plan, "none"]:
        res = subprocess.run([sys.executable, str(script), spec, str(journal), str(out), str(cfg)],
                             capture_output=True, text=True, timeout=120, env=env)
        if spec == "none":
            assert res.returncode == 0, res.stderr
        else:  # every planned kill happened (the plan is seeded: the same kills every time)
            assert res.returncode == -signal.SIGKILL, (spec, res.returncode, res.stderr)
            kills.append(spec)
            assert not (out / "log.txt").read_text().endswith("grid complete\n")
    assert len(kills) >= 5
    # every group was finished (its summary.json renamed into place) exactly once
    finished = journal.read_text().split()
    assert sorted(finished) == ["g0000", "g0001", "g0002"], finished
    # the same rows and the same metrics table as the uninterrupted run
    assert _show_json(out, capsys) == _show_json(reference, capsys)
    assert pq.read_table(out / "metrics.parquet").equals(pq.read_table(reference /
                                                                       "metrics.parquet"))
    for g in ("g0000", "g0001", "g0002"):
        assert pq.read_table(out / "groups" / g / "metrics.parquet").equals(
            pq.read_table(reference / "groups" / g / "metrics.parquet"))
    rows = json.loads(_show_json(out, capsys))
    assert sorted((r["cell"], r["task"]) for r in rows) == [(c, t) for c in range(6)
                                                            for t in range(1, 5)]
    # nothing half-written or stale is left behind
    assert not list(out.rglob("*.tmp")) and not list(out.rglob("ckpt*"))
    log = (out / "log.txt").read_text()
    assert log.count("resumed from step") >= 2 and log.endswith("grid complete\n")
    assert "left by an interrupted run" in log


def test_half_written_files_are_never_read_as_done(reference, tmp_path):
    """A torn summary.json temp file beside an unfinished group: the group still runs."""
    out = tmp_path / "run"
    GridRun(load_experiment(_config(tmp_path / "tiny.yaml")), out)  # plans only
    gdir = out / "groups" / "g0001"
    gdir.mkdir(parents=True)
    torn = gdir / f"{store.TEMP_PREFIX}summary.json.abc.tmp"  # a write cut short
    torn.write_text('[{"cell": 2, "ta')
    assert store.remove_stale_temps(out) == 1 and not list(gdir.iterdir())
    torn.write_text('[{"cell": 2, "ta')
    torch.set_num_threads(1)
    run = GridRun(load_experiment(_config(tmp_path / "tiny.yaml")), out)
    assert not run.is_done(run.groups[1])
    run.run()
    assert (out / "summary.json").read_bytes() == (reference / "summary.json").read_bytes()
    assert not list(out.rglob("*.tmp"))


# -- concurrency -----------------------------------------------------------------------------


def _start(cfg: Path, out: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "raretask", "run", str(cfg), "--out", str(out),
                             "--checkpoint-seconds", "0", "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline
        time.sleep(0.01)


def _fails(argv: list[str], capsys) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    cap = capsys.readouterr()
    assert exc.value.code == 2 and cap.out == ""
    lines = cap.err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
    return lines[0]


def test_second_process_refuses_while_the_first_runs(reference, tmp_path, capsys):
    cfg = _config(tmp_path / "tiny.yaml", {"steps": 3000})  # long enough to overlap
    out = tmp_path / "run"
    first = _start(cfg, out)
    try:
        _wait_for(out / "groups" / "g0000" / "ckpt", first)
        # temp files come and go with the running process's atomic writes: compare the rest
        before = sorted(p.name for p in out.rglob("*") if store.TEMP_PREFIX not in str(p))
        err = _fails(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
        assert err == f"error: {out}: another raretask process is running in this directory"
        second = subprocess.run([sys.executable, "-m", "raretask", "run", str(cfg), "--out",
                                 str(out), "--quiet"], capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr == err + "\n"
        assert first.poll() is None  # the refusals did not disturb the running one
        assert set(before) <= {p.name for p in out.rglob("*")}
    finally:
        first.kill()
        first.wait()


def test_a_killed_run_leaves_no_stale_lock(reference, tmp_path, capsys):
    cfg = _config(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    first = _start(cfg, out)
    _wait_for(out / "groups" / "g0000" / "ckpt", first)
    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    assert (out / ".lock").exists()  # the file stays; the flock died with its process
    torch.set_num_threads(1)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["run", str(cfg), "--out", str(out), "--quiet"])
    assert exc.value.code == 0, capsys.readouterr().err
    assert _show_json(out, capsys) == _show_json(reference, capsys)


# -- disk full, permission denied ------------------------------------------------------------


def test_disk_full_mid_run_keeps_earlier_results(reference, tmp_path, capsys, monkeypatch):
    cfg = _config(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    torch.set_num_threads(1)
    real = os.replace

    def full(src, dst):
        if Path(dst).name == "summary.json" and Path(dst).parent.name == "g0001":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)

    monkeypatch.setattr(os, "replace", full)
    err = _fails(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    target = out / "groups" / "g0001" / "summary.json"
    assert err == f"error: {target}: cannot write (No space left on device)"
    # the group finished before the disk filled is intact; nothing half-written is left
    g0 = out / "groups" / "g0000" / "summary.json"
    assert g0.read_bytes() == (reference / "groups" / "g0000" / "summary.json").read_bytes()
    assert not target.exists() and not list(out.rglob("*.tmp"))
    assert not (out / "summary.json").exists()
    # once there is room again, the run completes with the uninterrupted numbers
    monkeypatch.setattr(os, "replace", real)
    with pytest.raises(SystemExit) as exc:
        main(["run", str(cfg), "--out", str(out), "--quiet"])
    assert exc.value.code == 0
    assert _show_json(out, capsys) == _show_json(reference, capsys)
    assert "g0000: 2 cells" not in (out / "log.txt").read_text().split("start:")[-1]


def test_no_space_for_the_log_or_the_lock(tmp_path, capsys, monkeypatch):
    """Errors outside the atomic writes (appending to the log, opening the lock) are one line
    too, naming the file."""
    cfg = _config(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    real_open = open

    def no_log(file, mode="r", *args, **kwargs):
        if str(file).endswith("log.txt") and "a" in mode:
            raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_log)
    err = _fails(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert err == f"error: {out / 'log.txt'}: cannot write (Disk quota exceeded)"
    monkeypatch.undo()

    def no_lock(file, mode="r", *args, **kwargs):
        if str(file).endswith(".lock"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_lock)
    err = _fails(["run", str(cfg), "--out", str(tmp_path / "other"), "--quiet"], capsys)
    assert err == (f"error: {tmp_path / 'other'}: cannot use as a run directory "
                   "(Permission denied)")


def _chmod_blocks_writes(directory: Path) -> bool:
    probe = directory / "probe"
    try:
        probe.write_text("x")
    except PermissionError:
        return True
    probe.unlink()
    return False


def test_read_only_run_directory(reference, tmp_path, capsys):
    """A finished group in a directory that turned read-only: a clear line, nothing lost. As
    root, chmod does not stop writes: the in-process ENOSPC test above covers that case."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(reference, out)
    for p in [out / "summary.json", out / "metrics.parquet"]:
        p.unlink()  # the merge has to run again
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    dirs = [out, *[p for p in out.rglob("*") if p.is_dir()]]
    for d in dirs:
        d.chmod(0o555)
    try:
        if not _chmod_blocks_writes(out):
            pytest.skip("running as root: chmod does not block writes")
        err = _fails(["run", str(out / "config.yaml"), "--out", str(out), "--quiet"], capsys)
        assert "Permission denied" in err and str(out) in err
    finally:
        for d in dirs:
            d.chmod(0o755)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
