"""Figures of the toy study, drawn from a run directory's stored results (never from training).

* :func:`phase_diagram`: per beta, mean normalised signal over seeds for each (width, task), with
  Theorem 3's staircase (the width at which each task's first feature enters) drawn on top.
* :func:`injection_traces`: the rare task's normalised signal step by step, injections marked.

The report (:mod:`raretask.report.build`) draws every figure in memory: the ``*_figure``
functions return a matplotlib Figure (or None when the data cannot make one) and
:func:`png_bytes` encodes it.
"""

from __future__ import annotations

import io
import textwrap
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from raretask.report.analysis import load_traces  # noqa: E402
from raretask.theory import TaskSet, Theory  # noqa: E402


def png_bytes(fig, dpi: int = 96) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def _save(fig, path: Path) -> Path:
    from raretask.runs import store

    store.write_bytes(path, png_bytes(fig, dpi=110))  # atomic, like every file of a run
    return path


def phase_diagram(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Write the phase diagram PNG; returns its path, or None when the grid has < 2 widths."""
    fig = phase_diagram_figure(rows, title)
    return None if fig is None else _save(fig, path)


def phase_diagram_figure(rows: list[dict], title: str = ""):
    """The phase diagram (one panel per (beta, alpha)); None when no panel has 2 widths."""
    iid = [r for r in rows if r["schedule"] == "iid"]
    by_beta: dict[tuple, list[dict]] = defaultdict(list)
    for r in iid:
        by_beta[(r["beta"], r["alpha"])].append(r)
    panels = [k for k in sorted(by_beta) if len({r["width"] for r in by_beta[k]}) >= 2]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4.2), squeeze=False)
    for ax, key in zip(axes[0], panels, strict=True):
        rs = by_beta[key]
        widths = sorted({r["width"] for r in rs})
        tasks = sorted({r["task"] for r in rs})
        sig = np.full((len(tasks), len(widths)), np.nan)
        acc: dict[tuple[int, int], list[float]] = defaultdict(list)
        for r in rs:
            acc[(r["task"], r["width"])].append(r["signal"])
        for (t, w), v in acc.items():
            sig[tasks.index(t), widths.index(w)] = float(np.mean(v))
        im = ax.imshow(np.clip(sig, 0, 1), origin="lower", aspect="auto", cmap="viridis",
                       vmin=0, vmax=1, extent=(-0.5, len(widths) - 0.5, 0.5, len(tasks) + 0.5))
        # Theorem 3 staircase: task k learned for widths >= its first-feature width
        r0 = rs[0]
        th = Theory(TaskSet.power_law(r0["tasks"], r0["features_per_task"], alpha=r0["alpha"],
                                      beta=r0["beta"]), r0.get("frequent_mass", 0.8))
        # boundary of each task's row: before the first grid width >= its first-feature width
        xk = np.searchsorted(widths, th.first_feature_width()) - 0.5
        ks = np.arange(1, xk.size + 1)
        ax.plot(np.repeat(xk, 2), np.column_stack([ks - 0.5, ks + 0.5]).ravel(), color="red",
                lw=1.8, label="Theorem 3: learned to the right")
        ax.legend(loc="upper left", fontsize=7, framealpha=0.8)
        ax.set_xticks(range(len(widths)), [str(w) for w in widths], fontsize=8)
        ax.set_xlabel("width N")
        ax.set_ylabel("task k (1 = most frequent)")
        ax.set_title(f"beta = {key[0]:g}, alpha = {key[1]:g}", fontsize=10)
        fig.colorbar(im, ax=ax, fraction=0.046, label="normalised signal s~ (mean over seeds)")
    fig.suptitle(title or "Phase diagram: learned signal vs Theorem 3", fontsize=11)
    fig.tight_layout()
    return fig


def injection_traces(run_dir: Path, rows: list[dict], path: Path) -> Path | None:
    """Write :func:`injection_traces_figure` as a PNG; returns its path or None (no traces)."""
    fig = injection_traces_figure(run_dir, rows)
    return None if fig is None else _save(fig, path)


def injection_traces_figure(run_dir: Path, rows: list[dict]):
    """The rare-signal traces: one panel per (gap, width), seeds overlaid; None without traces.

    Panels are scaled one by one: a narrow model's rise at an injection is small next to a wide
    model's accumulation, and a shared axis would hide it. The dotted line is the floor
    s~ = -N/(d - N): an encoder holding none of the rare block.
    """
    series = load_traces(run_dir)
    cells = {r["cell"]: r for r in rows if r["rare"] and r["cell"] in series}
    if not cells:
        return None
    gaps = sorted({r["gap"] for r in cells.values()})
    widths = sorted({r["width"] for r in cells.values()})
    fig, axes = plt.subplots(len(gaps), len(widths), figsize=(4.4 * len(widths), 2.6 * len(gaps)),
                             squeeze=False)
    for gi, gap in enumerate(gaps):
        for wi, width in enumerate(widths):
            ax = axes[gi, wi]
            mine = [c for c, r in cells.items() if r["gap"] == gap and r["width"] == width]
            if not mine:
                ax.set_visible(False)
                continue
            r0 = cells[mine[0]]
            for c in mine:
                steps, sig = series[c]
                ax.plot(steps, sig, lw=0.9, label=f"seed {cells[c]['seed']}")
            last = max(series[c][0].max() for c in mine)
            if r0["schedule"] != "iid" and gap > 0 and last / gap <= 200:
                for s in range(gap, int(last) + 1, gap):
                    ax.axvline(s, color="grey", lw=0.5, alpha=0.35)
            d = r0["tasks"] * r0["features_per_task"]
            ax.axhline(-width / (d - width), color="black", lw=0.7, ls=":",
                       label="floor: none of the rare block")
            ax.set_title(f"width {width}, {r0['schedule']} G = {gap}", fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.set_ylabel("rare signal s~", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.legend(fontsize=6, loc="upper left")
    fig.suptitle("Rare task's signal step by step (grey lines: injections)", fontsize=10)
    fig.tight_layout()
    return fig


# -- Fig. 1: the scaling-law argument ------------------------------------------------------------
def scaling_figure(law, sizes: list[float], pairs: list, title: str):
    """L_C(N) and L_inf(N) over N with the sizes marked (left); Definition 1 per pair (right).

    ``law``: a :class:`raretask.scaling.ScalingFit`; ``pairs``: :func:`raretask.scaling.classify`.
    """
    sizes = sorted(sizes)
    n = np.geomspace(sizes[0] / 3, sizes[-1] * 3, 200)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.0), gridspec_kw={"width_ratios": [3, 2]})
    ax.plot(n, law.loss_compute_optimal(n), color="C0", label="L_C(N): compute-optimal data")
    ax.plot(n, law.loss_infinite_data(n), color="C1", ls="--", label="L_inf(N): unlimited data")
    s = np.array(sizes)
    ax.scatter(s, law.loss_compute_optimal(s), color="C0", zorder=3)
    ax.scatter(s, law.loss_infinite_data(s), color="C1", zorder=3)
    big = sizes[-1]
    target = float(law.loss_compute_optimal(big))
    ax.axhline(target, color="grey", lw=0.7, ls=":")
    crit = next((p.critical_small_size for p in pairs if p.large == big), None)
    if crit is not None and crit > 0:
        ax.axvspan(n[0], min(crit, n[-1]), color="red", alpha=0.07,
                   label=f"N < N_s* = {crit:.3g}: needs model scaling to reach L_C({big:.3g})")
    ax.set_xscale("log")
    ax.set_xlabel("parameters N")
    ax.set_ylabel("loss")
    ax.legend(fontsize=7)
    ax.set_title("Loss laws (Sec. 2)", fontsize=10)
    # Definition 1 matrix: rows small, columns large
    mat = np.full((len(sizes), len(sizes)), np.nan)
    for p in pairs:
        mat[sizes.index(p.small), sizes.index(p.large)] = 1.0 if p.verdict == "data" else 0.0
    bx.imshow(mat, cmap="RdYlGn", vmin=-0.3, vmax=1.3, origin="lower")
    for p in pairs:
        i, j = sizes.index(p.small), sizes.index(p.large)
        bx.text(j, i, "data" if p.verdict == "data" else "model", ha="center", va="center",
                fontsize=7)
    labels = [f"{v:.3g}" for v in sizes]
    bx.set_xticks(range(len(sizes)), labels, fontsize=7, rotation=45)
    bx.set_yticks(range(len(sizes)), labels, fontsize=7)
    bx.set_xlabel("large N_l")
    bx.set_ylabel("small N_s")
    bx.set_title("Def. 1: reach L_C(N_l) via data or model scaling", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# -- Fig. 3: frequent residual vs rare signal ---------------------------------------------------
def _by_width_final(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray, list]:
    acc: dict[int, list[float]] = defaultdict(list)
    for r in rows:
        if r[key] is not None:
            acc[r["width"]].append(r[key])
    widths = sorted(acc)
    return np.array(widths), np.array([np.mean(acc[w]) for w in widths]), [acc[w] for w in widths]


def residual_figure(rows: list[dict], m: dict[str, np.ndarray], title: str,
                    threshold: float | None = None):
    """Fig. 3 analogue for one toy setting (rows of iid cells sharing K, M, alpha, beta).

    (a) final frequent residual delta_F vs width, with Theorem 3's optimum and the best any
    width-N encoder can do; (b) the rare task's final signal vs width, with its Prop. 6 critical
    width and Theorem 3 first-feature width; (c) each width's path through (delta_F, rare s~)
    during training (mean over seeds), showing the rare signal rises only once delta_F is small.
    """
    from raretask.report.analysis import metric_series

    rare = [r for r in rows if r["rare"]]
    if not rare or all(r["residual_F"] is None for r in rare):
        return None
    r0 = rare[0]
    th = Theory(TaskSet.power_law(r0["tasks"], r0["features_per_task"], alpha=r0["alpha"],
                                  beta=r0["beta"]), r0.get("frequent_mass", 0.8))
    k = r0["task"] - 1
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.9))
    ax = axes[0]
    w, mean, each = _by_width_final(rare, "residual_F")
    for wi, vals in zip(w, each, strict=True):
        ax.scatter([wi] * len(vals), vals, color="C0", s=10, alpha=0.5)
    ax.plot(w, mean, "o-", color="C0", label="measured (mean over seeds)")
    grid = np.arange(max(1, w.min()), w.max() + 1)
    ax.plot(grid, [max(th.optimal_residual(int(g)), 1e-12) for g in grid], color="red", lw=1,
            label="Thm 3 optimum of the mixture")
    ax.plot(grid, [max(th.best_residual(int(g)), 1e-12) for g in grid], color="black", lw=0.8,
            ls=":", label="best any width-N encoder (sum mu_i^F, i > N)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("width N")
    ax.set_ylabel("frequent residual delta_F")
    ax.legend(fontsize=7)
    ax.set_title("(a) frequent residual falls with width", fontsize=9)
    bx = axes[1]
    w, mean, each = _by_width_final(rare, "signal")
    for wi, vals in zip(w, each, strict=True):
        bx.scatter([wi] * len(vals), vals, color="C2", s=10, alpha=0.5)
    bx.plot(w, mean, "o-", color="C2", label=f"task {r0['task']} (rarest, "
            f"{100 * r0['frequency']:.3g}%)")
    crit, first = int(th.critical_width()[k]), int(th.first_feature_width()[k])
    bx.axvline(crit, color="purple", ls="--", lw=1, label=f"Prop. 6 critical width {crit}")
    bx.axvline(first, color="red", lw=1, label=f"Thm 3 first feature at {first}")
    bx.axhline(0, color="grey", lw=0.5)
    if threshold is not None:
        bx.axhline(threshold, color="grey", ls="--", lw=0.8, label=f"learned: s~ >= {threshold:g}")
    bx.set_xscale("log", base=2)
    bx.set_xlabel("width N")
    bx.set_ylabel("rare task's final signal s~")
    bx.legend(fontsize=7)
    bx.set_title("(b) the rare task is learned only by wide models", fontsize=9)
    cx = axes[2]
    cmap = plt.get_cmap("viridis")
    widths = sorted({r["width"] for r in rare})
    for i, width in enumerate(widths):
        cells = [r["cell"] for r in rare if r["width"] == width]
        res = [metric_series(m, c, "residual_F", -1) for c in cells]
        sig = [metric_series(m, c, "signal_norm", k) for c in cells]
        if not res or not res[0][0].size:
            continue
        n = min(len(s[0]) for s in res + sig)
        x = np.mean([s[1][:n] for s in res], axis=0)
        y = np.mean([s[1][:n] for s in sig], axis=0)
        color = cmap(i / max(len(widths) - 1, 1))
        cx.plot(x, y, "-", color=color, lw=1.2, label=f"N = {width}")
        cx.scatter(x[-1:], y[-1:], color=color, s=18, zorder=3)
    cx.set_xscale("log")
    cx.invert_xaxis()
    cx.set_xlabel("frequent residual delta_F (axis reversed: training runs left to right)")
    cx.set_ylabel("rare signal s~")
    cx.legend(fontsize=7, ncol=2)
    cx.set_title("(c) rare signal vs frequent residual during training", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


# -- Fig. 4: gap x width sweep and gradient cosines ---------------------------------------------
def injection_sweep_figure(rows: list[dict], m: dict[str, np.ndarray], title: str):
    """Final rare signal vs gap G per width (left) and the mean frequent/rare gradient cosine over
    training vs G (right); None unless the run has at least two gaps."""
    from raretask.report.analysis import metric_series

    rare = [r for r in rows if r["rare"]]
    gaps = sorted({r["gap"] for r in rare})
    if len(gaps) < 2:
        return None
    widths = sorted({r["width"] for r in rare})
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8))
    for i, width in enumerate(widths):
        mine = [r for r in rare if r["width"] == width]
        g = sorted({r["gap"] for r in mine})
        sig = [np.mean([r["signal"] for r in mine if r["gap"] == x]) for x in g]
        ax.plot(g, sig, "o-", color=f"C{i}", label=f"N = {width}")
        ax.scatter([r["gap"] for r in mine], [r["signal"] for r in mine], color=f"C{i}", s=8,
                   alpha=0.4)
        cos = []
        for x in g:
            vals = []
            for r in mine:
                if r["gap"] == x:
                    steps, v = metric_series(m, r["cell"], "grad_cosine", -1)
                    v = v[(steps > 0) & np.isfinite(v)]
                    if v.size:
                        vals.append(float(np.mean(v)))
            cos.append(np.mean(vals) if vals else np.nan)
        bx.plot(g, cos, "o-", color=f"C{i}", label=f"N = {width}")
    for a in (ax, bx):
        a.set_xscale("log")
        a.set_xticks(gaps, [str(g) for g in gaps])
        a.minorticks_off()
        a.set_xlabel("gap G (steps between injections; same long-run frequency)")
        a.legend(fontsize=7)
    ax.set_ylabel("rare task's final signal s~")
    ax.set_title("final rare signal vs gap", fontsize=9)
    bx.axhline(0, color="grey", lw=0.5)
    bx.set_ylabel("cos(rare gradient, frequent gradient), mean")
    bx.set_title("interference: gradient cosine on U", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def gradient_cosine_figure(rows: list[dict], m: dict[str, np.ndarray], title: str):
    """Cosine between a rare-only and a frequent-only batch gradient on U, step by step, one
    line per cell coloured by width; None when the run logged none."""
    from raretask.report.analysis import metric_series

    cells = {r["cell"]: r for r in rows if r["rare"]}
    widths = sorted({r["width"] for r in cells.values()})
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    drawn = set()
    for c, r in sorted(cells.items()):
        steps, v = metric_series(m, c, "grad_cosine", -1)
        keep = steps > 0
        if not keep.any():
            continue
        i = widths.index(r["width"])
        label = None if r["width"] in drawn else f"N = {r['width']}"
        drawn.add(r["width"])
        ax.plot(steps[keep], v[keep], color=f"C{i}", lw=0.9, alpha=0.8, label=label)
    if not drawn:
        plt.close(fig)
        return None
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("cos(g_rare, g_frequent)")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


# -- Figs. 5-9: language models -----------------------------------------------------------------
def lm_label(r: dict) -> str:
    """Short label of a language-model cell: size, task, frequency per token, schedule."""
    return f"{r['size']} {r['task']} {r['frequency']:.2e} ({r['schedule']})"


def nominal_frequency(r: dict, cells: dict[int, dict]) -> float:
    """The rate a cell asked for (:func:`raretask.lm.config.requested_rate`)."""
    from raretask.lm.config import requested_rate

    return requested_rate(cells.get(r["cell"], {}), {"frequency": r["frequency"]})


def _lm_key(r: dict, cells: dict[int, dict]) -> tuple[float, str]:
    return (float(f"{nominal_frequency(r, cells):.4g}"), r["schedule"])


def _lm_columns(rows: list[dict], cells: dict[int, dict]) -> list[tuple[float, str]]:
    """Distinct (nominal frequency, schedule) columns, most frequent first."""
    return sorted({_lm_key(r, cells) for r in rows}, key=lambda c: (-c[0], c[1]))


def lm_heatmap_figure(rows: list[dict], cells: dict[int, dict], title: str):
    """Fig. 5 analogue: final test accuracy and task loss over size x frequency, one row of two
    panels per task; colours and the numbers written in each cell are means over seeds (with the
    sd under the accuracy when there are several). A cell whose seeds disagree (some learned
    the task, some did not: :func:`raretask.lm.verdict.lm_verdict`, test accuracy >= 0.9) is
    outlined in red and its value starred."""
    from raretask.lm.verdict import seed_learned
    from raretask.report.lm_seeds import other_text, seed_cells

    rows = [r for r in rows if r["task"] != "none"]
    tasks = sorted({r["task"] for r in rows})
    if not tasks:
        return None
    # a heatmap row is a size and whatever else sets cells apart (weight decay...): cells that
    # differ there are not seeds of one value
    other_of = {i: c.other for c in seed_cells(rows, cells) for i in c.cells}

    def row_key(r):
        return r["size"], other_of.get(r["cell"], ())

    fig, axes = plt.subplots(len(tasks), 2, figsize=(11, 1.4 + 1.1 * len(tasks) * max(
        2, len({r["size"] for r in rows})) / 2 + 1.2), squeeze=False)
    for ti, task in enumerate(tasks):
        rs = [r for r in rows if r["task"] == task]
        sizes = sorted({row_key(r) for r in rs}, key=lambda k: (
            min(r["params"] for r in rs if r["size"] == k[0]), repr(k[1])))
        cols = _lm_columns(rs, cells)
        for pi, (metric, fmt, cmap, vmin, vmax) in enumerate((
                ("test_accuracy", "{:.3f}", "viridis", 0.0, 1.0),
                ("task_loss", "{:.4g}", "magma_r", None, None))):
            ax = axes[ti, pi]
            mat = np.full((len(sizes), len(cols)), np.nan)
            sd = np.full_like(mat, np.nan)
            disagree = np.zeros(mat.shape, dtype=bool)
            for si, s in enumerate(sizes):
                for ci, col in enumerate(cols):
                    here = [r for r in rs if row_key(r) == s and _lm_key(r, cells) == col]
                    v = [r[metric] for r in here if r[metric] is not None]
                    if v:
                        mat[si, ci] = float(np.mean(v))
                        sd[si, ci] = float(np.std(v, ddof=1)) if len(v) > 1 else np.nan
                    n_learned = sum(seed_learned(r) for r in here)
                    disagree[si, ci] = 0 < n_learned < len(here)
            im = ax.imshow(mat, aspect="auto", origin="lower", cmap=cmap, vmin=vmin, vmax=vmax)
            for si in range(len(sizes)):
                for ci in range(len(cols)):
                    if np.isfinite(mat[si, ci]):
                        r_, g_, b_, _ = im.cmap(im.norm(mat[si, ci]))
                        dark = 0.299 * r_ + 0.587 * g_ + 0.114 * b_ < 0.5
                        text = fmt.format(mat[si, ci]) + ("*" if disagree[si, ci] else "")
                        if pi == 0 and np.isfinite(sd[si, ci]):
                            text += f"\n\u00b1{sd[si, ci]:.3f}"
                        ax.text(ci, si, text, ha="center", va="center",
                                fontsize=6.5, color="white" if dark else "black")
                    if disagree[si, ci]:
                        ax.add_patch(plt.Rectangle((ci - 0.47, si - 0.47), 0.94, 0.94,
                                                   fill=False, ec="red", lw=1.6))
            ax.set_xticks(range(len(cols)), [f"{f:.2e}\n{s}" for f, s in cols], fontsize=6)
            ax.set_yticks(range(len(sizes)), [", ".join(filter(None, (s, other_text(o))))
                                              for s, o in sizes], fontsize=8)
            ax.set_xlabel("frequency (instances per token) and schedule", fontsize=8)
            ax.set_ylabel("model size", fontsize=8)
            what = "test accuracy" if pi == 0 else "task loss"
            mark = " (* red: seeds disagree)" if disagree.any() else ""
            ax.set_title(f"T_{task.upper()}: {what}{mark}", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.04)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _panel_grid(rows: list[list], panel_w: float, panel_h: float, extra_w: float = 0.0,
                extra_h: float = 0.0, sharey: bool = False):
    """(figure, [(ax, item, column)]): a grid with a row per list of ``rows`` and a panel per
    item, each over log-spaced steps; the grid cells past a short row's end hidden; y shared
    along a row with ``sharey``."""
    ncol = max(len(row) for row in rows)
    fig, axes = plt.subplots(len(rows), ncol, squeeze=False, sharey="row" if sharey else False,
                             figsize=(panel_w * ncol + extra_w, panel_h * len(rows) + extra_h))
    out = []
    for ri, row in enumerate(rows):
        for ci in range(ncol):
            ax = axes[ri, ci]
            if ci >= len(row):
                ax.set_visible(False)
                continue
            ax.set_xscale("log")
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            out.append((ax, row[ci], ci))
    return fig, out


def _metric_panels(layout: list[list[tuple[str, str, str]]], panel_w: float, panel_h: float,
                   extra_w: float = 0.0):
    """(figure, [(ax, metric, label, task)]): a row of panels per task, one per (metric, label,
    task) of ``layout``, titled and labelled by it (:func:`_panel_grid`)."""
    fig, grid = _panel_grid(layout, panel_w, panel_h, extra_w)
    panels = []
    for ax, (metric, label, task), _ in grid:
        ax.set_ylabel(label, fontsize=8)
        ax.set_title(f"T_{task.upper()}: {label}", fontsize=9)
        panels.append((ax, metric, label, task))
    return fig, panels


def _has(m, cell, metric) -> bool:
    sel = (m["cell"] == cell) & (m["metric"] == metric)
    return bool(sel.any() and np.isfinite(m["value"][sel].astype(float)).any())


def lm_order_figure(rows, m, title: str, cells: dict[int, dict] | None = None):
    """Fig. 6 analogue (order): test accuracy over training, a row of panels per task and a
    panel per size, a line per frequency (brighter = more frequent; line style per schedule or
    other field when several), each the mean over its seeds with a +- sd band: within a size,
    frequent tasks are learned first. None without test accuracy over training."""
    from raretask.report.lm_seeds import other_text

    settings = {k: rs for k, rs in _seed_settings(rows, cells).items()
                if any(_has(m, r["cell"], "test_accuracy") for r in rs)}
    if not settings:
        return None
    tasks = sorted({k[0] for k in settings})
    layout = [[("test_accuracy", size, t) for _, size in
               sorted({(k[1], k[2]) for k in settings if k[0] == t})] for t in tasks]
    fig, panels = _metric_panels(layout, 3.3, 2.8, extra_w=2.4)
    cmap = plt.get_cmap("plasma")
    styles = ["-", "--", ":", "-."]
    handles: dict[str, object] = {}
    for ax, _, size, task in panels:
        ax.set_title(f"T_{task.upper()}, {size}", fontsize=9)
        ax.set_ylabel("test accuracy", fontsize=8)
        ax.set_ylim(-0.02, 1.02)
        mine = {k: rs for k, rs in settings.items() if k[0] == task}
        freqs = sorted({k[4] for k in mine})
        variants = sorted({(k[3], k[5]) for k in mine}, key=repr)
        for (_, _, s, sched, freq, other), seed_rows in mine.items():
            got = _seed_mean_series(m, seed_rows, "test_accuracy") if s == size else None
            if got is None:
                continue
            steps, mean, sd = got
            colour = cmap(0.85 * freqs.index(freq) / max(len(freqs) - 1, 1))
            style = styles[variants.index((sched, other)) % len(styles)]
            line = _mean_band(ax, steps, mean, sd, style, colour)
            label = ", ".join(filter(None, (f"T_{task.upper()} {freq:.2e}",
                                            sched if len(variants) > 1 else "",
                                            other_text(other) if len(variants) > 1 else "")))
            handles.setdefault(label, line)
    fig.suptitle(f"{title} (seed mean, band: +- sd)", fontsize=10)
    _legend_beside(fig, handles, 2.3)
    return fig


def lm_gap_figure(rows: list[dict], cells: dict[int, dict], title: str):
    """Fig. 6 analogue (gaps): final task loss vs the gap between injections at one frequency,
    a line per (size, task); None unless some frequency was run with two or more gaps."""
    groups: dict[tuple, list[tuple[int, float]]] = defaultdict(list)
    for r in rows:
        c = cells.get(r["cell"], {})
        if r["task"] == "none" or r["task_loss"] is None:
            continue
        groups[(r["size"], r["task"], _lm_key(r, cells)[0])].append(
            (c.get("every", 1), r["task_loss"]))
    groups = {k: v for k, v in groups.items() if len({e for e, _ in v}) >= 2}
    if not groups:
        return None
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for i, ((size, task, freq), pts) in enumerate(sorted(groups.items())):
        gaps = sorted({e for e, _ in pts})
        loss = [np.mean([v for e, v in pts if e == g]) for g in gaps]
        ax.plot(gaps, loss, "o-", color=f"C{i}", label=f"{size} T_{task.upper()} at {freq:.2e}")
    ax.set_xscale("log")
    ticks = sorted({e for pts in groups.values() for e, _ in pts})
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("gap: steps between injections (same long-run frequency)")
    ax.set_ylabel("final task loss")
    ax.legend(fontsize=7)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def lm_presence_figure(rows, m, title: str, cells: dict[int, dict] | None = None):
    """Fig. 7 analogue: feature presence (T_CMP: R^2 of the hidden order from the first layer;
    T_ADD: Fourier modes across layers, and in the symbols' token embeddings where recorded)
    and test accuracy over training, seed means with bands, one colour per size."""
    return lm_seed_band_figure(rows, m, [("order_r2", "order R^2 (T_CMP feature)"),
                                         ("fourier_modes", "Fourier modes (T_ADD feature)"),
                                         ("fourier_modes_embedding",
                                          "Fourier modes in the embeddings (T_ADD)"),
                                         ("test_accuracy", "test accuracy")], title,
                               cells=cells)


def lm_retention_figure(rows, m, title: str, cells: dict[int, dict] | None = None):
    """Task loss on the training and the held-out instances over training, seed means with
    bands, one colour per size (the densely traced Fig. 8 is
    :func:`lm_burst_retention_figure`)."""
    return lm_seed_band_figure(rows, m, [("task_loss", "task loss"),
                                         ("task_test_loss", "held-out task loss")], title,
                               cells=cells)


def lm_grokking_figure(rows, m, cells: dict[int, dict], title: str, max_panels: int = 12):
    """Grokking curves: train (dashed) and test (solid) accuracy over training, one panel per
    T_ADD setting (frequency, schedule and whatever else differs, such as weight decay; the
    first ``max_panels`` by frequency, highest first), one colour per size, each curve the mean
    over its seeds with a +- sd band on the test curve; None unless a T_ADD cell recorded both.
    Memorisation is the train curve rising alone; grokking, the test curve following it later.
    The dotted line is the accuracy the task counts as learned at, 0.9
    (:data:`raretask.lm.verdict.LEARNED_ACCURACY`)."""
    from matplotlib.lines import Line2D

    from raretask.lm.verdict import LEARNED_ACCURACY
    from raretask.report.lm_seeds import other_text

    settings = {k: rs for k, rs in _seed_settings(rows, cells).items() if k[0] == "add"
                and any(_has(m, r["cell"], "train_accuracy") and _has(m, r["cell"],
                                                                      "test_accuracy")
                        for r in rs)}
    if not settings:
        return None
    keys = sorted({(k[3], k[4], k[5]) for k in settings},
                  key=lambda v: (-v[1], v[0], repr(v[2])))[:max_panels]
    sizes = sorted({(k[1], k[2]) for k in settings})
    colours = {s: plt.get_cmap("viridis")(0.9 * i / max(len(sizes) - 1, 1))
               for i, (_, s) in enumerate(sizes)}
    ncol = min(4, len(keys))
    nrow = -(-len(keys) // ncol)
    legend_in = 2.4  # the legend's column, off the data; one panel still leaves the title room
    fig, axes = plt.subplots(nrow, ncol, squeeze=False, sharey=True,
                             figsize=(max(3.4 * ncol, 5.0) + legend_in, 2.7 * nrow + 0.4))
    for ax in axes.flat[len(keys):]:
        ax.set_visible(False)
    handles: dict[str, object] = {}
    for ax, (sched, freq, other) in zip(axes.flat, keys, strict=False):
        for (_, _, size, s2, f2, o2), seed_rows in settings.items():
            if (s2, f2, o2) != (sched, freq, other):
                continue
            n = len(seed_rows)
            for metric, style in (("train_accuracy", "--"), ("test_accuracy", "-")):
                got = _seed_mean_series(m, seed_rows, metric)
                if got is None:
                    continue
                steps, mean, sd = got
                test = metric == "test_accuracy"  # the band on the test curve only
                line = _mean_band(ax, steps, mean, sd, style, colours[size], band=test)
                if test:
                    handles.setdefault(f"{size}, {n} seed" + "s" * (n > 1), line)
        ax.set_title(", ".join(filter(None, (f"{freq:.2e} {sched}", other_text(other)))),
                     fontsize=8)
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.axhline(LEARNED_ACCURACY, color="0.6", lw=0.7, ls=":")
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0, 0].set_ylabel("T_ADD accuracy", fontsize=8)
    handles["train (dashed)"] = Line2D([], [], ls="--", color="0.3")
    handles["test, held-out pairs (solid)"] = Line2D([], [], ls="-", color="0.3")
    fig.suptitle(f"{title}\n(seed mean; band: +- sd of the test curve)", fontsize=10)
    _legend_beside(fig, handles, legend_in)
    return fig


def lm_cosine_figure(rows, m, title: str, cells: dict[int, dict] | None = None):
    """Fig. 9 analogue: cosines of the batch gradient g, its task-token part g_t and its
    other-token part g_nt with the task's reference gradient g_r at an injection step, and of g
    between injections (a batch without instances), over training: per setting the mean over
    its seeds with a +- sd band, one colour per size, a panel per setting when there are
    several (:func:`lm_seed_band_figure`)."""
    from raretask.report.lm_seeds import COSINES

    return lm_seed_band_figure(rows, m, list(COSINES), title, zero_line=True, cells=cells)


def _seed_settings(rows: list[dict], cells: dict[int, dict] | None = None):
    """{(task, params, size, schedule, frequency, other): [rows of its seeds]}: the settings of
    :func:`raretask.report.lm_seeds.seed_cells`, in its order."""
    from raretask.report.lm_seeds import seed_cells

    by_cell = {r["cell"]: r for r in rows}
    return {(c.task, c.params, c.size, c.schedule, c.frequency, c.other):
            [by_cell[i] for i in c.cells] for c in seed_cells(rows, cells)}


def _mean_band(ax, x, mean, sd, style: str, colour, band: bool = True, **kw):
    """A seed-mean line with its +- sd band (the band left out with ``band=False``); the line."""
    (line,) = ax.plot(x, mean, style, color=colour, lw=1.3, **kw)
    if band:
        ax.fill_between(x, mean - sd, mean + sd, color=colour, alpha=0.2, lw=0)
    return line


def _legend_beside(fig, handles: dict[str, object], width_in: float) -> None:
    """The figure's legend in a column ``width_in`` inches wide right of the panels, off the
    data, then the panels laid out in the rest."""
    fig.legend(list(handles.values()), list(handles), loc="center right", fontsize=7,
               frameon=False)
    right = 1 - width_in / fig.get_figwidth()
    fig.tight_layout(rect=(0, 0, right, 1))
    # tight_layout pads for the suptitle in fractions of the figure, too little on a tall one:
    # lay out again below it where a top-row title reaches into it
    sup = getattr(fig, "_suptitle", None)
    if sup is not None and sup.get_text():
        renderer = fig.canvas.get_renderer()
        bottom = sup.get_window_extent(renderer).y0
        reach = max((ax.title.get_window_extent(renderer).y1 for ax in fig.axes
                     if ax.get_visible() and ax.get_title()), default=0.0)
        if reach > bottom - 4:
            fig.tight_layout(rect=(0, 0, right, 1 - (reach - bottom + 8) / (fig.dpi
                                                                     * fig.get_figheight())))


def _seed_mean_series(m, seed_rows: list[dict], metric: str):
    """(steps, mean, sd) over the seeds at the steps every seed has (steps > 0); sd 0 for one."""
    from raretask.report.analysis import metric_series

    series = []
    for r in seed_rows:
        steps, v = metric_series(m, r["cell"], metric)
        keep = (steps > 0) & np.isfinite(v)
        series.append(dict(zip(steps[keep].tolist(), v[keep].tolist(), strict=True)))
    common = sorted(set.intersection(*(set(x) for x in series))) if series else []
    if not common:
        return None
    vals = np.array([[x[s] for s in common] for x in series])  # [seeds, steps]
    sd = vals.std(0, ddof=1) if len(series) > 1 else np.zeros(len(common))
    return np.array(common), vals.mean(0), sd


def lm_seed_band_figure(rows, m, metrics: list[tuple[str, str]], title: str, zero_line=False,
                        cells: dict[int, dict] | None = None, max_settings: int = 6):
    """Curves of ``metrics`` over training, one colour per size, each the mean over the seeds of
    a setting with a +- sd band; the legend beside the panels, off the data.

    With one setting per task (a frequency, schedule and other fields) a row of panels per
    task, a panel per metric. With several, small multiples: a row per (task, metric), a panel
    per setting (highest frequency first, the first ``max_settings``), y shared along a row;
    every panel then holds one curve per size, so a colour never has to share its panel with a
    line style (a 5 x 5 grid drawn in one panel is 25 tangled curves).
    """
    from raretask.report.lm_seeds import other_text

    settings = _seed_settings(rows, cells)
    tasks = sorted({k[0] for k in settings})
    variants = {t: sorted({(k[3], k[4], k[5]) for k in settings if k[0] == t},
                          key=lambda v: (v[0], -v[1], repr(v[2]))) for t in tasks}
    sizes = sorted({(k[1], k[2]) for k in settings})
    colours = {s: plt.get_cmap("viridis")(0.9 * i / max(len(sizes) - 1, 1))
               for i, (_, s) in enumerate(sizes)}
    drawn = [(metric, label, t) for t in tasks for metric, label in metrics
             if any(_has(m, r["cell"], metric) for k, rs in settings.items() if k[0] == t
                    for r in rs)]
    if not drawn:
        return None
    several = max(len(v) for v in variants.values()) > 1
    if not several:  # a row per task, a panel per metric
        layout = [[d for d in drawn if d[2] == t] for t in tasks]
        fig, panels = _metric_panels([row for row in layout if row], 4.2, 3.2, extra_w=2.2)
        panels = [(ax, metric, label, task, variants[task][0])
                  for ax, metric, label, task in panels]
    else:
        fig, panels = _setting_panels(drawn, variants, max_settings)
    seeds: dict[str, set[int]] = defaultdict(set)  # size -> seed counts drawn
    handles: dict[str, object] = {}
    for ax, metric, _label, task, setting in panels:
        for (t, _, size, sched, freq, other), seed_rows in settings.items():
            if t != task or (sched, freq, other) != setting:
                continue
            got = _seed_mean_series(m, seed_rows, metric)
            if got is None:
                continue
            steps, mean, sd = got
            line = _mean_band(ax, steps, mean, sd, "-", colours[size])
            seeds[size].add(len(seed_rows))
            if several:
                handles.setdefault(size, line)
            else:
                also = f", {other_text(other)}" if other else ""
                n = len(seed_rows)
                handles.setdefault(f"{size}, {freq:.2e} {sched}{also}, {n} seed"
                                   + "s" * (n > 1), line)
        if zero_line:
            ax.axhline(0, color="0.5", lw=0.6)
    if several:  # a legend entry per size, with how many seeds its curves average
        handles = {f"{size}, {_count_text(seeds[size])} seed"
                   + "s" * (max(seeds[size]) > 1): line for size, line in handles.items()}
    fig.suptitle(f"{title} (seed mean, band: +- sd)", fontsize=10)
    _legend_beside(fig, handles, 2.0 if not several else 1.5)
    return fig


def _count_text(counts: set[int]) -> str:
    """'3', or '2-3' when a size's settings have different seed counts (a grid half run)."""
    lo, hi = min(counts), max(counts)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def _setting_panels(drawn: list[tuple[str, str, str]], variants: dict[str, list],
                    max_settings: int):
    """(figure, [(ax, metric, label, task, setting)]): a row per (metric, label, task) of
    ``drawn``, a panel per setting of that task (its first ``max_settings``), y shared along
    a row (:func:`_panel_grid`); each panel titled by task and setting, the last of a cut row
    with how many it leaves out, each row's first labelled by metric."""
    from raretask.report.lm_seeds import other_text

    rows = [[(metric, label, task, v) for v in variants[task][:max_settings]]
            for metric, label, task in drawn]
    fig, grid = _panel_grid(rows, 2.7, 2.1, extra_w=1.5, extra_h=0.5, sharey=True)
    panels = []
    for ax, (metric, label, task, setting), ci in grid:
        sched, freq, other = setting
        shown = min(len(variants[task]), max_settings)
        left = len(variants[task]) - shown if ci == shown - 1 else 0
        ax.set_title(", ".join(filter(None, (
            f"T_{task.upper()} {freq:.2e} {sched}", other_text(other, short=True),
            f"+{left} more not drawn" if left else ""))), fontsize=8)
        if ci == 0:  # wrapped: a row's label has one panel's height
            ax.set_ylabel("\n".join(textwrap.wrap(label, 24)), fontsize=8)
        panels.append((ax, metric, label, task, setting))
    return fig, panels


def lm_burst_retention_figure(rows: list[dict], m, cells: dict[int, dict], title: str,
                              metric: str = "task_loss"):
    """Fig. 8 analogue, from a run with densely traced injections (``trace_windows``):
    left, the task loss through the last traced injection cycle (steps from just before the
    burst), seed mean +- sd, one colour per size, line style per gap; right, per size the drop at
    an injection and the rebound over the gap (:mod:`raretask.lm.retention`: per seed the mean
    over its windows past the warm-up, then mean +- sd over seeds). None without traced
    windows."""
    from raretask.lm.retention import retention_by_size, run_windows

    windows = run_windows(m, rows, cells, metric)
    lines = retention_by_size(windows, rows, cells)
    if not lines:
        return None
    by_cell = {r["cell"]: r for r in rows}
    sizes = sorted({(ln.params, ln.size) for ln in lines})
    colours = {s: plt.get_cmap("viridis")(0.9 * i / max(len(sizes) - 1, 1))
               for i, (_, s) in enumerate(sizes)}
    gaps = sorted({ln.every for ln in lines})
    styles = ["-", "--", ":", "-."]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12.5, 3.9))
    for _, size in sizes:
        for gi, every in enumerate(gaps):
            traces = [ws[-1] for cid, ws in windows.items() if ws and by_cell[cid]["size"] == size
                      and int(cells.get(cid, {}).get("every", 1)) == every]
            if not traces:
                continue
            offsets = sorted(set.intersection(*(set(w.offsets) for w in traces)))
            vals = np.array([[dict(zip(w.offsets, w.values, strict=True))[o] for o in offsets]
                             for w in traces])
            mean = vals.mean(0)
            sd = vals.std(0, ddof=1) if len(traces) > 1 else np.zeros(len(offsets))
            _mean_band(ax, offsets, mean, sd, styles[gi % 4], colours[size],
                       label=f"{size}, every {every} (m g = {traces[0].injection})")
    ax.axvline(0.5, color="0.5", lw=0.6)  # the burst is trained between offsets 0 and 1
    ax.set_xlabel("steps from just before the burst (burst trained between 0 and 1)", fontsize=8)
    ax.set_ylabel(metric.replace("_", " "), fontsize=8)
    ax.set_title("the last traced injection cycle", fontsize=9)
    ax.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    x = np.arange(len(sizes))
    width = 0.8 / (2 * len(gaps))
    for gi, every in enumerate(gaps):
        for qi, (what, hatch) in enumerate((("drop", None), ("rebound", "//"))):
            ys, es = [], []
            for _, size in sizes:
                ln = next((v for v in lines if v.size == size and v.every == every), None)
                mean, sd = getattr(ln, what) if ln else (None, None)
                ys.append(np.nan if mean is None else mean)
                es.append(0.0 if sd is None else sd)
            pos = x + (2 * gi + qi - len(gaps) + 0.5) * width
            bx.bar(pos, ys, width, yerr=es, color=f"C{gi}", hatch=hatch, alpha=0.8,
                   label=f"{what}, every {every}", capsize=2)
    bx.set_xticks(x, [s for _, s in sizes], fontsize=8)
    bx.axhline(0, color="0.5", lw=0.6)
    bx.set_ylabel(f"{metric.replace('_', ' ')} change", fontsize=8)
    bx.set_title("drop at an injection, rebound over the gap (seed mean +- sd)", fontsize=9)
    bx.legend(fontsize=6.5, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
