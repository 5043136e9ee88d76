"""Figures of the toy study, drawn from a run directory's stored results (never from training).

* :func:`phase_diagram`: per beta, mean normalised signal over seeds for each (width, task), with
  Theorem 3's staircase (the width at which each task's first feature enters) drawn on top.
* :func:`injection_traces`: the rare task's normalised signal step by step, injections marked.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from raretask.report.analysis import load_traces  # noqa: E402
from raretask.theory import TaskSet, Theory  # noqa: E402


def phase_diagram(rows: list[dict], path: Path, title: str = "") -> Path | None:
    """Write the phase diagram PNG; returns its path, or None when the grid has < 2 widths."""
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def injection_traces(run_dir: Path, rows: list[dict], path: Path) -> Path | None:
    """Write the rare-signal traces PNG: one panel per (gap, width), seeds overlaid.

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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
