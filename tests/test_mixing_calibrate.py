"""`raretask calibrate`: the toy's per-size thresholds agree with Theorem 3; LM rows fit exactly;
the CLI writes a law `plan` reads (tests/test_learnability.py tests the law itself)."""

import json

import numpy as np
import pytest

from raretask.cli import main
from raretask.config import load_experiment
from raretask.mixing.calibrate import calibrate_rows, load_calibration, threshold_point
from raretask.runs.grid import GridRun, load_summary

GRID = {"kind": "toy", "name": "cal", "tasks": 16, "features": 8, "alpha": 2.0, "beta": 1.0,
        "width": [4, 8, 16, 32], "seed": [0], "steps": 3000, "batch_size": 256, "lr": 3e-3,
        "eval_points": 5}


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("cal") / "run"
    GridRun(load_experiment(None, base=GRID), out).run()
    return out


def test_toy_calibration_agrees_with_theory(toy_run):
    kind, (curve,) = calibrate_rows(load_summary(toy_run))
    assert kind == "toy"
    assert [p.size for p in curve.points] == [4, 8, 16, 32]
    assert all(p.agrees for p in curve.points)  # measured and Theorem 3 brackets overlap
    used = [p for p in curve.points if p.threshold is not None]
    assert len(used) >= 3
    thr = [p.threshold for p in used]
    assert thr == sorted(thr, reverse=True)  # bigger models need less
    fit, theory = curve.fit, curve.theory_fit
    sd = np.sqrt(fit.cov[1][1])
    assert abs(fit.slope - theory.slope) < 3 * sd + 0.05
    for p in used:  # the fitted curve passes through every measured bracket
        assert p.low <= fit.at(p.size) * 1.1 and fit.at(p.size) / 1.1 <= p.high
        assert p.theory == pytest.approx(fit.at(p.size), rel=0.25)


def test_cli_writes_a_calibration_that_plan_uses(toy_run, tmp_path, capsys):
    cal = tmp_path / "cal.json"
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", str(toy_run), "--out", str(cal)])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "vs Theorem 3" in out and "leave one cell out" in out
    data = json.loads(cal.read_text())
    assert data["kind"] == "toy" and data["units"]["frequency"] == "share of samples"
    (law,) = load_calibration(cal).laws
    assert law.kind == "logistic" and law.slope()[0] < 0
    # the law's threshold at width 8 lies in the measured bracket of the per-size cut
    _, (curve,) = calibrate_rows(load_summary(toy_run))
    p8 = next(p for p in curve.points if p.size == 8)
    f8 = law.required_frequency(8, law.ranges.tokens[0])[0]
    assert p8.low <= f8 * 1.1 and f8 / 1.1 <= p8.high
    # plan reads it: every task needs the law's share at width 8 (at the grid's budget, where
    # the law was fitted)
    with pytest.raises(SystemExit) as exc:
        main(["plan", "examples/tasks.yaml", "--size", "8", "--calibration", str(cal), "--json",
              "--margin", "1", "--budget", str(law.ranges.tokens[0])])
    plan = json.loads(capsys.readouterr().out)
    assert exc.value.code == 0
    assert [t["required"] for t in plan["tasks"]] == [pytest.approx(f8, rel=1e-9)] * 5


def test_not_a_run_directory_exits_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["calibrate", str(tmp_path)])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "not a raretask run directory" in err


def test_threshold_point_brackets_and_censoring():
    f = np.array([0.1, 0.05, 0.02, 0.01, 0.1, 0.05, 0.02, 0.01])
    y = np.array([1, 1, 0, 0, 1, 0, 0, 0], bool)  # one seed misses 0.05
    p = threshold_point(8, f, y)
    # two cuts tie at one error each: the bracket spans both, so its uncertainty widens
    assert p.errors == 1 and (p.low, p.high) == (0.02, 0.1)
    assert p.threshold == pytest.approx(np.sqrt(0.002))
    assert threshold_point(8, f, np.ones(8, bool)).censored == "all learned"
    assert threshold_point(8, f, np.zeros(8, bool)).censored == "none learned"
    q = threshold_point(8, np.array([0.1, 0.01]), np.array([True, False]))
    assert q.threshold == pytest.approx(np.sqrt(0.001))


def test_lm_rows_fit_an_exact_power_law():
    rows = []
    for params, cut in ((1e6, 1e-3), (1e7, 1e-4), (1e8, 1e-5)):
        for f in (cut * 3, cut / 3):  # learned above the cut, not below
            rows.append({"kind": "lm", "cell": len(rows), "task": "cmp", "schedule": "spread",
                         "params": params, "frequency": f,
                         "test_accuracy": 0.99 if f > cut else 0.3})
    kind, (curve,) = calibrate_rows(rows, learned_accuracy=0.9)
    assert kind == "lm" and curve.theory_fit is None
    assert curve.fit.slope == pytest.approx(-1.0, abs=1e-6)
    assert curve.fit.at(1e7) == pytest.approx(1e-4, rel=1e-6)
