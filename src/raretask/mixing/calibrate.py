"""`raretask calibrate`: the share a task needs to be learned, as a function of model size.

Reads a finished grid (toy or LM, :func:`raretask.runs.grid.load_summary`), and for each curve
(cells that differ only in size, seed and task frequency) and each size finds the frequency
threshold that best separates learned from not-learned (task, seed) points: the cut with fewest
misclassifications; the bracket ``[low, high]`` runs from the most frequent task below the cut to
the least frequent above it, the threshold is their geometric mean and its standard error (log10)
is the bracket's width / sqrt(12). Sizes where every point is learned (or none) only bound the
threshold and are left out of the fit. The fit is ``log10 f* = log10_c + slope * log10 size``
(weighted least squares, ``scipy.optimize.curve_fit`` with those errors, ``absolute_sigma``), with
its covariance.

Toy grids: the size is the width N, "learned" is the summary's ``learned`` (s~ >= threshold), and
each point is compared with :mod:`raretask.theory`: Theorem 3's verdicts on the same tasks give a
theory bracket, which must overlap the measured one (``agrees``); ``theory`` is the share the
curve's rarest task needs at that width (:meth:`~raretask.theory.Theory.required_frequency`), and
``theory_fit`` fits those shares over the sizes the measured fit uses, so the two slopes compare.
LM grids: the size is the non-embedding parameter count, the frequency is instances per token,
learned means test accuracy >= ``learned_accuracy``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from raretask.errors import UserError
from raretask.mixing.thresholds import CalibratedThreshold

TOY_CURVE_KEYS = ("tasks", "features_per_task", "alpha", "beta", "frequent_mass", "schedule",
                  "gap")
LM_CURVE_KEYS = ("task", "schedule")


@dataclass(frozen=True)
class Point:
    """The threshold at one size."""

    size: float
    threshold: float | None
    low: float | None
    high: float | None
    sigma_log10: float | None
    errors: int
    n: int
    censored: str | None  # "all learned" / "none learned" / None
    theory: float | None = None
    theory_low: float | None = None
    theory_high: float | None = None
    agrees: bool | None = None


@dataclass(frozen=True)
class Fit:
    """``log10 f*(size) = log10_c + slope * log10 size`` with covariance."""

    log10_c: float
    slope: float
    cov: list[list[float]]
    points: int

    def at(self, size: float) -> float:
        return float(10 ** (self.log10_c + self.slope * math.log10(size)))

    def sigma_log10(self, size: float) -> float:
        x = np.array([1.0, math.log10(size)])
        return float(np.sqrt(max(x @ np.asarray(self.cov) @ x, 0.0)))


@dataclass(frozen=True)
class Curve:
    name: str
    key: dict
    points: tuple[Point, ...]
    fit: Fit | None
    theory_fit: Fit | None = None


def threshold_point(size: float, freq: np.ndarray, learned: np.ndarray) -> Point:
    """The best cut between not-learned (below) and learned (above) frequencies."""
    f = np.asarray(freq, float)
    y = np.asarray(learned, bool)
    levels = np.unique(f)
    m = levels.size
    # errors(i): cut between levels[i-1] and levels[i] (i = 0: below all, i = m: above all)
    errs = np.array([int(np.sum(y & (f < (levels[i] if i < m else np.inf)))) +
                     int(np.sum(~y & (f >= (levels[i] if i < m else np.inf))))
                     for i in range(m + 1)])
    best = np.flatnonzero(errs == errs.min())
    i_lo, i_hi = int(best[0]), int(best[-1])
    n, e = int(f.size), int(errs.min())
    if i_hi == 0:
        return Point(size, None, None, float(levels[0]), None, e, n, "all learned")
    if i_lo == m:
        return Point(size, None, float(levels[-1]), None, None, e, n, "none learned")
    low = float(levels[i_lo - 1]) if i_lo > 0 else None
    high = float(levels[i_hi]) if i_hi < m else None
    if low is None or high is None:
        return Point(size, None, low, high, None, e, n,
                     "all learned" if low is None else "none learned")
    thr = math.sqrt(low * high)
    return Point(size, thr, low, high, math.log10(high / low) / math.sqrt(12), e, n, None)


def fit_curve(points: list[Point]) -> Fit | None:
    """Weighted power-law fit over the uncensored points (None with fewer than 2)."""
    from scipy.optimize import curve_fit

    use = [p for p in points if p.threshold is not None]
    if len({p.size for p in use}) < 2:
        return None
    x = np.log10([p.size for p in use])
    y = np.log10([p.threshold for p in use])
    sigma = np.maximum([p.sigma_log10 for p in use], 0.01)
    (a, b), cov = curve_fit(lambda x, a, b: a + b * x, x, y, p0=(y.mean(), 0.0), sigma=sigma,
                            absolute_sigma=True)
    return Fit(float(a), float(b), np.asarray(cov).tolist(), len(use))


def _theory(rows: list[dict], width: int) -> tuple[float, np.ndarray]:
    """(share the curve's rarest task needs at ``width``, Theorem 3's verdict for each row)."""
    from raretask.theory import TaskSet, Theory

    r = rows[0]
    ts = TaskSet.power_law(r["tasks"], r["features_per_task"], r["alpha"], r["beta"])
    th = Theory(ts, r["frequent_mass"])
    learned = th.learned(width)
    return th.required_frequency(ts.size - 1, width), np.array([learned[x["task"] - 1]
                                                                for x in rows])


def calibrate_rows(rows: list[dict], learned_accuracy: float = 0.9) -> tuple[str, list[Curve]]:
    """(kind, curves) from a grid's summary rows."""
    if not rows:
        raise UserError("calibrate: the run has no finished cells")
    kind = "lm" if rows[0].get("kind") == "lm" else "toy"
    groups: dict[tuple, list[dict]] = {}
    keys = LM_CURVE_KEYS if kind == "lm" else TOY_CURVE_KEYS
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    curves = []
    for key, rs in groups.items():
        by_size: dict[float, list[dict]] = {}
        for r in rs:
            size = float(r["params"] if kind == "lm" else r["width"])
            by_size.setdefault(size, []).append(r)
        points = []
        for size in sorted(by_size):
            grp = by_size[size]
            if kind == "lm":
                freq = [r["frequency"] for r in grp]
                learned = [(r.get("test_accuracy") or 0.0) >= learned_accuracy for r in grp]
            else:
                freq = [r["frequency"] for r in grp]
                learned = [r["learned"] for r in grp]
            p = threshold_point(size, np.array(freq), np.array(learned))
            if kind == "toy":
                th, predicted = _theory(grp, int(size))
                tp = threshold_point(size, np.array(freq), predicted)
                overlap = (p.low or 0.0) <= (tp.high if tp.high is not None else np.inf) and \
                    (tp.low or 0.0) <= (p.high if p.high is not None else np.inf)
                p = Point(**{**asdict(p), "theory": th, "theory_low": tp.low,
                             "theory_high": tp.high, "agrees": bool(overlap)})
            points.append(p)
        name = ",".join(f"{k}={v}" for k, v in zip(keys, key, strict=True))
        theory_fit = None
        if kind == "toy":
            tp = [Point(p.size, p.theory, None, None, 0.01, 0, 1, None) for p in points
                  if p.theory and p.theory > 0 and p.threshold is not None]
            theory_fit = fit_curve(tp)
        curves.append(Curve(name, dict(zip(keys, key, strict=True)), tuple(points),
                            fit_curve(points), theory_fit))
    return kind, curves


def calibration_json(kind: str, source: str, curves: list[Curve], learned: str) -> dict:
    return {"kind": kind, "source": source, "size_unit": "params" if kind == "lm" else "width",
            "frequency_unit": "instances per token" if kind == "lm" else "share of samples",
            "learned": learned,
            "curves": [{"name": c.name, "key": c.key, "points": [asdict(p) for p in c.points],
                        "fit": asdict(c.fit) if c.fit else None,
                        "theory_fit": asdict(c.theory_fit) if c.theory_fit else None}
                       for c in curves]}


def load_calibration(path: str | Path, curve: str | None = None) -> CalibratedThreshold:
    """A :class:`CalibratedThreshold` from a calibration file (``curve``: name or index)."""
    from raretask.runs import store

    path = Path(path)
    try:
        data = store.read_json(path)
        curves = data["curves"]
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not a calibration file written by raretask calibrate") from None
    fitted = [c for c in curves if c.get("fit")]
    if not fitted:
        raise UserError(f"{path}: no curve has a fit (each needs two sizes with a threshold)")
    if curve is None:
        if len(fitted) > 1:
            raise UserError(f"{path}: {len(fitted)} curves; choose one with --curve (names: "
                            f"{', '.join(c['name'] for c in fitted)})")
        chosen = fitted[0]
    else:
        match = [c for i, c in enumerate(fitted) if c["name"] == curve or str(i) == curve]
        if not match:
            raise UserError(f"--curve: {curve!r} is not a fitted curve of {path}")
        chosen = match[0]
    f = chosen["fit"]
    sigma = float(np.sqrt(max(f["cov"][0][0], 0.0)))
    return CalibratedThreshold(f["log10_c"], f["slope"], label=f"{path.name} [{chosen['name']}]",
                               log10_sigma=sigma)
