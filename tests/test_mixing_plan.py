"""`raretask plan`: minimum KL under thresholds and caps, checked against scipy; infeasible plans
exit 2 naming the task and the constraint; exports read back."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy.optimize import minimize

from raretask.cli import main
from raretask.errors import UserError
from raretask.mixing.export import FORMATS, render
from raretask.mixing.plan import kl, make_plan, min_kl_weights
from raretask.mixing.thresholds import CalibratedThreshold, TheoryThreshold
from raretask.theory import TaskSet, Theory

EXAMPLES = Path(__file__).parent.parent / "examples"


def run(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def scipy_min_kl(p, lo, hi):
    cons = [{"type": "eq", "fun": lambda q: q.sum() - 1}]
    res = minimize(lambda q: kl(np.maximum(q, 1e-300), p), x0=np.clip(p, lo, hi),
                   bounds=list(zip(lo, hi, strict=True)), constraints=cons, method="SLSQP",
                   options={"ftol": 1e-15, "maxiter": 1000})
    return res.x


@pytest.mark.parametrize("seed", range(8))
def test_closed_form_is_the_kl_minimum(seed):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(3, 9))
    p = rng.dirichlet(np.ones(k) * 0.7)
    lo = np.where(rng.random(k) < 0.4, rng.uniform(0, 0.25, k), 0.0)
    hi = np.where(rng.random(k) < 0.4, rng.uniform(0.05, 0.6, k), 1.0)
    hi = np.maximum(hi, lo)
    if lo.sum() > 1 or hi.sum() < 1:
        pytest.skip("random bounds infeasible")
    q = min_kl_weights(p, lo, hi)
    assert q.sum() == pytest.approx(1, abs=1e-12)
    assert np.all(q >= lo - 1e-15) and np.all(q <= hi + 1e-15)
    ref = scipy_min_kl(p, lo, hi)
    assert kl(q, p) <= kl(ref, p) + 1e-9
    assert q == pytest.approx(ref, abs=2e-5)


def test_brute_force_on_three_tasks():
    p = np.array([0.7, 0.25, 0.05])
    lo, hi = np.array([0, 0, 0.2]), np.array([1, 0.2, 1])
    q = min_kl_weights(p, lo, hi)
    grid = np.linspace(0, 1, 2001)
    best = min((kl(np.array([a, b, 1 - a - b]), p), a, b) for a in grid for b in grid
               if lo[1] <= b <= hi[1] and 1 - a - b >= lo[2] - 1e-12)
    assert kl(q, p) <= best[0] + 1e-12
    assert q[:2] == pytest.approx([best[1], best[2]], abs=1e-3)
    # task 2 sits on its floor, task 1 on its cap (scaled it would be 0.8 * 0.25 / 0.95 > 0.2),
    # and the one free task takes the rest
    assert q == pytest.approx([0.6, 0.2, 0.2], abs=1e-12)


def toy():
    ts = TaskSet.power_law(16, 16, alpha=2.0, beta=1.5)
    return ts, TheoryThreshold(ts.names, spectra=ts.spectra)


def test_theory_plan_lifts_the_target_at_minimum_kl():
    ts, thr = toy()
    plan = make_plan(ts.names, ts.frequencies, thr, 16, targets=["16"], margin=1.5)
    q = np.array([t.weight for t in plan.tasks])
    th = Theory(TaskSet(ts.names, q, ts.spectra))
    assert not Theory(ts).learned(16)[15] and th.learned(16)[15]
    # the threshold at the final weights, times the margin, is met exactly (it binds)
    assert q[15] == pytest.approx(1.5 * th.required_frequency(15, 16), rel=1e-9)
    # every other task is scaled by one common factor (the KKT solution)
    ratio = q[:15] / ts.frequencies[:15]
    assert ratio == pytest.approx(np.full(15, ratio[0]), rel=1e-12)
    assert plan.kl == pytest.approx(kl(q, ts.frequencies))
    # pinned numbers of the fix's setting
    assert plan.tasks[15].natural == pytest.approx(0.007370, abs=1e-6)
    assert plan.tasks[15].weight == pytest.approx(0.02594, abs=1e-5)
    assert plan.kl == pytest.approx(0.014250, abs=1e-6)
    assert plan.natural_size_minimum == Theory(ts).first_feature_width()[15] == 31
    assert plan.natural_size_needed == 37
    th37 = Theory(ts)
    assert 1.5 * th37.required_frequency(15, 37) <= ts.frequencies[15] < \
        1.5 * th37.required_frequency(15, 36)


def test_caps_hold_and_bind():
    names = ["a", "b", "c", "d"]
    thr = CalibratedThreshold(np.log10(0.02), 0.0)  # 2% at any size
    counts = np.array([5000.0, 3000.0, 1500.0, 20.0])
    plan = make_plan(names, counts, thr, 1.0, targets=["d"], margin=1.5, available=counts,
                     budget=9520.0, max_epochs=20.0)
    q = np.array([t.weight for t in plan.tasks])
    assert np.all(q <= np.minimum(1, 20.0 * counts / 9520.0) + 1e-15)
    assert q[3] == pytest.approx(0.03)  # 2% x 1.5, the floor binds
    # shares measured in one unit, data available in another (e.g. token shares, example
    # counts): the caps of tasks a and c fall below their natural shares and bind
    natural = np.array([0.5, 0.3, 0.18, 0.02])
    avail = np.array([4000.0, 3000.0, 1000.0, 500.0])
    plan2 = make_plan(names, natural, thr, 1.0, targets=["d"], margin=1.5, available=avail,
                      budget=8500.0, max_epochs=1.0)
    q2 = np.array([t.weight for t in plan2.tasks])
    caps = avail / 8500.0
    assert q2[0] == pytest.approx(caps[0]) and q2[2] == pytest.approx(caps[2])
    assert np.all(q2 <= caps + 1e-15) and q2[3] >= 0.03 - 1e-15
    ref = scipy_min_kl(natural, np.array([0, 0, 0, 0.03]), caps)
    assert kl(q2, natural) <= kl(ref, natural) + 1e-9
    assert q2 == pytest.approx(ref, abs=2e-5)


@pytest.mark.parametrize("args, task, constraint", [
    (["--max-epochs", "1"], "d", "constraint: max_epochs"),
    (["--budget", "1e9", "--max-epochs", "2"], "a", "constraint: budget"),
    (["--margin", "40"], "d", "constraint: threshold"),
    (["--target", "c", "--target", "d", "--margin", "6"], "d", "constraint: thresholds"),
])
def test_infeasible_plans_exit_2_with_one_line(tmp_path, capsys, args, task, constraint):
    src = tmp_path / "tasks.csv"
    src.write_text("name,count,alpha,features\na,5000,2,8\nb,3000,2,8\nc,1500,2,8\nd,20,2,8\n")
    out = tmp_path / "plan"
    base = ["plan", str(src), "--size", "4", "--out", str(out)]
    if "--target" not in args:
        base += ["--target", "d"]
    code, stdout, err = run(capsys, *base, *args)
    assert code == 2 and stdout == "" and err.count("\n") == 1
    assert err.startswith(f"error: task '{task}':") and constraint in err
    assert not out.exists()


def test_unknown_target_and_size_too_small(capsys, tmp_path):
    src = tmp_path / "tasks.csv"
    src.write_text("name,count,alpha,features\na,5000,2,8\nb,3000,2,8\nc,30,2,8\nd,20,2,8\n")
    code, _, err = run(capsys, "plan", str(src), "--size", "4", "--target", "zz")
    assert code == 2 and "--target: unknown task 'zz'" in err
    # four targets cannot all hold a feature of a width-3 model, whatever the shares
    code, _, err = run(capsys, "plan", str(src), "--size", "3", "--margin", "1")
    assert code == 2 and err.startswith("error: task 'c': not learned at size 3")
    assert "constraint: size" in err


def test_plan_cli_writes_plan_and_every_export(tmp_path, capsys):
    out = tmp_path / "p"
    code, stdout, _ = run(capsys, "plan", str(EXAMPLES / "tasks.yaml"), "--size", "16",
                          "--out", str(out), "--path-template", "/data/{task}")
    assert code == 0 and "KL" in stdout
    plan = json.loads((out / "plan.json").read_text())
    w = {t["task"]: t["weight"] for t in plan["tasks"]}
    assert sum(w.values()) == pytest.approx(1)
    for fmt in FORMATS:
        assert (out / fmt).exists()
    assert parse_back(out) == pytest.approx(w, abs=1e-11)


def parse_back(out: Path) -> dict:
    """Every format's weights; asserts they agree and returns one copy."""
    got = []
    for name in ("weights.json", "weights.yaml"):
        text = (out / name).read_text()
        obj = json.loads(text) if name.endswith("json") else yaml.safe_load(text)
        got.append(obj["weights"])
    inter = json.loads((out / "interleave.json").read_text())
    got.append(dict(zip(inter["datasets"], inter["probabilities"], strict=True)))
    olmo = yaml.safe_load((out / "olmo_core.yaml").read_text())["source_mixture"]
    got.append({s["source_name"]: s["target_ratio"] for s in olmo["source_configs"]})
    assert all(s["paths"] == [f"/data/{s['source_name']}"] for s in olmo["source_configs"])
    parts = (out / "megatron.txt").read_text().split()
    got.append({p.removeprefix("/data/"): float(w) for w, p in zip(parts[::2], parts[1::2],
                                                                    strict=True)})
    mosaic = yaml.safe_load((out / "mosaicml.yaml").read_text())["streams"]
    got.append({k: v["proportion"] for k, v in mosaic.items()})
    for g in got[1:]:
        assert g == pytest.approx(got[0], abs=1e-11)
    return got[0]


def test_export_bad_template_writes_nothing(tmp_path, capsys):
    out = tmp_path / "p"
    code, _, err = run(capsys, "plan", str(EXAMPLES / "tasks.yaml"), "--size", "16", "--out",
                       str(out), "--path-template", "/data/x")
    assert code == 2 and "--path-template" in err and not out.exists()


def test_render_unknown_format():
    ts, thr = toy()
    plan = make_plan(ts.names, ts.frequencies, thr, 16, targets=["16"])
    with pytest.raises(UserError, match="unknown 'csv'"):
        render(plan, "csv")
    assert render(plan, "olmo_core.yaml").count("max_repetition_ratio: 1.0") == 16


def test_plan_out_refuses_a_directory_another_process_writes(tmp_path, capsys):
    from raretask.runs import store

    out = tmp_path / "p"
    with store.run_lock(out):  # what a concurrent `plan`/`analyze`/`fix --out` holds
        code, stdout, err = run(capsys, "plan", str(EXAMPLES / "tasks.yaml"), "--size", "16",
                                "--out", str(out))
    assert code == 2 and stdout == ""
    assert err == f"error: {out}: another raretask process is running in this directory\n"
    assert sorted(p.name for p in out.iterdir()) == [".lock"]  # nothing of the plan written
    code, _, _ = run(capsys, "plan", str(EXAMPLES / "tasks.yaml"), "--size", "16", "--out",
                     str(out))
    assert code == 0 and (out / "plan.json").exists()
