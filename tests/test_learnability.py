"""The learnability law (issue 20): fitted on the committed grids, checked on cells it never saw,
the toy's exponent against Theorem 3, unit conversion, and one test per invalid input."""

import json
from pathlib import Path

import numpy as np
import pytest

from raretask.cli import main
from raretask.errors import UserError
from raretask.mixing.calibrate import calibrate_runs, load_calibration
from raretask.mixing.learnability import Obs, contradictions, fit_law
from raretask.mixing.thresholds import LawThreshold

RES = Path(__file__).resolve().parents[1] / "benchmarks" / "results"
FIG5, FIG6, FIG9 = RES / "fig5_lm_heatmap", RES / "fig6_lm_schedule", RES / "fig9_lm_gradients"
PACK = RES / "lm_pack" / "packed"


def _cli(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def _obs(params, freq, learned, tokens=1e6, task="t", seed=0):
    return Obs(task, f"{params:g}", params, tokens, freq, "spread", seed, "syn",
               f"syn#{params}-{freq}-{seed}", float(learned), bool(learned))


# -- the law on synthetic data (an oracle) ------------------------------------------------------

def test_separable_grid_recovers_the_threshold_exponent():
    # learned exactly when f >= 1e-3 * (N / 1e6)^-1: a separable grid, so only the prior keeps
    # the slopes finite; the threshold's exponent and position are still recovered
    obs = []
    for n in (1e6, 2e6, 4e6, 8e6, 16e6):
        for f in np.geomspace(1e-5, 1e-2, 49):  # 16 per decade
            obs.append(_obs(n, f, f >= 1e-3 * (n / 1e6) ** -1))
    law = fit_law(obs)
    slope, lo, hi = law.slope()
    assert slope == pytest.approx(-0.984, abs=0.01) and lo < -1.0 < hi
    assert law.required_frequency(4e6, 1e6)[0] == pytest.approx(2.5e-4, rel=0.02)
    assert all(np.isfinite(law.coef))


def test_a_task_nothing_learned_is_a_bound_not_a_threshold():
    law = fit_law([_obs(1e6, f, False) for f in (1e-3, 1e-2)])
    assert law.kind == "bound" and law.coef is None and law.learned_cells == 0


def test_contradictions_flag_non_monotone_cells_not_replicates():
    obs = [_obs(1e6, 1e-3, True), _obs(2e6, 1e-3, False),  # bigger model, not learned
           _obs(1e6, 5e-4, True, seed=0), _obs(1e6, 5e-4, False, seed=1)]  # replicates
    (line,) = contradictions(obs)
    assert "1 cell(s) at size 2e+06 not learned" in line


# -- the committed LM grids --------------------------------------------------------------------

@pytest.fixture(scope="module")
def lm_all():
    return calibrate_runs([FIG5, FIG6, FIG9, PACK])


def test_committed_lm_law_pinned(lm_all):
    cmp = lm_all.law("cmp")
    assert (cmp.cells, cmp.learned_cells) == (51, 22)
    assert cmp.coef == pytest.approx([-0.4545, 5.9207, 18.7654, -4.8644], abs=2e-3)
    assert cmp.threshold_law() == "f* ∝ N^-0.316 · D^-0.741"
    f, lo, hi = cmp.required_frequency(4724928, 8192000)  # 4m, 1,000 steps
    assert (f, lo, hi) == pytest.approx((0.002159, 0.001832, 0.002601), rel=2e-3)
    scores = {s.scheme: s for s in lm_all.cross_validation if s.task == "cmp"}
    loco, loso = scores["leave one cell out"], scores["leave one size out: 4m"]
    assert (loco.right, loco.wrong, loco.band) == (48, 2, 1)
    assert (loso.right, loso.wrong, loso.band) == (14, 1, 4)  # the size between the others
    add = lm_all.law("add")
    assert add.kind == "bound" and add.best_score <= 0.007
    assert any("add: 0 of 12 cells learned" in w for w in lm_all.warnings)


def test_held_out_budgets_called_right(tmp_path):
    # fit on the 1,000-step grids only; predict 2x (fig9, bursts, 3 seeds) and 6x (lm_pack,
    # frequencies down to 4x below the fitted ones) the budget
    cal = calibrate_runs([FIG5, FIG6], holdout=[FIG9, PACK])
    (s,) = cal.holdout_scores
    assert (s.right, s.wrong, s.band) == (16, 1, 4) and s.accuracy >= 0.9
    cal = calibrate_runs([FIG5, FIG6, PACK], holdout=[FIG9])
    (s,) = cal.holdout_scores
    assert (s.right, s.wrong, s.band) == (9, 0, 0)


def test_predict_cli_on_cells_the_fit_never_saw(tmp_path, capsys):
    """The issue's check: calibrate, then `predict --json` per held-out cell."""
    from raretask.runs.grid import load_summary

    cal = tmp_path / "cal.json"
    code, _, _ = _cli(["calibrate", FIG5, FIG6, FIG9, "--out", cal], capsys)
    assert code == 0
    right = total = 0
    for r in load_summary(PACK):
        code, out, _ = _cli(["predict", "--calibration", cal, "--task", "cmp", "--size", r["size"],
                             "--tokens", r["tokens"], "--frequency", r["frequency"], "--json"],
                            capsys)
        obj = json.loads(out)
        assert code == 0 and obj["params"] == r["params"]
        assert obj["extrapolated"] is True  # 50M tokens: beyond the fitted budgets
        if 0.4 <= obj["learned_probability"] <= 0.6:
            continue
        total += 1
        right += obj["learned"] == (r["test_accuracy"] >= 0.9)
    assert (right, total) == (11, 11)


def test_predict_json_shape_and_required_frequency(capsys):
    cal = RES / "lm_calibration.json"
    code, out, _ = _cli(["predict", "--calibration", cal, "--task", "cmp", "--size", "60m",
                         "--tokens", "5e8", "--frequency", "0.002", "--json"], capsys)
    obj = json.loads(out)
    assert code == 0 and list(obj) == [
        "task", "size", "params", "tokens", "frequency", "learned_probability", "learned",
        "required_frequency", "required_frequency_interval", "extrapolated"]
    assert obj["size"] == "60m" and obj["learned"] is True and obj["extrapolated"] is True
    code, out, _ = _cli(["predict", "--calibration", cal, "--task", "cmp", "--size", "4724928",
                         "--tokens", "8192000", "--json"], capsys)
    obj = json.loads(out)
    assert obj["learned_probability"] is None and obj["learned"] is None
    assert obj["required_frequency"] == pytest.approx(0.002159, rel=2e-3)
    assert obj["extrapolated"] is False
    lo, hi = obj["required_frequency_interval"]
    assert lo < obj["required_frequency"] < hi


def test_predict_text_warns_in_one_line_when_extrapolated(capsys):
    code, out, _ = _cli(["predict", "--calibration", RES / "lm_calibration.json", "--task",
                         "cmp", "--size", "1b", "--tokens", "1e9", "--frequency", "1e-4"], capsys)
    warn = [line for line in out.splitlines() if line.startswith("warning: extrapolated")]
    assert code == 0 and len(warn) == 1 and "size 1.07e+09 outside the fitted" in warn[0]


def test_predict_add_reports_the_bound(capsys):
    code, out, _ = _cli(["predict", "--calibration", RES / "lm_calibration.json", "--task",
                         "add", "--size", "4m", "--tokens", "8192000", "--frequency", "0.004",
                         "--json"], capsys)
    obj = json.loads(out)
    assert obj["learned"] is False and obj["learned_probability"] is None
    assert obj["required_frequency"] is None
    assert obj["required_frequency_interval"] == [0.0078125, None]  # more than it ever saw


# -- the toy: the exponent against Theorem 3 ---------------------------------------------------

def test_toy_fig2_exponent_against_theorem_3():
    cal = calibrate_runs([RES / "fig2_phase"])
    th = {t["task"]: t for t in cal.theory}
    b2 = th["toy-k32-m32-alpha2-beta2"]
    assert b2["agrees"] is False and b2["widths_disagreeing"] == [512.0]
    assert b2["slope"] == pytest.approx(-1.010, abs=0.01)
    assert any("size 512 not learned" in w for w in cal.warnings)  # said, not hidden
    assert any("does not contain Theorem 3's -1.90" in w for w in cal.warnings)
    assert th["toy-k32-m32-alpha2-beta1.5"]["agrees"] is True
    cal = calibrate_runs([RES / "fig2_phase"], exclude_sizes=["512"])
    b2 = {t["task"]: t for t in cal.theory}["toy-k32-m32-alpha2-beta2"]
    lo, hi = b2["slope_interval"]
    assert b2["agrees"] is True and lo < b2["theory_slope"] < hi
    assert b2["theory_slope"] == pytest.approx(-1.532, abs=0.01)


# -- units: plan converts the law's instances per token ----------------------------------------

def test_law_threshold_converts_to_token_and_example_shares(lm_all):
    law = lm_all.law("cmp")
    f = law.required_frequency(4724928, 8192000)[0]
    tpe = [100.0, 10.0]
    tok = LawThreshold(law, 4, "tokens", 8192000, tpe)
    assert tok.required(np.array([0.9, 0.1]), 4724928) == pytest.approx([f * 100, f * 10])
    ex = LawThreshold(law, 4, "examples", 8192000, tpe)
    mean = 0.5 * 100 + 0.5 * 10  # the mix's tokens per example
    assert ex.required(np.array([0.5, 0.5]), 4724928) == pytest.approx([f * mean] * 2)


def test_law_threshold_refuses_without_tokens_per_example(lm_all):
    with pytest.raises(UserError, match="instances per token; converting it to shares of "
                       "examples needs each task's tokens per example"):
        LawThreshold(lm_all.law("cmp"), 4, "examples", 1e7, None)


def test_plan_with_a_calibration_warns_when_extrapolated(tmp_path, capsys):
    rows = [{"task": t, "text": " ".join(["w"] * n)} for t, k, n in
            [("chat", 900, 50), ("arith", 1, 8)] for _ in range(k)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    code, _, _ = _cli(["analyze", data, "--task-field", "task", "--out", tmp_path / "a"], capsys)
    assert code == 0
    code, out, _ = _cli(["plan", tmp_path / "a", "--size", "4724928", "--target", "arith",
                         "--calibration", RES / "lm_calibration.json", "--budget", "2e7",
                         "--unit", "tokens", "--json"], capsys)
    obj = json.loads(out)
    arith = next(t for t in obj["tasks"] if t["task"] == "arith")
    # 8 tokens per example: the token share needed is 8x the law's instances per token
    f = load_calibration(RES / "lm_calibration.json").law("cmp").required_frequency(
        4724928, 2e7)[0]
    assert code == 0 and arith["required"] == pytest.approx(8 * f, rel=1e-9)
    assert any(x.startswith("natural mix needs") for x in obj["extrapolated"])


# -- invalid inputs: exit 2, one line ----------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["--task", "mul", "--size", "4m", "--tokens", "1e7"],
     "--task: unknown task 'mul' (calibrated: add, cmp)"),
    (["--task", "cmp", "--size", "5m", "--tokens", "1e7"], "--size: unknown size '5m' (presets:"),
    (["--task", "cmp", "--size", "-3", "--tokens", "1e7"], "--size: expected a number > 0"),
    (["--task", "cmp", "--size", "4m"], "--tokens: required; the calibration saw budgets"),
    (["--task", "cmp", "--size", "4m", "--tokens", "0"], "--tokens: expected a number > 0"),
    (["--task", "cmp", "--size", "4m", "--tokens", "1e7", "--frequency", "2"],
     "--frequency: expected a rate in (0, 1]"),
    (["--task", "cmp", "--tokens", "1e7"], "--size: required with --calibration"),
    (["--size", "4m", "--tokens", "1e7", "--width", "8"], "--width: a theory option"),
])
def test_predict_invalid_inputs(args, message, capsys):
    code, out, err = _cli(["predict", "--calibration", RES / "lm_calibration.json", *args],
                          capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err


def test_predict_theory_needs_width(capsys):
    code, _, err = _cli(["predict", "--tasks", "4"], capsys)
    assert code == 2 and "--width: required" in err
    code, _, err = _cli(["predict", "--width", "8", "--size", "4m"], capsys)
    assert code == 2 and "--size: needs --calibration" in err


@pytest.mark.parametrize("content, message", [
    ("{not json", "not JSON"),
    ('{"kind": "lm", "curves": []}', "not a calibration file written by raretask calibrate"),
    ('{"format": "raretask-calibration-2", "kind": "lm"}', "sources: Field required"),
])
def test_malformed_calibration_file(content, message, tmp_path, capsys):
    bad = tmp_path / "cal.json"
    bad.write_text(content)
    code, out, err = _cli(["predict", "--calibration", bad, "--size", "4m", "--tokens", "1e7"],
                          capsys)
    assert code == 2 and out == "" and err.count("\n") == 1 and message in err


def test_calibration_with_a_broken_law_is_refused(tmp_path, capsys):
    data = json.loads((RES / "lm_calibration.json").read_text())
    data["laws"][1]["coef"] = [1.0, 2.0]
    bad = tmp_path / "cal.json"
    bad.write_text(json.dumps(data))
    code, _, err = _cli(["predict", "--calibration", bad, "--size", "4m", "--tokens", "1e7"],
                        capsys)
    assert code == 2 and "laws.1: Value error, coef (4), center (3) and cov (4x4)" in err


def test_calibrate_invalid_inputs(tmp_path, capsys):
    code, _, err = _cli(["calibrate", FIG5, "--exclude-size", "7m", "--out", tmp_path / "c"],
                        capsys)
    assert code == 2 and "--exclude-size: '7m' is not a size of these grids" in err
    code, _, err = _cli(["calibrate", FIG5, RES / "fig2_phase", "--out", tmp_path / "c"], capsys)
    assert code == 2 and "mix toy and LM grids" in err
    code, _, err = _cli(["calibrate", RES / "fig5_lm_heatmap_partial", "--out", tmp_path / "c"],
                        capsys)
    assert code == 2 and "the run has no finished cells" in err
    code, _, err = _cli(["calibrate", FIG5, "--prior-sd", "0", "--out", tmp_path / "c"], capsys)
    assert code == 2 and "--prior-sd must be a number > 0" in err
    assert not (tmp_path / "c").exists()


def test_report_tables_of_a_held_out_calibration():
    from raretask.report.calibration import calibration_tables

    cal = load_calibration(RES / "lm_calibration_heldout_1k.json")
    acc, laws, held = calibration_tables(cal)
    row = next(r for r in acc["rows"] if r[1].startswith("held out"))
    assert row[0] == "cmp" and row[2:5] == ["16/17", "94%", "4"]
    assert len(held["rows"]) == 21 and [r[-1] for r in held["rows"]].count("wrong") == 1
