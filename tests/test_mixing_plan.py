"""`raretask plan`: minimum KL under thresholds and caps, checked against scipy; infeasible plans
exit 2 naming the task and the constraint; exports read back."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_calls import run_cli as run
from scipy.optimize import minimize

from raretask.errors import UserError
from raretask.mixing.export import FORMATS, render
from raretask.mixing.plan import kl, make_plan, min_kl_weights
from raretask.mixing.thresholds import CalibratedThreshold, TheoryThreshold
from raretask.theory import TaskSet, Theory

EXAMPLES = Path(__file__).parent.parent / "examples"




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
    a, b = np.meshgrid(grid, grid, indexing="ij")  # every (a, b, 1 - a - b) of the grid at once
    mix = np.stack([a, b, 1 - a - b])
    ok = (lo[1] <= b) & (b <= hi[1]) & (mix[2] >= lo[2] - 1e-12)
    with np.errstate(divide="ignore", invalid="ignore"):  # 0 log 0 = 0, as kl has it
        terms = np.where(mix > 0, mix * np.log(mix / p[:, None, None]), 0.0)
    div = np.where(ok, terms.sum(0), np.inf)
    i, j = np.unravel_index(np.argmin(div), div.shape)
    assert div[i, j] == pytest.approx(kl(mix[:, i, j], p), abs=1e-12)  # the same divergence
    assert kl(q, p) <= div[i, j] + 1e-12
    assert q[:2] == pytest.approx([grid[i], grid[j]], abs=1e-3)
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
    # a task file has no token counts: the token loaders' formats are skipped and named
    # (their read-back, in tokens, is tests/test_mixing_export.py)
    assert sorted(plan["exports_skipped"]) == ["megatron.txt", "mosaicml.yaml", "olmo_core.yaml"]
    for fmt in FORMATS:
        assert (out / fmt).exists() == (fmt not in plan["exports_skipped"])
    assert parse_back(out) == pytest.approx(w, abs=1e-11)


def parse_back(out: Path) -> dict:
    """The example-unit formats' weights; asserts they agree and returns one copy."""
    got = []
    for name in ("weights.json", "weights.yaml"):
        text = (out / name).read_text()
        obj = json.loads(text) if name.endswith("json") else yaml.safe_load(text)
        got.append(obj["weights"])
    inter = json.loads((out / "interleave.json").read_text())
    got.append(dict(zip(inter["datasets"], inter["probabilities"], strict=True)))
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


# -- per-task constraints and keep_learned (issue 22, item 4) ----------------------------------
NAMES = ["a", "b", "c", "d"]
COUNTS = np.array([5000.0, 3000.0, 1500.0, 20.0])


def flat_plan(share=0.02, **kw):
    """A plan of four tasks against a flat threshold (``share`` at any size)."""
    thr = CalibratedThreshold(np.log10(share), 0.0)
    return make_plan(NAMES, COUNTS, thr, 1.0, available=COUNTS, **kw)


def binds(plan):
    return [(b["task"], b["constraint"], b["bound"]) for b in plan.binding]


def weights(plan):
    return np.array([t.weight for t in plan.tasks])


def test_max_fraction_caps_one_task_and_binds():
    plan = flat_plan(targets=["d"], max_fraction={"a": 0.4})
    q = weights(plan)
    # a at its cap, d at 2% x 1.5, b and c share the rest in their natural proportion 2:1
    assert q == pytest.approx([0.4, 0.38, 0.19, 0.03], abs=1e-12)
    assert plan.kl == pytest.approx(0.077535, abs=1e-6)
    assert binds(plan) == [("a", "max_fraction", "upper"), ("d", "margin", "lower")]
    assert [t.binding for t in plan.tasks] == ["max_fraction", None, None, "margin"]
    assert plan.tasks[0].max_fraction == 0.4 and plan.tasks[0].cap == 0.4
    ref = scipy_min_kl(COUNTS / COUNTS.sum(), np.array([0, 0, 0, 0.03]),
                       np.array([0.4, 1, 1, 1]))
    assert q == pytest.approx(ref, abs=2e-5)


def test_per_task_repetition_cap_overrides_the_global_one():
    plan = flat_plan(targets=["d"], max_epochs=20, max_epochs_for={"c": 0.5})
    q = weights(plan)
    assert q[2] == pytest.approx(0.5 * 1500 / 9520, abs=1e-12)  # half an epoch of c
    assert q == pytest.approx([0.557012, 0.334207, 0.078782, 0.03], abs=1e-6)
    assert binds(plan) == [("c", "max_epochs", "upper"), ("d", "margin", "lower")]
    assert [t.max_epochs for t in plan.tasks] == [20, 20, 0.5, 20]
    assert plan.constraints["max_epochs_for"] == {"c": 0.5}


def test_each_target_its_own_margin():
    plan = flat_plan(0.05, targets=["c", "d"], margin=2, margins={"c": 4})
    # c needs 5% x 4 (above its natural 15.8%), d 5% x 2; a and b keep their ratio 5:3
    assert weights(plan) == pytest.approx([0.4375, 0.2625, 0.2, 0.1], abs=1e-12)
    assert [t.margin for t in plan.tasks] == [None, None, 4.0, 2.0]
    assert binds(plan) == [("c", "margin", "lower"), ("d", "margin", "lower")]
    assert plan.kl == pytest.approx(0.306076, abs=1e-6)


def test_keep_learned_holds_what_the_natural_mix_learns():
    # at a 10% threshold a, b and c are learned; lifting d to 15% would take c to 13.4%
    free = flat_plan(0.1, targets=["d"])
    assert weights(free) == pytest.approx([0.447368, 0.268421, 0.134211, 0.15], abs=1e-6)
    kept = flat_plan(0.1, targets=["d"], keep_learned=True)
    assert kept.constraints["kept"] == ["a", "b", "c"]
    assert [t.kept for t in kept.tasks] == [True, True, True, False]
    # ... with keep_learned c keeps 10% x the margin (1.5 by default)
    assert weights(kept) == pytest.approx([0.4375, 0.2625, 0.15, 0.15], abs=1e-12)
    assert binds(kept) == [("c", "keep_learned", "lower"), ("d", "margin", "lower")]
    assert kept.kl == pytest.approx(0.504961, abs=1e-6)
    # a keep margin of 1.2 asks for 12%, which c keeps without help: nothing of it binds
    loose = flat_plan(0.1, targets=["d"], keep_learned=True, keep_margin=1.2)
    assert weights(loose) == pytest.approx(weights(free), abs=1e-15)
    assert binds(loose) == [("d", "margin", "lower")]


def test_keep_learned_on_the_fix_toy_loses_nothing():
    """The fix's setting: without keep_learned the plan lifts task 16 and drops task 9 below its
    Theorem 3 threshold; with it tasks 7-9 are held at 1.5 x theirs and all ten are learned."""
    ts, thr = toy()
    natural = Theory(ts).learned(16)
    assert np.flatnonzero(natural).tolist() == list(range(9))
    plain = make_plan(ts.names, ts.frequencies, thr, 16, targets=["16"], margin=1.5)
    assert plain.tasks[8].learned_natural and not plain.tasks[8].learned_planned
    plan = make_plan(ts.names, ts.frequencies, thr, 16, targets=["16"], margin=1.5,
                     keep_learned=True)
    q = weights(plan)
    th = Theory(TaskSet(ts.names, q, ts.spectra))
    assert np.flatnonzero(th.learned(16)).tolist() == [*range(9), 15]
    assert binds(plan) == [("7", "keep_learned", "lower"), ("8", "keep_learned", "lower"),
                           ("9", "keep_learned", "lower"), ("16", "margin", "lower")]
    for i in (6, 7, 8, 15):  # each at 1.5 x its threshold at the planned mix
        assert q[i] == pytest.approx(1.5 * th.required_frequency(i, 16), rel=1e-9)
    assert q[15] == pytest.approx(0.026945, abs=1e-6)
    assert plan.kl == pytest.approx(0.019146, abs=1e-6)
    free = [i for i in range(16) if i not in (6, 7, 8, 15)]
    ratio = q[free] / ts.frequencies[free]
    assert ratio == pytest.approx(np.full(len(free), ratio[0]), rel=1e-12)


@pytest.mark.parametrize("kw, message", [
    (dict(targets=["d"], max_fraction={"d": 0.01}),
     "task 'd': needs a share of 0.03 (required 0.02 x margin 1.5) but its maximum fraction is "
     "0.01; constraint: max_fraction vs margin (raise its --max-fraction)"),
    (dict(targets=["d"], max_fraction={"a": 0.2, "b": 0.2}, max_epochs_for={"c": 1, "d": 2}),
     "task 'a': the caps leave room for 0.5618 of the data (< 1; this one 0.2 by max_fraction); "
     "constraint: max_epochs + max_fraction (raise a cap, lower --budget or add data)"),
    (dict(share=0.1, targets=["d"], keep_learned=True, max_fraction={"c": 0.12}),
     "task 'c': is learned under the natural mix; keeping it needs a share of 0.15 (required "
     "0.1 x keep margin 1.5) but its maximum fraction is 0.12; constraint: max_fraction vs "
     "keep_learned (raise its --max-fraction)"),
    (dict(share=0.1, targets=["d"], keep_learned=True, max_epochs_for={"c": 0.8}),
     "task 'c': is learned under the natural mix; keeping it needs a share of 0.15 (required "
     "0.1 x keep margin 1.5) but its repetition cap allows 0.1261 (0.8 epochs x 1,500 examples "
     "/ budget 9,520); constraint: max_epochs vs keep_learned (raise --max-epochs, lower "
     "--budget or add data for this task)"),
    (dict(share=0.1, targets=["d"], keep_learned=True, margin=3),
     "task 'a': the targets and the 3 tasks kept learned together need 1.2 of the data (> 1; "
     "this one 0.3); constraint: thresholds + keep_learned (fewer targets, smaller margins, no "
     "--keep-learned or a larger model)"),
    (dict(share=0.5, targets=["d"], keep_learned=True, keep_margin=2.1),
     "task 'a': is learned under the natural mix; keeping it needs a share of 1.05 (required "
     "0.5 x keep margin 2.1) > 1 at size 1; constraint: keep_learned (a larger model or a "
     "smaller --keep-margin)"),
    (dict(targets=["d"], margins={"c": 2}), "--margin-for: task 'c' is not a target (add "
     "--target c)"),
    (dict(targets=["d"], margins={"d": 0.5}),
     "--margin-for: task 'd': expected a number >= 1, got 0.5"),
    (dict(targets=["d"], max_fraction={"zz": 0.2}),
     "--max-fraction: unknown task 'zz' (known: a, b, c, d)"),
    (dict(targets=["d"], max_fraction={"a": 1.2}),
     "--max-fraction: task 'a': expected a number > 0 and <= 1, got 1.2"),
    (dict(targets=["d"], max_epochs_for={"a": 0}),
     "--max-epochs-for: task 'a': expected a number > 0, got 0"),
    (dict(targets=["d"], keep_learned=True, keep_margin=0.9),
     "--keep-margin must be a number >= 1, got 0.9"),
])
def test_conflicting_constraints_fail_in_one_line(kw, message):
    with pytest.raises(UserError) as err:
        flat_plan(**kw)
    assert str(err.value) == message


def test_repetition_cap_per_task_needs_counts():
    thr = CalibratedThreshold(np.log10(0.02), 0.0)
    with pytest.raises(UserError, match=r"^--max-epochs-for: a repetition cap needs the data's "):
        make_plan(NAMES, COUNTS, thr, 1.0, targets=["d"], max_epochs_for={"a": 2})


def test_plan_json_records_constraints_and_binding(tmp_path, capsys):
    src = tmp_path / "tasks.csv"
    src.write_text("name,count,alpha,features\na,5000,2,8\nb,3000,2,8\nc,1500,2,8\nd,20,2,8\n")
    out = tmp_path / "plan"
    code, _, err = run(capsys, "plan", str(src), "--size", "4", "--target", "d", "--out",
                       str(out), "--keep-learned", "--max-fraction", "a=0.35",
                       "--max-epochs-for", "d=400", "--margin-for", "d=2")
    assert code == 0, err
    plan = json.loads((out / "plan.json").read_text())
    c = plan["constraints"]
    assert c["max_fraction"] == {"a": 0.35} and c["max_epochs_for"] == {"d": 400.0}
    assert c["margins"] == {"d": 2.0} and c["keep_learned"] and c["keep_margin"] == 1.5
    assert c["kept"] == ["a", "b", "c"]  # Theorem 3 at width 4 (8 features each)
    assert [(b["task"], b["constraint"], b["bound"]) for b in plan["binding"]] == [
        ("a", "max_fraction", "upper"), ("d", "margin", "lower")]
    w = {t["task"]: t["weight"] for t in plan["tasks"]}
    assert w == pytest.approx({"a": 0.35, "b": 0.302412, "c": 0.151206, "d": 0.196383},
                              abs=1e-6)
    assert all(t["learned_planned"] for t in plan["tasks"])
    from raretask.mixing.plan import Plan

    assert Plan.from_json(plan).binding == plan["binding"]  # plan.json reads back


@pytest.mark.parametrize("args, message", [
    (["--max-fraction", "a"], "error: --max-fraction: expected TASK=NUMBER, got 'a'\n"),
    (["--max-fraction", "a=x"], "error: --max-fraction: expected TASK=NUMBER, got 'a=x'\n"),
    (["--margin-for", "d=2", "--margin-for", "d=3"],
     "error: --margin-for: task 'd' given twice\n"),
])
def test_bad_per_task_options_exit_2(tmp_path, capsys, args, message):
    src = tmp_path / "tasks.csv"
    src.write_text("name,count,alpha,features\na,5000,2,8\nb,3000,2,8\nc,1500,2,8\nd,20,2,8\n")
    out = tmp_path / "plan"
    code, stdout, err = run(capsys, "plan", str(src), "--size", "4", "--target", "d", "--out",
                            str(out), *args)
    assert (code, stdout, err) == (2, "", message) and not out.exists()


def test_plan_files_without_the_constraint_fields_still_read():
    """plan.json written before issue 22 has no constraints, binding or per-task caps."""
    from raretask.mixing.plan import Plan

    data = flat_plan(targets=["d"], max_fraction={"a": 0.4}).to_json()
    new_task_fields = ("kept", "margin", "max_epochs", "max_fraction", "binding")
    old = {k: v for k, v in data.items() if k not in ("constraints", "binding")}
    old["tasks"] = [{k: v for k, v in t.items() if k not in new_task_fields}
                    for t in data["tasks"]]
    plan = Plan.from_json(old)
    assert plan.weights() == pytest.approx({"a": 0.4, "b": 0.38, "c": 0.19, "d": 0.03})
    assert plan.constraints == {} and plan.binding == []
    assert [t.binding for t in plan.tasks] == [None] * 4


def test_a_budget_beyond_2_to_the_53_is_refused_before_anything_is_written(tmp_path, capsys):
    """--budget 1e30 planned, then crashed in the Mosaic export (an int64 overflow) with --out
    (issue 22 review)."""
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"task": t, "text": "w w"}) + "\n" for t in "a" * 9 + "b"))
    assert run(capsys, "analyze", str(data), "--task-field", "task", "--out",
               str(tmp_path / "an"))[0] == 0
    src = tmp_path / "an" / "analysis.json"
    out = tmp_path / "plan"
    code, stdout, err = run(capsys, "plan", str(src), "--size", "16", "--budget", "1e30",
                            "--out", str(out))
    assert (code, stdout) == (2, "")
    assert err == "error: --budget must be a number > 0 and at most 9,007,199,254,740,992 " \
        "(2**53), got 1e+30\n"
    assert not out.exists()
    code, _, err = run(capsys, "plan", str(src), "--size", "16", "--budget", str(2**53),
                       "--out", str(out))
    assert code == 0, err
