"""The fix on language models (mixing/fix_lm.py): the plan arm's rate is `plan`'s output on the
grid's analysed mix with the committed LM calibration; arms resolve to ordinary cells; a plan
the sequences cannot carry is refused before anything is written; `raretask fix` writes the
per-arm table, fix.json (read by the report) and results.json."""

import json
from pathlib import Path

import pytest

from raretask.cli import main
from raretask.config import load_experiment
from raretask.mixing.fix_lm import arm_summary, fix_plan, resolve_arm


@pytest.fixture(scope="module")
def arms():
    cells = list(load_experiment("configs/fix_lm.yaml").cells())
    return {c.arm: c for c in cells if c.seed == 0}, cells


def test_fix_lm_config_holds_five_arms_times_three_seeds(arms):
    by_arm, cells = arms
    assert len(cells) == 15 and list(by_arm) == ["natural", "plan", "even", "burst", "big"]
    assert {c.seed for c in cells} == {0, 1, 2}


def test_plan_arm_takes_the_rate_of_plan_on_the_analysed_mix(arms):
    by_arm, _ = arms
    plan = fix_plan(by_arm["plan"])
    text, cmp = plan.tasks
    # the analysed mix in tokens: the task at 1/1024 instances per token x 4 tokens per instance
    assert (text.task, cmp.task) == ("text", "cmp") and cmp.target and not text.target
    assert cmp.natural == pytest.approx(4 / 1024)
    # the law needs 0.00239 instances per token at 0.13M parameters and 32.8M tokens
    assert cmp.required / 4 == pytest.approx(0.0023926, rel=1e-4)
    assert cmp.weight == pytest.approx(1.5 * cmp.required, rel=1e-9)
    assert not cmp.learned_natural and cmp.learned_planned
    assert plan.natural_size_needed == pytest.approx(8.147e6, rel=1e-3)
    got = {a: resolve_arm(c) for a, c in by_arm.items()}
    assert {a: (c.size, c.delivery, c.every) for a, c in got.items()} == {
        "natural": ("tiny", "iid", 1), "plan": ("tiny", "iid", 1), "even": ("tiny", "even", 1),
        "burst": ("tiny", "burst", 2), "big": ("20m", "iid", 1)}
    assert got["natural"].rate == got["big"].rate == 1 / 1024
    assert got["plan"].rate == got["even"].rate == pytest.approx(cmp.weight / 4, rel=1e-12)
    # bursts: whole instances, 59 every second step (29.4 a step planned)
    assert got["burst"].injection_size == 59
    assert all(c.arm is None for c in got.values())


def test_a_plan_the_sequences_cannot_carry_is_refused_before_writing(tmp_path, capsys):
    # 3,840 training tokens: the law wants more than one instance in every 16-token row
    out = tmp_path / "o"
    with pytest.raises(SystemExit) as exc:
        main(["fix", "configs/fix_lm.yaml", "--out", str(out), "--set", "steps=30",
              "--set", "seq_len=16", "--set", "batch_size=8"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and err.count("\n") == 1 and "task 'cmp'" in err
    assert not out.exists()


@pytest.mark.parametrize("override, message", [
    ("arm=[natural,huge]", "arm: Input should be 'natural', 'plan', 'even', 'burst' or 'big'"),
    ("every=1", "every: a fix arm needs every >= 2"),
    ("delivery=burst", "delivery: a fix arm sets the task's delivery"),
    ("big_size=7b", "big_size: unknown preset '7b'"),
    ("calibration=null", "calibration: a fix arm needs the calibration file"),
])
def test_bad_lm_fix_config_exits_2(tmp_path, capsys, override, message):
    with pytest.raises(SystemExit) as exc:
        main(["fix", "configs/fix_lm.yaml", "--out", str(tmp_path / "o"), "--set", override])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_missing_calibration_file_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["fix", "configs/fix_lm.yaml", "--out", str(tmp_path / "o"),
              "--set", f"calibration={tmp_path / 'none.json'}"])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "none.json" in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()


def test_fix_runs_arms_and_writes_what_the_report_reads(tmp_path, capsys):
    """Two arms that need no plan, a few steps on the CPU: the rows carry their arm, the
    table aggregates them, fix.json loads in the report's reader (means over seeds:
    test_arm_summary_means_and_sds_over_seeds)."""
    import torch

    from raretask.report.fix import load_fix

    torch.set_num_threads(1)
    out = tmp_path / "lm"
    sets = ["arm=[natural,big]", "big_size=4m", "steps=6", "seq_len=16", "batch_size=8",
            "vocab_size=512", "rate=0.0625", "seed=3", "eval_points=2",
            "profile.device=cpu"]
    with pytest.raises(SystemExit) as exc:
        main(["fix", "configs/fix_lm.yaml", "--out", str(out), "--quiet",
              *[x for s in sets for x in ("--set", s)]])
    assert exc.value.code == 0
    rows = json.loads((out / "summary.json").read_text())
    rows = rows if isinstance(rows, list) else rows["rows"]
    assert sorted((r["arm"], r["seed"], r["size"]) for r in rows) == [
        ("big", 3, "4m"), ("natural", 3, "tiny")]
    results = json.loads((out / "results.json").read_text())
    assert [a["arm"] for a in results] == ["natural", "big"]
    nat = results[0]
    (acc,) = [r["test_accuracy"] for r in rows if r["arm"] == "natural"]
    assert nat["per_seed_accuracy"] == [acc] and nat["test_accuracy"] == acc
    assert nat["seeds"] == [3] and nat["test_accuracy_sd"] == 0.0
    assert results[1]["flops"] / nat["flops"] == pytest.approx(4724928 / 131648)
    assert not (out / "plan.json").exists()  # no arm took a plan
    fix = load_fix(out / "fix.json")
    assert [r.label for r in fix.rows] == ["natural (iid)", "big (iid)"]
    assert all(r.val_loss is not None and r.val_loss > 0 for r in fix.rows)
    # the text loss in each arm's training format beside the plain one, and its change
    (framed,) = [r["val_loss_framed"] for r in rows if r["arm"] == "natural"]
    assert nat["val_loss_framed"] == framed == fix.rows[0].val_loss_framed > 0
    from raretask.report.build import fix_section, load_run

    (table,) = fix_section([load_run(out)]).tables
    row = dict(zip(table.columns, table.rows[1], strict=True))
    big = fix.rows[1].val_loss_framed - fix.rows[0].val_loss_framed
    assert row["framed change"] == f"{big:+.4f}" and "val_loss_framed" in table.caption


def test_arm_summary_means_and_sds_over_seeds():
    rows = [{"arm": "plan", "size": "tiny", "params": 10.0, "frequency": 0.01,
             "schedule": "iid", "seed": s, "test_accuracy": a, "task_loss": 1.0,
             "val_loss": v, "steps": 5, "tokens": 100.0}
            for s, a, v in ((1, 0.95, 4.0), (0, 0.5, 4.2), (2, 0.92, 4.1))]
    (plan,) = arm_summary(rows)
    assert plan["seeds"] == [0, 1, 2] and plan["learned"] == 2
    assert plan["per_seed_accuracy"] == [0.5, 0.95, 0.92]
    assert plan["test_accuracy"] == pytest.approx(0.79)
    assert plan["test_accuracy_sd"] == pytest.approx(0.2515949, rel=1e-6)
    assert plan["val_loss"] == pytest.approx(4.1) and plan["flops"] == 6000.0
    assert plan["val_loss_framed"] is None  # rows from before it was recorded
    rows[0]["val_loss_framed"], rows[2]["val_loss_framed"] = 4.3, 4.5
    assert arm_summary(rows)[0]["val_loss_framed"] == pytest.approx(4.4)  # over seeds with it


def test_report_shows_the_gpu_fix_with_seeds_text_loss_and_compute():
    """The committed H200 run (benchmarks/results/fix_lm): the report's fix table gives each
    arm's seeds learned, accuracy ± sd, text loss and its change, and compute vs natural."""
    from raretask.report.build import fix_section, load_run

    run = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fix_lm"
    (table,) = fix_section([load_run(run)]).tables
    rows = {r[0].split()[0]: dict(zip(table.columns, r, strict=True)) for r in table.rows}
    assert list(rows) == ["natural", "plan", "even", "burst", "big"]
    assert [rows[a]["learned"] for a in rows] == [
        "0/3 seeds", "3/3 seeds", "2/3 seeds", "2/3 seeds", "3/3 seeds"]
    assert rows["natural"]["acc"] == "0.374 ± 0.168" and rows["plan"]["acc"] == "0.906 ± 0.004"
    assert rows["plan"]["text L"] == "4.0638" and rows["plan"]["change"] == "+0.0097"
    assert rows["natural"]["compute"] == "1x" and rows["big"]["compute"] == "143x"
    assert "compute: training FLOPs (6 N T) relative to the first row" in table.caption
