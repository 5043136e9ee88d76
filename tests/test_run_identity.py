"""A run directory knows what it is (issue 23 items 2, 3): manifest.json holds the experiment,
the axis order, the cells and the sha256 of each result; a re-run that is another experiment is
refused in one line naming the first difference, whatever happened to config.yaml; a result
changed outside raretask is named by show, report and a re-run, and its group trains again."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from cli_calls import fails

from raretask.cli import main
from raretask.runs import manifest, store

# 3 groups of one cell each, 30 steps: a whole grid in about a second
TINY = {"name": "ident", "tasks": 2, "features": 2, "width": [1, 2], "seed": [0, 1],
        "steps": 30, "batch_size": 8, "lr": 0.01, "eval_points": 3,
        "profile": {"group_size": 2}}


def _config(path: Path, extra: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump({**TINY, **(extra or {})}, sort_keys=False))
    return path




def _runs(argv: list[str], capsys) -> str:
    """Runs a command that succeeds; returns its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(argv)
    cap = capsys.readouterr()
    assert exc.value.code == 0, cap.err
    return cap.err


def _tree(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name not in ("log.txt", ".lock")}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, one_thread_module):
    base = tmp_path_factory.mktemp("ident")
    cfg = _config(base / "tiny.yaml")
    out = base / "run"
    with pytest.raises(SystemExit) as exc:
        main(["run", str(cfg), "--out", str(out), "--quiet"])
    assert exc.value.code == 0
    return cfg, out


@pytest.fixture(scope="module")
def one_thread_module():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _copy(reference, tmp_path) -> tuple[Path, Path]:
    cfg, out = reference
    shutil.copytree(out, tmp_path / "run")
    return cfg, tmp_path / "run"


def test_the_manifest_records_identity_groups_and_every_result(reference):
    cfg, out = reference
    m = json.loads((out / "manifest.json").read_text())
    assert m["format"] == "raretask-run" and m["kind"] == "toy"
    assert m["axes"] == ["width", "seed"] and m["cells"] == 4
    assert m["experiment"]["width"] == [1, 2] and m["experiment"]["lr"] == 0.01
    assert m["groups"] == {"g0000": [0, 1], "g0001": [2, 3]}
    assert sorted(m["files"]) == [
        "cells.json", "config.yaml", "groups/g0000/metrics.parquet", "groups/g0000/summary.json",
        "groups/g0001/metrics.parquet", "groups/g0001/summary.json", "metrics.parquet",
        "summary.json"]
    for rel, digest in m["files"].items():  # each one the file's sha256
        assert store.file_sha256(out / rel) == digest, rel


def test_config_removed_and_another_set_is_refused(reference, tmp_path, capsys):
    """The issue's check: config.yaml gone, re-run with a different --set: refused, one line
    naming the field and both values; nothing in the directory changes."""
    cfg, out = _copy(reference, tmp_path)
    (out / "config.yaml").unlink()
    before = _tree(out)
    line = fails(["run", str(cfg), "--out", str(out), "--set", "lr=0.05", "--set", "steps=40",
                   "--quiet"], capsys)
    assert "holds another experiment (lr: 0.01 there, 0.05 now)" in line
    assert _tree(out) == before and not (out / "config.yaml").exists()


def test_config_edited_is_detected_and_written_again(reference, tmp_path, capsys):
    """An edited config.yaml is not taken as the experiment: the manifest is. A re-run of the
    recorded experiment warns, rewrites config.yaml and trains nothing."""
    cfg, out = _copy(reference, tmp_path)
    (out / "config.yaml").write_text("lr: 0.5\n")  # an edit that claims another lr
    err = _runs(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert err.strip() == (f"warning: {out / 'config.yaml'} was removed or changed outside "
                           "raretask; written again from manifest.json (the experiment matches)")
    assert yaml.safe_load((out / "config.yaml").read_text())["lr"] == 0.01
    assert (out / "log.txt").read_text().count("g0000: 2 cells") == 1  # not trained again
    line = fails(["run", str(cfg), "--out", str(out), "--set", "lr=0.5"], capsys)
    assert "(lr: 0.01 there, 0.5 now)" in line


def test_a_damaged_run_config_is_one_line_without_a_manifest(reference, tmp_path, capsys):
    """A run made before manifests: its config.yaml is the identity; damaged, it is one line
    (no traceback), nothing written."""
    cfg, out = _copy(reference, tmp_path)
    (out / "manifest.json").unlink()
    (out / "config.yaml").write_text("kind: toy\nwidth: [1, 2\n")
    before = _tree(out)
    line = fails(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert f"{out / 'config.yaml'}: unreadable (" in line and "use a new --out" in line
    assert _tree(out) == before


def test_results_without_any_identity_are_refused(reference, tmp_path, capsys):
    cfg, out = _copy(reference, tmp_path)
    (out / "manifest.json").unlink()
    (out / "config.yaml").unlink()
    line = fails(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert "holds results (cells.json) but no manifest.json or config.yaml" in line
    assert not (out / "manifest.json").exists()


def test_a_run_from_before_manifests_is_adopted(reference, tmp_path, capsys):
    """No manifest, config.yaml and cells.json matching: the run is adopted (its finished
    groups read once and hashed, not trained again)."""
    cfg, out = _copy(reference, tmp_path)
    (out / "manifest.json").unlink()
    _runs(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    m = manifest.read(out)
    assert m["files"]["groups/g0001/metrics.parquet"] == store.file_sha256(
        out / "groups/g0001/metrics.parquet")
    assert (out / "log.txt").read_text().count("g0001: 2 cells") == 1


def test_axes_in_another_order_are_another_numbering(reference, tmp_path, capsys):
    """The same values with the axes swapped number the cells differently: refused, not
    merged under the old cell ids."""
    cfg, out = _copy(reference, tmp_path)
    swapped = {k: v for k, v in TINY.items() if k not in ("width", "seed")}
    (tmp_path / "swapped.yaml").write_text(yaml.safe_dump(
        {**swapped, "seed": [0, 1], "width": [1, 2]}, sort_keys=False))
    line = fails(["run", str(tmp_path / "swapped.yaml"), "--out", str(out)], capsys)
    assert "axes (the order that numbers the cells): ['width', 'seed'] there, " \
           "['seed', 'width'] now" in line


def test_a_duplicate_axis_value_is_refused_before_anything(reference, tmp_path, capsys):
    cfg, out = _copy(reference, tmp_path)
    before = _tree(out)
    line = fails(["run", str(cfg), "--out", str(out), "--set", "width=[1,1,2]"], capsys)
    assert line.endswith("width: the value 1 appears twice in the axis (each value once)")
    assert _tree(out) == before
    line = fails(["run", str(cfg), "--out", str(tmp_path / "new"), "--set",
                   "lr=[0.01, 1.0e-2]"], capsys)
    assert "lr: the value 0.01 appears twice" in line
    assert not (tmp_path / "new").exists()
    # YAML reads 1e-2 (no dot) as a string the float field makes 0.01: the same value, twice
    # (it made 12 cells while manifest.json and config.yaml recorded one lr)
    for axis, value, same in (("lr=[0.01, 1e-2]", "'1e-2'", "0.01"),
                              ('width=[1, "1"]', "'1'", "1")):
        line = fails(["run", str(cfg), "--out", str(tmp_path / "new"), "--set", axis], capsys)
        name = axis.split("=")[0]
        assert line.endswith(f"{name}: the values {same} and {value} are one value ({same}) "
                             "twice in the axis (each value once)"), line
        assert not (tmp_path / "new").exists()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_one_flipped_byte_is_named_by_show_report_and_rerun(reference, tmp_path, capsys):
    """The issue's check: one flipped byte in a group parquet. show and report name the file
    (exit 2); a re-run names it, trains that group again (only it) and merges clean results,
    equal to the reference's."""
    cfg, out = _copy(reference, tmp_path)
    bad = out / "groups" / "g0001" / "metrics.parquet"
    _flip(bad)
    for argv in (["show", str(out)], ["report", str(out), "--out", str(tmp_path / "r.html")]):
        line = fails(argv, capsys)
        assert line == (f"error: {bad}: does not match the sha256 recorded in manifest.json "
                        "(changed outside raretask); re-run the grid: its group is trained again")
    assert not (tmp_path / "r.html").exists()
    err = _runs(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert err.strip() == (f"warning: {bad}: does not match the sha256 recorded in "
                           "manifest.json (changed outside raretask); group g0001 is trained "
                           "again")
    log = (out / "log.txt").read_text()
    assert log.count("g0001: 2 cells") == 2 and log.count("g0000: 2 cells") == 1
    ref = reference[1]
    for name in ("summary.json", "groups/g0001/summary.json"):
        assert json.loads((out / name).read_text()) == json.loads((ref / name).read_text())
    import pyarrow.parquet as pq

    assert pq.read_table(out / "metrics.parquet").equals(pq.read_table(ref / "metrics.parquet"))
    _runs(["show", str(out)], capsys)


@pytest.mark.parametrize("name, old, new", [("config.yaml", "lr: 0.01", "lr: 0.05"),
                                             ("cells.json", '"lr": 0.01', '"lr": 0.05')])
def test_report_refuses_an_edited_config_or_cells_copy(reference, tmp_path, capsys, name, old,
                                                      new):
    """report prints config.yaml and reads cells' settings from cells.json: an edited copy
    would label lr-0.01 results as lr 0.05. Named in one line; a re-run writes it again from
    manifest.json and the report is written."""
    cfg, out = _copy(reference, tmp_path)
    path = out / name
    path.write_text(path.read_text().replace(old, new))
    html = tmp_path / "r.html"
    line = fails(["report", str(out), "--out", str(html)], capsys)
    assert line == (f"error: {path}: does not match the sha256 recorded in manifest.json "
                    "(changed outside raretask); re-run the grid to write it again from "
                    "manifest.json")
    assert not html.exists()
    _runs(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert old in path.read_text() and new not in path.read_text()
    _runs(["report", str(out), "--out", str(html)], capsys)
    assert html.exists()


def test_a_truncated_parquet_of_a_run_before_manifests_reruns_its_group(reference, tmp_path,
                                                                      capsys):
    cfg, out = _copy(reference, tmp_path)
    (out / "manifest.json").unlink()
    bad = out / "groups" / "g0000" / "metrics.parquet"
    bad.write_bytes(bad.read_bytes()[:100])
    err = _runs(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert err.strip() == (f"warning: {bad}: unreadable (changed outside raretask); group "
                           "g0000 is trained again")
    assert json.loads((out / "summary.json").read_text()) == json.loads(
        (reference[1] / "summary.json").read_text())


def test_a_damaged_merged_table_is_named_and_merged_again(reference, tmp_path, capsys):
    cfg, out = _copy(reference, tmp_path)
    _flip(out / "metrics.parquet")
    line = fails(["show", str(out)], capsys)
    assert f"{out / 'metrics.parquet'}: does not match" in line and "merge it again" in line
    _runs(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert (out / "metrics.parquet").read_bytes() == (reference[1] / "metrics.parquet").read_bytes()


def test_a_damaged_manifest_is_one_line(reference, tmp_path, capsys):
    cfg, out = _copy(reference, tmp_path)
    (out / "manifest.json").write_text("{not json")
    before = _tree(out)
    line = fails(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    assert f"{out / 'manifest.json'}: unreadable (JSONDecodeError)" in line
    assert _tree(out) == before
    assert "manifest.json: unreadable" in fails(["show", str(out)], capsys)


def test_show_on_an_unfinished_run_says_how_many_cells_are_missing(reference, tmp_path,
                                                                   capsys):
    cfg, out = _copy(reference, tmp_path)
    (out / "groups" / "g0001" / "summary.json").unlink()  # as a killed run leaves it
    (out / "summary.json").unlink()
    (out / "metrics.parquet").unlink()
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["show", str(out)])
    cap = capsys.readouterr()
    assert exc.value.code == 0 and cap.err == ""
    assert "unfinished: 2 of 4 cells have no results yet; the table covers the 2 finished" in \
        " ".join(cap.out.split())
    with pytest.raises(SystemExit):
        main(["show", str(out), "--json"])
    cap = capsys.readouterr()
    assert len(json.loads(cap.out)) == 2 * 2  # two cells x two tasks
    assert cap.err.strip() == (f"{out}: unfinished: 2 of 4 cells have no results yet; the "
                               "table covers the 2 finished")


def test_the_recorded_config_numbers_the_cells_as_the_run_did(tmp_path, capsys):
    """Axes written seed before width: config.yaml keeps that order, so running it again is
    the same experiment (same cell ids), not a renumbered one."""
    cfg = tmp_path / "seed_first.yaml"
    cfg.write_text(yaml.safe_dump({**{k: v for k, v in TINY.items() if k != "width"},
                                   "seed": [0, 1], "width": [1, 2]}, sort_keys=False))
    out = tmp_path / "run"
    _runs(["run", str(cfg), "--out", str(out), "--quiet"], capsys)
    recorded = yaml.safe_load((out / "config.yaml").read_text())
    assert [k for k in recorded if k in ("seed", "width")] == ["seed", "width"]
    _runs(["run", str(out / "config.yaml"), "--out", str(out), "--quiet"], capsys)
    cells = json.loads((out / "cells.json").read_text())
    assert [(c["seed"], c["width"]) for c in cells] == [(0, 1), (0, 2), (1, 1), (1, 2)]
