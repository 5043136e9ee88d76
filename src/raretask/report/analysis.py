"""Numbers read off finished runs: per-width agreement with theory, the injection contrast."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


@dataclass(frozen=True)
class WidthAgreement:
    """Tasks learned vs predicted at one (width, beta, alpha), seeds pooled."""

    width: int
    beta: float
    alpha: float
    seeds: int
    learned: float  # mean over seeds of the number of tasks learned
    predicted: int
    agreement: float  # fraction of (cell, task) pairs where learned == predicted


def agreement_by_width(rows: list[dict]) -> list[WidthAgreement]:
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        if r["schedule"] == "iid":
            groups[(r["width"], r["beta"], r["alpha"])].append(r)
    out = []
    for (w, b, a), rs in sorted(groups.items()):
        cells = {r["cell"] for r in rs}
        pred = sum(r["predicted_learned"] for r in rs) // len(cells)
        out.append(WidthAgreement(
            width=w, beta=b, alpha=a, seeds=len(cells),
            learned=sum(r["learned"] for r in rs) / len(cells), predicted=pred,
            agreement=sum(r["agree"] for r in rs) / len(rs)))
    return out


@dataclass(frozen=True)
class InjectionContrast:
    """What the rare task's signal does around injections, for one cell.

    ``rise``: mean jump from just before an injection to the peak that follows it; ``trough``:
    mean signal just before each injection (what survived the gap); ``first_trough`` and
    ``last_trough``: the same for the first and the last quarter of injections (accumulation).
    """

    cell: int
    width: int
    seed: int
    gap: int
    injections: int
    rise: float
    trough: float
    first_trough: float
    last_trough: float
    final: float


def load_traces(run_dir: Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """cell -> (steps, rare signal) from every group's traces file."""
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for f in sorted(Path(run_dir).glob("groups/g*/traces.parquet")):
        t = pq.read_table(f).to_pydict()
        by: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for c, s, v in zip(t["cell"], t["step"], t["rare_signal"], strict=True):
            by[c].append((s, v))
        for c, pts in by.items():
            pts.sort()
            out[c] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    return out


def injection_contrast(run_dir: Path, rows: list[dict]) -> list[InjectionContrast]:
    """One :class:`InjectionContrast` per cell with an injection schedule and a trace."""
    traces = load_traces(run_dir)
    cells = {r["cell"]: r for r in rows if r["rare"] and r["schedule"] != "iid"}
    out = []
    for c, r in sorted(cells.items()):
        if c not in traces:
            continue
        steps, sig = traces[c]
        gap = r["gap"]
        inj = np.arange(gap, steps.max() + 1, gap)
        if inj.size < 2:
            continue
        before, peaks = [], []
        for s in inj:
            pre = sig[steps < s]
            post = sig[(steps >= s) & (steps < s + gap)]
            if pre.size and post.size:
                before.append(pre[-1])
                peaks.append(post.max())
        before_a, peaks_a = np.array(before), np.array(peaks)
        q = max(1, before_a.size // 4)
        out.append(InjectionContrast(
            cell=c, width=r["width"], seed=r["seed"], gap=gap, injections=int(before_a.size),
            rise=float(np.mean(peaks_a - before_a)), trough=float(np.mean(before_a[1:])),
            first_trough=float(np.mean(before_a[1:1 + q])),
            last_trough=float(np.mean(before_a[-q:])),
            final=float(sig[-1])))
    return out
