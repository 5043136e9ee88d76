"""Numbers read off finished runs: per-width agreement with theory, the injection contrast."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raretask.runs import store


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


def format_cell(v) -> str:
    """One table cell as ``raretask show`` and the report print it (yes/no, 4 significant)."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


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
        t = store.read_parquet(f).to_pydict()  # page checksums verified
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


# -- tables shared by `raretask show` and the report ----------------------------------------------
def load_metrics(run_dir: Path, partial: bool = False) -> dict[str, np.ndarray]:
    """The run's long-format metrics as columns (cell, step, task, metric, value).

    Reads the merged ``metrics.parquet`` of a finished grid; empty columns when it is missing,
    or, with ``partial``, the tables of the groups finished so far (a grid run call by call
    with ``--only``: its seed tables before the last call).
    """
    names = ("cell", "step", "task", "metric", "value")
    path = Path(run_dir) / "metrics.parquet"
    if path.exists():
        paths = [path]
    elif partial:
        paths = [g / "metrics.parquet" for g in sorted((Path(run_dir) / "groups").glob("g*"))
                 if (g / "summary.json").exists() and (g / "metrics.parquet").exists()]
    else:
        paths = []
    tables = [store.read_parquet(p).to_pydict() for p in paths]  # page checksums verified
    return {k: np.asarray([v for t in tables for v in t[k]]) for k in names}


def metric_series(m: dict[str, np.ndarray], cell: int, metric: str,
                  task: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric of one cell, by step; ``task`` None: any task column."""
    sel = (m["cell"] == cell) & (m["metric"] == metric)
    if task is not None:
        sel &= m["task"] == task
    order = np.argsort(m["step"][sel], kind="stable")
    return m["step"][sel][order].astype(int), m["value"][sel][order].astype(float)


@dataclass(frozen=True)
class CellDigest:
    """One line of ``raretask show``'s toy digest: a cell's tasks learned vs Theorem 3."""

    cell: int
    width: int
    beta: float
    alpha: float
    seed: int
    schedule: str  # "iid" or "<schedule> <gap>"
    learned: int  # tasks with s~ >= threshold
    predicted: int  # tasks Theorem 3 says are learned
    agreement: float  # fraction of the cell's tasks where the two agree
    rare_signal: float  # the rare task's final normalised signal
    rare_predicted: bool
    diverged: int | None = None  # eval step at which training diverged (rows: diverged_step)


def cell_digest(rows: list[dict]) -> list[CellDigest]:
    """Per cell, from :func:`raretask.runs.grid.load_summary` rows of a toy run."""
    by_cell: dict[int, list[dict]] = {}
    for r in rows:
        by_cell.setdefault(r["cell"], []).append(r)
    out = []
    for cell, rs in by_cell.items():
        r0 = rs[0]
        rare = next(r for r in rs if r["rare"])
        out.append(CellDigest(
            cell=cell, width=r0["width"], beta=r0["beta"], alpha=r0["alpha"], seed=r0["seed"],
            schedule=r0["schedule"] + (f" {r0['gap']}" if r0["schedule"] != "iid" else ""),
            learned=sum(r["learned"] for r in rs),
            predicted=sum(r["predicted_learned"] for r in rs),
            agreement=sum(r["agree"] for r in rs) / len(rs), rare_signal=rare["signal"],
            rare_predicted=rare["predicted_learned"], diverged=r0.get("diverged_step")))
    return out


def overall_agreement(rows: list[dict]) -> float:
    """Fraction of (cell, task) pairs of a toy run where learned == predicted."""
    return sum(r["agree"] for r in rows) / len(rows)


@dataclass(frozen=True)
class CosineStats:
    """A language-model cell's gradient cosines over its evaluations after step 0 (mean, sd).

    ``g``: whole batch; ``gt``: the task tokens' part; ``gnt``: the other tokens' part; each
    against the reference task gradient g_r (PAPER.md Sec. 3). NaN when not measured.
    """

    cell: int
    evaluations: int
    g_mean: float
    g_sd: float
    gt_mean: float
    gt_sd: float
    gnt_mean: float
    gnt_sd: float


def lm_cosine_stats(m: dict[str, np.ndarray], cells: list[int]) -> list[CosineStats]:
    """:class:`CosineStats` for each cell that recorded ``cos_g_gr``."""
    out = []
    for c in cells:
        vals = {}
        n = 0
        for key, metric in (("g", "cos_g_gr"), ("gt", "cos_gt_gr"), ("gnt", "cos_gnt_gr")):
            steps, v = metric_series(m, c, metric)
            v = v[(steps > 0) & np.isfinite(v)]
            n = max(n, v.size)
            vals[f"{key}_mean"] = float(np.mean(v)) if v.size else float("nan")
            vals[f"{key}_sd"] = float(np.std(v)) if v.size else float("nan")
        if n:
            out.append(CosineStats(cell=c, evaluations=n, **vals))
    return out
