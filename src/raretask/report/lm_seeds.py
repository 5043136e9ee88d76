"""Language-model cells over seeds: mean +- sd, whether the seeds agree, where each size learns.

The scaled Fig. 5 runs every (size, task, frequency, schedule) with several seeds. This module
folds the seeds of one such setting into a :class:`SeedCell` and finds, per size, the lowest
frequency the size learns and the bracket the true boundary lies in (:func:`learned_boundaries`).

Definitions (ours; the paper shows heatmaps and states no threshold):

* **learned** (one seed): :func:`raretask.lm.verdict.lm_verdict` says so: final
  ``test_accuracy`` >= :data:`~raretask.lm.verdict.LEARNED_ACCURACY` (0.9), T_CMP and T_ADD
  alike, the threshold `raretask calibrate` and the LM fix use. A diverged seed counts as not
  learned.
* **a setting is learned** when a strict majority of its seeds learned (2 of 3);
  **its seeds disagree** when some learned and some did not (the heatmaps mark those cells).
* **mean +- sd**: over the seeds' final values; sd is the sample standard deviation (ddof 1),
  None for a single seed.
* **lowest learned frequency** of a size (per task and schedule): the lowest tested frequency
  whose setting is learned; its **bracket** is (the next lower tested frequency, it]: the
  boundary lies above the first and at or below the second. ``None`` as the lower end: learned
  at the lowest tested frequency (the boundary is below the grid). No learned frequency: the
  lowest learned frequency is None and the bracket is (the highest tested frequency, None).
  ``monotone`` says whether every tested frequency above it is learned too.

Example::

    >>> rows = [dict(cell=i, size="4m", params=4, task="cmp", schedule="spread",
    ...              frequency=1 / 512, seed=i, test_accuracy=a, chance_format=0.5)
    ...         for i, a in enumerate([0.95, 0.91, 0.86])]
    >>> (c,) = seed_cells(rows)
    >>> c.learned, c.disagree, round(c.mean["test_accuracy"], 4)
    (True, True, 0.9067)
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raretask.lm.verdict import LEARNED_ACCURACY, seed_learned

METRICS = ("test_accuracy", "train_accuracy", "task_loss", "task_test_loss", "val_loss",
           "val_loss_framed")
"""Final values aggregated over seeds: accuracy, task loss (training instances), held-out task
loss (test instances), background validation loss, plain and in the training rows' format."""
def nominal_frequency(row: dict, cells: dict[int, dict] | None = None) -> float:
    """The rate the cell asked for (:func:`raretask.lm.config.requested_rate`), to 4
    significant digits, so the seeds of one setting share it exactly."""
    from raretask.lm.config import requested_rate

    return float(f"{requested_rate((cells or {}).get(row['cell'], {}), row):.4g}")


IDENTITY = frozenset({"cell", "group", "seed"})
"""Cell fields that tell seeds of one setting apart (or name the cell), not the setting."""
SHOWN = frozenset({"task", "size", "rate", "every", "delivery",
                   "frequency", "instances", "mode"})  # the last three: before the rename
"""Fields a setting's row already shows (as task, size, frequency and schedule), under their
names today and in run directories made before issue 21's vocabulary."""


def varying_fields(fields: Sequence[dict]) -> list[str]:
    """The keys whose values differ among the field dicts ``fields`` (cells.json entries),
    identity fields left out: what tells those cells apart in a label."""
    keys = {k for f in fields for k in f} - IDENTITY
    return sorted(k for k in keys
                  if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in fields}) > 1)


def other_fields(rows: list[dict], cells: dict[int, dict]) -> dict[int, tuple]:
    """Per row's cell, ``((key, value), ...)`` for the fields beyond those a row shows and the
    seed that differ among the cells of its task: what else sets it apart (weight decay...).
    Per task, so a grid whose tasks each have their own budget (``variants:``) does not label
    every T_CMP cell with its steps because T_ADD's differ."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_task[r.get("task", "none")].append(cells.get(r["cell"], {}))
    keys = {task: [k for k in varying_fields(fs) if k not in SHOWN]
            for task, fs in by_task.items()}
    return {r["cell"]: tuple((k, cells.get(r["cell"], {}).get(k))
                             for k in keys[r.get("task", "none")]) for r in rows}


def schedule_family(row: dict, cells: dict[int, dict] | None = None) -> str:
    """'spread', or 'every G MODE': the schedule without its injection size (which grows with
    the frequency), so one size's frequencies line up."""
    from raretask.lm.config import delivery_family

    c = (cells or {}).get(row["cell"], {})
    label = row.get("schedule", "spread")
    if c:
        return delivery_family(c)
    if label in ("spread", "none"):
        return label
    size_every, mode = label.split()
    return f"every {size_every.split('/')[1]} {mode}"


@dataclass(frozen=True)
class SeedCell:
    """One (size, task, frequency, schedule) setting over its seeds."""

    size: str
    params: int
    task: str
    frequency: float
    schedule: str
    """:func:`schedule_family`."""
    seeds: tuple[int, ...]
    cells: tuple[int, ...]
    mean: dict[str, float | None]
    """Per metric of :data:`METRICS`: the mean over the seeds that have it (None if none)."""
    sd: dict[str, float | None]
    """Per metric: sample sd (ddof 1) over those seeds; None with fewer than two."""
    learned_seeds: tuple[bool, ...]
    """:func:`seed_learned` per seed, in ``seeds`` order."""
    other: tuple[tuple[str, object], ...] = ()
    """The setting's other fields that differ between the run's settings (weight decay, lr...):
    two settings that differ only there are not seeds of one another."""

    @property
    def n_learned(self) -> int:
        return sum(self.learned_seeds)

    @property
    def learned(self) -> bool:
        """A strict majority of the seeds learned the task."""
        return 2 * self.n_learned > len(self.learned_seeds)

    @property
    def disagree(self) -> bool:
        """Some seeds learned the task and some did not."""
        return 0 < self.n_learned < len(self.learned_seeds)

    def text(self, metric: str, fmt: str = ".3f") -> str:
        """'mean +- sd' (or the mean alone for one seed, '-' without values)."""
        m, s = self.mean.get(metric), self.sd.get(metric)
        if m is None:
            return "-"
        return f"{m:{fmt}}" if s is None else f"{m:{fmt}} +- {s:{fmt}}"


def _mean_sd(values: Sequence[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var)


def seed_cells(rows: list[dict], cells: dict[int, dict] | None = None,
               metrics: Sequence[str] = METRICS) -> list[SeedCell]:
    """Fold the summary rows of an LM run (``raretask show DIR --json``) over seeds.

    ``cells`` (cell id -> fields, as in ``cells.json``) gives each row its configured frequency
    and schedule; without it they come from the rows. Rows of ``task: none`` are skipped.
    Settings come back ordered by task, size (parameters), schedule, frequency (descending).
    """
    cells = cells or {}
    rows = [r for r in rows if r.get("task", "none") != "none"]
    others = other_fields(rows, cells)
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        key = (r["task"], r["size"], schedule_family(r, cells), nominal_frequency(r, cells),
               others[r["cell"]])
        groups[key].append(r)
    out = []
    for (task, size, sched, freq, other), rs in groups.items():
        rs = sorted(rs, key=lambda r: (r.get("seed", 0), r["cell"]))
        mean, sd = {}, {}
        for metric in metrics:
            vals = [float(r[metric]) for r in rs if r.get(metric) is not None
                    and math.isfinite(float(r[metric]))]
            mean[metric], sd[metric] = _mean_sd(vals)
        out.append(SeedCell(
            size=size, params=int(rs[0]["params"]), task=task, frequency=freq, schedule=sched,
            seeds=tuple(int(r.get("seed", 0)) for r in rs), cells=tuple(r["cell"] for r in rs),
            mean=mean, sd=sd, learned_seeds=tuple(seed_learned(r) for r in rs), other=other))
    return sorted(out, key=lambda c: (c.task, c.params, c.size, c.schedule,
                                      json.dumps(c.other, default=str), -c.frequency))


@dataclass(frozen=True)
class Boundary:
    """Where one size learns one task under one schedule (module docstring)."""

    size: str
    params: int
    task: str
    schedule: str
    lowest_learned: float | None
    """The lowest tested frequency whose setting is learned; None if none is."""
    bracket: tuple[float | None, float | None]
    """(highest tested frequency below it, it): the boundary lies in (lo, hi]."""
    monotone: bool
    """Every tested frequency above ``lowest_learned`` is learned too."""
    frequencies: tuple[float, ...]
    """The tested frequencies, ascending."""
    other: tuple[tuple[str, object], ...] = ()
    """:attr:`SeedCell.other` of the settings it is over."""

    def text(self) -> str:
        lo, hi = self.bracket
        if hi is None:
            return f"not learned (boundary above {lo:.3g})"
        if lo is None:
            return f"{hi:.3g} (boundary at or below it: the lowest tested)"
        return f"{hi:.3g} (boundary in ({lo:.3g}, {hi:.3g}])"


def learned_boundaries(settings: list[SeedCell]) -> list[Boundary]:
    """Per (task, size, schedule): the lowest learned frequency and its bracket."""
    groups: dict[tuple, list[SeedCell]] = defaultdict(list)
    for c in settings:
        groups[(c.task, c.params, c.size, c.schedule, c.other)].append(c)
    out = []
    for (task, params, size, sched, other), cs in sorted(
            groups.items(), key=lambda kv: (*kv[0][:4], json.dumps(kv[0][4], default=str))):
        cs = sorted(cs, key=lambda c: c.frequency)
        freqs = tuple(c.frequency for c in cs)
        learned = [i for i, c in enumerate(cs) if c.learned]
        if not learned:
            out.append(Boundary(size, params, task, sched, None, (freqs[-1], None), True, freqs,
                                other))
            continue
        i = learned[0]
        lo = freqs[i - 1] if i > 0 else None
        monotone = all(c.learned for c in cs[i:])
        out.append(Boundary(size, params, task, sched, freqs[i], (lo, freqs[i]), monotone, freqs,
                            other))
    return out


SHORT = {"weight_decay": "wd", "batch_size": "B", "seq_len": "T", "task_seed": "task seed"}
"""Short names for the fields an 80-column table names in its 'also' column."""


def other_text(other: tuple[tuple[str, object], ...], short: bool = False) -> str:
    """'weight_decay 0.1, lr 0.003' (empty when nothing else differs); ``short``:
    'wd=0.1 lr=0.003', names from :data:`SHORT`, for a narrow column."""
    if short:
        return " ".join(f"{SHORT.get(k, k)}={v}" for k, v in other)
    return ", ".join(f"{k} {v}" for k, v in other)


COSINES = (("cos_g_gr", "cos(g, g_r)"), ("cos_gt_gr", "cos(g_t, g_r)"),
           ("cos_gnt_gr", "cos(g_nt, g_r)"),
           ("cos_g_gr_between", "cos(g, g_r) between injections"))
"""The probe's cosines: at the injection step (g = g_t + g_nt), and between injections (a
batch without instances: g is all other tokens'; runs made before it was probed lack it)."""


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
        if metric not in self.mean:  # not probed (a run from before the metric existed)
            return "-"
        return f"{self.mean[metric]:+.3f} ± {self.half_width[metric]:.3f}"


def lm_cosine_over_seeds(m: dict[str, np.ndarray], rows: list[dict],
                         cells: dict[int, dict]) -> list[CosineOverSeeds]:
    """Fig. 9 over seeds: the settings of :func:`raretask.report.lm_seeds.seed_cells` with two
    or more seeds that recorded ``cos_g_gr``. The first quarter of a run (its transient) is left
    out: a seed's mean is over the evaluations from step ``steps / 4`` on."""
    from scipy import stats

    from raretask.report.analysis import metric_series

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


@dataclass(frozen=True)
class SeedTable:
    """One table of :func:`seed_tables`: the terminal (``summary_tables``) and the HTML report
    draw the same cells."""

    key: str
    """'settings', 'boundaries' or 'retention' (Fig. 8's, drawn beside Fig. 8)."""
    title: str
    columns: list[str]
    rows: list[list[str]]
    numbers: tuple[str, ...] = ()
    """Columns of numbers, never folded."""


def _pm(mean: float | None, sd: float | None) -> str:
    return "-" if mean is None else (f"{mean:.3f}" if sd is None else f"{mean:.3f}±{sd:.3f}")


def seed_tables(rows: list[dict], cells: dict[int, dict], m: dict | None = None
                ) -> list[SeedTable]:
    """An LM run's tables over seeds: settings (mean ± sd, learned seeds, disagreement), the
    lowest learned frequency per size with its bracket, and, when ``m`` (the long metrics)
    holds traced injections (Fig. 8), drop / rebound / kept per size and gap."""
    from raretask.lm.retention import retention_by_size, run_windows

    settings = seed_cells(rows, cells)
    also = any(c.other for c in settings)  # settings apart in other fields (weight decay...)
    # the format-matched text loss, where the runs recorded it (older runs did not)
    framed = any(r.get("val_loss_framed") is not None for r in rows)
    extra = ["also"] * also

    def more(other) -> list[str]:
        return [other_text(other, short=True)] * also

    def pm(text: str) -> str:  # 'mean±sd': 80 columns hold the table without folding numbers
        return text.replace(" +- ", "±")

    out = [SeedTable(
        "settings", "final values over seeds (mean ± sd)",
        ["task", "size", "freq/tok", "schedule", *extra, "test acc", "task L", "held-out L",
         "val L", *["framed val L"] * framed, "learned"],
        [[c.task, c.size, f"{c.frequency:.2e}", c.schedule, *more(c.other),
          pm(c.text("test_accuracy")), pm(c.text("task_loss")), pm(c.text("task_test_loss")),
          pm(c.text("val_loss")), *[pm(c.text("val_loss_framed"))] * framed,
          f"{c.n_learned}/{len(c.seeds)}" + (" disagree" if c.disagree else "")]
         for c in settings],
        ("freq/tok", "test acc", "task L", "held-out L", "val L", "framed val L"))]
    out.append(SeedTable(
        "boundaries", "lowest learned frequency per size (boundary bracket)",
        ["task", "size", "schedule", *extra, "lowest learned", "monotone"],
        [[b.task, b.size, b.schedule, *more(b.other), b.text(), "yes" if b.monotone else "no"]
         for b in learned_boundaries(settings)]))
    lines = retention_by_size(run_windows(m, rows, cells), rows, cells) if m is not None else []
    if lines:
        out.append(SeedTable(
            "retention",
            "retention around injections (task loss; per seed the mean over its traced "
            "windows past the warm-up, then mean ± sd over seeds; drop: before - after the "
            "burst, rebound: end of the gap - after, kept: 1 - rebound / drop, net: before - "
            "end of the gap)",
            ["size", "every", "seeds", "windows", "drop", "rebound", "kept", "net"],
            [[ln.size, str(ln.every), str(ln.seeds), str(ln.windows), _pm(*ln.drop),
              _pm(*ln.rebound), _pm(*ln.kept), _pm(*ln.net)] for ln in lines]))
    return out


def summary_tables(run_dir: str | Path) -> list:
    """rich Tables of an LM run directory (finished cells; :func:`seed_tables`)."""
    from rich import box
    from rich.table import Table

    from raretask.report.analysis import load_metrics
    from raretask.runs import store
    from raretask.runs.grid import load_summary

    run_dir = Path(run_dir)
    rows = load_summary(run_dir)  # the finished cells of a run still going too
    m = load_metrics(run_dir, partial=True)  # the finished groups of a grid still going
    tables = []
    for i, t in enumerate(seed_tables(rows, store.read_cells(run_dir), m)):
        drawn = Table(title=f"{run_dir}: {t.title}" if i == 0 else t.title,
                      box=box.SIMPLE_HEAD, padding=0)
        for c in t.columns:  # words wrap, a number stays whole
            drawn.add_column(c, justify="right", overflow="fold", no_wrap=c in t.numbers)
        for row in t.rows:
            drawn.add_row(*row)
        tables.append(drawn)
    return tables


def main(argv: list[str] | None = None) -> None:
    """``python -m raretask.report.lm_seeds RUN_DIR``: print :func:`summary_tables`."""
    import sys

    from rich.console import Console

    args = sys.argv[1:] if argv is None else argv
    console = Console()
    for run_dir in args:
        for table in summary_tables(run_dir):
            console.print(table)


__all__ = [
    "LEARNED_ACCURACY",
    "METRICS",
    "COSINES",
    "Boundary",
    "CosineOverSeeds",
    "SeedCell",
    "SeedTable",
    "learned_boundaries",
    "lm_cosine_over_seeds",
    "nominal_frequency",
    "other_text",
    "schedule_family",
    "seed_cells",
    "seed_learned",
    "seed_tables",
    "summary_tables",
    "varying_fields",
]


if __name__ == "__main__":
    main()
