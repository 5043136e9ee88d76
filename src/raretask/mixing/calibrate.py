"""`raretask calibrate`: the learnability law of :mod:`raretask.mixing.learnability`, pooled
from any number of finished grids, cross-validated, and written to a calibration file
(:func:`calibrate_runs`, :class:`CalibrationFile`, :func:`load_calibration`).

Below that, the per-size brackets this module started with, kept for the toy's comparison with
Theorem 3 (:func:`calibrate_rows`). It reads a finished grid's rows, and for each curve
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
learned means test accuracy >= ``learned_accuracy``, by default
:data:`raretask.lm.verdict.LEARNED_ACCURACY` (0.9), the verdict `raretask show` and the report use.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from raretask.errors import UserError
from raretask.lm.verdict import LEARNED_ACCURACY
from raretask.mixing.learnability import PRIOR_SD, Law, Score
from raretask.runs.grid import load_summary  # the one place calibration reads rows from
from raretask.studies import all_studies, study, study_of_rows


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


def calibrate_rows(rows: list[dict], learned_accuracy: float = LEARNED_ACCURACY
                   ) -> tuple[str, list[Curve]]:
    """(kind, curves) from a grid's summary rows; the rows' study says what a curve, a size and
    "learned" are, and compares each point with its closed-form theory where it has one.
    ``learned_accuracy``: LM grids' threshold (default the study's one, 0.9)."""
    if not rows:
        raise UserError("calibrate: the run has no finished cells")
    st = study_of_rows(rows)
    groups: dict[tuple, list[dict]] = {}
    keys = st.curve_keys
    for r in rows:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    curves = []
    for key, rs in groups.items():
        by_size: dict[float, list[dict]] = {}
        for r in rs:
            by_size.setdefault(st.cell_size(r), []).append(r)
        points = []
        for size in sorted(by_size):
            grp = by_size[size]
            freq = np.array([r["frequency"] for r in grp])
            p = threshold_point(size, freq, np.array([st.learned_row(r, learned_accuracy)
                                                      for r in grp]))
            theory = st.theory_verdicts(grp, size)
            if theory is not None:
                th, predicted = theory
                tp = threshold_point(size, freq, predicted)
                overlap = (p.low or 0.0) <= (tp.high if tp.high is not None else np.inf) and \
                    (tp.low or 0.0) <= (p.high if p.high is not None else np.inf)
                p = Point(**{**asdict(p), "theory": th, "theory_low": tp.low,
                             "theory_high": tp.high, "agrees": bool(overlap)})
            points.append(p)
        name = ",".join(f"{k}={v}" for k, v in zip(keys, key, strict=True))
        tp = [Point(p.size, p.theory, None, None, 0.01, 0, 1, None) for p in points
              if p.theory and p.theory > 0 and p.threshold is not None]
        theory_fit = fit_curve(tp) if any(p.agrees is not None for p in points) else None
        curves.append(Curve(name, dict(zip(keys, key, strict=True)), tuple(points),
                            fit_curve(points), theory_fit))
    return st.kind, curves


# -- the calibration file (format 2: the learnability law) --------------------------------------

FORMAT = "raretask-calibration-2"


class Units(BaseModel):
    """What the numbers of a calibration mean."""

    model_config = ConfigDict(extra="forbid")
    size: str
    budget: str
    frequency: str
    tokens_per_instance: float | None


class HeldOut(BaseModel):
    """One held-out cell: what it measured and what the law said."""

    model_config = ConfigDict(extra="forbid")
    source: str
    task: str
    size: str
    params: float
    tokens: float
    frequency: float
    schedule: str
    seed: int
    score: float
    learned: bool
    probability: float | None
    verdict: str


class CalibrationFile(BaseModel):
    """Everything `raretask calibrate` writes; `predict` and `plan` read it back."""

    model_config = ConfigDict(extra="forbid")
    format: Literal["raretask-calibration-2"]
    kind: Literal["lm", "toy"]
    sources: list[str]
    units: Units
    learned: str
    prior_sd: float
    duplicates_dropped: int
    excluded_sizes: list[str]
    laws: list[Law]
    cross_validation: list[Score]
    holdout_sources: list[str]
    holdout: list[HeldOut]
    holdout_scores: list[Score]
    theory: list[dict]
    warnings: list[str]

    def law(self, task: str | None, option: str = "--task") -> Law:
        """The law of ``task`` (None: the only one, or the only fitted one)."""
        names = [law.task for law in self.laws]
        if task is None:
            fitted = [law for law in self.laws if law.kind == "logistic"]
            if len(self.laws) == 1:
                return self.laws[0]
            if len(fitted) == 1:
                return fitted[0]
            raise UserError(f"{option}: required, the calibration has {len(names)} tasks "
                            f"({', '.join(names)})")
        for law in self.laws:
            if law.task == task:
                return law
        raise UserError(f"{option}: unknown task {task!r} (calibrated: {', '.join(names)})")


def _observations(run_dir: Path, learned_accuracy: float) -> tuple[str, list[dict], list]:
    rows = load_summary(run_dir)
    if not rows:
        raise UserError(f"{run_dir}: the run has no finished cells")
    st = study_of_rows(rows, str(run_dir))
    try:
        return st.kind, rows, st.observations(rows, run_dir, learned_accuracy)
    except UserError:
        raise
    except (KeyError, TypeError, ValueError) as err:  # rows edited outside raretask
        raise UserError(f"{run_dir}: malformed summary rows ({type(err).__name__}: {err})") \
            from None


def calibrate_runs(run_dirs: list[Path], learned_accuracy: float = LEARNED_ACCURACY,
                   prior_sd: float = PRIOR_SD, holdout: list[Path] | None = None,
                   exclude_sizes: list[str] | None = None) -> CalibrationFile:
    """Fit the law on ``run_dirs`` (pooled: seeds, grids and schedules), cross-validate it, and
    score it on the ``holdout`` grids, which never enter the fit. ``learned_accuracy``: LM
    grids' threshold (default the study's one, 0.9)."""
    from raretask.mixing.learnability import (
        contradictions,
        cross_validate,
        dedupe,
        fit_laws,
        predict_obs,
        score,
    )

    if not run_dirs:
        raise UserError("calibrate: give at least one finished run directory")
    if not 0 < learned_accuracy <= 1:
        raise UserError(f"--learned-accuracy must be in (0, 1], got {learned_accuracy}")
    if not (math.isfinite(prior_sd) and prior_sd > 0):
        raise UserError(f"--prior-sd must be a number > 0, got {prior_sd}")
    excluded = [str(x) for x in exclude_sizes or []]
    kinds, obs, fit_rows, test = set(), [], [], []
    for d in run_dirs:
        kind, rows, o = _observations(Path(d), learned_accuracy)
        kinds.add(kind)
        obs += o
        fit_rows += rows
    for d in holdout or []:
        kind, _, o = _observations(Path(d), learned_accuracy)
        kinds.add(kind)
        test += o
    if len(kinds) > 1:
        labels = [s.label for s in all_studies() if s.kind in kinds]
        raise UserError(f"calibrate: the runs mix {' and '.join(labels)} grids; calibrate each "
                        "kind alone")
    (kind,) = kinds
    st = study(kind)
    sizes = {o.size for o in obs}
    for x in excluded:
        if x not in sizes:
            raise UserError(f"--exclude-size: {x!r} is not a size of these grids "
                            f"({', '.join(sorted(sizes, key=_size_order))})")
    obs = [o for o in obs if o.size not in excluded]
    obs, dropped = dedupe(obs)
    if not obs:
        raise UserError("calibrate: no cells left to fit")
    fit_keys = {o.key for o in obs}
    test = [o for o in dedupe(test)[0] if o.key not in fit_keys]  # never score a fitted cell
    laws = fit_laws(obs, prior_sd)
    warnings = contradictions(obs)
    for law in laws:
        if law.kind == "bound":
            warnings.append(f"{law.task}: {law.learned_cells} of {law.cells} cells learned: no "
                            "threshold can be fitted (predict reports the bound)")
            continue
        _, bn, bx, _ = law.coef
        if bn <= 0:
            warnings.append(f"{law.task}: the fitted probability does not rise with size "
                            f"(bN = {bn:.3g})")
        if bx <= 0:
            warnings.append(f"{law.task}: the fitted probability does not rise with frequency "
                            f"(bX = {bx:.3g})")
    try:  # the study's closed-form theory, where it has one (the toy: Theorem 3)
        theory, notes = st.theory_check(laws, fit_rows, excluded)
        warnings += notes
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, StopIteration, ZeroDivisionError) as err:
        raise UserError(f"{', '.join(map(str, run_dirs))}: malformed summary rows "
                        f"({type(err).__name__}: {err})") from None
    calls = predict_obs(laws, test)
    held = [HeldOut(source=c.obs.source, task=c.obs.task, size=c.obs.size, params=c.obs.params,
                    tokens=c.obs.tokens, frequency=c.obs.frequency, schedule=c.obs.schedule,
                    seed=c.obs.seed, score=c.obs.score, learned=c.obs.learned,
                    probability=c.probability, verdict=c.verdict) for c in calls]
    held_scores = [score(t, "held out", [c for c in calls if c.obs.task == t])
                   for t in sorted({c.obs.task for c in calls})]
    units, learned = st.calibration_units(learned_accuracy)
    return CalibrationFile(
        format=FORMAT, kind=kind, sources=[str(d) for d in run_dirs], units=Units(**units),
        learned=learned, prior_sd=prior_sd, duplicates_dropped=dropped, excluded_sizes=excluded,
        laws=laws, cross_validation=cross_validate(obs, prior_sd),
        holdout_sources=[str(d) for d in holdout or []], holdout=held, holdout_scores=held_scores,
        theory=theory, warnings=warnings)


def _size_order(size: str) -> tuple:
    try:
        return (0, float(size))
    except ValueError:
        return (1, size)


def load_calibration(path: str | Path) -> CalibrationFile:
    """A calibration file, checked; anything else is a one-line UserError naming it."""
    from pydantic import ValidationError

    from raretask.runs import store

    path = Path(path)
    try:
        data = store.read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{path}: is a directory, expected a calibration file") from None
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{path}: not JSON") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not a calibration file written by raretask calibrate (format "
                        f"{FORMAT}; re-run raretask calibrate)")
    try:
        return CalibrationFile.model_validate(data)
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(x) for x in e["loc"]) or "file"
        raise UserError(f"{path}: {where}: {e['msg']}") from None
