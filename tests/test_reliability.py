"""Runs survive kills, a second process, a full disk and a read-only directory; nothing is lost.

The kill test SIGKILLs a CPU toy grid at seeded moments (mid-training, while a file is half
written, just before and just after a rename, during the final merge) and re-runs it until it
finishes: every group is written exactly once and the results equal an uninterrupted run's.

A checkpoint is one directory written as a unit and verified on resume
(:mod:`raretask.runs.checkpoint_dir`). The fault-injection harness (tests/faults.py) kills a small
toy grid, a small LM grid and ``plan --out`` before every durable step (rename, delete, fsync)
and in the middle of every file's write, then re-runs: the files equal an uninterrupted run's
(``plan --out``: the old set or the new one right after the kill). ``make test`` runs a sample
of the kill points (a few seconds each), ``make test-slow`` all of them.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
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
from cli_calls import fails

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


@pytest.mark.slow  # make test: the fault sample below kills at exact durable steps instead
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
            log = out / "log.txt"  # a kill at one of the first writes comes before the log
            assert not log.exists() or not log.read_text().endswith("grid complete\n")
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


def test_half_written_files_are_never_read_as_done(reference, tmp_path, monkeypatch,
                                                   one_thread):
    """A torn summary.json temp file beside an unfinished group: the group still runs."""
    out = tmp_path / "run"
    _stopped_before_results(_config(tmp_path / "tiny.yaml"), out, monkeypatch)  # a real run
    gdir = out / "groups" / "g0001"
    gdir.mkdir(parents=True)
    torn = gdir / f"{store.TEMP_PREFIX}summary.json.abc.tmp"  # a write cut short
    torn.write_text('[{"cell": 2, "ta')
    assert store.remove_stale_temps(out) == 1 and not list(gdir.iterdir())
    torn.write_text('[{"cell": 2, "ta')
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




def _lasting_names(root: Path) -> set[str]:
    """Names under ``root`` other than those a running process's atomic writes make and remove
    (temp files, the checkpoint set aside during a save); a directory that vanishes mid-walk is
    skipped, not an error."""
    names = set()
    for parent, dirs, files in os.walk(root, onerror=lambda err: None):
        if store.TEMP_PREFIX in parent or "ckpt.old" in Path(parent).parts:
            continue
        names |= {n for n in dirs + files if store.TEMP_PREFIX not in n and n != "ckpt.old"}
    return names


def test_second_process_refuses_while_the_first_runs(reference, tmp_path, capsys):
    cfg = _config(tmp_path / "tiny.yaml", {"steps": 3000})  # long enough to overlap
    out = tmp_path / "run"
    first = _start(cfg, out)
    try:
        _wait_for(out / "groups" / "g0000" / "ckpt", first)
        before = _lasting_names(out)
        err = fails(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
        assert err == f"error: {out}: another raretask process is running in this directory"
        second = subprocess.run([sys.executable, "-m", "raretask", "run", str(cfg), "--out",
                                 str(out), "--quiet"], capture_output=True, text=True,
                                timeout=60)
        assert second.returncode == 2 and second.stdout == ""
        assert second.stderr == err + "\n"
        assert first.poll() is None  # the refusals did not disturb the running one
        assert before <= _lasting_names(out)
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
    err = fails(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
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
    err = fails(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert err == f"error: {out / 'log.txt'}: cannot write (Disk quota exceeded)"
    monkeypatch.undo()

    def no_lock(file, mode="r", *args, **kwargs):
        if str(file).endswith(".lock"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_lock)
    err = fails(["run", str(cfg), "--out", str(tmp_path / "other"), "--quiet"], capsys)
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
        err = fails(["run", str(out / "config.yaml"), "--out", str(out), "--quiet"], capsys)
        assert "Permission denied" in err and str(out) in err
    finally:
        for d in dirs:
            d.chmod(0o755)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# -- one checkpoint, one commit (raretask.runs.checkpoint_dir) -------------------------------


def _ckpt_names(gdir: Path) -> list[str]:
    return sorted(p.name for p in gdir.iterdir())


def test_a_checkpoint_is_whole_at_every_stage_of_a_save(tmp_path):
    """The states a kill can leave between a save's steps each read as one whole checkpoint."""
    from raretask.runs import checkpoint_dir as cd

    gdir = tmp_path / "g0000"
    assert cd.read(gdir) is None and cd.location(gdir) is None
    cd.save(gdir, {"a.bin": b"old-a", "b.bin": b"old-b"})
    assert _ckpt_names(gdir) == ["ckpt"]
    assert _ckpt_names(gdir / "ckpt") == ["a.bin", "b.bin", "manifest.json"]
    manifest = json.loads((gdir / "ckpt" / "manifest.json").read_text())
    digest = hashlib.sha256(b"old-a").hexdigest()
    assert manifest["files"]["a.bin"] == {"bytes": 5, "sha256": digest}
    # killed between the two renames: only the old one, aside
    (gdir / "ckpt").rename(gdir / "ckpt.old")
    assert cd.read(gdir) == {"a.bin": b"old-a", "b.bin": b"old-b"}
    # a killed save's temporary directory is never read, and the next save removes it
    (gdir / ".raretask-tmp.ckpt.x1.tmp").mkdir()
    (gdir / ".raretask-tmp.ckpt.x1.tmp" / "a.bin").write_bytes(b"torn")
    cd.save(gdir, {"a.bin": b"new-a", "b.bin": b"new-b"})
    assert _ckpt_names(gdir) == ["ckpt"]
    assert cd.read(gdir) == {"a.bin": b"new-a", "b.bin": b"new-b"}
    # killed after the new one went in, before the old one was discarded: the new one wins
    cd.save(gdir, {"a.bin": b"newer-a", "b.bin": b"newer-b"})
    (gdir / "ckpt.old").mkdir()
    (gdir / "ckpt.old" / "a.bin").write_bytes(b"stale")
    assert cd.read(gdir)["a.bin"] == b"newer-a"
    cd.save(gdir, {"a.bin": b"3", "b.bin": b"3"})
    assert _ckpt_names(gdir) == ["ckpt"]
    assert cd.remove(gdir) == 1 and _ckpt_names(gdir) == []


@pytest.mark.parametrize(("damage", "message"), [
    ("flip", "{d}/a.bin: damaged (does not match manifest.json: sha256)"),
    ("truncate", "{d}/a.bin: damaged (does not match manifest.json: 3 bytes, 6 expected)"),
    ("delete", "{d}/a.bin: missing (named by manifest.json)"),
    ("manifest", "{d}/manifest.json: missing, so the checkpoint cannot be verified"),
    ("garbage", "{d}/manifest.json: not a raretask checkpoint manifest"),
])
def test_a_damaged_checkpoint_is_named_in_one_line(tmp_path, damage, message):
    from raretask.errors import UserError
    from raretask.runs import checkpoint_dir as cd

    gdir = tmp_path / "g0003"
    cd.save(gdir, {"a.bin": b"abcdef"})
    d = gdir / "ckpt"
    if damage == "flip":
        (d / "a.bin").write_bytes(b"abcdeF")
    elif damage == "truncate":
        (d / "a.bin").write_bytes(b"abc")
    elif damage == "delete":
        (d / "a.bin").unlink()
    elif damage == "manifest":
        (d / "manifest.json").unlink()
    else:
        (d / "manifest.json").write_bytes(b"\x00{")
    with pytest.raises(UserError) as err:
        cd.read(gdir)
    assert str(err.value) == (message.format(d=d) + f"; delete {d} to restart group g0003 "
                              "from step 0")


def test_disk_full_during_a_checkpoint_keeps_the_last_one(tmp_path, monkeypatch):
    from raretask.errors import UserError
    from raretask.runs import checkpoint_dir as cd

    gdir = tmp_path / "g0000"
    cd.save(gdir, {"a.bin": b"old-a", "b.bin": b"old-b"})
    real, calls = cd._write_synced, []

    def full(path, data):
        calls.append(path.name)
        if len(calls) == 2:  # the second file of the new checkpoint
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, data)

    monkeypatch.setattr(cd, "_write_synced", full)
    with pytest.raises(UserError) as err:
        cd.save(gdir, {"a.bin": b"new-a", "b.bin": b"new-b"})
    assert str(err.value) == f"{gdir / 'ckpt'}: cannot write (No space left on device)"
    assert _ckpt_names(gdir) == ["ckpt"]  # no temporary directory left
    assert cd.read(gdir) == {"a.bin": b"old-a", "b.bin": b"old-b"}


def test_lm_checkpoints_of_the_old_two_file_layout_are_refused(tmp_path):
    """model.safetensors + state.pt were two commits: a kill between them resumed new weights
    with an old optimizer and step. They are refused in one line, not read."""
    from raretask.errors import UserError
    from raretask.studies import study

    gdir = tmp_path / "g0000"
    gdir.mkdir()
    for name in ("model.safetensors", "state.pt"):
        (gdir / name).write_bytes(b"x")
    lm = study("lm")
    assert lm.has_checkpoint(gdir)
    with pytest.raises(UserError, match=r"g0000: a checkpoint from an older raretask "
                       r"\(model.safetensors, state.pt\); delete those files to restart group "
                       "g0000 from step 0"):
        lm.load_checkpoint(gdir, trainer=None)
    assert lm.remove_checkpoint(gdir) == 2 and not list(gdir.iterdir())


class _Stop(Exception):
    pass


def _stopped_before_results(cfg: Path, out: Path, monkeypatch) -> None:
    """Train group g0000 with a checkpoint at every evaluation, stop before its results: its
    last checkpoint stays."""
    from raretask.studies.toy import ToyStudy

    def stop(*args, **kwargs):
        raise _Stop

    with monkeypatch.context() as mp:
        mp.setattr(ToyStudy, "results", stop)
        with pytest.raises(_Stop):
            GridRun(load_experiment(cfg), out, checkpoint_seconds=0).run()


def test_a_flipped_byte_in_a_checkpoint_is_refused_then_restarts(reference, tmp_path, capsys,
                                                                 monkeypatch, one_thread):
    cfg = _config(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    _stopped_before_results(cfg, out, monkeypatch)
    ckpt = out / "groups" / "g0000" / "ckpt"
    state = ckpt / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit in the middle of a tensor: still loads, silently
    state.write_bytes(bytes(data))
    err = fails(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert err == (f"error: {state}: damaged (does not match manifest.json: sha256); delete "
                   f"{ckpt} to restart group g0000 from step 0")
    assert not (out / "summary.json").exists()
    shutil.rmtree(ckpt)  # as the message says
    with pytest.raises(SystemExit) as exc:
        main(["run", str(cfg), "--out", str(out), "--quiet"])
    assert exc.value.code == 0
    assert _show_json(out, capsys) == _show_json(reference, capsys)


def test_a_toy_checkpoint_of_the_old_single_file_layout_resumes(reference, tmp_path, capsys,
                                                                monkeypatch, one_thread):
    """checkpoint.safetensors was one file renamed into place (whole): it is read once."""
    cfg = _config(tmp_path / "tiny.yaml")
    out = tmp_path / "run"
    _stopped_before_results(cfg, out, monkeypatch)
    gdir = out / "groups" / "g0000"
    (gdir / "ckpt" / "state.safetensors").rename(gdir / "checkpoint.safetensors")
    shutil.rmtree(gdir / "ckpt")
    with pytest.raises(SystemExit) as exc:
        main(["run", str(cfg), "--out", str(out), "--quiet"])
    assert exc.value.code == 0
    assert "g0000: resumed from step" in (out / "log.txt").read_text()
    assert _show_json(out, capsys) == _show_json(reference, capsys)
    assert not list(out.rglob("checkpoint.safetensors")) and not list(out.rglob("ckpt*"))


# -- fault injection: a kill at every durable step (tests/faults.py) ---------------------------

FAULTS = Path(__file__).parent / "faults.py"
EXAMPLES = Path(__file__).parent.parent / "examples"
# 3 cells in 2 groups (2 + 1), 3 checkpoints a group: 102 durable steps
TOY_FAULTS = {"name": "faults", "tasks": 4, "features": 4, "width": [2, 4, 8], "seed": 0,
              "beta": 1.5, "steps": 200, "batch_size": 32, "lr": 0.01, "eval_points": 4,
              "profile": {"group_size": 2}}
# the smallest LM of tests/test_lm_grid.py, one cell, 3 checkpoints
LM_FAULTS = {"kind": "lm", "name": "faults", "size": "tiny", "vocab_size": 512, "seq_len": 32,
             "batch_size": 16, "steps": 12, "task": "cmp", "rate": 0.03125, "source": "ngram",
             "eval_points": 4, "probes": False}


def _fault_specs(tmp: Path, sample: bool) -> list[dict]:
    """The toy grid, the LM grid and `plan --out` (over an older plan), every kill point or
    the few that matter most (``sample``)."""
    import yaml

    argv = {}
    for name, cfg in (("toy", TOY_FAULTS), ("lm", LM_FAULTS)):
        (tmp / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
        argv[name] = ["run", str(tmp / f"{name}.yaml"), "--checkpoint-seconds", "0", "--quiet"]
    plan = ["plan", str(EXAMPLES / "tasks.yaml")]
    between_renames = {"op": "rename", "endswith": "/ckpt", "nth": 1}  # only ckpt.old/ exists
    both = {"op": "replace", "contains": "/ckpt.old ->", "nth": 0}  # ckpt/ and ckpt.old/
    mid_delete = {"op": "unlink", "contains": "ckpt-old", "nth": 0}  # half a discarded one
    select = {
        "toy": [between_renames, both, mid_delete,
                {"op": "fsync", "contains": "state.safetensors", "phase": "torn", "nth": 1},
                {"op": "replace", "endswith": "g0000/summary.json"}],  # trained, not done
        "lm": [between_renames, mid_delete,
               {"op": "fsync", "contains": "model.safetensors", "phase": "torn", "nth": 1}],
        "plan": [{"op": "fsync", "contains": "plan.json", "phase": "torn"},
                 {"op": "replace", "contains": "interleave.json"},
                 {"op": "unlink", "nth": 0}, {"op": "rmdir", "nth": -1}],
    }
    specs = [{"kind": "run", "argv": argv["toy"], "select": select["toy"]},
             {"kind": "run", "argv": argv["lm"], "select": select["lm"]},
             {"kind": "set", "old_argv": [*plan, "--size", "16"], "argv": [*plan, "--size", "32"],
              "select": select["plan"]}]
    for name, spec in zip(("toy", "lm", "plan"), specs, strict=True):
        spec.update(work=str(tmp / name), jobs=2 if sample else max(os.cpu_count() or 1, 2),
                    warm=name != "plan")
        if not sample:
            del spec["select"]
    return specs


def _run_faults(tmp: Path, specs: list[dict], timeout: float) -> list[dict]:
    spec_path, result_path = tmp / "spec.json", tmp / "result.json"
    spec_path.write_text(json.dumps(specs))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RARETASK_CACHE": str(tmp / "cache")}
    res = subprocess.run([sys.executable, str(FAULTS), str(spec_path), str(result_path)],
                         capture_output=True, text=True, timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(result_path.read_text())


def _check_run_sweep(result: dict, expect_points: int | None = None) -> None:
    """Every kill happened, and every re-run left exactly the uninterrupted run's files."""
    points = result["points"]
    if expect_points is not None:  # each selector named one kill point
        assert len(points) == expect_points, [(p["n"], p["op"], p["path"]) for p in points]
    bad = [p for p in points if not (p["killed"] and p["rerun"] == 0 and p["diff"] == [])]
    assert not bad, bad[:3]
    assert any(p["resumed"] for p in points)  # some re-runs resumed a checkpoint


def _check_set_sweep(result: dict, expect_points: int | None = None) -> None:
    """After each kill the directory held the old set or the new one; each re-run, the new."""
    points = result["points"]
    if expect_points is not None:
        assert len(points) == expect_points, [(p["n"], p["op"], p["path"]) for p in points]
    bad = [p for p in points if not (p["killed"] and p["rerun"] == 0 and p["diff"] == []
                                     and p["after_kill"] in ("old", "new"))]
    assert not bad, bad[:3]
    assert {p["after_kill"] for p in points} == {"old", "new"}


@pytest.fixture(scope="module")
def fault_sample(tmp_path_factory):
    """The sample of kill points for the default suite, in one process (torch imported once)."""
    tmp = tmp_path_factory.mktemp("faults")
    return _run_faults(tmp, _fault_specs(tmp, sample=True), timeout=300)


def test_toy_kill_sample_resumes_identically(fault_sample):
    _check_run_sweep(fault_sample[0], expect_points=5)


def test_lm_kill_sample_resumes_identically(fault_sample):
    _check_run_sweep(fault_sample[1], expect_points=3)


def test_plan_out_kill_sample_leaves_old_or_new_set(fault_sample):
    _check_set_sweep(fault_sample[2], expect_points=4)


@pytest.mark.slow
@pytest.mark.parametrize("which", ["toy", "lm", "plan"])
def test_every_kill_point_resumes_identically(tmp_path, which):
    """`make test-slow`: SIGKILL before every durable step (and mid-write at every fsync of a
    file) of a small run, then re-run: the uninterrupted run's files, byte for byte."""
    specs = _fault_specs(tmp_path, sample=False)
    spec = specs[["toy", "lm", "plan"].index(which)]
    (result,) = _run_faults(tmp_path, [spec], timeout=3600)
    steps = result["steps"]
    torn = sum(1 for op, path in result["journal"] if op == "fsync" and path.startswith("file "))
    assert len(result["points"]) == steps + torn  # every step, every write
    if which == "plan":
        _check_set_sweep(result)
    else:
        _check_run_sweep(result)
    print(f"{which}: {steps} durable steps, {steps + torn} kill points, all identical")
