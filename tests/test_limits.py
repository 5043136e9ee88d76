"""Limits and refusals checked before anything is written (issue 23 items 5, 6, 8): each is one
line naming the field (and the limit), exit code 2, and the run directory untouched."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml
from cli_calls import fails

from raretask import limits
from raretask.config import ToyCell, load_experiment, load_task_file
from raretask.errors import UserError

TINY = {"name": "limits", "tasks": 2, "features": 2, "width": [1, 2], "steps": 20,
        "batch_size": 8, "eval_points": 2}


def _config(path: Path, data: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump(TINY if data is None else data, sort_keys=False))
    return path




@pytest.fixture
def cfg(tmp_path) -> Path:
    return _config(tmp_path / "tiny.yaml")


# -- grid size -------------------------------------------------------------------------------


@pytest.mark.parametrize("dry_run", [False, True])
def test_a_grid_of_1e11_cells_is_refused_without_making_cells(tmp_path, capsys, dry_run):
    """The issue's 7-list-axis config (a 1.7 KB file, 4.2e11 cells): refused from the axes'
    lengths alone, also with --dry-run, before the directory exists."""
    axes = {"width": list(range(1, 41)), "seed": list(range(100)),
            "lr": [0.001 * (i + 1) for i in range(40)], "beta": [1 + 0.01 * i for i in range(40)],
            "alpha": [1 + 0.01 * i for i in range(40)], "eval_points": list(range(2, 42)),
            "batch_size": list(range(1, 42))}
    path = _config(tmp_path / "big.yaml", {"tasks": 8, "features": 8, **axes})
    out = tmp_path / "out"
    line = fails(["run", str(path), "--out", str(out)] + ["--dry-run"] * dry_run, capsys)
    assert line == (f"error: {path}: grid: 7 list axes make 419,840,000,000 cells (width 40 x "
                    "seed 100 x lr 40 x beta 40 x alpha 40 x eval_points 40 x batch_size 41), "
                    "more than the limit of 100,000 cells in one grid")
    assert not out.exists()


def test_the_grid_limit_is_inclusive(tmp_path):
    assert limits.check_grid_size({"seed": list(range(1000)), "lr": list(range(100))}, "c") \
        == limits.MAX_CELLS
    with pytest.raises(UserError, match="100,100 cells"):
        limits.check_grid_size({"seed": list(range(1001)), "lr": list(range(100))}, "c")


# -- YAML depth and size ---------------------------------------------------------------------


def test_yaml_nested_1000_deep_is_one_line(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("width: " + "[" * 1000 + "]" * 1000 + "\n")
    line = fails(["run", str(path), "--out", str(tmp_path / "out")], capsys)
    assert line == (f"error: {path}: nested deeper than the limit of 32 levels of mappings "
                    "and lists")
    assert not (tmp_path / "out").exists()


def test_yaml_depth_limit_names_the_key_and_counts_aliases(tmp_path, capsys):
    path = tmp_path / "deep.yaml"
    path.write_text("tasks: 2\nwidth: " + "[" * 32 + "]" * 32 + "\n")
    assert "width: nested deeper than the limit of 32" in fails(
        ["run", str(path), "--out", str(tmp_path / "o")], capsys)
    # each alias only 1 deeper than the last, 40 in a chain: 40 levels in all
    chain = "x0: &x0 [1]\n" + "".join(f"x{i}: &x{i} [*x{i - 1}]\n" for i in range(1, 40))
    path.write_text(chain)
    assert "x31: nested deeper than the limit of 32" in fails(
        ["run", str(path), "--out", str(tmp_path / "o")], capsys)
    path.write_text("tasks: &a [*a]\n")
    assert "tasks: refers to itself" in fails(["run", str(path), "--out", str(tmp_path / "o")],
                                               capsys)
    line = fails(["run", str(_config(tmp_path / "t.yaml")), "--out", str(tmp_path / "o"),
                   "--set", "width=" + "[" * 40 + "]" * 40], capsys)
    assert "--set width: nested deeper than the limit of 32" in line
    assert not (tmp_path / "o").exists()


def test_a_config_over_1_mib_is_refused_before_reading(tmp_path, capsys):
    path = tmp_path / "huge.yaml"
    path.write_text("tasks: 2\n#" + "x" * (1 << 20) + "\n")
    line = fails(["run", str(path), "--out", str(tmp_path / "o")], capsys)
    assert line == (f"error: {path}: {path.stat().st_size:,} bytes, more than the limit of "
                    "1,048,576 bytes for a config file")


# -- values that validate but cannot be allocated ------------------------------------------


def test_a_batch_that_cannot_fit_names_batch_size(cfg, tmp_path, capsys):
    out = tmp_path / "out"
    line = fails(["run", str(cfg), "--out", str(out), "--set", "batch_size=1048576",
                   "--set", "tasks=4096", "--set", "features=64", "--set", "width=4"], capsys)
    assert line.startswith("error: config: batch_size: group g0000 (1 cell) needs about ")
    assert "TB of memory, more than the " in line and line.endswith("(the limit); lower "
                                                                    "batch_size")
    assert not out.exists()


def test_a_burst_that_cannot_fit_names_every(cfg, tmp_path, capsys):
    out = tmp_path / "out"
    line = fails(["run", str(cfg), "--out", str(out), "--set", "delivery=burst", "--set",
                   "every=1000000000", "--set", "steps=1000000000", "--set", "rate=0.5",
                   "--set", "tasks=64", "--set", "features=64", "--set", "width=4",
                   "--set", "batch_size=1024"], capsys)
    assert line.startswith("error: config: every: group g0000 (1 cell) needs about ")
    assert not out.exists()


def test_a_burst_that_never_comes_allocates_nothing():
    cell = ToyCell(tasks=2, features=2, width=2, batch_size=8, delivery="burst", every=1000,
                   rate=0.5, steps=999)
    assert cell.memory_parts()["every"] == 0
    cell = ToyCell(tasks=2, features=2, width=2, batch_size=8, delivery="burst", every=1000,
                   rate=0.5, steps=1000)
    assert cell.memory_parts()["every"] == round(1000 * 8 * 0.5) * 4 * 3 * 4


def test_memory_parts_of_a_small_cell():
    """Pinned from the trainer's buffers (tasks 2, features 2: d = 4; batch 8; width 2)."""
    parts = ToyCell(tasks=2, features=2, width=2, batch_size=8, steps=100,
                    trace_every=10).memory_parts()
    assert parts == {"batch_size": 8 * (8 * (8 + 6 * 4) + 4 * (16 + 12)),  # 2944
                     "features": 4 * 4 * 4, "width": 4 * 2 * 4 * 2 * 4,
                     "rate": 0, "trace_every": 11 * 208}


def test_a_group_that_fits_only_cell_by_cell_names_group_size():
    cells = [ToyCell(tasks=2, features=2, width=2, batch_size=8, seed=s) for s in range(4)]
    one = sum(cells[0].memory_parts().values())
    limits.check_group_memory([("g0000", cells)], "cpu", memory=4 * one)  # fits exactly
    with pytest.raises(UserError) as err:
        limits.check_group_memory([("g0000", cells)], "cpu", memory=4 * one - 1)
    assert str(err.value).startswith("config: profile.group_size: group g0000 (4 cells) needs")
    with pytest.raises(UserError, match="config: batch_size: group g0000"):
        limits.check_group_memory([("g0000", cells[:1])], "cpu", memory=one - 1)


def test_the_device_memory_is_known():
    n, what = limits.device_memory("cpu")
    assert n > 1 << 28 and what == "this machine's memory"


def test_a_trace_too_long_names_trace_every(cfg, tmp_path, capsys):
    line = fails(["run", str(cfg), "--out", str(tmp_path / "o"), "--set", "trace_every=1",
                   "--set", "steps=1000000000"], capsys)
    assert line == ("error: --set trace_every: steps 1,000,000,000 / trace_every 1 = "
                    "1,000,000,001 trace points per cell, more than the limit of 1,000,000")
    assert not (tmp_path / "o").exists()


# -- silently accepted before ---------------------------------------------------------------


@pytest.mark.parametrize(("override", "field"), [("width=true", "width"), ("steps=true", "steps"),
                                                 ("lr=false", "lr"), ("width=[2,true]", "width"),
                                                 ("profile.group_size=true", "group_size")])
def test_booleans_are_not_numbers(cfg, tmp_path, capsys, override, field):
    line = fails(["run", str(cfg), "--out", str(tmp_path / "o"), "--set", override], capsys)
    assert f"{field}: expected " in line and "got a boolean" in line
    assert not (tmp_path / "o").exists()


def test_numbers_stay_lenient_where_yaml_needs_it(tmp_path):
    """A YAML int is a float field's value, and YAML 1.1's string '1e-3' still reads as a
    number: only booleans are refused."""
    grid = load_experiment(_config(tmp_path / "c.yaml", {**TINY, "lr": 1, "alpha": "1e-1"}))
    cell = next(grid.cells())
    assert cell.lr == 1.0 and cell.alpha == 0.1


def test_a_task_file_with_a_boolean_frequency_is_refused(tmp_path):
    path = tmp_path / "tasks.yaml"
    path.write_text("tasks:\n- {name: a, frequency: true, alpha: 1, features: 2}\n")
    with pytest.raises(UserError, match=r"tasks\.0: frequency: expected a number, got a "
                                        r"boolean \(True\)"):
        load_task_file(path)


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_config_is_an_error(tmp_path, capsys, text):
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    line = fails(["run", str(path), "--out", str(tmp_path / "o")], capsys)
    assert line == f"error: {path}: empty config: give the experiment's fields (see the " \
                   "shipped configs/ for examples)"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("value", ["nan", "-5", "inf"])
def test_checkpoint_seconds_must_be_finite_and_not_negative(cfg, tmp_path, capsys, value):
    line = fails(["run", str(cfg), "--out", str(tmp_path / "o"), "--checkpoint-seconds",
                   value], capsys)
    assert line == ("error: --checkpoint-seconds: expected a finite number of seconds >= 0, "
                    f"got {float(value):g}")
    assert not (tmp_path / "o").exists()


def test_kind_is_not_an_axis(cfg, tmp_path, capsys):
    line = fails(["run", str(cfg), "--out", str(tmp_path / "o"), "--set", "kind=[toy,lm]"],
                  capsys)
    assert "kind: unknown experiment kind ['toy', 'lm']" in line


# -- predict's problem size ------------------------------------------------------------------


def test_predict_refuses_a_problem_over_its_limit_at_once(capsys):
    line = fails(["predict", "--tasks", "1000", "--features", "1000", "--width", "100"], capsys)
    assert line == ("error: tasks x features: 1,000 tasks x 1,000,000 features in all = "
                    "1,000,000,000, more than the limit of 10,000,000 (about 10 s); predict "
                    "fewer tasks or features")


def test_predict_below_its_limit_still_answers():
    from raretask.predict import predict
    from raretask.theory import TaskSet

    report = predict(TaskSet.power_law(32, 32, alpha=2, beta=1.5), width=64)
    assert report.frequent_tasks == 6 and report.rows[-1].first_feature_width == 70
    assert math.isclose(sum(r.frequency for r in report.rows), 1.0)


def test_an_lm_batch_that_cannot_fit_names_batch_size(tmp_path, capsys):
    path = _config(tmp_path / "lm.yaml", {"kind": "lm", "size": "tiny", "task": "none",
                                          "steps": 2})
    line = fails(["run", str(path), "--out", str(tmp_path / "o"), "--set", "batch_size=65536",
                   "--set", "seq_len=2048", "--set", "vocab_size=65536"], capsys)
    assert line.startswith("error: config: batch_size: group g0000 (1 cell) needs about ")
    assert "TB of memory" in line and not (tmp_path / "o").exists()


def test_lm_memory_parts_pin_the_weights_and_the_batch():
    from raretask.lm.config import LMCell
    from raretask.lm.model import ModelConfig

    cell = LMCell(size="tiny", task="none", batch_size=4, seq_len=16, vocab_size=512)
    model = ModelConfig.preset("tiny", vocab_size=512)
    assert cell.memory_parts() == {"size": 16 * model.num_params(),
                                   "batch_size": 64 * (8 * 512 + 16 * 64 * 2)}
