"""The fix proved on the toy: the planned small model learns the rare task the natural-mix small
model misses; bursts at the same frequency do not; the bigger model does, at more compute."""

import pytest

from raretask.cli import main
from raretask.demo import builtin_config
from raretask.mixing.fix import toy_fix_results


@pytest.fixture(scope="module")
def demo_fix(tmp_path_factory):
    """The demo's fix grid run by `raretask fix` (an ordinary toy grid with an arm axis)."""
    import torch

    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("fix") / "run"
    with pytest.raises(SystemExit) as exc:
        main(["fix", str(builtin_config("demo_fix.yaml")), "--out", str(out), "--quiet"])
    assert exc.value.code == 0
    cfg, plan, arms = toy_fix_results(out)
    return cfg, plan, {a.arm: a for a in arms}, out


def test_plan_learns_what_the_natural_mix_misses(demo_fix):
    cfg, plan, arms, _ = demo_fix
    thr = cfg.learned_threshold
    assert arms["natural"].rare_signal < 0.05  # nothing of the rare task kept
    assert arms["plan"].rare_signal > thr + 0.2 and arms["plan"].rare_learned == "1/1"
    assert arms["even"].rare_signal > thr + 0.2
    assert arms["big"].rare_signal > thr and arms["big"].width == 37
    # bursts at the same long-run frequency: the narrow model forgets between them
    assert arms["burst"].rare_signal < 0.05
    assert abs(arms["burst"].rare_share - arms["plan"].rare_share) < 0.002
    # the frequent tasks pay a small, reported price; the bigger model costs 37/16 the compute
    rise = arms["plan"].frequent_loss - arms["natural"].frequent_loss
    assert 0 < rise < 0.03
    assert arms["big"].flops / arms["natural"].flops == pytest.approx(37 / 16, rel=1e-6)
    assert arms["plan"].flops == arms["natural"].flops
    assert arms["plan"].rare_share == pytest.approx(plan.tasks[-1].weight, abs=0.002)


def test_fix_json_is_what_the_report_reads(demo_fix):
    from raretask.report.fix import load_fix

    *_, out = demo_fix
    fix = load_fix(out / "fix.json")
    assert [r.label.split()[0] for r in fix.rows] == ["natural", "plan", "even", "burst", "big"]
    assert [r.learned for r in fix.rows] == [False, True, True, False, True]


@pytest.mark.parametrize("override, message", [
    ("bogus=1", "bogus: unknown key"),
    ("arm=[natural,huge]", "arm: Input should be 'natural', 'plan', 'even', 'burst' or 'big'"),
    ("width=1000", "width: 1000 exceeds the total feature count tasks*features = 256"),
    ("margin=0.5", "margin: Input should be greater than or equal to 1"),
    ("every=1", "every: a fix arm needs every >= 2"),
])
def test_bad_fix_config_exits_2(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exc:
        main(["fix", "configs/fix_toy.yaml", "--out", str(tmp_path / "o"), "--set", override])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_the_plan_loses_no_task_the_natural_mix_learns(demo_fix):
    """issue 22: the plan keeps every task learned under the natural mix (keep_learned) and
    learns the rare one; the table lists every task, not only the target."""
    cfg, plan, arms, out = demo_fix
    assert plan.constraints["kept"] == [str(k) for k in range(1, 10)]  # Theorem 3, width 16
    natural, planned = arms["natural"].learned_tasks, arms["plan"].learned_tasks
    assert natural == [str(k) for k in range(1, 9)]  # task 9 is still rising at 4,000 steps
    assert planned == [*natural, "9", "16"]
    assert arms["plan"].lost == [] and arms["plan"].gained == ["9", "16"]
    assert arms["big"].learned_tasks == [str(k) for k in range(1, 17)]
    assert len(arms["plan"].task_signal) == cfg.tasks
    assert arms["plan"].task_signal[cfg.rare] == arms["plan"].rare_signal
    from raretask.report.fix import load_fix

    rows = {r.label.split()[0]: r for r in load_fix(out / "fix.json").rows}
    assert rows["plan"].tasks_learned == planned and rows["plan"].lost == []


@pytest.mark.slow
def test_fix_toy_keeps_what_natural_learns_and_learns_the_target(tmp_path, capsys):
    """The full configs/fix_toy.yaml (3 seeds x 8,000 steps): no task learned under the natural
    mix is lost under the plan, and the rare task (16) is learned."""
    import json

    import torch

    torch.set_num_threads(1)
    out = tmp_path / "fix_toy"
    with pytest.raises(SystemExit) as exc:
        main(["fix", "configs/fix_toy.yaml", "--out", str(out), "--quiet"])
    assert exc.value.code == 0
    printed = capsys.readouterr().out
    assert "Every task: learned under each arm" in printed
    arms = {r["arm"]: r for r in json.loads((out / "results.json").read_text())}
    natural, planned = arms["natural"]["learned_tasks"], arms["plan"]["learned_tasks"]
    assert set(natural) <= set(planned) and "16" in planned and "16" not in natural
    assert "9" in natural  # the task the plan without keep_learned lost (issue 22)


def test_arms_are_read_by_the_runs_cell_ids(tmp_path):
    """A fix grid with a seed axis: the resolved config.yaml lists seed before arm, so arms must
    be matched to cells through cells.json, not by enumerating the config again (which mixed
    natural and plan cells in the reported arms)."""
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "tiny"
    sets = ["tasks=4", "features=4", "width=4", "steps=60", "batch_size=64", "every=10",
            "eval_points=2", "seed=[0,1]", "arm=[natural,plan,big]"]
    with pytest.raises(SystemExit) as exc:
        main(["fix", "configs/fix_toy.yaml", "--out", str(out), "--quiet",
              *[a for s in sets for a in ("--set", s)]])
    assert exc.value.code == 0
    _, plan, arms = toy_fix_results(out)
    results = {a.arm: a for a in arms}
    natural, planned = plan.tasks[3].natural, plan.tasks[3].weight
    assert (natural, planned) == pytest.approx((0.0748, 0.1824), abs=1e-4)
    # 7,680 samples per arm: the realised share is within 0.015 of the arm's own share
    assert results["natural"].rare_share == pytest.approx(natural, abs=0.015)
    assert results["big"].rare_share == pytest.approx(natural, abs=0.015)
    assert results["plan"].rare_share == pytest.approx(planned, abs=0.015)
    assert (results["natural"].width, results["big"].width) == (4, 7)
