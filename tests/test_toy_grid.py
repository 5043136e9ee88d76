"""`raretask run` / `show` / resume / demo: the toy study end to end on CPU."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from rich.console import Console

from raretask.config import load_experiment
from raretask.runs.grid import GridRun, load_summary

TINY = ["tasks=4", "features=4", "width=[2,4,8]", "seed=[0,1]", "beta=1.5", "steps=1500",
        "batch_size=64", "lr=0.01", "eval_points=12", "profile.group_size=2"]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "raretask", *args], capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    path.write_text("\n".join(s.replace("=", ": ", 1) for s in TINY if "." not in s.split("=")[0])
                    + "\nname: tiny\nprofile: {group_size: 2}\n")
    return path


@pytest.fixture(scope="module")
def reference(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    GridRun(load_experiment(tiny_config), out).run()
    return out


def test_run_writes_the_documented_files(reference):
    for name in ("config.yaml", "cells.json", "log.txt", "metrics.parquet", "summary.json"):
        assert (reference / name).exists(), name
    groups = sorted(p.name for p in (reference / "groups").iterdir())
    assert groups == ["g0000", "g0001", "g0002"]  # 6 cells, group_size 2
    assert not list(reference.glob("groups/*/ckpt*"))  # removed when done
    import pyarrow.parquet as pq

    m = pq.read_table(reference / "metrics.parquet")
    assert set(m.column_names) == {"cell", "step", "task", "metric", "value"}
    assert set(m.column("cell").to_pylist()) == set(range(6))


def test_show_json_rows_and_theory_agreement(reference):
    res = cli("show", str(reference), "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)
    assert len(rows) == 6 * 4
    need = {"width", "beta", "alpha", "seed", "task", "frequency", "signal", "loss", "learned",
            "predicted_learned"}
    assert need <= set(rows[0])
    for r in rows:
        assert r["learned"] == (r["signal"] >= 0.3)
        assert 0.0 <= r["loss"] <= 1.2
    # "loss" is each task's normalised loss, the model's own loss is "model_loss"
    for cell in {r["cell"] for r in rows}:
        mine = [r for r in rows if r["cell"] == cell]
        assert len({r["loss"] for r in mine}) == len(mine)
        assert len({r["model_loss"] for r in mine}) == 1 and mine[0]["model_loss"] > 0
    # K = 4 tasks with 4 features: theory is clear away from the boundary
    assert sum(r["agree"] for r in rows) / len(rows) >= 0.9
    table = cli("show", str(reference))
    assert table.returncode == 0 and "Agreement over all" in table.stdout


def test_archived_run_without_group_files_still_shows(reference, tmp_path):
    """A finished run copied without groups/ (merged files only) reads the same rows."""
    import shutil

    from raretask.runs.grid import load_summary

    archived = tmp_path / "archived"
    shutil.copytree(reference, archived, ignore=shutil.ignore_patterns("groups"))
    assert load_summary(archived) == load_summary(reference)
    assert len(load_summary(archived)) == 6 * 4


@pytest.mark.slow  # make test: test_reliability's toy kill sample (exact kill points)
def test_kill_and_resume_gives_identical_results(tiny_config, reference, tmp_path):
    out = tmp_path / "run"
    args = [sys.executable, "-m", "raretask", "run", str(tiny_config), "--out", str(out),
            "--checkpoint-seconds", "0", "--quiet"]
    kills = 0
    for target in ("g0000", "g0001"):  # kill inside two different groups
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        ckpt = out / "groups" / target / "ckpt"
        deadline = time.time() + 120
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            kills += 1
        proc.wait()
    assert kills >= 1
    res = cli("run", str(tiny_config), "--out", str(out), "--quiet")
    assert res.returncode == 0, res.stderr
    assert load_summary(out) == load_summary(reference)
    log = (out / "log.txt").read_text()
    assert "resumed from step" in log
    # a finished group is never trained again
    for g in ("g0000", "g0001", "g0002"):
        assert log.count(f"{g}: 2 cells, steps") == 1, log
    assert cli("show", str(out), "--json").stdout == cli("show", str(reference), "--json").stdout


def test_rerun_of_a_finished_grid_does_nothing(reference):
    before = (reference / "summary.json").read_bytes()
    GridRun(load_experiment(reference / "config.yaml"), reference).run()
    assert (reference / "summary.json").read_bytes() == before
    assert (reference / "log.txt").read_text().count("g0000: 2 cells") == 1


def test_another_experiment_in_the_same_directory_is_refused(tiny_config, reference):
    res = cli("run", str(tiny_config), "--out", str(reference), "--set", "lr=0.02")
    assert res.returncode == 2 and res.stdout == ""
    assert "holds another experiment (lr: 0.01 there, 0.02 now)" in res.stderr


@pytest.mark.slow  # old run folders (make test-slow)
def test_a_run_from_before_a_field_existed_resumes(tiny_config, tmp_path):
    """A run directory whose config.yaml predates a field (here basis) is the same experiment
    when the field is at its default, and another one when it is not; execution settings that
    an older config.yaml still holds (tf32, device, group_size) are never compared."""
    out = tmp_path / "old"
    assert cli("run", str(tiny_config), "--out", str(out), "--quiet").returncode == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    del cfg["basis"]
    cfg.update(tf32=False, device="cuda", group_size=7)  # as configs before the profile held
    (out / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert cli("run", str(tiny_config), "--out", str(out), "--quiet").returncode == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["basis"] == "random"  # recorded
    res = cli("run", str(tiny_config), "--out", str(out), "--set", "basis=identity")
    assert res.returncode == 2
    assert "holds another experiment (basis: 'random' there, 'identity' now)" in res.stderr


def test_a_directory_resumes_under_another_profile(reference, tiny_config, tmp_path):
    """Started with groups of 2 and one profile, resumed with another group size and an
    explicit retraction: the recorded groups are kept, only the unfinished one runs, and the
    rows equal the uninterrupted reference's (CPU). A device change is logged as a warning."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "groups" / "g0001" / "summary.json").unlink()
    (out / "summary.json").unlink()
    prof = yaml.safe_load((out / "profile.yaml").read_text())
    assert prof["device"] == "cpu" and prof["retraction"] == "qr"  # CPU defaults
    (out / "profile.yaml").write_text(yaml.safe_dump({**prof, "device": "cuda:0"}))
    res = cli("run", str(tiny_config), "--out", str(out), "--quiet", "--set",
              "profile.group_size=5", "--set", "profile.retraction=qr")
    assert res.returncode == 0, res.stderr
    assert res.stderr.strip() == (f"warning: {out} was run on cuda:0 and resumes on cpu; its "
                                  "numbers may differ from a run on either alone")
    assert sorted(p.name for p in (out / "groups").iterdir()) == ["g0000", "g0001", "g0002"]
    assert json.loads((out / "summary.json").read_text()) == \
        json.loads((reference / "summary.json").read_text())
    assert yaml.safe_load((out / "profile.yaml").read_text())["group_size"] == 5


def test_a_finished_grid_revisited_elsewhere_changes_nothing(reference, tiny_config, tmp_path):
    """A finished grid run again on another device trains nothing: no device warning, its
    profile.yaml still names the device that trained it, the merged tables keep their bytes
    (and so the hashes the manifest recorded)."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    prof = yaml.safe_load((out / "profile.yaml").read_text())
    (out / "profile.yaml").write_text(yaml.safe_dump({**prof, "device": "cuda:0"}))
    before = {n: (out / n).read_bytes() for n in ("profile.yaml", "metrics.parquet",
                                                  "summary.json", "manifest.json")}
    res = cli("run", str(tiny_config), "--out", str(out), "--quiet")
    assert res.returncode == 0 and res.stderr == "", res.stderr
    assert {n: (out / n).read_bytes() for n in before} == before
    assert "0 groups to run" in (out / "log.txt").read_text().splitlines()[-2]


@pytest.mark.parametrize(
    ("override", "message"),
    [("wdth=3", "wdth: unknown key"), ("width=-1", "width: Input should be greater than or "
     "equal to 1"), ("beta=[]", "beta: list is empty")],
)
def test_bad_config_exits_2_with_one_line(tiny_config, tmp_path, override, message):
    res = cli("run", str(tiny_config), "--out", str(tmp_path / "x"), "--set", override)
    assert res.returncode == 2 and res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]
    assert not (tmp_path / "x").exists()  # nothing written


def test_dry_run_prints_the_resolved_config(tiny_config):
    res = cli("run", str(tiny_config), "--out", "unused", "--dry-run", "--set", "lr=1e-2")
    assert res.returncode == 0
    import yaml

    cfg = yaml.safe_load(res.stdout)
    assert cfg["lr"] == 0.01 and cfg["width"] == [2, 4, 8] and cfg["learned_threshold"] == 0.3


def test_show_on_a_non_run_directory(tmp_path):
    res = cli("show", str(tmp_path))
    assert res.returncode == 2 and "not a raretask run directory" in res.stderr


@pytest.mark.slow  # 96 s on 2 cores: the whole demo (make demo runs it; its parts are tested alone)
def test_demo_meets_the_issue_checks(tmp_path):
    from raretask.cli import _GridProgress
    from raretask.demo import run_demo

    console = Console(file=open(os.devnull, "w"))  # noqa: SIM115
    res = run_demo(tmp_path / "demo", console, lambda: _GridProgress(True))
    assert res["agreement"] >= 0.9
    narrow = [c for c in res["injection"] if c.width == 16]
    wide = [c for c in res["injection"] if c.width == 128]
    assert narrow and wide
    d = 16 * 16
    for c in narrow:  # rises at each injection, back at the floor (nothing kept) before the next
        assert c.rise > 0.01
        assert c.trough == pytest.approx(-16 / (d - 16), abs=0.01)
        assert abs(c.last_trough - c.first_trough) < 0.01
    for c in wide:  # what an injection leaves accumulates
        assert c.last_trough > c.first_trough + 0.3
        assert c.final > 0.1
    for f in res["figures"]:
        assert f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(res["figures"]) == 2


def test_stop_ends_the_rare_task_and_the_trace_shows_what_follows(tmp_path):
    """`stop:` ends the injections: the wide model that learns the rare task while it arrives
    (evenly: matched, gap 1) loses it once it stops, while the same model without a stop keeps
    learning it. The trace after the stop is what a retention experiment reads."""
    import pyarrow.parquet as pq

    grid = load_experiment(None, ["name=stop", "tasks=4", "features=4", "beta=1.5", "width=12",
                                  "delivery=even", "stop=[300,null]", "steps=1200",
                                  "batch_size=64", "lr=0.01", "eval_points=6", "trace_every=50"])
    GridRun(grid, tmp_path / "run").run()
    trace: dict[int, dict[int, float]] = {}
    for r in pq.read_table(tmp_path / "run" / "groups" / "g0000" / "traces.parquet").to_pylist():
        trace.setdefault(r["cell"], {})[r["step"]] = r["rare_signal"]
    stopped, kept = trace[0], trace[1]
    assert stopped[300] == kept[300] > 0.1  # the same run until the stop
    assert stopped[350] < stopped[300] - 0.2 and stopped[1200] < -2  # gone after it
    assert kept[1200] > 0.3  # learned when it keeps arriving
    rows = {r["cell"]: r for r in load_summary(tmp_path / "run") if r["rare"]}
    assert not rows[0]["learned"] and rows[1]["learned"]
    res = cli("run", "--set", "delivery=iid", "--out", str(tmp_path / "x"),
              str(tmp_path / "run" / "config.yaml"))
    assert res.returncode == 2 and not (tmp_path / "x").exists()
    assert res.stderr.strip().endswith("stop: start and stop need a delivery that injects "
                                       "the rare task (even or burst)")


def test_rate_sets_the_rare_share_and_keeps_the_others_in_proportion(tmp_path):
    """`rate:` gives the rare task that share of the samples, the others keep their natural
    proportions: the rows' frequencies say so, Theorem 3 is asked about that mix, and the
    realised share of the trained samples is the rate."""
    import numpy as np

    from raretask.studies.toy import task_set

    grid = load_experiment(None, ["name=rate", "tasks=4", "features=4", "beta=1.5", "width=4",
                                  "rate=[null,0.2]", "steps=300", "batch_size=64",
                                  "eval_points=3"])
    GridRun(grid, tmp_path / "run").run()
    rows = load_summary(tmp_path / "run")
    natural = task_set(list(grid.cells())[0]).frequencies
    got = {c: np.array([r["frequency"] for r in rows if r["cell"] == c]) for c in (0, 1)}
    assert np.array_equal(got[0], natural)
    assert got[1][3] == pytest.approx(0.2)
    assert got[1][:3] / got[1][:3].sum() == pytest.approx(natural[:3] / natural[:3].sum())
    import pyarrow.parquet as pq

    m = pq.read_table(tmp_path / "run" / "metrics.parquet").to_pydict()
    seen = {(c, t): v for c, s, t, k, v in zip(m["cell"], m["step"], m["task"], m["metric"],
                                                m["value"], strict=True)
            if k == "seen" and s == 300}
    share = seen[(1, 3)] / sum(seen[(1, t)] for t in range(4))
    assert share == pytest.approx(0.2, abs=0.01)


def test_only_trains_the_selected_groups_and_a_full_run_finishes_the_same_grid(
        tiny_config, reference, tmp_path):
    """``--only width=8``: the groups holding width-8 cells, nothing merged; the run without it
    trains the rest and merges a grid equal to the one-shot run's."""
    out = tmp_path / "run"
    res = cli("run", str(tiny_config), "--out", str(out), "--only", "width=8")
    assert res.returncode == 0, res.stderr
    assert "done: 2 of 6 cells (--only)" in " ".join(res.stdout.split())
    cells = json.loads((out / "cells.json").read_text())
    done = {r["cell"] for r in load_summary(out)}
    assert done == {c["cell"] for c in cells if c["width"] == 8}
    assert not (out / "summary.json").exists() and not (out / "metrics.parquet").exists()
    log = (out / "log.txt").read_text()
    assert "1 groups to run (--only; 2 other groups unfinished)" in log
    assert "2 groups of 3 left for a run without --only" in log
    shown = cli("show", str(out))
    assert shown.returncode == 0 and "unfinished: 4 of 6 cells" in " ".join(shown.stdout.split())
    from raretask.report.analysis import load_metrics

    assert len(load_metrics(out)["cell"]) == 0  # nothing merged yet ...
    assert set(load_metrics(out, partial=True)["cell"].tolist()) == done  # ... but these done
    res = cli("run", str(tiny_config), "--out", str(out))
    assert res.returncode == 0, res.stderr
    assert (json.loads((out / "summary.json").read_text())
            == json.loads((reference / "summary.json").read_text()))


@pytest.mark.parametrize(("only", "message"), [
    ("widht=8", "error: --only widht: not a cell field"),
    ("width=[3,5]", "error: --only width=[3,5]: no cell of the grid matches"),
])
def test_only_refuses_what_selects_nothing(tiny_config, tmp_path, only, message):
    res = cli("run", str(tiny_config), "--out", str(tmp_path / "run"), "--only", only)
    assert res.returncode == 2 and res.stderr.strip().splitlines()[-1] == message
    assert not (tmp_path / "run").exists()
