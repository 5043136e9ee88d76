"""Fig. 8, retention around bursts: the dense evaluation schedule (raretask.lm.schedule), the
drop / rebound analysis (raretask.lm.retention), and the shipped config shortened to a CPU run
whose metrics carry the dense trace."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from raretask.cli import main
from raretask.config import load_experiment
from raretask.lm.config import LMCell
from raretask.lm.retention import Window, retention_by_size, run_windows, windows
from raretask.lm.schedule import eval_schedule, traced_windows
from raretask.studies.base import eval_steps

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def cell(**kw) -> LMCell:
    return LMCell(**{"task": "cmp", "rate": 8 / 40960, "every": 10, "delivery": "burst",
                     "steps": 100, "eval_points": 4,
                     "probes": False, **kw})


# -- schedule -----------------------------------------------------------------------------------
def test_without_trace_the_schedule_is_the_one_the_committed_gpu_runs_used():
    """trace_windows 0 keeps today's steps: those in the committed Fig. 5 and Fig. 9 metrics."""
    for name in ("fig5_lm_heatmap", "fig9_lm_gradients"):
        m = pq.read_table(ROOT / "benchmarks" / "results" / name / "metrics.parquet").to_pydict()
        used = sorted({s for s, c in zip(m["step"], m["cell"], strict=True) if c == 0})
        (first, *_) = load_experiment(CONFIGS / f"{name}.yaml").cells()
        assert first.trace_windows == 0 and list(eval_schedule(first)) == used, name
    assert eval_steps(1000, 12)[:6] == (1, 2, 4, 7, 12, 23)


def test_windows_bracket_each_traced_injection():
    w = traced_windows(cell(trace_windows=3, trace_stride=4))
    # 100 steps, every 10: complete cycles m = 1..9 ((m + 1) 10 - 1 <= 100); 3 of them: 1, 5, 9
    assert [x.injection for x in w] == [1, 5, 9]
    assert [(x.before, x.after, x.end) for x in w] == [(9, 10, 19), (49, 50, 59), (89, 90, 99)]
    assert w[1].steps == (49, 50, 54, 58, 59)
    assert set(eval_schedule(cell(trace_windows=3, trace_stride=4))) >= {
        s for x in w for s in x.steps}


def test_more_windows_than_cycles_traces_each_cycle_once_and_spread_cells_pairs():
    assert [x.injection for x in traced_windows(cell(trace_windows=50))] == list(range(1, 10))
    spread = traced_windows(LMCell(task="cmp", rate=1 / 128, steps=10, trace_windows=3,
                                   probes=False))
    assert [x.steps for x in spread] == [(0, 1), (5, 6), (9, 10)]  # m = 1, 5.5 -> 6, 10
    assert traced_windows(cell(task="none", rate=None, delivery="even", every=1)) == []
    # no complete cycle: the first injection's window, cut at the last step
    assert [x.steps for x in traced_windows(cell(steps=15, trace_windows=2))] == [
        (9, 10, 11, 12, 13, 14, 15)]


# -- analysis -----------------------------------------------------------------------------------
def test_drop_rebound_kept_by_hand():
    steps = [0, 9, 10, 12, 14, 16, 18, 19, 29, 30, 39]
    loss = [6.0, 3.0, 2.0, 2.2, 2.4, 2.5, 2.6, 2.6, 2.5, 2.4, 2.5]
    w = windows(steps, loss, every=10)
    assert [x.injection for x in w] == [10, 30]  # 20's before (19) is there, its end (29) too,
    # but not 20 itself; 30 has 29, 30 and 39
    first = w[0]
    assert first.offsets == (0, 1, 3, 5, 7, 9, 10)
    assert (first.drop, first.rebound) == pytest.approx((1.0, 0.6))
    assert first.kept == pytest.approx(0.4)
    assert first.net == pytest.approx(first.drop - first.rebound)
    assert w[1].kept == pytest.approx(0.0)  # 2.5 -> 2.4 -> 2.5: all of it lost
    assert Window(1, 2.0, 2.5, 2.7, (0, 1), (2.0, 2.5)).kept is None  # the burst did not help


def test_retention_by_size_means_per_seed_then_over_seeds():
    w = lambda before, after, end: Window(1, before, after, end, (0, 1), (before, after))  # noqa
    cell_windows = {0: [w(3, 2, 2.5), w(3, 2, 2.9)], 1: [w(3, 1, 2)], 2: [w(1, 0.5, 0.5)]}
    rows = [dict(cell=0, size="4m", params=4, seed=0), dict(cell=1, size="4m", params=4, seed=1),
            dict(cell=2, size="20m", params=20, seed=0)]
    cells = {i: {"every": 10} for i in range(3)}
    small, big = retention_by_size(cell_windows, rows, cells)
    assert (small.size, small.seeds, small.windows, small.every) == ("4m", 2, 3, 10)
    # seed 0: drops 1, 1 -> 1; rebounds 0.5, 0.9 -> 0.7; kept 1 - 0.7 / 1 = 0.3.
    # seed 1: drop 2, rebound 1, kept 0.5
    assert small.drop == pytest.approx((1.5, 0.5**0.5))
    assert small.rebound == pytest.approx((0.85, (2 * 0.15**2) ** 0.5))
    assert small.kept[0] == pytest.approx(0.4)
    # net (before - end): seed 0 0.5 and 0.1 -> 0.3, seed 1 1.0
    assert small.net == pytest.approx((0.65, (2 * 0.35**2) ** 0.5))
    assert big.drop == (0.5, None) and big.kept == (1.0, None) and big.net == (0.5, None)


def test_kept_is_a_ratio_of_means_so_a_flat_window_cannot_swamp_it():
    """One window whose burst barely moved the loss (drop 0.001, rebound 0.05: kept -49 on its
    own) beside one that dropped 1 and rebounded 0.2: the seed kept 1 - 0.125 / 0.5005."""
    w = lambda before, after, end: Window(1, before, after, end, (0, 1), (before, after))  # noqa
    (line,) = retention_by_size({0: [w(3, 2, 2.2), w(2.001, 2, 2.05)]},
                                [dict(cell=0, size="tiny", params=1, seed=0)], {0: {"every": 8}})
    assert line.kept == (pytest.approx(1 - 0.125 / 0.5005), None)


def test_run_windows_leaves_out_bursts_inside_the_warmup_unless_asked():
    steps = [1, 2, 3, 5, 6, 7]  # windows after the injections at steps 2 and 6 (every 2)
    m = {"cell": [0] * 6, "metric": ["task_loss"] * 6, "step": steps,
         "value": [5.0, 4.0, 4.5, 3.0, 2.5, 2.6]}
    rows, cells = [dict(cell=0)], {0: {"every": 2, "trace_windows": 2, "warmup": 4}}
    assert [w.injection for w in run_windows(m, rows, cells)[0]] == [6]
    both = run_windows(m, rows, cells, past_warmup=False)[0]
    assert [w.injection for w in both] == [2, 6]
    assert [(w.drop, w.rebound) for w in both] == [(1.0, 0.5), pytest.approx((0.5, 0.1))]


# -- the shipped config, shortened to CPU --------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("fig8") / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RARETASK_CACHE", str(tmp_path_factory.mktemp("cache")))
        sets = ["size=tiny", "steps=8", "batch_size=16", "rate=0.0078125", "every=[2]",
                "seed=0", "vocab_size=512", "trace_windows=2", "eval_points=2", "warmup=1"]
        args = ["run", str(CONFIGS / "fig8_lm_retention.yaml"), "--out", str(out), "--quiet"]
        for s in sets:
            args += ["--set", s]
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny models: OpenMP spinning on a busy 2-core box is 10x slower
        try:
            with pytest.raises(SystemExit) as exc:
                main(args)
        finally:
            torch.set_num_threads(threads)
        assert exc.value.code == 0
    return out


def test_fig8_cpu_run_rows_carry_the_dense_trace(cpu_run):
    rows = json.loads((cpu_run / "summary.json").read_text())
    cells = {c["cell"]: c for c in json.loads((cpu_run / "cells.json").read_text())}
    (row,) = rows
    assert row["schedule"] == "8/2 burst" and row["steps"] == 8
    m = pq.read_table(cpu_run / "metrics.parquet").to_pydict()
    loss_steps = sorted(s for s, k in zip(m["step"], m["metric"], strict=True) if k == "task_loss")
    # log-spaced 0, 1, 8 and the windows of injections 1 and 3 (of 3 complete cycles)
    assert loss_steps == [0, 1, 2, 3, 5, 6, 7, 8]
    got = run_windows(m, rows, cells)[row["cell"]]
    assert [(w.injection, w.offsets) for w in got] == [(2, (0, 1, 2)), (6, (0, 1, 2))]
    for w in got:
        assert all(v == v and 0 < v < 10 for v in w.values)  # finite losses, near ln(512)
    (line,) = retention_by_size({row["cell"]: got}, rows, cells)
    assert (line.size, line.every, line.windows) == ("tiny", 2, 2)


def test_fig8_cpu_run_draws_the_retention_figure(cpu_run):
    import matplotlib.pyplot as plt

    from raretask.report.figures import lm_burst_retention_figure

    rows = json.loads((cpu_run / "summary.json").read_text())
    cells = {c["cell"]: c for c in json.loads((cpu_run / "cells.json").read_text())}
    m = pq.read_table(cpu_run / "metrics.parquet").to_pydict()
    fig = lm_burst_retention_figure(rows, m, cells, "fig8 (CPU)")
    trace, bars = fig.axes
    (line,) = [ln for ln in trace.get_lines() if len(ln.get_xdata()) > 2]
    assert list(line.get_xdata()) == [0, 1, 2]  # before, after, end of the last window
    assert len(bars.patches) == 2  # drop and rebound for the one size and gap
    plt.close(fig)
    assert lm_burst_retention_figure(rows, {"cell": [], "step": [], "metric": [], "value": []},
                                     cells, "untraced") is None


def test_fig8_cpu_run_reaches_the_report(cpu_run, tmp_path):
    """The report shows Fig. 8 (the traced cycle and the drop/rebound bars) and its table, with
    the run's own drop and rebound."""
    from raretask.report.html import write_report

    rows = json.loads((cpu_run / "summary.json").read_text())
    cells = {c["cell"]: c for c in json.loads((cpu_run / "cells.json").read_text())}
    m = pq.read_table(cpu_run / "metrics.parquet").to_pydict()
    (line,) = retention_by_size(run_windows(m, rows, cells), rows, cells)
    html = write_report([cpu_run], tmp_path / "r.html").read_text()
    assert "Retention around bursts: fig8_lm_retention" in html
    assert "retention around injections" in html
    assert f"<td>{line.drop[0]:.3f}</td>" in html and f"<td>{line.rebound[0]:.3f}</td>" in html
