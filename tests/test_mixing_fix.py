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
