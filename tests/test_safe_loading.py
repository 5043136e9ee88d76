"""Safe loading: weights only through safetensors or ``torch.load(weights_only=True)``, YAML only
through ``safe_load``, no code named in a config or a file runs, and no output path escapes the
output directory."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from cli_calls import fails

from raretask.cli import main

SRC = Path(__file__).resolve().parents[1] / "src" / "raretask"


def _sources() -> dict[Path, str]:
    return {p: p.read_text(encoding="utf-8") for p in SRC.rglob("*.py")}


def test_no_unsafe_loader_in_the_source():
    """Every loader call in src/ is a safe one (a regression guard: fails on a new unsafe call)."""
    problems = []
    for path, text in _sources().items():
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            if "weights_only=True" not in m.group(1):
                problems.append(f"{path.name}: torch.load without weights_only=True")
        for pat in (r"yaml\.load\(", r"yaml\.unsafe_load", r"yaml\.full_load", r"Loader\s*=",
                    r"pickle\.loads?\(", r"(?<![.\w])eval\(", r"(?<![.\w])exec\(", r"__import__\(",
                    r"marshal\.loads?\(", r"shelve\.open"):
            if re.search(pat, text):
                problems.append(f"{path.name}: {pat}")
        if "import_module(" in text and path != SRC / "studies" / "__init__.py":
            problems.append(f"{path.name}: import_module")
    assert problems == []
    # the one dynamic import maps a validated kind to a fixed table, never a user string
    registry = (SRC / "studies" / "__init__.py").read_text()
    assert "importlib.import_module(STUDIES[kind])" in registry
    assert "kind not in STUDIES:" in registry




def _tag(marker: Path) -> str:
    return f"!!python/object/apply:os.system ['touch {marker}']"


def test_yaml_python_tags_never_run(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(f"tasks: 4\nwidth: {_tag(marker)}\n")
    err = fails(["run", str(run_cfg), "--out", str(tmp_path / "o"), "--dry-run"], capsys)
    assert "could not determine a constructor" in err and str(run_cfg) in err
    tasks = tmp_path / "t.yaml"
    tasks.write_text(f"tasks:\n  - {{name: a, count: 1, alpha: 2, features: {_tag(marker)}}}\n")
    fails(["predict", "--task-file", str(tasks), "--width", "4"], capsys)
    fails(["plan", str(tasks), "--size", "4"], capsys)
    rules = tmp_path / "r.yaml"
    rules.write_text(f"rules: {_tag(marker)}\n")
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "x"}\n')
    fails(["analyze", str(data), "--rules", str(rules)], capsys)
    fix = tmp_path / "fix.yaml"
    fix.write_text(f"kind: fix_toy\nwidth: {_tag(marker)}\n")
    fails(["fix", str(fix), "--out", str(tmp_path / "f")], capsys)
    err = fails(["run", str(run_cfg.with_name("none.yaml")), "--out", "o", "--set",
                  f"width={_tag(marker)}"], capsys)
    assert "--set width: cannot read value" in err or "no such file" in err
    cfg = tmp_path / "ok.yaml"
    cfg.write_text("tasks: 4\n")
    err = fails(["run", str(cfg), "--out", "o", "--dry-run", "--set", f"width={_tag(marker)}"],
                 capsys)
    assert "--set width: cannot read value" in err
    assert not marker.exists()


def test_a_config_cannot_name_code(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("kind: os:system\n")
    assert "kind: unknown experiment kind 'os:system'" in fails(
        ["run", str(cfg), "--out", str(tmp_path / "o"), "--dry-run"], capsys)
    cfg.write_text("kind: raretask.config:ToyGrid\n")
    assert "unknown experiment kind" in fails(
        ["run", str(cfg), "--out", str(tmp_path / "o"), "--dry-run"], capsys)


@pytest.mark.parametrize("name", ["../../x", "a/b", "/abs", "..\\x", "x y"])
def test_names_with_path_parts_are_refused(name, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tasks: 4\n")
    err = fails(["run", str(cfg), "--out", str(tmp_path / "o"), "--set", f"name={name}"],
                 capsys)
    assert err.startswith("error: --set name: String should match pattern")
    assert not (tmp_path / "o").exists()


def test_every_file_lands_inside_the_output_directory(tmp_path, capsys, one_thread):
    """The name is never part of a path: even '..' (a legal name) writes only under --out."""
    root = tmp_path / "a" / "b"
    root.mkdir(parents=True)
    cfg = root / "c.yaml"
    cfg.write_text("name: '..'\ntasks: 3\nfeatures: 2\nwidth: [1, 2]\nsteps: 20\n"
                   "batch_size: 8\neval_points: 2\n")
    before = {p for p in tmp_path.rglob("*")}
    with pytest.raises(SystemExit) as exc:
        main(["run", str(cfg), "--out", str(root / "out"), "--quiet"])
    assert exc.value.code == 0
    with pytest.raises(SystemExit) as exc:
        main(["report", str(root / "out"), "--out", str(root / "out" / "report.html")])
    assert exc.value.code == 0
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p == root / "out" or (root / "out") in p.parents for p in new), new


class _Boom:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_PICKLE",))


def test_checkpoints_are_never_unpickled(tmp_path, capsys, monkeypatch, one_thread):
    """A toy checkpoint that is a pickle (or garbage) is refused with one line; so is an LM
    state.pt whose pickle names a function: nothing in either file runs."""
    monkeypatch.chdir(tmp_path)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("tasks: 3\nfeatures: 2\nwidth: 2\nsteps: 20\nbatch_size: 8\n"
                   "eval_points: 2\n")
    out = tmp_path / "out"
    from raretask.config import load_experiment
    from raretask.runs import checkpoint_dir
    from raretask.runs.grid import GridRun
    from raretask.studies.toy import ToyStudy

    def stop(*args, **kwargs):  # a real run directory, its group stopped before its results
        raise LookupError

    with monkeypatch.context() as mp:
        mp.setattr(ToyStudy, "results", stop)
        with pytest.raises(LookupError):
            GridRun(load_experiment(cfg), out, checkpoint_seconds=0).run()
    gdir = out / "groups" / "g0000"
    for payload in (pickle.dumps(_Boom()), b"\x00" * 7, b""):
        # a checkpoint directory whose manifest vouches for the payload (hashes match)
        checkpoint_dir.save(gdir, {"state.safetensors": payload})
        err = fails(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
        assert err == (f"error: {gdir / 'ckpt' / 'state.safetensors'}: unreadable checkpoint "
                       f"(SafetensorError); delete {gdir / 'ckpt'} to restart group g0000 from "
                       "step 0")
    checkpoint_dir.remove(gdir)
    ckpt = gdir / "checkpoint.safetensors"  # the single-file layout before checkpoint dirs
    for payload in (pickle.dumps(_Boom()), b"\x00" * 7, b""):
        ckpt.write_bytes(payload)
        err = fails(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
        assert err == (f"error: {ckpt}: unreadable checkpoint (SafetensorError); delete it to "
                       "restart group g0000 from step 0")
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    assert not (out / "summary.json").exists() and ckpt.read_bytes() == b""

    from raretask.errors import UserError
    from raretask.studies.lm import load_checkpoint

    weights, state = tmp_path / "model.safetensors", tmp_path / "state.pt"
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(weights))
    torch.save({"step": 3, "evil": _Boom()}, state)
    with pytest.raises(UserError, match="unreadable checkpoint \\(UnpicklingError\\)"):
        load_checkpoint(weights, state)
    assert not (tmp_path / "PWNED_BY_PICKLE").exists()
    torch.save({"step": 3}, state)  # a genuine one loads
    assert load_checkpoint(weights, state)["step"] == 3
