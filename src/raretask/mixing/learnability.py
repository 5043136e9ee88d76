"""The learnability law: P(learned | N, D, f, task), fitted on finished grids and checked on
cells it never saw.

One law per task (per toy family), a logistic regression in three log10 covariates::

    logit P(learned) = b0 + bN (log10 N - cN) + bX (log10 f D - cX) + bD (log10 D - cD)

N is the size (LM: non-embedding parameters; toy: width), D the budget (LM: training tokens;
toy: training samples), f the rate (LM: instances per token; toy: share of samples) and
f D the instances seen ("exposures"); c are the fit data's means. Exposures rather than f
because the two committed budgets say so: at fixed f D a longer run barely helps, at fixed f it
helps a lot (4m at 1/1024: 0.10 after 1,000 steps, 0.83-0.88 after 2,047). So bD is the effect of
the budget *at fixed exposures*; when the fit data has one budget it stays at its prior mean 0
with its prior width, and predictions at another budget carry that uncertainty.

The threshold follows in closed form: P = 1/2 at ``log10 f* = -(b0 + bN dN + bX (log10 D - cX)
+ bD dD) / bX``, i.e. ``f*(N, D) ∝ N^(-bN/bX) D^(-(bX+bD)/bX)``.

Fitting: maximum a posteriori with independent Gaussian priors, sd ``PRIOR_SD`` (10 per log10
unit) on the slopes and on the intercept. Grids are often perfectly separable (every cell of a
size above the threshold learned, every one below not), where the plain MLE runs off to
infinity; the prior keeps the slopes finite (the steepest it allows is about a factor 10 in
probability odds per 0.1 decade, steeper than any transition in the committed data) and barely
moves a fit that data determine. Intervals come from the Laplace approximation (the inverse
Hessian at the optimum); predicted probabilities are averaged over it (MacKay's probit
approximation), so an uncertain prediction is pulled towards 1/2; the required-frequency
interval is the 5-95% range of the threshold over ``DRAWS`` parameter draws (seeded: the same
file gives the same numbers).

A task no cell learned (or every cell learned) has no threshold to fit: it gets a ``bound``
law that only says what was seen (T_ADD in the committed LM grids).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict

from raretask.errors import UserError

PRIOR_SD = 10.0
DRAWS = 4000
BAND = (0.4, 0.6)  # predictions inside it are too close to call; scored apart
COVARIATES = ("log10 size", "log10 exposures (f x D)", "log10 budget D")


# -- observations ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Obs:
    """One (cell, task) of a finished grid, as the law sees it."""

    task: str
    size: str  # LM preset name or toy width, for leave-one-size-out
    params: float  # N
    tokens: float  # D
    frequency: float  # f
    schedule: str
    seed: int
    source: str
    cell: str  # identity of the grid cell (a toy cell holds many tasks)
    score: float  # LM test accuracy, toy normalised signal
    learned: bool

    @property
    def key(self) -> tuple:
        return (self.task, self.params, self.tokens, self.frequency, self.schedule, self.seed,
                self.score)


def toy_family(row: dict) -> str:
    """The toy's 'task': one spectrum family (its thresholds depend on the whole mix)."""
    return (f"toy-k{row['tasks']}-m{row['features_per_task']}-alpha{row['alpha']:g}"
            f"-beta{row['beta']:g}")


def lm_observations(rows: list[dict], source: str, learned_accuracy: float) -> list[Obs]:
    """LM summary rows -> observations (diverged runs and runs without a test score left out)."""
    out = []
    for r in rows:
        if r.get("diverged_step") is not None or r.get("test_accuracy") is None:
            continue
        if r["task"] == "none":
            continue
        tokens = r.get("tokens")
        if not isinstance(tokens, int | float) or isinstance(tokens, bool) or tokens <= 0:
            raise UserError(f"{source}: cell {r['cell']}: tokens: expected a number > 0, got "
                            f"{tokens!r}")
        acc = float(r["test_accuracy"])
        out.append(Obs(str(r["task"]), str(r["size"]), float(r["params"]), float(tokens),
                       float(r["frequency"]), str(r["schedule"]), int(r["seed"]), source,
                       f"{source}#{r['cell']}", acc, acc >= learned_accuracy))
    return check_obs(out, source)


def toy_observations(rows: list[dict], source: str, samples: float) -> list[Obs]:
    """Toy summary rows (one per task of each cell) -> observations; ``samples`` = steps x
    batch of the grid."""
    out = []
    for r in rows:
        if r.get("diverged_step") is not None:
            continue
        sched = str(r["schedule"]) + (f" gap {r['gap']}" if r.get("gap") else "")
        out.append(Obs(toy_family(r), str(r["width"]), float(r["width"]), float(samples),
                       float(r["frequency"]), sched, int(r["seed"]), source,
                       f"{source}#{r['cell']}", float(r["signal"]), bool(r["learned"])))
    return check_obs(out, source)


def check_obs(obs: list[Obs], source: str) -> list[Obs]:
    """Every number the law takes logs of is finite and > 0 (rows edited outside raretask)."""
    for o in obs:
        for name, v in (("params", o.params), ("tokens", o.tokens), ("frequency", o.frequency)):
            if not (math.isfinite(v) and v > 0):
                raise UserError(f"{source}: {o.cell.split('#')[-1]}: {name}: expected a number "
                                f"> 0, got {v!r}")
    return obs


def dedupe(obs: list[Obs]) -> tuple[list[Obs], int]:
    """Drop exact duplicates (the same run given twice, e.g. lm_pack's alone_0 and packed)."""
    seen, out = set(), []
    for o in obs:
        if o.key not in seen:
            seen.add(o.key)
            out.append(o)
    return out, len(obs) - len(out)


def _design(params, tokens, freq) -> np.ndarray:
    n, d, f = (np.log10(np.asarray(x, float)) for x in (params, tokens, freq))
    return np.column_stack([n, f + d, d])


# -- the law -----------------------------------------------------------------------------------


class Ranges(BaseModel):
    """What the fit saw: [min, max] of each axis."""

    model_config = ConfigDict(extra="forbid")
    params: tuple[float, float]
    tokens: tuple[float, float]
    frequency: tuple[float, float]


class Law(BaseModel):
    """One task's law as stored in a calibration file.

    ``kind`` is "logistic" (``coef`` = b0, bN, bX, bD; ``center``; ``cov``) or "bound" (no
    cell learned, or every cell: ``coef`` is None and only the ranges and scores speak).
    """

    model_config = ConfigDict(extra="forbid")
    task: str
    kind: str
    cells: int
    learned_cells: int
    best_score: float
    worst_score: float
    ranges: Ranges
    schedules: list[str]
    coef: list[float] | None = None
    center: list[float] | None = None
    cov: list[list[float]] | None = None
    prior_sd: float = PRIOR_SD

    def model_post_init(self, _ctx) -> None:
        if self.kind not in ("logistic", "bound"):
            raise ValueError(f"kind: expected 'logistic' or 'bound', got {self.kind!r}")
        if self.kind == "logistic":
            if self.coef is None or self.center is None or self.cov is None:
                raise ValueError("a logistic law needs coef, center and cov")
            cov = np.asarray(self.cov, float)
            if len(self.coef) != 4 or len(self.center) != 3 or cov.shape != (4, 4) or \
                    not np.all(np.isfinite(cov)) or not np.all(np.isfinite(self.coef)) or \
                    not np.all(np.isfinite(self.center)):
                raise ValueError("coef (4), center (3) and cov (4x4) must be finite")

    # -- evaluation ----------------------------------------------------------------------------

    def _x(self, params, tokens, freq) -> np.ndarray:
        x = _design(params, tokens, freq) - np.asarray(self.center)
        return np.column_stack([np.ones(len(x)), x])

    def logit(self, params, tokens, freq) -> tuple[np.ndarray, np.ndarray]:
        """(mean, variance) of the logit at each point."""
        x = self._x(params, tokens, freq)
        cov = np.asarray(self.cov)
        return x @ np.asarray(self.coef), np.einsum("ij,jk,ik->i", x, cov, x)

    def probability(self, params, tokens, freq) -> np.ndarray:
        """P(learned), averaged over the fit's uncertainty (probit approximation)."""
        mu, var = self.logit(np.atleast_1d(params), np.atleast_1d(tokens), np.atleast_1d(freq))
        return 1.0 / (1.0 + np.exp(-mu / np.sqrt(1.0 + math.pi * var / 8.0)))

    def _log10_threshold(self, coef: np.ndarray, params: float, tokens: float) -> np.ndarray:
        c = np.asarray(self.center)
        b0, bn, bx, bd = (coef[..., i] for i in range(4))
        ln, ld = math.log10(params), math.log10(tokens)
        with np.errstate(divide="ignore", invalid="ignore"):
            lf = -(b0 + bn * (ln - c[0]) + bx * (ld - c[1]) + bd * (ld - c[2])) / bx
        return np.where(bx > 0, lf, np.inf)  # no positive slope in f: no frequency suffices

    def required_frequency(self, params: float, tokens: float) -> tuple[float, float, float]:
        """(f*, lo, hi): the rate at which P = 1/2, and its 90% interval (inf: never)."""
        coef = np.asarray(self.coef)
        mid = float(10 ** self._log10_threshold(coef, params, tokens))
        draws = np.random.default_rng(0).multivariate_normal(coef, np.asarray(self.cov), DRAWS,
                                                             method="eigh")
        lo, hi = np.quantile(self._log10_threshold(draws, params, tokens), [0.05, 0.95])
        return mid, float(10 ** lo), float(10 ** hi)

    def size_for(self, freq: float, tokens: float) -> float:
        """Smallest size at which P = 1/2 at rate ``freq`` (inf when size does not help)."""
        b0, bn, bx, bd = self.coef
        c = self.center
        lf, ld = math.log10(freq), math.log10(tokens)
        if bn <= 0:
            return math.inf
        rest = b0 + bx * (lf + ld - c[1]) + bd * (ld - c[2])
        return float(10 ** (c[0] - rest / bn))

    def slope(self) -> tuple[float, float, float]:
        """d log10 f* / d log10 N = -bN/bX, with its 90% interval."""
        coef = np.asarray(self.coef)
        draws = np.random.default_rng(0).multivariate_normal(coef, np.asarray(self.cov), DRAWS,
                                                             method="eigh")
        s = -draws[:, 1] / draws[:, 2]
        lo, hi = np.quantile(s, [0.05, 0.95])
        return float(-coef[1] / coef[2]), float(lo), float(hi)

    def budget(self, given: float | None, flag: str, unit: str) -> float:
        """``given``, or the one training budget the law saw; with several seen, a one-line
        UserError naming ``flag`` (``unit``: what the budget counts)."""
        if given is not None:
            return given
        lo, hi = self.ranges.tokens
        if lo != hi:
            raise UserError(f"{flag}: required; the calibration saw budgets {lo:.3g}..{hi:.3g} "
                            f"({unit})")
        return lo

    def extrapolation(self, params: float, tokens: float, freq: float | None) -> list[str]:
        """One phrase per axis outside the fitted ranges (empty: inside)."""
        out = []
        for name, v, (lo, hi) in (("size", params, self.ranges.params),
                                  ("budget", tokens, self.ranges.tokens),
                                  ("frequency", freq, self.ranges.frequency)):
            if v is not None and not lo * (1 - 1e-9) <= v <= hi * (1 + 1e-9):
                out.append(f"{name} {v:.3g} outside the fitted {lo:.3g}..{hi:.3g}")
        return out

    def formula(self) -> str:
        if self.kind == "bound":
            return (f"{self.task}: no threshold ({self.learned_cells} of {self.cells} cells "
                    f"learned; scores {self.worst_score:.3g}..{self.best_score:.3g})")
        b0, bn, bx, bd = self.coef
        c = self.center
        return (f"{self.task}: logit P = {b0:.2f} + {bn:.2f} (log10 N - {c[0]:.2f}) + "
                f"{bx:.2f} (log10 fD - {c[1]:.2f}) + {bd:.2f} (log10 D - {c[2]:.2f})")

    def threshold_law(self) -> str:
        """f* ∝ N^a D^b, the exponents read off the coefficients."""
        _, bn, bx, bd = self.coef
        lo, hi = self.ranges.tokens
        prior = " (D: one budget seen, exponent from the prior)" if lo == hi else ""
        return f"f* ∝ N^{-bn / bx:.3f} · D^{-(bx + bd) / bx:.3f}{prior}"


def _span(values) -> tuple[float, float]:
    v = list(values)
    return (min(v), max(v))


def fit_law(obs: list[Obs], prior_sd: float = PRIOR_SD) -> Law:
    """The law of one task from its observations (a bound when nothing, or everything, was
    learned)."""
    from scipy.optimize import minimize

    if not obs:
        raise UserError("calibrate: no observations to fit")
    task = obs[0].task
    y = np.array([o.learned for o in obs], float)
    x = _design([o.params for o in obs], [o.tokens for o in obs], [o.frequency for o in obs])
    common = dict(
        task=task, cells=len(obs), learned_cells=int(y.sum()),
        best_score=max(o.score for o in obs), worst_score=min(o.score for o in obs),
        ranges=Ranges(params=_span(o.params for o in obs), tokens=_span(o.tokens for o in obs),
                      frequency=_span(o.frequency for o in obs)),
        schedules=sorted({o.schedule for o in obs}), prior_sd=prior_sd)
    if y.sum() in (0, len(y)):
        return Law(kind="bound", **common)
    center = x.mean(axis=0)
    a = np.column_stack([np.ones(len(x)), x - center])
    prec = np.full(4, 1.0 / prior_sd ** 2)

    def nll(b):
        z = a @ b
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * np.sum(prec * b * b))

    def grad(b):
        z = a @ b
        return a.T @ (1.0 / (1.0 + np.exp(-z)) - y) + prec * b

    res = minimize(nll, np.zeros(4), jac=grad, method="BFGS", options={"gtol": 1e-10})
    b = res.x
    p = 1.0 / (1.0 + np.exp(-(a @ b)))
    hess = (a * (p * (1 - p))[:, None]).T @ a + np.diag(prec)
    cov = np.linalg.inv(hess)
    cov = (cov + cov.T) / 2
    return Law(kind="logistic", coef=b.tolist(), center=center.tolist(), cov=cov.tolist(),
               **common)


def fit_laws(obs: list[Obs], prior_sd: float = PRIOR_SD) -> list[Law]:
    by_task: dict[str, list[Obs]] = {}
    for o in obs:
        by_task.setdefault(o.task, []).append(o)
    return [fit_law(v, prior_sd) for _, v in sorted(by_task.items())]


# -- checks: contradictions, held-out accuracy -------------------------------------------------


def contradictions(obs: list[Obs]) -> list[str]:
    """Cells that contradict any monotone law: not learned although a smaller cell (no larger on
    any of size, budget, frequency, smaller on one; same task and schedule) was. One line per
    (task, size)."""
    lines = []
    groups: dict[tuple, list[Obs]] = {}
    for o in obs:
        groups.setdefault((o.task, o.schedule), []).append(o)
    for (task, sched), grp in sorted(groups.items()):
        v = np.array([[o.params, o.tokens, o.frequency] for o in grp])
        y = np.array([o.learned for o in grp])
        # bad[i]: row i not learned, some learned row j with v_j <= v_i everywhere
        # le[i, j]: v_j <= v_i on every axis and < on one (equal points are replicates: noise)
        le = np.all(v[None, :, :] <= v[:, None, :], axis=2) & \
            np.any(v[None, :, :] < v[:, None, :], axis=2)
        bad = ~y & np.any(le & y[None, :], axis=1)
        by_size: dict[str, int] = {}
        for i in np.flatnonzero(bad):
            by_size[grp[i].size] = by_size.get(grp[i].size, 0) + 1
        for size, count in by_size.items():
            lines.append(f"{task} ({sched}): {count} cell(s) at size {size} not learned although "
                         "a smaller, shorter or rarer cell was (non-monotone)")
    return lines


@dataclass(frozen=True)
class Call:
    """One held-out prediction."""

    obs: Obs
    probability: float | None

    @property
    def verdict(self) -> str:
        """'right', 'wrong', 'band' (too close to call) or 'none' (no fitted law)."""
        if self.probability is None:
            return "none"
        if BAND[0] <= self.probability <= BAND[1]:
            return "band"
        return "right" if (self.probability > 0.5) == self.obs.learned else "wrong"


def predict_obs(laws: list[Law], obs: list[Obs]) -> list[Call]:
    by_task = {law.task: law for law in laws}
    calls = []
    for o in obs:
        law = by_task.get(o.task)
        if law is None or law.kind != "logistic":
            calls.append(Call(o, None))
        else:
            calls.append(Call(o, float(law.probability(o.params, o.tokens, o.frequency)[0])))
    return calls


class Score(BaseModel):
    """Held-out calls of one task under one scheme."""

    model_config = ConfigDict(extra="forbid")
    task: str
    scheme: str
    right: int
    wrong: int
    band: int
    unfitted: int

    @property
    def accuracy(self) -> float | None:
        n = self.right + self.wrong
        return self.right / n if n else None

    def text(self) -> str:
        if self.right + self.wrong == 0:
            return f"- ({self.band} in the band, {self.unfitted} not fitted)"
        return (f"{self.right}/{self.right + self.wrong} = {100 * self.accuracy:.0f}% "
                f"(+{self.band} in the 0.4-0.6 band)")


def score(task: str, scheme: str, calls: list[Call]) -> Score:
    v = [c.verdict for c in calls]
    return Score(task=task, scheme=scheme, right=v.count("right"), wrong=v.count("wrong"),
                 band=v.count("band"), unfitted=v.count("none"))


def cross_validate(obs: list[Obs], prior_sd: float = PRIOR_SD) -> list[Score]:
    """Leave one cell out and leave one size out, per task (a task whose held-in part is a
    bound is 'not fitted' for that fold)."""
    by_task: dict[str, list[Obs]] = {}
    for o in obs:
        by_task.setdefault(o.task, []).append(o)
    out = []
    for task, grp in sorted(by_task.items()):
        for scheme, key in (("leave one cell out", lambda o: o.cell),
                            ("leave one size out", lambda o: o.size)):
            calls, per = [], []
            for k in sorted({key(o) for o in grp}, key=lambda k: min(
                    o.params for o in grp if key(o) == k)):
                train = [o for o in grp if key(o) != k]
                test = [o for o in grp if key(o) == k]
                c = [Call(o, None) for o in test] if not train else \
                    predict_obs([fit_law(train, prior_sd)], test)
                calls += c
                per.append(score(task, f"{scheme}: {k}", c))
            out.append(score(task, scheme, calls))
            if scheme == "leave one size out":  # the middle sizes interpolate, the ends do not
                out += per
    return out


# -- toy: the law against Theorem 3 ------------------------------------------------------------


def toy_theory_check(law: Law, curves: list) -> tuple[dict, list[str]]:
    """Compare the law's size exponent with Theorem 3's over the same widths (a least-squares
    line through the share the family's rarest task needs at each width), and say where the
    measured verdicts disagree with the theorem (the per-width brackets of
    :func:`raretask.mixing.calibrate.calibrate_rows` of the family's rows, ``curves``)."""
    points = [p for c in curves for p in c.points]
    disagree = sorted({p.size for p in points if p.agrees is False})
    # the exponent is local: compare over the widths whose cells bracket a threshold (the others
    # only bound it, and Theorem 3's curve steepens at large widths)
    seen = {p.size for p in points if p.threshold is not None}
    theory = {p.size: p.theory for p in points if p.theory and (p.size in seen or len(seen) < 2)}
    out = {"task": law.task, "widths": sorted(theory), "theory_slope": None, "slope": None,
           "slope_interval": None, "agrees": None, "widths_disagreeing": disagree}
    if law.kind != "logistic" or len(theory) < 2:
        return out, []
    t_slope = float(np.polyfit(np.log10(list(theory)), np.log10(list(theory.values())), 1)[0])
    s, lo, hi = law.slope()
    ok = lo <= t_slope <= hi
    out.update(theory_slope=t_slope, slope=s, slope_interval=[lo, hi], agrees=ok)
    if ok:
        return out, []
    where = (f"; measured verdicts disagree with Theorem 3 at width "
             f"{', '.join(f'{w:g}' for w in disagree)}" if disagree else "")
    return out, [f"{law.task}: size exponent {s:.2f} [{lo:.2f}, {hi:.2f}] does not contain "
                 f"Theorem 3's {t_slope:.2f} (widths {min(theory):g}..{max(theory):g}){where}"]
