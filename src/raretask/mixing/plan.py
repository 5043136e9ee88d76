"""`raretask plan`: sampling weights that lift target tasks above their thresholds at minimum KL.

The problem, for natural shares p (sum 1), target set T, threshold model f (theory or calibration),
model size N, margins m_t (one per target, default the global margin), budget B, repetition caps
E_k (epochs; per task or one global) with a_k examples (or tokens) of task k available, maximum
fractions F_k and, with ``keep_learned``, the set L of non-target tasks learned under p::

    minimise   KL(q || p) = sum_k q_k log(q_k / p_k)
    subject to sum_k q_k = 1,
               q_t >= m_t * f_t(q, N)          for t in T     (learned, with a margin)
               q_l >= m_keep * f_l(q, N)       for l in L     (kept learned)
               q_k <= min(E_k a_k / B, F_k)    for every k    (repetition cap, maximum fraction)

With the thresholds fixed the constraints are a box l <= q <= u, and the KKT conditions give the
closed form ``q_k = clip(s * p_k, l_k, u_k)`` with the scalar s set so the weights sum to 1
(:func:`min_kl_weights`, exact: the sum is piecewise linear in s). Every task off its bounds is
scaled by the same factor, which is what "as close as possible to the natural mix" means under KL;
a task held at a bound that s p_k would cross is *binding* (the plan lists it with the constraint:
margin, keep_learned, max_epochs or max_fraction). Theory thresholds depend on the mix itself (a
task needs to outrank the others' features), so the plan alternates "thresholds at the current
weights" and "closed form" until the thresholds stop moving, then checks with Theorem 3 that every
target and every kept task is learned at the planned weights.

Infeasible requests raise a one-line :class:`UserError` naming the task and the constraints that
conflict (a floor above its cap: "max_fraction vs keep_learned"; caps that leave less than the
whole mix; floors that add up to more than it; the size).

Example
-------
>>> import numpy as np
>>> q = min_kl_weights(np.array([0.7, 0.2, 0.1]), np.array([0, 0, 0.3]), np.ones(3))
>>> [round(float(x), 4) for x in q]
[0.5444, 0.1556, 0.3]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from raretask.errors import UserError
from raretask.mixing.readers import bad_field, check_task_names

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
    return _min_kl(p, lower, upper)[0]


def _min_kl(p: np.ndarray, lower: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, float]:
    """(:func:`min_kl_weights`' weights, the common factor s of the tasks off their bounds)."""
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
    return q, float(s)


@dataclass(frozen=True)
class PlanTask:
    """One task of a plan.

    ``lower`` is the task's floor (a target's margin x required share, or a kept task's keep
    margin x required share; 0 otherwise), ``cap`` its ceiling (the smaller of its repetition
    cap and its maximum fraction; 1 when uncapped) and ``binding`` the constraint that holds the
    task at one of them ("margin", "keep_learned", "max_epochs" or "max_fraction"; None: the
    task is scaled by the common factor).
    """

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
    kept: bool = False
    margin: float | None = None
    max_epochs: float | None = None
    max_fraction: float | None = None
    binding: str | None = None


@dataclass(frozen=True)
class Plan:
    """Planned weights and everything needed to judge them.

    ``constraints`` records what was asked (the margins, per-task caps, keep_learned and the
    tasks it kept); ``binding`` lists the constraints the solution sits on, one entry per task
    held at a bound: ``{"task", "constraint", "bound": "lower"|"upper", "share"}``.
    """

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
    constraints: dict = field(default_factory=dict)
    binding: list = field(default_factory=list)

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
            rest = {k: data[k] for k in cls.__dataclass_fields__
                    if k != "tasks" and (k in data or k not in ("constraints", "binding"))}
            plan = cls(**rest, tasks=tasks)
        except (KeyError, TypeError) as err:
            raise UserError(f"{source}: not a plan file written by raretask plan ({err})") \
                from None
        _check_loaded(plan, source)
        return plan


MAX_BUDGET = 2**53  # examples or tokens; beyond it counts lose digits as floats (and int64 rows)


def _number(v) -> bool:
    return type(v) in (int, float) and np.isfinite(v)


def _check_loaded(plan: Plan, source: str) -> None:
    """A plan read back (plan.json, maybe edited by hand) must be one ``plan`` could have
    written in what its consumers use: the unit, unique task names, weights that are shares
    summing to 1, a budget, availability and caps that are finite numbers in range."""
    def bad(where: str, expected: str, got) -> UserError:
        return bad_field(source, where, expected, got)

    if plan.unit not in ("examples", "tokens"):
        raise bad("unit", "'examples' or 'tokens'", plan.unit)
    if not plan.tasks:
        raise bad("tasks", "at least one task", [])
    if plan.budget is not None and not (_number(plan.budget) and 0 < plan.budget <= MAX_BUDGET):
        raise bad("budget", f"null or a number > 0 and <= {MAX_BUDGET:,}", plan.budget)
    if plan.max_epochs is not None and not (_number(plan.max_epochs) and plan.max_epochs > 0):
        raise bad("max_epochs", "null or a number > 0", plan.max_epochs)
    check_task_names([t.task for t in plan.tasks], source)
    for i, t in enumerate(plan.tasks):
        for name in ("weight", "natural"):
            v = getattr(t, name)
            if not (_number(v) and 0 <= v <= 1):
                raise bad(f"tasks.{i}.{name}", "a share from 0 to 1", v)
        if t.available is not None and not (_number(t.available) and
                                            0 <= t.available <= MAX_BUDGET):
            raise bad(f"tasks.{i}.available", f"null or a number from 0 to {MAX_BUDGET:,}",
                      t.available)
        if t.max_epochs is not None and not (_number(t.max_epochs) and t.max_epochs > 0):
            raise bad(f"tasks.{i}.max_epochs", "null or a number > 0", t.max_epochs)
    total = sum(t.weight for t in plan.tasks)
    if abs(total - 1) > 1e-6:
        raise UserError(f"{source}: tasks.*.weight: the weights sum to {total:.9g}, not 1")


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def _per_task(values: Mapping[str, float] | None, names: list[str], option: str, low: float,
              high: float, low_open: bool) -> dict[str, float]:
    """Validate a per-task option ``{task: value}``: known tasks, finite values in range."""
    out = {}
    for task, v in (values or {}).items():
        if task not in names:
            shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
            raise UserError(f"{option}: unknown task {task!r} (known: {shown})")
        v = float(v)
        ok = np.isfinite(v) and (v > low if low_open else v >= low) and v <= high
        if not ok:
            rng = f"{'>' if low_open else '>='} {low:g}" + \
                ("" if not np.isfinite(high) else f" and <= {high:g}")
            raise UserError(f"{option}: task {task!r}: expected a number {rng}, got {v:g}")
        out[task] = v
    return out


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
    *,
    margins: Mapping[str, float] | None = None,
    max_epochs_for: Mapping[str, float] | None = None,
    max_fraction: Mapping[str, float] | None = None,
    keep_learned: bool = False,
    keep_margin: float | None = None,
) -> Plan:
    """Minimum-KL weights lifting every target to its margin times its required share.

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
    margins:
        Per-target margins ``{task: margin}`` (>= 1) in place of ``margin``; each must be a target.
    max_epochs_for:
        Per-task repetition caps ``{task: epochs}`` in place of ``max_epochs`` (needs
        ``available``).
    max_fraction:
        Per-task maximum shares ``{task: fraction}`` (0 < fraction <= 1).
    keep_learned:
        Tasks learned under the natural mix (by ``threshold`` at ``size``) that are not targets
        keep a share >= ``keep_margin`` x their required share at the plan, so the plan loses
        none of them.
    keep_margin:
        The kept tasks' safety factor (>= 1; default ``margin``): a task learned with less
        headroom than that is lifted to it, as a target would be.

    Raises
    ------
    UserError
        Unknown task, bad numbers, or an infeasible plan (names the task and the constraints
        that conflict).
    """
    names = [str(n) for n in names]
    k = len(names)
    p = np.asarray(natural, float)
    if p.shape != (k,) or k == 0 or np.any(~np.isfinite(p)) or np.any(p < 0) or p.sum() <= 0:
        raise UserError("natural: expected one share >= 0 per task, not all zero")
    p = p / p.sum()
    if not np.isfinite(margin) or margin < 1:
        raise UserError(f"--margin must be a number >= 1, got {margin}")
    keep_margin = margin if keep_margin is None else keep_margin
    if not np.isfinite(keep_margin) or keep_margin < 1:
        raise UserError(f"--keep-margin must be a number >= 1, got {keep_margin}")
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
    per_margin = _per_task(margins, names, "--margin-for", 1.0, np.inf, False)
    for t in per_margin:
        if not tmask[names.index(t)]:
            raise UserError(f"--margin-for: task {t!r} is not a target (add --target {t})")
    epochs_for = _per_task(max_epochs_for, names, "--max-epochs-for", 0.0, np.inf, True)
    fraction = _per_task(max_fraction, names, "--max-fraction", 0.0, 1.0, True)
    for i in np.flatnonzero(tmask & (p == 0)):
        raise UserError(f"task {names[i]!r}: has no examples in the data, so no weight can "
                        "sample it; constraint: available data")
    avail = None if available is None else np.asarray(available, float)
    if avail is not None and (avail.shape != (k,) or np.any(avail < 0)):
        raise UserError("available: expected one count >= 0 per task")
    if epochs_for and avail is None:
        raise UserError("--max-epochs-for: a repetition cap needs the data's counts (plan from "
                        "an analysis, or a task file with counts)")
    if budget is not None and not (np.isfinite(budget) and 0 < budget <= MAX_BUDGET):
        raise UserError(f"--budget must be a number > 0 and at most {MAX_BUDGET:,} (2**53), "
                        f"got {budget:g}")
    if max_epochs is not None and not (np.isfinite(max_epochs) and max_epochs > 0):
        raise UserError(f"--max-epochs must be a number > 0, got {max_epochs}")
    if budget is None and avail is not None:
        budget = float(avail.sum())
    task_margin = np.array([per_margin.get(n, margin) for n in names])
    task_epochs = [epochs_for.get(n, max_epochs) for n in names]
    caps = _caps(names, avail, budget, task_epochs, fraction)
    upper, cap_from = caps
    _check_caps(names, p, upper, cap_from, avail, budget, max_epochs, epochs_for, fraction, unit)

    learned_natural = threshold.learned(p, size)
    kmask = (learned_natural & ~tmask) if keep_learned else np.zeros(k, dtype=bool)
    floor_margin = np.where(tmask, task_margin, np.where(kmask, keep_margin, 0.0))
    floored = tmask | kmask
    q = p.copy()
    lower = np.zeros(k)
    req = np.full(k, np.nan)
    rounds, s = 0, 1.0
    for rounds in range(1, MAX_ROUNDS + 1):  # noqa: B007 - reported
        r = threshold.required(q, size)
        req = np.where(floored, r, np.nan)
        new_lower = np.where(floored, floor_margin * r, 0.0)
        _check_feasible(names, new_lower, upper, req, floor_margin, tmask, kmask, cap_from,
                        task_epochs, fraction, avail, budget, unit, size)
        q_new, s = _min_kl(p, new_lower, upper)
        done = np.allclose(new_lower, lower, rtol=1e-10, atol=1e-15) and \
            np.allclose(q_new, q, rtol=1e-10, atol=1e-15)
        lower, q = new_lower, q_new
        if done:
            break
    learned_planned = threshold.learned(q, size)
    for i in np.flatnonzero(tmask & ~learned_planned):
        raise UserError(
            f"task {names[i]!r}: not learned at size {size:g} even at share {_fmt(q[i])}: the "
            "targets compete for the model's capacity; constraint: size (fewer targets or a "
            "larger model)")
    for i in np.flatnonzero(kmask & ~learned_planned):
        raise UserError(
            f"task {names[i]!r}: learned under the natural mix but not at the plan's share "
            f"{_fmt(q[i])}: the targets and the kept tasks compete for the model's capacity; "
            "constraint: keep_learned vs size (fewer targets, no --keep-learned or a larger "
            "model)")
    binding = _binding(p, q, s, lower, upper, tmask, kmask, cap_from)
    frequent = threshold.frequent(p)
    needed = [threshold.size_needed(p, i, task_margin[i]) if tmask[i] else None
              for i in range(k)]
    minimum = [threshold.size_needed(p, i) if tmask[i] else None for i in range(k)]
    rows = tuple(
        PlanTask(
            task=names[i], natural=float(p[i]), weight=float(q[i]), target=bool(tmask[i]),
            frequent=bool(frequent[i]),
            required=None if not floored[i] else float(req[i]), lower=float(lower[i]),
            cap=float(upper[i]), available=None if avail is None else float(avail[i]),
            change=float(q[i] - p[i]), relative_change=float(q[i] / p[i] - 1) if p[i] else 0.0,
            learned_natural=bool(learned_natural[i]), learned_planned=bool(learned_planned[i]),
            size_needed=float(needed[i]) if tmask[i] else None,
            size_minimum=float(minimum[i]) if tmask[i] else None,
            kept=bool(kmask[i]), margin=float(floor_margin[i]) if floored[i] else None,
            max_epochs=None if task_epochs[i] is None else float(task_epochs[i]),
            max_fraction=fraction.get(names[i]),
            binding=binding.get(i, (None,))[0],
        )
        for i in range(k)
    )
    natural_needed = max((float(max(needed[i], size)) for i in np.flatnonzero(tmask)),
                         default=None)
    natural_minimum = max((float(max(minimum[i], size)) for i in np.flatnonzero(tmask)),
                          default=None)
    constraints = {
        "margin": float(margin), "margins": per_margin, "max_epochs": max_epochs,
        "max_epochs_for": epochs_for, "max_fraction": fraction, "keep_learned": bool(keep_learned),
        "keep_margin": float(keep_margin), "kept": [names[i] for i in np.flatnonzero(kmask)],
    }
    return Plan(unit=unit, size=float(size), margin=float(margin), budget=budget,
                max_epochs=max_epochs, threshold=threshold.describe(), kl=kl(q, p),
                natural_size_needed=natural_needed, natural_size_minimum=natural_minimum,
                rounds=rounds, tasks=rows, constraints=constraints,
                binding=[{"task": names[i], "constraint": c, "bound": b, "share": float(q[i])}
                         for i, (c, b) in sorted(binding.items())])


def _caps(names, avail, budget, task_epochs, fraction) -> tuple[np.ndarray, list[str | None]]:
    """(each task's ceiling, the constraint that sets it: "max_epochs", "max_fraction" or None)."""
    upper, source = np.ones(len(names)), [None] * len(names)
    for i, n in enumerate(names):
        if task_epochs[i] is not None and avail is not None:
            cap = task_epochs[i] * avail[i] / budget
            if cap < upper[i]:
                upper[i], source[i] = cap, "max_epochs"
        if n in fraction and fraction[n] < upper[i]:
            upper[i], source[i] = fraction[n], "max_fraction"
    return upper, source


def _check_caps(names, p, upper, cap_from, avail, budget, max_epochs, epochs_for, fraction,
                unit) -> None:
    """The ceilings must leave room for the whole mix."""
    if float(upper.sum()) >= 1 - 1e-12:
        return
    if not epochs_for and not fraction:  # the one global cap: the budget is what is too big
        big = int(np.argmax(p))
        raise UserError(
            f"task {names[big]!r}: the budget of {budget:,.0f} {unit} exceeds what the repetition "
            f"caps allow ({max_epochs:g} epochs x {avail.sum():,.0f} {unit} = "
            f"{max_epochs * avail.sum():,.0f}); constraint: budget (lower --budget, raise "
            "--max-epochs or add data)")
    kinds = sorted({c for c in cap_from if c is not None})
    big = max((i for i, c in enumerate(cap_from) if c is not None), key=lambda i: p[i])
    raise UserError(
        f"task {names[big]!r}: the caps leave room for {_fmt(float(upper.sum()))} of the data "
        f"(< 1; this one {_fmt(upper[big])} by {cap_from[big]}); constraint: "
        f"{' + '.join(kinds)} (raise a cap, lower --budget or add data)")


def _check_feasible(names, lower, upper, req, floor_margin, tmask, kmask, cap_from, task_epochs,
                    fraction, avail, budget, unit, size) -> None:
    for i in np.flatnonzero(tmask | kmask):
        floor = "margin" if tmask[i] else "keep_learned"
        what = f"needs a share of {_fmt(lower[i])} (required {_fmt(req[i])} x " \
            f"{'margin' if tmask[i] else 'keep margin'} {floor_margin[i]:g})"
        if not tmask[i]:
            what = "is learned under the natural mix; keeping it " + what
        if lower[i] > 1:
            raise UserError(
                f"task {names[i]!r}: {what} > 1 at size {size:g}; constraint: "
                f"{'threshold' if tmask[i] else 'keep_learned'} (a larger model or a smaller "
                f"{'--margin' if tmask[i] else '--keep-margin'})")
        if lower[i] > upper[i] + 1e-15:
            if cap_from[i] == "max_epochs":
                cap = (f"its repetition cap allows {_fmt(upper[i])} ({task_epochs[i]:g} epochs x "
                       f"{avail[i]:,.0f} {unit} / budget {budget:,.0f})")
                fix = "raise --max-epochs, lower --budget or add data for this task"
            else:
                cap = f"its maximum fraction is {fraction[names[i]]:g}"
                fix = "raise its --max-fraction"
            raise UserError(f"task {names[i]!r}: {what} but {cap}; constraint: {cap_from[i]} vs "
                            f"{floor} ({fix})")
    total = float(lower.sum())
    if total > 1 + 1e-12:
        worst = int(np.nanargmax(np.where(tmask | kmask, lower, -1)))
        if not kmask.any():
            raise UserError(
                f"task {names[worst]!r}: the targets together need {_fmt(total)} of the data "
                f"(> 1; this one {_fmt(lower[worst])}); constraint: thresholds (fewer targets, a "
                "smaller --margin or a larger model)")
        raise UserError(
            f"task {names[worst]!r}: the targets and the {int(kmask.sum())} tasks kept learned "
            f"together need {_fmt(total)} of the data (> 1; this one {_fmt(lower[worst])}); "
            "constraint: thresholds + keep_learned (fewer targets, smaller margins, no "
            "--keep-learned or a larger model)")


def _binding(p, q, s, lower, upper, tmask, kmask, cap_from) -> dict[int, tuple[str, str]]:
    """{task index: (constraint, "lower"|"upper")} for the tasks held at a bound the common
    factor s would cross (a task exactly at s p_k on its bound does not bind)."""
    out = {}
    for i in range(len(q)):
        free = s * p[i]
        if lower[i] > 0 and q[i] <= lower[i] * (1 + 1e-9) and free < lower[i] * (1 - 1e-9):
            out[i] = ("margin" if tmask[i] else "keep_learned", "lower")
        elif upper[i] < 1 and q[i] >= upper[i] * (1 - 1e-9) and free > upper[i] * (1 + 1e-9):
            out[i] = (cap_from[i], "upper")
    return out


def parse_task_values(items: Sequence[str] | None, option: str) -> dict[str, float]:
    """``["arith=4", "code=2.5"]`` -> ``{"arith": 4.0, "code": 2.5}`` for a repeated CLI option
    (``--max-epochs-for TASK=N``); the value follows the last ``=``, so a task name may hold one.
    Ranges are checked by :func:`make_plan`."""
    out: dict[str, float] = {}
    for item in items or []:
        task, eq, value = str(item).rpartition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not eq or not task or number is None:
            raise UserError(f"{option}: expected TASK=NUMBER, got {item!r}")
        if task in out:
            raise UserError(f"{option}: task {task!r} given twice")
        out[task] = number
    return out
