"""Retention around bursts (PAPER.md Sec. 3, the paper's Fig. 8): what an injection teaches and
what the gap until the next one takes away, read from a densely traced task loss.

A cell with bursts every g steps and ``trace_windows`` > 0 is evaluated at ``m g - 1`` (just
before the m-th injection), ``m g`` (just after) and through the gap to ``(m + 1) g - 1``
(:mod:`raretask.lm.schedule`). For each such window found in the metrics:

* ``drop`` = loss(before) - loss(after): how much the burst lowered the task loss (> 0: it
  taught something);
* ``rebound`` = loss(end) - loss(after): how much of it the gap's background steps undid
  (> 0: forgetting; update-and-forget makes it large in small models);
* ``kept`` = 1 - rebound / drop: the share of the drop still there when the next burst comes
  (1: all kept, 0: all lost, < 0: worse than before the burst); None when drop <= 0.
* ``net`` = loss(before) - loss(end) = drop - rebound: what the whole cycle (burst and gap)
  left, in loss units (> 0: the task loss is lower when the next burst comes). Unlike kept it
  stays defined, and its spread over seeds readable, when a burst barely moves the loss.

:func:`run_windows` finds them in a run's metrics, leaving out bursts inside the learning-rate
warm-up; :func:`retention_by_size` folds the windows of every cell into one line per (size, gap):
per seed the mean over its windows (kept: 1 - mean rebound / mean drop of the seed), then
mean +- sd (ddof 1) over the seeds.

Example::

    >>> steps = [9, 10, 12, 14, 16, 18, 19]
    >>> loss = [3.0, 2.0, 2.2, 2.4, 2.5, 2.6, 2.6]
    >>> (w,) = windows(steps, loss, every=10)
    >>> round(w.drop, 3), round(w.rebound, 3), round(w.kept, 3), round(w.net, 3)
    (1.0, 0.6, 0.4, 0.4)
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Window:
    """One traced injection cycle of one cell (module docstring)."""

    injection: int
    """m: the m-th injection (1-based)."""
    before: float
    after: float
    end: float
    offsets: tuple[int, ...]
    """Steps relative to the injection's own step m g - 1 ... : before is 0, after is 1."""
    values: tuple[float, ...]
    """The metric at those steps."""

    @property
    def step(self) -> int:
        """Evaluation step just after the injection (m g)."""
        return self.injection

    @property
    def drop(self) -> float:
        return self.before - self.after

    @property
    def rebound(self) -> float:
        return self.end - self.after

    @property
    def kept(self) -> float | None:
        return 1.0 - self.rebound / self.drop if self.drop > 0 else None

    @property
    def net(self) -> float:
        return self.before - self.end


def windows(steps: Sequence[int], values: Sequence[float], every: int) -> list[Window]:
    """Every injection cycle whose before (m g - 1), after (m g) and end ((m + 1) g - 1) steps
    are all among ``steps`` (a metric's evaluation steps, ``values`` at them): the traced ones,
    plus any the log-spaced schedule happens to cover whole. ``injection`` holds m g."""
    if every < 1:
        raise ValueError(f"every must be >= 1, got {every}")
    at = {int(s): float(v) for s, v in zip(steps, values, strict=True) if math.isfinite(v)}
    out = []
    for after in sorted(s for s in at if s > 0 and s % every == 0):
        before, end = after - 1, after + every - 1
        if before not in at or end not in at:
            continue
        inside = [s for s in sorted(at) if before <= s <= end]
        out.append(Window(after, at[before], at[after], at[end],
                          tuple(s - before for s in inside), tuple(at[s] for s in inside)))
    return out


def _mean_sd(xs: Sequence[float]) -> tuple[float | None, float | None]:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if not xs:
        return None, None
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


@dataclass(frozen=True)
class SizeRetention:
    """One (size, gap) line: per seed the mean over its windows, then mean +- sd over seeds."""

    size: str
    params: int
    every: int
    seeds: int
    windows: int
    """Windows over all seeds."""
    drop: tuple[float | None, float | None]
    rebound: tuple[float | None, float | None]
    kept: tuple[float | None, float | None]
    net: tuple[float | None, float | None]


def retention_by_size(cell_windows: dict[int, list[Window]], rows: list[dict],
                      cells: dict[int, dict]) -> list[SizeRetention]:
    """Fold ``cell_windows`` (cell id -> its :func:`windows`) into one line per (size, every),
    ordered by parameters then gap. ``rows``: the run's summary rows (size, params, seed);
    ``cells``: cell id -> config fields (``every``)."""
    by_cell = {r["cell"]: r for r in rows}
    groups: dict[tuple, list[list[Window]]] = defaultdict(list)
    for cid, ws in cell_windows.items():
        if not ws:
            continue
        r = by_cell[cid]
        groups[(r["params"], r["size"], int(cells.get(cid, {}).get("every", 1)))].append(ws)
    out = []
    for (params, size, every), per_seed in sorted(groups.items()):
        out.append(SizeRetention(
            size=size, params=params, every=every, seeds=len(per_seed),
            windows=sum(len(ws) for ws in per_seed),
            drop=_mean_sd(_seed_means(per_seed, "drop")),
            rebound=_mean_sd(_seed_means(per_seed, "rebound")),
            kept=_mean_sd(_seed_kept(per_seed)),
            net=_mean_sd(_seed_means(per_seed, "net"))))
    return out


def _seed_kept(per_seed: list[list[Window]]) -> list[float]:
    """Per seed, 1 - mean rebound / mean drop over its windows (None-free; a seed whose mean
    drop is not positive is left out). A ratio of means, not a mean of ratios: one window whose
    burst barely moved the loss would make its own ratio, and a mean of them, anything."""
    out = []
    for ws in per_seed:
        drop = sum(w.drop for w in ws) / len(ws)
        if drop > 0:
            out.append(1.0 - sum(w.rebound for w in ws) / len(ws) / drop)
    return out


def _seed_means(per_seed: list[list[Window]], attr: str) -> list[float]:
    """Per seed, the mean of ``attr`` over its windows (windows without a value left out)."""
    means = []
    for ws in per_seed:
        vals = [getattr(w, attr) for w in ws if getattr(w, attr) is not None]
        if vals:
            means.append(sum(vals) / len(vals))
    return means


def run_windows(m: dict, rows: list[dict], cells: dict[int, dict],
                metric: str = "task_loss", past_warmup: bool = True) -> dict[int, list[Window]]:
    """:func:`windows` of ``metric`` for every cell of a run that traced its injections
    (``trace_windows`` > 0 in ``cells``: log-spaced evaluations that happen to fall one gap
    apart are not a trace); ``m``: the long-format metrics as column arrays
    (``raretask.report.analysis.load_metrics``).

    ``past_warmup`` leaves out a window whose burst lands within the cell's learning-rate
    warm-up (injection step <= ``warmup``): there the task loss moves with the ramping rate
    and the background's first fitting (fig8_lm_retention, 2026-12-05: the first window's
    task loss rose by up to 0.9 over the gap at every size), not with what the burst taught."""
    import numpy as np

    cell_col, metric_col = np.asarray(m["cell"]), np.asarray(m["metric"])
    step_col, value_col = np.asarray(m["step"]), np.asarray(m["value"], dtype=float)
    of_metric = metric_col == metric
    out = {}
    for r in rows:
        cid = r["cell"]
        fields = cells.get(cid, {})
        if not int(fields.get("trace_windows") or 0):
            continue
        sel = of_metric & (cell_col == cid)
        found = windows(step_col[sel].astype(int).tolist(), value_col[sel].tolist(),
                        int(fields.get("every", 1)))
        warmup = int(fields.get("warmup") or 0) if past_warmup else 0
        out[cid] = [w for w in found if w.injection > warmup]
    return out


__all__ = ["SizeRetention", "Window", "retention_by_size", "run_windows", "windows"]
