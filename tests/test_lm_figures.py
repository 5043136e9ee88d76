"""LM figures over seeds (raretask.report.figures) on the committed Fig. 9 run (3 seeds per size):
curves are seed means with a band, one colour per size, the legend off the data; heatmap cells
whose seeds disagree are marked."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest

from raretask.report import figures
from raretask.report.analysis import load_metrics, metric_series

FIG9 = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "fig9_lm_gradients"


@pytest.fixture(scope="module")
def fig9():
    rows = json.loads((FIG9 / "summary.json").read_text())
    cells = {c["cell"]: c for c in json.loads((FIG9 / "cells.json").read_text())}
    return rows, cells, load_metrics(FIG9)


def test_cosine_panels_draw_one_seed_mean_per_size_with_a_band(fig9):
    rows, _, m = fig9
    fig = figures.lm_cosine_figure(rows, m, "fig9")
    axes = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in axes] == [
        "T_CMP: cos(g, g_r)", "T_CMP: cos(g_t, g_r)", "T_CMP: cos(g_nt, g_r)"]
    for ax in axes:
        curves = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 2]  # not the zero line
        assert len(curves) == 3 and len({ln.get_color() for ln in curves}) == 3
        assert len(ax.collections) == 3  # one +- sd band per size
        assert ax.get_legend() is None  # the legend is the figure's, beside the panels
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == [
        f"{s}, 9.77e-04 every 4 burst, 3 seeds" for s in ("tiny", "4m", "20m")]
    # the 20m curve of cos(g_nt, g_r) is the mean of its three seeds at each step
    steps, mean, sd = figures._seed_mean_series(m, [r for r in rows if r["size"] == "20m"],
                                                "cos_gnt_gr")
    line = [ln for ln in axes[2].get_lines() if len(ln.get_xdata()) > 2][2]
    assert np.allclose(line.get_ydata(), mean) and np.allclose(line.get_xdata(), steps)
    assert len(steps) == 36 and steps[-1] == 2047 and (sd > 0).all()
    plt.close(fig)


def panels(fig) -> list:
    return [a for a in fig.axes if a.get_label() != "<colorbar>"]


def red_boxes(ax) -> int:
    return sum(1 for p in ax.patches if p.get_edgecolor()[:3] == (1.0, 0.0, 0.0))


def test_heatmap_marks_cells_whose_seeds_disagree(fig9):
    rows, cells, _ = fig9
    fig = figures.lm_heatmap_figure(rows, cells, "fig9")
    assert [red_boxes(ax) for ax in panels(fig)] == [0, 0]  # every seed agrees
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["0.048\n\u00b10.047", "0.845\n\u00b10.033", "0.919\n\u00b10.016"]
    plt.close(fig)
    flipped = [dict(r) for r in rows]
    flipped[1]["test_accuracy"] = 0.9  # tiny seed 1 now learned, seeds 0 and 2 not
    fig = figures.lm_heatmap_figure(flipped, cells, "fig9")
    acc, loss = panels(fig)
    assert red_boxes(acc) == 1 and red_boxes(loss) == 1
    assert acc.texts[0].get_text().startswith("0.341*") and "seeds disagree" in acc.get_title()
    plt.close(fig)


GROK = FIG9.parent / "fig5_lm_add_grok_20m_4m"


def test_grokking_panels_show_train_and_test_accuracy_per_add_setting():
    """The committed T_ADD run (20m and 4m x weight decay 1.0 / 0.1, one H200 call): a panel
    per setting titled by what differs, a colour per size, the train and test curves are the
    run's own numbers; T_CMP runs have no grokking panel."""
    rows = json.loads((GROK / "summary.json").read_text())
    cells = {c["cell"]: c for c in json.loads((GROK / "cells.json").read_text())}
    m = load_metrics(GROK)
    fig = figures.lm_grokking_figure(rows, m, cells, "grok")
    axes = [a for a in fig.axes if a.get_visible()]
    assert [a.get_title() for a in axes] == ["3.12e-02 spread, weight_decay 0.1",
                                             "3.12e-02 spread, weight_decay 1.0"]
    by = {(r["size"], cells[r["cell"]]["weight_decay"]): r for r in rows}
    # per panel, sizes in order of parameters (4m, 20m), train then test
    train_4m, test_4m, train_20m, test_20m = (ln.get_ydata() for ln in axes[0].get_lines()[:4])
    assert test_20m[-1] == pytest.approx(by["20m", 0.1]["test_accuracy"]) and test_20m[-1] > 0.9
    assert train_20m[-1] == pytest.approx(by["20m", 0.1]["train_accuracy"])
    assert test_4m[-1] == pytest.approx(by["4m", 0.1]["test_accuracy"]) and test_4m[-1] < 0.5
    assert axes[0].get_lines()[1].get_color() != axes[0].get_lines()[3].get_color()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == ["4m, 1 seed", "20m, 1 seed", "train (dashed)",
                      "test, held-out pairs (solid)"]
    plt.close(fig)
    fig9_rows = json.loads((FIG9 / "summary.json").read_text())
    assert figures.lm_grokking_figure(fig9_rows, load_metrics(FIG9), {}, "cmp") is None
    # the heatmap keeps the weight decays apart: a row each, no seeds that "disagree"
    heat = figures.lm_heatmap_figure(rows, cells, "grok").axes[0]
    assert [t.get_text() for t in heat.get_yticklabels()] == [
        "4m, weight_decay 0.1", "4m, weight_decay 1.0", "20m, weight_decay 0.1",
        "20m, weight_decay 1.0"]
    assert [t.get_text() for t in heat.texts] == ["0.276", "0.680", "0.963", "0.128"]
    plt.close("all")


def test_fig9_cosines_over_seeds_match_results_md(fig9):
    """The report's Fig. 9 table over seeds: per size the mean of the 3 seeds' means from step
    512 (a quarter of 2,047) with a 95% t-interval; the numbers RESULTS.md states."""
    from raretask.report.lm_seeds import lm_cosine_over_seeds

    rows, cells, m = fig9
    got = {o.setting["size"]: o for o in lm_cosine_over_seeds(m, rows, cells)}
    assert list(got) == ["tiny", "4m", "20m"]
    assert {o.seeds for o in got.values()} == {3} and {o.from_step for o in got.values()} == {512}
    assert [got[s].text("cos_gnt_gr") for s in got] == [
        "-0.083 ± 0.036", "-0.068 ± 0.054", "-0.061 ± 0.009"]
    assert [got[s].text("cos_gt_gr") for s in got] == [
        "+0.790 ± 0.045", "+0.646 ± 0.279", "+0.543 ± 0.030"]
    one_seed = [r for r in rows if cells[r["cell"]]["seed"] == 0]
    assert lm_cosine_over_seeds(m, one_seed, cells) == []  # no interval from one seed


HEATMAP = FIG9.parent / "fig5_lm_heatmap"


def test_several_settings_draw_small_multiples_with_a_curve_per_size():
    """The committed Fig. 5 run (T_ADD and T_CMP x tiny/4m/20m x 4 frequencies, one seed): a row
    per (task, metric), a panel per frequency (highest first), y shared along a row, one curve
    per size in each panel (never a line style per frequency), each the cell's own series; the
    legend names the sizes; a cap on the panels says how many settings it left out."""
    rows = json.loads((HEATMAP / "summary.json").read_text())
    cells = {c["cell"]: c for c in json.loads((HEATMAP / "cells.json").read_text())}
    m = load_metrics(HEATMAP)
    fig = figures.lm_retention_figure(rows, m, "fig5", cells)
    axes = [a for a in fig.axes if a.get_visible()]
    freqs = ("7.81e-03", "3.91e-03", "1.95e-03", "9.77e-04")
    assert [a.get_title() for a in axes] == [
        f"T_{t} {f} spread" for t in ("ADD", "CMP") for _ in range(2) for f in freqs]
    assert [a.get_ylabel() for a in axes[::4]] == ["task loss", "held-out task loss"] * 2
    for ax in axes:
        curves = ax.get_lines()
        assert len(curves) == 3 and {ln.get_linestyle() for ln in curves} == {"-"}
        assert len({ln.get_color() for ln in curves}) == 3
    assert axes[1].get_shared_y_axes().joined(axes[0], axes[3])  # a row shares its y axis
    assert not axes[0].get_shared_y_axes().joined(axes[0], axes[4])
    # T_CMP at 1.95e-03, 20m (the third size): its one seed's held-out task loss as stored
    (cell,) = [r["cell"] for r in rows if r["task"] == "cmp" and r["size"] == "20m"
               and figures.nominal_frequency(r, cells) == 0.001953125]
    steps, values = metric_series(m, cell, "task_test_loss")
    line = axes[14].get_lines()[2]
    keep = steps > 0
    assert np.allclose(line.get_xdata(), steps[keep]) and np.allclose(line.get_ydata(),
                                                                       values[keep])
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [
        "tiny, 1 seed", "4m, 1 seed", "20m, 1 seed"]
    plt.close(fig)
    capped = figures.lm_seed_band_figure(rows, m, [("task_loss", "task loss")], "fig5",
                                         cells=cells, max_settings=3)
    titles = [a.get_title() for a in capped.axes if a.get_visible()]
    assert titles == ["T_ADD 7.81e-03 spread", "T_ADD 3.91e-03 spread",
                      "T_ADD 1.95e-03 spread, +1 more not drawn", "T_CMP 7.81e-03 spread",
                      "T_CMP 3.91e-03 spread", "T_CMP 1.95e-03 spread, +1 more not drawn"]
    plt.close("all")
