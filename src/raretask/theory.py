"""Closed-form theory of the linear multitask toy (arXiv 2605.29548, Sec. 3).

K tasks live on mutually orthogonal feature blocks. Task k has prior pi_k and covariance
spectrum lambda_{k,1} >= lambda_{k,2} >= ...; a model of width N (N shared "neurons") keeps, at
its optimum, the N features of largest utility u_{k,j} = pi_k * lambda_{k,j} (Theorem 3). From
that ranking follow the per-task feature counts, the optimal per-task loss, the width at which a
task's first feature enters, the critical width of a rare direction against the frequent set
(Prop. 6), the frequent residual and its gradient bound (Thm 4, Cor. 5), and the inverse
question: how frequent must a task be to be learned at a given width.

Everything here is numpy only; nothing imports training code.

Conventions (ours where the paper is silent, see PAPER.md):

* A power-law spectrum is ``lambda_j = j**-alpha`` (leading eigenvalue 1, not trace-normalised).
  With a common alpha and feature count the constant does not change any ranking.
* Power laws make exact ties (e.g. 1/(2*4) == 1/(8*1)) that floating point blurs. Utilities equal
  to within ``TIE_RTOL`` (1e-9 relative) are ties, ranked by task order, then feature order.
* Explicit eigenvalues are sorted descending; zeros are allowed (a feature with no variance).

Example
-------
>>> from raretask.theory import TaskSet, Theory
>>> tasks = TaskSet.power_law(tasks=32, features=32, alpha=2.0, beta=1.5)
>>> th = Theory(tasks)
>>> int(th.first_feature_width()[-1]), int(th.critical_width()[-1]), th.frequent_tasks().size
(70, 37, 6)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from raretask.errors import UserError

TIE_RTOL = 1e-9
"""Relative tolerance under which two utilities count as tied."""

DEFAULT_FREQUENT_MASS = 0.8
MAX_FEATURES = 10_000_000
"""Most features (tasks x features per task, all tasks together) a task set may have: the theory
sorts them all, and more would exhaust memory rather than answer."""
"""The frequent set F is the smallest top-prior set of tasks holding at least this mass."""


def _is_tie(a: float, b: float) -> bool:
    return abs(a - b) <= TIE_RTOL * max(abs(a), abs(b))


@dataclass(frozen=True)
class TaskSet:
    """Tasks with priors and spectra.

    Parameters
    ----------
    names:
        One name per task, in input order (the order that breaks ties).
    frequencies:
        Non-negative weights, normalised here to priors ``pi`` summing to 1 (counts are fine).
    spectra:
        One 1-D array of non-negative eigenvalues per task; sorted descending here.
    """

    names: tuple[str, ...]
    frequencies: np.ndarray
    spectra: tuple[np.ndarray, ...] = field(repr=False)

    def __post_init__(self) -> None:
        k = len(self.names)
        if k == 0:
            raise UserError("tasks: at least one task is needed")
        freq = np.asarray(self.frequencies, dtype=float)
        if freq.shape != (k,):
            raise UserError(f"frequency: expected {k} values, got shape {freq.shape}")
        if len(self.spectra) != k:
            raise UserError(f"eigenvalues: expected {k} spectra, got {len(self.spectra)}")
        for name, f in zip(self.names, freq, strict=True):
            if not np.isfinite(f) or f < 0:
                raise UserError(f"frequency of task {name!r} must be a finite number >= 0, got {f}")
        if freq.size and freq.max() > 0:
            freq = freq / freq.max()  # huge counts (1e308 each) would sum to inf
        total = float(freq.sum())
        if not total > 0:
            raise UserError("frequency: all task frequencies are zero")
        n_features = sum(np.size(s) for s in self.spectra)
        if n_features > MAX_FEATURES:
            raise UserError(f"features: {n_features:,} in all, more than the {MAX_FEATURES:,} "
                            "the theory handles")
        spectra = []
        for name, s in zip(self.names, self.spectra, strict=True):
            s = np.asarray(s, dtype=float).ravel()
            if s.size == 0:
                raise UserError(f"eigenvalues of task {name!r}: at least one feature is needed")
            if not np.all(np.isfinite(s)) or np.any(s < 0):
                raise UserError(f"eigenvalues of task {name!r} must be finite numbers >= 0")
            if not s.sum() > 0:
                raise UserError(f"eigenvalues of task {name!r}: all are zero")
            spectra.append(np.sort(s)[::-1].copy())
        object.__setattr__(self, "frequencies", freq / total)
        object.__setattr__(self, "spectra", tuple(spectra))

    # -- constructors -------------------------------------------------------------------------
    @classmethod
    def power_law(
        cls, tasks: int, features: int, alpha: float = 2.0, beta: float = 1.5
    ) -> TaskSet:
        """The paper's family: ``pi_k ∝ k**-beta`` and ``lambda_{k,j} = j**-alpha``.

        Tasks are named ``"1" .. "K"`` (index from 1, most frequent first).
        """
        if tasks < 1:
            raise UserError(f"tasks must be >= 1, got {tasks}")
        if features < 1:
            raise UserError(f"features must be >= 1, got {features}")
        for name, v in (("alpha", alpha), ("beta", beta)):
            if not np.isfinite(v) or v < 0:
                raise UserError(f"{name} must be a finite number >= 0, got {v}")
        if tasks * features > MAX_FEATURES:
            raise UserError(f"tasks x features: {tasks:,} x {features:,} is more than the "
                            f"{MAX_FEATURES:,} features the theory handles")
        k = np.arange(1, tasks + 1, dtype=float)
        spectrum = np.arange(1, features + 1, dtype=float) ** -float(alpha)
        return cls(
            names=tuple(str(i) for i in range(1, tasks + 1)),
            frequencies=k ** -float(beta),
            spectra=tuple(spectrum for _ in range(tasks)),
        )

    @classmethod
    def from_specs(
        cls,
        names: Sequence[str],
        frequencies: Sequence[float],
        spectra: Sequence[Sequence[float] | np.ndarray],
    ) -> TaskSet:
        """Arbitrary tasks: one name, frequency (or count) and spectrum each."""
        return cls(tuple(str(n) for n in names), np.asarray(frequencies, float), tuple(spectra))

    # -- derived ------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        """Number of tasks K."""
        return len(self.names)

    @property
    def feature_counts(self) -> np.ndarray:
        """Features per task (length of each spectrum)."""
        return np.array([s.size for s in self.spectra])

    @property
    def total_features(self) -> int:
        """d, the ambient dimension: the widest meaningful model."""
        return int(self.feature_counts.sum())

    @property
    def total_variance(self) -> np.ndarray:
        """Tr(C_k) per task."""
        return np.array([s.sum() for s in self.spectra])

    def with_share(self, task: int, share: float) -> TaskSet:
        """The same tasks with task ``task`` at prior ``share``; others keep their proportions."""
        if not 0 <= share <= 1:
            raise UserError(f"share must be in [0, 1], got {share}")
        pi = self.frequencies.copy()
        # the others' mass summed, not 1 - pi[task]: that cancels to noise when pi[task] ~ 1
        rest = float(np.delete(pi, task).sum())
        scale = (1.0 - share) / rest if rest > 0 else 0.0
        pi = pi * scale
        pi[task] = share
        if rest <= 0 and share < 1:  # the task had everything: spread the remainder evenly
            others = np.arange(self.size) != task
            pi[others] = (1.0 - share) / others.sum()
        return TaskSet(self.names, pi, self.spectra)


def _rank_order(task_ids: np.ndarray, feature_ids: np.ndarray, utility: np.ndarray) -> np.ndarray:
    """Indices sorting features by utility, descending, ties (TIE_RTOL) by task then feature.

    After a plain descending sort, neighbours within TIE_RTOL of each other are chained into one
    tie group; inside a group the order is (task, feature). Vectorised: O(F log F).
    """
    order = np.lexsort((feature_ids, task_ids, -utility))
    u = utility[order]
    gap = u[:-1] - u[1:]
    new_group = gap > TIE_RTOL * np.maximum(np.abs(u[:-1]), np.abs(u[1:]))
    group = np.concatenate([[0], np.cumsum(new_group)])
    return order[np.lexsort((feature_ids[order], task_ids[order], group))]


class Theory:
    """Theorem 3 and its consequences for one :class:`TaskSet`.

    Parameters
    ----------
    tasks:
        The task set.
    frequent_mass:
        Prior mass that defines the frequent set F (default 0.8, as in the paper).

    Example
    -------
    >>> th = Theory(TaskSet.power_law(32, 16, alpha=2, beta=1))
    >>> int(th.first_feature_width()[-1]), int(th.critical_width()[-1])
    (46, 27)
    """

    def __init__(self, tasks: TaskSet, frequent_mass: float = DEFAULT_FREQUENT_MASS):
        if not 0 < frequent_mass <= 1:
            raise UserError(f"frequent_mass must be in (0, 1], got {frequent_mass}")
        self.tasks = tasks
        self.frequent_mass = float(frequent_mass)

    # -- the global ranking of features (Theorem 3) -------------------------------------------
    @cached_property
    def _features(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(task id, feature id, utility) of every feature, in rank order."""
        ts = self.tasks
        task_ids = np.concatenate([np.full(s.size, k) for k, s in enumerate(ts.spectra)])
        feat_ids = np.concatenate([np.arange(s.size) for s in ts.spectra])
        util = np.concatenate([ts.frequencies[k] * s for k, s in enumerate(ts.spectra)])
        order = _rank_order(task_ids, feat_ids, util)
        return task_ids[order], feat_ids[order], util[order]

    def ranked_utilities(self) -> np.ndarray:
        """All utilities pi_k * lambda_{k,j}, in rank order (descending)."""
        return self._features[2].copy()

    def _check_width(self, width: int) -> int:
        d = self.tasks.total_features
        if isinstance(width, bool) or int(width) != width or not 1 <= width <= d:
            raise UserError(f"width must be an integer in [1, {d}] (the total feature count), "
                            f"got {width}")
        return int(width)

    def features_kept(self, width: int) -> np.ndarray:
        """n_k(N): how many of task k's features are among the first N ranked features."""
        n = self._check_width(width)
        return np.bincount(self._features[0][:n], minlength=self.tasks.size)

    def loss(self, width: int) -> np.ndarray:
        """Optimal per-task loss: the variance of the features not kept, sum_{j > n_k} lambda_kj."""
        kept = self.features_kept(width)
        return np.array([s[n:].sum() for s, n in zip(self.tasks.spectra, kept, strict=True)])

    def normalized_loss(self, width: int) -> np.ndarray:
        """Optimal per-task loss divided by the task's total variance (1 = nothing learned)."""
        return self.loss(width) / self.tasks.total_variance

    def learned(self, width: int) -> np.ndarray:
        """Whether each task keeps at least one feature at width N."""
        return self.features_kept(width) >= 1

    def first_feature_width(self) -> np.ndarray:
        """Smallest N with n_k(N) >= 1: the 1-based rank of each task's first feature."""
        task_ids = self._features[0]
        out = np.empty(self.tasks.size, dtype=int)
        # a task's first feature is its highest-ranked one (ties within a task go by feature order)
        for k in range(self.tasks.size):
            out[k] = int(np.flatnonzero(task_ids == k)[0]) + 1
        return out

    # -- the frequent set (Thm 4, Cor. 5, Prop. 6) ---------------------------------------------
    def frequent_tasks(self) -> np.ndarray:
        """Indices of F: tasks by descending prior (ties by order) until the mass is reached."""
        pi = self.tasks.frequencies
        order = np.lexsort((np.arange(pi.size), -pi))
        cum = np.cumsum(pi[order])
        # tolerate rounding so a mass of exactly 0.8 counts as reached
        count = int(np.searchsorted(cum, self.frequent_mass * (1 - TIE_RTOL), side="left")) + 1
        return np.sort(order[: min(count, pi.size)])

    @cached_property
    def _frequent_eigenvalues(self) -> np.ndarray:
        """mu^F: descending eigenvalues of M_F = sum_{k in F} pi_k C_k (blocks are orthogonal)."""
        ts = self.tasks
        mu = np.concatenate([ts.frequencies[k] * ts.spectra[k] for k in self.frequent_tasks()])
        return np.sort(mu)[::-1]

    def frequent_eigenvalues(self) -> np.ndarray:
        """mu^F, descending (non-zero part; the rest of the d eigenvalues are 0)."""
        return self._frequent_eigenvalues.copy()

    def critical_width(self) -> np.ndarray:
        """Prop. 6 per task: N_crit = min{N : mu_N^F <= pi_k * lambda_k1}, ties counting as <=."""
        mu = self._frequent_eigenvalues
        out = np.empty(self.tasks.size, dtype=int)
        for k, (p, s) in enumerate(zip(self.tasks.frequencies, self.tasks.spectra, strict=True)):
            u = p * s[0]
            above = mu > u
            above &= ~np.array([_is_tie(m, u) for m in mu], dtype=bool)
            # mu is sorted, so the strictly-larger eigenvalues form a prefix; beyond mu, mu_N = 0
            out[k] = int(above.sum()) + 1
        return out

    def best_residual(self, width: int) -> float:
        """delta_F*(N) = sum_{i > N} mu_i^F: the least frequent residual any width-N encoder has."""
        n = self._check_width(width)
        return float(self._frequent_eigenvalues[n:].sum())

    def optimal_residual(self, width: int) -> float:
        """delta_F(U*) at the Theorem 3 optimum of the whole mixture (>= best_residual)."""
        n = self._check_width(width)
        task_ids, _, util = self._features
        in_f = np.isin(task_ids, self.frequent_tasks())
        return float(util[n:][in_f[n:]].sum())

    def gradient_bound(self, width: int, residual: float | None = None) -> float:
        """Thm 4: frequent-task gradient norm <= 2 sqrt(lambda_1(M_F) * delta_F).

        Uses ``best_residual(width)`` unless a measured residual is given.
        """
        delta = self.best_residual(width) if residual is None else float(residual)
        if delta < 0:
            raise UserError(f"residual must be >= 0, got {delta}")
        return float(2.0 * np.sqrt(self._frequent_eigenvalues[0] * delta))

    def frequent_width(self, eps: float) -> int:
        """Cor. 5: N_F(eps) = min N with sum_{i > N} mu_i^F <= eps (N >= 0)."""
        if not np.isfinite(eps) or eps < 0:
            raise UserError(f"eps must be a finite number >= 0, got {eps}")
        mu = self._frequent_eigenvalues
        tails = np.concatenate([np.cumsum(mu[::-1])[::-1], [0.0]])  # tails[N] = sum_{i>N} mu_i
        return int(np.flatnonzero(tails <= eps * (1 + TIE_RTOL))[0])

    def width_for_tasks(self, m: int) -> int:
        """N*(m): the smallest width at which at least m tasks hold a feature.

        The m-th smallest first-feature width: our reading of N*(m) (the paper shows a figure).
        """
        if not 1 <= m <= self.tasks.size:
            raise UserError(f"m must be in [1, {self.tasks.size}], got {m}")
        return int(np.sort(self.first_feature_width())[m - 1])

    # -- the inverse question -----------------------------------------------------------------
    def required_frequency(self, task: int, width: int) -> float:
        """Smallest prior task ``task`` must have for its first feature to be kept at width N.

        Other tasks keep their relative proportions. Exact up to tie resolution: at the returned
        share the task is learned (verified against the ranking), at a share 1% lower it is not.
        Returns 0.0 when any positive share suffices (fewer than N features compete).
        """
        n = self._check_width(width)
        ts = self.tasks
        if not 0 <= task < ts.size:
            raise UserError(f"task index must be in [0, {ts.size}), got {task}")
        others = [j for j in range(ts.size) if j != task]
        other_mass = float(ts.frequencies[others].sum())
        if other_mass <= 0:
            return 0.0  # alone in the mix: any share is all of it
        # utility per unit share of the other tasks; the task's share p gives them (1 - p) of it
        v = np.sort(np.concatenate([ts.frequencies[j] / other_mass * ts.spectra[j]
                                    for j in others]))[::-1]
        if n > v.size or v[n - 1] <= 0:
            return 0.0
        lam1 = ts.spectra[task][0]
        # kept iff fewer than N other features rank ahead: p*lam1 >= (1-p)*v_N, i.e. p >= r/(1+r)
        r = v[n - 1] / lam1
        share = r / (1.0 + r)
        # resolve ties exactly through the same ranking the rest of the theory uses
        for _ in range(64):
            if Theory(ts.with_share(task, share), self.frequent_mass).learned(n)[task]:
                return float(share)
            share = min(1.0, share * (1 + 4 * TIE_RTOL) + 1e-300)
        raise AssertionError("required_frequency did not converge")  # pragma: no cover
