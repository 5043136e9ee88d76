"""Multi-file outputs as a set (issue 23, item 7): `plan --out` and `analyze --out` swap a whole
set in, a kill between files leaves the old set intact, and a foreign file is never touched."""

import fcntl
import json
import os
import signal
from pathlib import Path

import pytest
from cli_calls import run_cli as run

from raretask.errors import UserError
from raretask.runs import outset
from raretask.runs.outset import MANIFEST, output_set

EXAMPLES = Path(__file__).parent.parent / "examples"




def snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".raretask-out."))


def old_set(out: Path) -> dict:
    with output_set(out, "plan", ["a.txt", "b.txt"]) as tmp:
        (tmp / "a.txt").write_text("old a")
        (tmp / "b.txt").write_text("old b")
    return snapshot(out)


def test_a_set_is_swapped_in_with_its_manifest(tmp_path):
    out = tmp_path / "p"
    before = old_set(out)
    assert json.loads(before[MANIFEST]) == {"command": "plan", "files": ["a.txt", "b.txt"]}
    with output_set(out, "plan", ["a.txt", "b.txt"]) as tmp:
        assert tmp.parent == out.parent and tmp.name.startswith(".raretask-out.p.")
        (tmp / "a.txt").write_text("new a")
    # the new set replaces the old one whole: b.txt, not written this time, is gone
    assert snapshot(out) == {MANIFEST: b'{\n "command": "plan",\n "files": [\n  "a.txt"\n ]\n}\n',
                             "a.txt": b"new a"}
    assert leftovers(out) == []


def test_an_error_between_files_leaves_the_old_set_intact(tmp_path):
    out = tmp_path / "p"
    before = old_set(out)
    with pytest.raises(RuntimeError, match="killed"), output_set(out, "plan", ["a.txt"]) as tmp:
        (tmp / "a.txt").write_text("new a")
        raise RuntimeError("killed between files")
    assert snapshot(out) == before and leftovers(out) == []


def test_a_write_error_names_the_file_under_out_not_the_build_directory(tmp_path, monkeypatch):
    """Disk full while the new set is built: the line names out/b.txt (where the user looks),
    not the hidden build directory that is gone when the line is read."""
    from raretask.runs import store

    out = tmp_path / "p"
    before = old_set(out)
    real = store.write_text

    def full(path, text):
        if Path(path).name == "b.txt":
            raise store.io_error(path, OSError(28, "No space left on device"))
        real(path, text)

    monkeypatch.setattr(store, "write_text", full)
    with pytest.raises(UserError) as exc, output_set(out, "plan", ["a.txt", "b.txt"]) as tmp:
        store.write_text(tmp / "a.txt", "new a")
        store.write_text(tmp / "b.txt", "new b")
    assert str(exc.value) == f"{out}/b.txt: cannot write (No space left on device)"
    assert snapshot(out) == before and leftovers(out) == []


def test_sigkill_between_files_leaves_the_old_set_and_the_next_run_sweeps(tmp_path):
    out = tmp_path / "p"
    before = old_set(out)
    pid = os.fork()
    if pid == 0:  # child: write one file of the new set, then die as a kill would
        try:
            with output_set(out, "plan", ["a.txt"]) as tmp:
                (tmp / "a.txt").write_text("new a")
                os.kill(os.getpid(), signal.SIGKILL)
        finally:
            os._exit(3)  # not reached
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert snapshot(out) == before
    assert len(leftovers(out)) == 1  # the dead build directory
    with output_set(out, "plan", ["a.txt"]) as tmp:
        (tmp / "a.txt").write_text("newer a")
    assert (out / "a.txt").read_text() == "newer a" and leftovers(out) == []


def test_fallback_two_renames_and_recovery_after_a_kill_between_them(tmp_path, monkeypatch):
    monkeypatch.setattr(outset, "_exchange", lambda a, b: False)  # a system without RENAME_EXCHANGE
    out = tmp_path / "p"
    before = old_set(out)
    # a kill after `out` went aside and before the new set came in
    aside = tmp_path / ".raretask-out.p.old.dead"
    os.rename(out, aside)
    build = tmp_path / ".raretask-out.p.0bad"
    build.mkdir()
    (build / "a.txt").write_text("half")
    with pytest.raises(RuntimeError), output_set(out, "plan", ["a.txt"]):
        raise RuntimeError("fails before swapping")
    assert snapshot(out) == before and leftovers(out) == []  # old set back, leftovers swept
    with output_set(out, "plan", ["a.txt"]) as tmp:
        (tmp / "a.txt").write_text("new a")
    assert (out / "a.txt").read_text() == "new a" and leftovers(out) == []


def test_a_live_build_directory_is_not_swept(tmp_path):
    out = tmp_path / "p"
    live = tmp_path / ".raretask-out.p.live"
    live.mkdir()
    (live / "a.txt").write_text("in flight")
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another process building its set
        old_set(out)
        assert (live / "a.txt").read_text() == "in flight"
    finally:
        os.close(fd)
    # a directory of another --out (its own prefix) is never looked at
    other = tmp_path / ".raretask-out.q.x"
    other.mkdir()
    old_set(out)
    assert other.exists() and not live.exists()


@pytest.mark.parametrize("foreign", ["notes.txt", ".editor-swap.x.tmp", ".plan.json.abc.tmp2"])
def test_plan_out_with_a_foreign_file_is_refused_untouched(tmp_path, capsys, foreign):
    out = tmp_path / "p"
    out.mkdir()
    (out / "plan.json").write_text("the user's own")
    (out / foreign).write_text("keep me")
    before = snapshot(out)
    code, stdout, err = run(capsys, "plan", str(EXAMPLES / "tasks.yaml"), "--size", "16",
                            "--out", str(out))
    assert code == 2 and stdout == ""
    assert err == (f"error: {out}: holds files raretask did not write ({foreign!r}); give "
                   "--out a new or empty directory\n")
    assert snapshot(out) == before and leftovers(out) == []


def test_plan_out_a_file_and_another_commands_set_are_refused(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    code, _, err = run(capsys, "plan", str(EXAMPLES / "tasks.yaml"), "--size", "16",
                       "--out", str(f))
    assert code == 2 and err == f"error: --out: {f} is a file, expected a directory\n"
    a = tmp_path / "a"
    with output_set(a, "analyze", ["analysis.json"]) as tmp:
        (tmp / "analysis.json").write_text("{}")
    code, _, err = run(capsys, "plan", str(EXAMPLES / "tasks.yaml"), "--size", "16",
                       "--out", str(a))
    assert code == 2 and err == (f"error: {a}: holds the output of `raretask analyze`; give "
                                 "`plan --out` a directory of its own\n")
    assert (a / "analysis.json").read_text() == "{}"


def analysis(tmp_path, capsys) -> Path:
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"task": t, "text": "a b " * (1 + i % 3)}) + "\n"
                            for i, t in enumerate("x" * 60 + "y" * 30 + "z" * 10)))
    assert run(capsys, "analyze", str(data), "--task-field", "task", "--out",
               str(tmp_path / "a"))[0] == 0
    return tmp_path / "a"


def test_plan_out_killed_between_exports_keeps_the_old_set(tmp_path, capsys, monkeypatch):
    out = tmp_path / "p"
    args = ("plan", str(analysis(tmp_path, capsys)), "--size", "16", "--alpha", "2",
            "--out", str(out))
    assert run(capsys, *args)[0] == 0
    before = snapshot(out)
    assert {"plan.json", "megatron.txt", "interleave.json", MANIFEST} <= set(before)

    from raretask.mixing import export

    real = export.store.write_text
    calls = []

    def dies_after_one(path, text):
        calls.append(path)
        if len(calls) > 1:
            raise KeyboardInterrupt  # as a Ctrl-C between two export files would
        real(path, text)

    monkeypatch.setattr(export.store, "write_text", dies_after_one)
    code, _, err = run(capsys, *args, "--margin", "2")
    assert code == 130 and len(calls) == 2  # the CLI's exit for an interrupt
    assert snapshot(out) == before and leftovers(out) == []


def test_plan_out_accepts_a_set_written_before_manifests(tmp_path, capsys):
    out = tmp_path / "p"
    out.mkdir()
    (out / "plan.json").write_text("{}")
    (out / "megatron.txt").write_text("1 x")
    (out / ".lock").write_text("")  # store.run_lock's, from an older raretask
    code, _, _ = run(capsys, "plan", str(EXAMPLES / "tasks.yaml"), "--size", "16",
                     "--out", str(out))
    assert code == 0 and json.loads((out / "plan.json").read_text())["tasks"]
    assert (out / MANIFEST).exists() and not (out / ".lock").exists()


def test_analyze_out_replaces_both_files_together(tmp_path, capsys, monkeypatch):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"task": t, "text": "a b"}) + "\n" for t in "xxxy"))
    out = tmp_path / "a"
    assert run(capsys, "analyze", str(data), "--task-field", "task", "--out", str(out))[0] == 0
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "analysis.json",
                                                     "rank_frequency.png"]
    before = snapshot(out)
    data.write_text("".join(json.dumps({"task": t, "text": "a b"}) + "\n" for t in "xxyyz"))
    from raretask.mixing import analyze as mod

    def broken_plot(*a, **k):
        raise UserError("plot: simulated failure")

    with monkeypatch.context() as m:
        m.setattr(mod, "rank_frequency_plot", broken_plot)
        code, _, err = run(capsys, "analyze", str(data), "--task-field", "task", "--out",
                           str(out))
    assert code == 2 and err == "error: plot: simulated failure\n"
    assert snapshot(out) == before and leftovers(out) == []
    assert run(capsys, "analyze", str(data), "--task-field", "task", "--out", str(out))[0] == 0
    assert json.loads((out / "analysis.json").read_text())["examples"] == 5


def test_report_out_is_one_file_replaced_whole(tmp_path, capsys):
    # report --out is a single self-contained HTML page written atomically: a set of one
    page = tmp_path / "report.html"
    page.write_text("<html>old report</html>")
    code, _, err = run(capsys, "report", str(tmp_path / "no-such-run"), "--out", str(page))
    assert code == 2 and err.count("\n") == 1
    assert page.read_text() == "<html>old report</html>"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
