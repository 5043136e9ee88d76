"""`raretask plan`: sampling weights that lift target tasks above their thresholds at minimum KL.

The problem, for natural shares p (sum 1), target set T, threshold model f (theory or calibration),
model size N, margin m, budget B and repetition cap E (epochs) with a_k examples (or tokens) of
task k available::

    minimise   KL(q || p) = sum_k q_k log(q_k / p_k)
    subject to sum_k q_k = 1,
               q_k >= m * f_k(q, N)          for k in T        (learned, with a margin)
               q_k <= E * a_k / B            for every k       (no example seen more than E times)

With the thresholds fixed the constraints are a box l <= q <= u, and the KKT conditions give the
closed form ``q_k = clip(s * p_k, l_k, u_k)`` with the scalar s set so the weights sum to 1
(:func:`min_kl_weights`, exact: the sum is piecewise linear in s). Every task off its bounds is
scaled by the same factor, which is what "as close as possible to the natural mix" means under KL.
Theory thresholds depend on the mix itself (a task needs to outrank the others' features), so the
plan alternates "thresholds at the current weights" and "closed form" until the thresholds stop
moving, then checks with Theorem 3 that every target is learned at the planned weights.

Infeasible requests raise a one-line :class:`UserError` naming the task and the constraint that
binds (its repetition cap, the thresholds' total, the budget, or the size).

Example
-------
>>> import numpy as np
>>> q = min_kl_weights(np.array([0.7, 0.2, 0.1]), np.array([0, 0, 0.3]), np.ones(3))
>>> [round(float(x), 4) for x in q]
[0.5444, 0.1556, 0.3]
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from raretask.errors import UserError

MAX_ROUNDS = 100


def kl(q: np.ndarray, p: np.ndarray) -> float:
    """KL(q || p) in nats (0 log 0 = 0; inf where q > 0 = p)."""
    q, p = np.asarray(q, float), np.asarray(p, float)
    m = q > 0
    if np.any(p[m] <= 0):
        return float("inf")
    return float(np.sum(q[m] * np.log(q[m] / p[m])))


def min_kl_weights(p: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """argmin_q KL(q || p) over {sum q = 1, lower <= q <= upper}: ``clip(s p, lower, upper)``.

    The caller guarantees feasibility (``lower <= upper``, ``sum lower <= 1 <= sum upper`` over
    tasks that can grow). Tasks with p_k = 0 sit at their lower bound.
    """
    p, lo, hi = (np.asarray(x, float) for x in (p, lower, upper))
    pos = p > 0
    # g(s) = sum clip(s p, lo, hi) is piecewise linear and non-decreasing; breakpoints lo/p, hi/p
    bps = np.unique(np.concatenate([lo[pos] / p[pos], hi[pos] / p[pos], [0.0]]))

    def g(s: float) -> float:
        return float(np.sum(np.clip(s * p, lo, hi)))

    vals = np.array([g(s) for s in bps])
    if vals[-1] < 1 - 1e-12:
        raise AssertionError("min_kl_weights: infeasible upper bounds")  # checked by callers
    j = int(np.searchsorted(vals, 1.0))
    if j == 0:
        s = bps[0]
    else:
        s0, s1, g0, g1 = bps[j - 1], bps[j], vals[j - 1], vals[j]
        s = s1 if g1 == g0 else s0 + (1.0 - g0) * (s1 - s0) / (g1 - g0)
    q = np.clip(s * p, lo, hi)
    free = pos & (q > lo) & (q < hi)
    if free.any():  # remove the last rounding from the free tasks
        q[free] *= (1.0 - q[~free].sum()) / q[free].sum()
    return q


@dataclass(frozen=True)
class PlanTask:
    """One task of a plan."""

    task: str
    natural: float
    weight: float
    target: bool
    frequent: bool
    required: float | None
    lower: float
    cap: float
    available: float | None
    change: float
    relative_change: float
    learned_natural: bool
    learned_planned: bool
    size_needed: float | None
    size_minimum: float | None


@dataclass(frozen=True)
class Plan:
    """Planned weights and everything needed to judge them."""

    unit: str
    size: float
    margin: float
    budget: float | None
    max_epochs: float | None
    threshold: str
    kl: float
    natural_size_needed: float | None
    natural_size_minimum: float | None
    rounds: int
    tasks: tuple[PlanTask, ...]

    def weights(self) -> dict[str, float]:
        return {t.task: t.weight for t in self.tasks}

    def to_json(self) -> dict:
        out = asdict(self)
        out["tasks"] = [asdict(t) for t in self.tasks]
        return out

    @classmethod
    def from_json(cls, data: dict, source: str = "plan") -> Plan:
        try:
            tasks = tuple(PlanTask(**t) for t in data["tasks"])
            rest = {k: data[k] for k in cls.__dataclass_fields__ if k != "tasks"}
            return cls(**rest, tasks=tasks)
        except (KeyError, TypeError) as err:
            raise UserError(f"{source}: not a plan file written by raretask plan ({err})") \
                from None


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def make_plan(
    names: Sequence[str],
    natural: Sequence[float],
    threshold,
    size: float,
    targets: Sequence[str] | None = None,
    margin: float = 1.5,
    available: Sequence[float] | None = None,
    budget: float | None = None,
    max_epochs: float | None = None,
    unit: str = "examples",
) -> Plan:
    """Minimum-KL weights lifting every target to ``margin`` times its required share.

    Parameters
    ----------
    names, natural:
        Tasks and their natural shares (normalised here).
    threshold:
        A :mod:`raretask.mixing.thresholds` model (theory or calibration).
    size:
        Model size (the theory's width N, or the calibration's size unit).
    targets:
        Tasks that must be learned (default: every task).
    margin:
        Safety factor on the required shares (>= 1).
    available:
        Examples (or tokens, per ``unit``) of each task in the data; None: unlimited.
    budget:
        Training examples (or tokens) the plan is for; default: all available data once.
    max_epochs:
        Most times an example may be seen (None: no cap).
    unit:
        "examples" or "tokens": the unit of shares, availability and budget.

    Raises
    ------
    UserError
        Unknown target, bad numbers, or an infeasible plan (names the task and the constraint).
    """
    names = [str(n) for n in names]
    k = len(names)
    p = np.asarray(natural, float)
    if p.shape != (k,) or k == 0 or np.any(~np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise UserError("natural: expected one share >= 0 per task, not all zero")
    p = p / p.sum()
    if not np.isfinite(margin) or margin < 1:
        raise UserError(f"--margin must be a number >= 1, got {margin}")
    if unit not in ("examples", "tokens"):
        raise UserError(f"--unit must be 'examples' or 'tokens', got {unit!r}")
    if targets is None or len(targets) == 0:
        tmask = np.ones(k, dtype=bool)
    else:
        tmask = np.zeros(k, dtype=bool)
        for t in targets:
            if t not in names:
                shown = ", ".join(names[:8]) + (", ..." if k > 8 else "")
                raise UserError(f"--target: unknown task {t!r} (known: {shown})")
            tmask[names.index(t)] = True
    for i in np.flatnonzero(tmask & (p == 0)):
        raise UserError(f"task {names[i]!r}: has no examples in the data, so no weight can "
                        "sample it; constraint: available data")
    avail = None if available is None else np.asarray(available, float)
    if avail is not None and (avail.shape != (k,) or np.any(avail < 0)):
        raise UserError("available: expected one count >= 0 per task")
    if budget is not None and not (np.isfinite(budget) and budget > 0):
        raise UserError(f"--budget must be a number > 0, got {budget}")
    if max_epochs is not None and not (np.isfinite(max_epochs) and max_epochs > 0):
        raise UserError(f"--max-epochs must be a number > 0, got {max_epochs}")
    if budget is None and avail is not None:
        budget = float(avail.sum())
    if max_epochs is not None and avail is not None:
        upper = np.minimum(1.0, max_epochs * avail / budget)
    else:
        upper = np.ones(k)

    if max_epochs is not None and avail is not None and float(upper.sum()) < 1 - 1e-12:
        big = int(np.argmax(p))
        raise UserError(
            f"task {names[big]!r}: the budget of {budget:,.0f} {unit} exceeds what the repetition "
            f"caps allow ({max_epochs:g} epochs x {avail.sum():,.0f} {unit} = "
            f"{max_epochs * avail.sum():,.0f}); constraint: budget (lower --budget, raise "
            "--max-epochs or add data)")

    q = p.copy()
    lower = np.zeros(k)
    req = np.full(k, np.nan)
    rounds = 0
    for rounds in range(1, MAX_ROUNDS + 1):  # noqa: B007 - reported
        r = threshold.required(q, size)
        req = np.where(tmask, r, np.nan)
        new_lower = np.where(tmask, margin * r, 0.0)
        _check_feasible(names, new_lower, upper, req, margin, tmask, avail, budget, max_epochs,
                        unit, size)
        q_new = min_kl_weights(p, new_lower, upper)
        done = np.allclose(new_lower, lower, rtol=1e-10, atol=1e-15) and \
            np.allclose(q_new, q, rtol=1e-10, atol=1e-15)
        lower, q = new_lower, q_new
        if done:
            break
    learned_planned = threshold.learned(q, size)
    learned_natural = threshold.learned(p, size)
    for i in np.flatnonzero(tmask & ~learned_planned):
        raise UserError(
            f"task {names[i]!r}: not learned at size {size:g} even at share {_fmt(q[i])}: the "
            "targets compete for the model's capacity; constraint: size (fewer targets or a "
            "larger model)")
    frequent = threshold.frequent(p)
    needed = [threshold.size_needed(p, i, margin) if tmask[i] else None for i in range(k)]
    minimum = [threshold.size_needed(p, i) if tmask[i] else None for i in range(k)]
    rows = tuple(
        PlanTask(
            task=names[i], natural=float(p[i]), weight=float(q[i]), target=bool(tmask[i]),
            frequent=bool(frequent[i]),
            required=None if not tmask[i] else float(req[i]), lower=float(lower[i]),
            cap=float(upper[i]), available=None if avail is None else float(avail[i]),
            change=float(q[i] - p[i]), relative_change=float(q[i] / p[i] - 1) if p[i] else 0.0,
            learned_natural=bool(learned_natural[i]), learned_planned=bool(learned_planned[i]),
            size_needed=float(needed[i]) if tmask[i] else None,
            size_minimum=float(minimum[i]) if tmask[i] else None,
        )
        for i in range(k)
    )
    natural_needed = max((float(max(needed[i], size)) for i in np.flatnonzero(tmask)),
                         default=None)
    natural_minimum = max((float(max(minimum[i], size)) for i in np.flatnonzero(tmask)),
                          default=None)
    return Plan(unit=unit, size=float(size), margin=float(margin), budget=budget,
                max_epochs=max_epochs, threshold=threshold.describe(), kl=kl(q, p),
                natural_size_needed=natural_needed, natural_size_minimum=natural_minimum,
                rounds=rounds, tasks=rows)


def _check_feasible(names, lower, upper, req, margin, tmask, avail, budget, max_epochs, unit,
                    size) -> None:
    for i in np.flatnonzero(tmask):
        if lower[i] > 1:
            raise UserError(
                f"task {names[i]!r}: needs a share of {_fmt(lower[i])} (required {_fmt(req[i])} "
                f"x margin {margin:g}) > 1 at size {size:g}; constraint: threshold (a larger "
                "model or a smaller --margin)")
        if lower[i] > upper[i] + 1e-15:
            raise UserError(
                f"task {names[i]!r}: needs a share of {_fmt(lower[i])} (required "
                f"{_fmt(req[i])} x margin {margin:g}) but its repetition cap allows "
                f"{_fmt(upper[i])} ({max_epochs:g} epochs x {avail[i]:,.0f} {unit} / budget "
                f"{budget:,.0f}); constraint: max_epochs (raise --max-epochs, lower --budget or "
                "add data for this task)")
    total = float(lower.sum())
    if total > 1 + 1e-12:
        worst = int(np.nanargmax(np.where(tmask, lower, -1)))
        raise UserError(
            f"task {names[worst]!r}: the targets together need {_fmt(total)} of the data "
            f"(> 1; this one {_fmt(lower[worst])}); constraint: thresholds (fewer targets, a "
            "smaller --margin or a larger model)")
