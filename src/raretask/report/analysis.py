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
def load_metrics(run_dir: Path) -> dict[str, np.ndarray]:
    """The run's long-format metrics as columns (cell, step, task, metric, value).

    Reads the merged ``metrics.parquet`` of a finished grid; empty columns when it is missing.
    """
    path = Path(run_dir) / "metrics.parquet"
    if not path.exists():
        return {k: np.array([]) for k in ("cell", "step", "task", "metric", "value")}
    t = store.read_parquet(path).to_pydict()  # page checksums verified
    return {k: np.asarray(v) for k, v in t.items()}


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


COSINES = (("cos_g_gr", "cos(g, g_r)"), ("cos_gt_gr", "cos(g_t, g_r)"),
           ("cos_gnt_gr", "cos(g_nt, g_r)"))


@dataclass(frozen=True)
class CosineOverSeeds:
    """One setting's gradient cosines over its seeds: per cosine, the mean over seeds of each
    seed's mean over its evaluations from ``from_step`` on, and the half-width of the 95%
    t-interval of that mean (n - 1 degrees of freedom)."""

    setting: dict
    seeds: int
    from_step: int
    mean: dict[str, float]
    half_width: dict[str, float]

    def text(self, metric: str) -> str:
        return f"{self.mean[metric]:+.3f} ± {self.half_width[metric]:.3f}"


def lm_cosine_over_seeds(m: dict[str, np.ndarray], rows: list[dict],
                         cells: dict[int, dict]) -> list[CosineOverSeeds]:
    """Fig. 9 over seeds: the settings of :func:`raretask.report.lm_seeds.seed_cells` with two
    or more seeds that recorded ``cos_g_gr``. The first quarter of a run (its transient) is left
    out: a seed's mean is over the evaluations from step ``steps / 4`` on."""
    from scipy import stats

    from raretask.report.lm_seeds import other_text, seed_cells

    steps_of = {r["cell"]: r["steps"] for r in rows}
    out = []
    for c in seed_cells(rows, cells):
        from_step = int(np.ceil(steps_of[c.cells[0]] / 4))
        per_seed: dict[str, list[float]] = defaultdict(list)
        for cell in c.cells:
            for metric, _ in COSINES:
                steps, v = metric_series(m, cell, metric)
                v = v[(steps >= from_step) & np.isfinite(v)]
                if v.size:
                    per_seed[metric].append(float(v.mean()))
        if len(per_seed.get("cos_g_gr", [])) < 2:
            continue
        mean, half = {}, {}
        for metric, vals in per_seed.items():
            a = np.array(vals)
            mean[metric] = float(a.mean())
            half[metric] = float(stats.t.ppf(0.975, a.size - 1) * a.std(ddof=1)
                                 / np.sqrt(a.size))
        out.append(CosineOverSeeds({"size": c.size, "task": c.task, "frequency": c.frequency,
                                    "schedule": c.schedule, "other": other_text(c.other)},
                                   len(per_seed["cos_g_gr"]), from_step, mean, half))
    return out
