"""Verdicts of LM summary rows (raretask.lm.verdict): below T_CMP's format-only chance a cell is
flagged "format not learned", never just "not learned"; on the committed Fig. 5 run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raretask.lm.verdict import FORMAT_NOT_LEARNED, LEARNED_ACCURACY, lm_verdict

FIG5 = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fig5_lm_heatmap"


def row(acc, task="cmp", **kw):
    return {"task": task, "test_accuracy": acc, "chance_format": 0.5053 if task == "cmp" else 0.01,
            **kw}


def test_one_threshold_for_both_tasks_and_the_calibration():
    """learned = test accuracy >= 0.9 everywhere: show, the report, `raretask calibrate` (its
    default) and the LM fix share the constant."""
    import inspect

    from raretask.mixing import calibrate, fix_lm

    assert LEARNED_ACCURACY == 0.9
    assert fix_lm.LEARNED_ACCURACY is LEARNED_ACCURACY
    for f in (calibrate.calibrate_rows, calibrate.calibrate_runs):
        assert inspect.signature(f).parameters["learned_accuracy"].default is LEARNED_ACCURACY


@pytest.mark.parametrize(("acc", "verdict"), [
    (0.0, FORMAT_NOT_LEARNED), (0.4, FORMAT_NOT_LEARNED), (0.5052, FORMAT_NOT_LEARNED),
    (0.5053, "not learned"), (0.7527, "not learned"), (0.862, "not learned"),
    (0.8999, "not learned"), (0.9, "learned"), (1.0, "learned")])
def test_cmp_verdicts_at_the_edges(acc, verdict):
    assert lm_verdict(row(acc)) == verdict


@pytest.mark.parametrize(("acc", "verdict"), [
    (0.006, "not learned"), (0.505, "not learned"), (0.512, "not learned"),
    (0.57, "not learned"), (0.8999, "not learned"), (0.9, "learned"), (0.98, "learned")])
def test_add_is_never_flagged_below_its_symbol_chance_and_learns_at_0_9(acc, verdict):
    """A half-generalised T_ADD model (0.51, 0.57) has not learned the task: the halfway rule
    (0.505) that called it learned is gone."""
    assert lm_verdict(row(acc, "add")) == verdict


def test_diverged_and_missing():
    assert lm_verdict(row(0.9, diverged_step=40)) == "diverged"
    assert lm_verdict(row(None)) == "-" and lm_verdict({"task": "none"}) == "-"
    assert lm_verdict({"task": "cmp", "test_accuracy": 0.4}) == FORMAT_NOT_LEARNED  # 0.505
    assert lm_verdict({"task": "add", "test_accuracy": 0.57}) == "not learned"  # no chance given


def test_committed_fig5_run():
    rows = json.loads((FIG5 / "summary.json").read_text())
    verdicts = {(r["size"], r["task"], r["requested_frequency"]): lm_verdict(r) for r in rows}
    cmp_flagged = sorted((s, f) for (s, t, f), v in verdicts.items() if v == FORMAT_NOT_LEARNED)
    # tiny at a row in 4 and 8 (0.165, 0.001), 4m at a row in 8 (0.095); 20m's 0.559 at a row
    # in 8 is above the format and below 0.9: "not learned"
    assert cmp_flagged == [("4m", 1 / 1024), ("tiny", 1 / 1024), ("tiny", 1 / 512)]
    assert verdicts[("20m", "cmp", 1 / 1024)] == "not learned"
    # below 0.9, learned under the old halfway rule (0.753): tiny's 0.762 at a row in 2, 4m's
    # 0.897 at a row in 4
    assert verdicts[("tiny", "cmp", 1 / 256)] == "not learned"
    assert verdicts[("4m", "cmp", 1 / 512)] == "not learned"
    learned = sorted((s, f) for (s, t, f), v in verdicts.items() if v == "learned")
    assert learned == [("20m", 1 / 512), ("20m", 1 / 256), ("20m", 1 / 128), ("4m", 1 / 256),
                       ("4m", 1 / 128), ("tiny", 1 / 128)]
    assert {v for (_, t, _), v in verdicts.items() if t == "add"} == {"not learned"}


def test_show_marks_format_not_learned_cells_and_says_so():
    """`raretask show` flags the three cells below the format-only chance with a '*' on their
    task and explains the mark in the caption (the report renders the same table)."""
    from raretask.studies import study

    rows = json.loads((FIG5 / "summary.json").read_text())
    table = study("lm").table(rows, "fig5")
    marked = [(r[3], r[6]) for r in table.rows if r[3].endswith("*")]
    assert marked == [("cmp*", "0.165"), ("cmp*", "0.001"), ("cmp*", "0.095")]
    assert "task*: format not learned (accuracy below the format-only chance)" in table.caption


def test_the_threshold_loads_without_torch():
    """`raretask calibrate` and `plan` read the constant at start-up: importing it (and the
    calibration) must not load torch, which the package's model and trainer need."""
    import subprocess
    import sys

    code = ("import sys, raretask.cli, raretask.mixing.calibrate, raretask.lm.verdict; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
