"""The share a task needs to be learned at a model size: from the theory or a calibration.

Two models with one small API (``required``, ``learned``, ``size_needed``, ``describe``):

* :class:`TheoryThreshold`: every task is a toy task with a spectrum (alpha + features, or an
  explicit task file); the size is the width N; Theorem 3 decides. The required share of task k
  is :meth:`raretask.theory.Theory.required_frequency` at the current mix (others keep their
  proportions), so it depends on the whole mix.
* :class:`LawThreshold`: the learnability law of a `raretask calibrate` file
  (:mod:`raretask.mixing.learnability`) at the plan's budget, its rate converted to the plan's
  unit (share of tokens or of examples); the same law for every task.
* :class:`CalibratedThreshold`: a bare curve ``f*(size) = 10**log10_c * size**slope``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from raretask.errors import UserError
from raretask.theory import DEFAULT_FREQUENT_MASS, TaskSet, Theory


class TheoryThreshold:
    """Theorem 3 thresholds for tasks with given spectra.

    Parameters
    ----------
    names:
        Task names, in the order shares will be given.
    spectra:
        One eigenvalue array per task; or None with ``alpha`` and ``features`` for all.
    alpha, features:
        Power-law spectrum ``j**-alpha`` over ``features`` features, used when ``spectra`` is None.
    frequent_mass:
        Mass of the frequent set F (reported, not used by the thresholds themselves).
    """

    def __init__(self, names: Sequence[str], spectra: Sequence[np.ndarray] | None = None,
                 alpha: float = 2.0, features: int = 32,
                 frequent_mass: float = DEFAULT_FREQUENT_MASS):
        self.names = tuple(names)
        self._explicit = spectra is not None
        if spectra is None:
            if features < 1:
                raise UserError(f"--features must be >= 1, got {features}")
            spec = np.arange(1, features + 1, dtype=float) ** -float(alpha)
            spectra = [spec] * len(self.names)
        self.spectra = tuple(np.asarray(s, float) for s in spectra)
        self.alpha, self.features = alpha, features
        self.frequent_mass = frequent_mass

    def theory(self, shares: np.ndarray) -> Theory:
        return Theory(TaskSet(self.names, np.asarray(shares, float), self.spectra),
                      self.frequent_mass)

    @staticmethod
    def _width(size: float) -> int:
        if float(size) != int(size) or size < 1:
            raise UserError(f"--size: the theory's size is a width N (an integer >= 1), "
                            f"got {size:g}")
        return int(size)

    def required(self, shares: np.ndarray, size: float) -> np.ndarray:
        th, n = self.theory(shares), self._width(size)
        return np.array([th.required_frequency(k, n) for k in range(len(self.names))])

    def learned(self, shares: np.ndarray, size: float) -> np.ndarray:
        return self.theory(shares).learned(self._width(size))

    def size_needed(self, shares: np.ndarray, task: int, margin: float = 1.0) -> float:
        """Smallest width N with ``margin * required(N) <= share``: at margin 1 the width at
        which the task's first feature enters (Theorem 3). Binary search: the required share
        never rises with N."""
        th = self.theory(shares)
        if margin == 1.0:
            return float(th.first_feature_width()[task])
        lo, hi = 1, self.theory(shares).tasks.total_features
        share = float(np.asarray(shares, float)[task] / np.sum(shares))
        while lo < hi:
            mid = (lo + hi) // 2
            if margin * th.required_frequency(task, mid) <= share:
                hi = mid
            else:
                lo = mid + 1
        return float(lo)

    def frequent(self, shares: np.ndarray) -> np.ndarray:
        mask = np.zeros(len(self.names), dtype=bool)
        mask[self.theory(shares).frequent_tasks()] = True
        return mask

    def describe(self) -> str:
        if len({s.size for s in self.spectra}) == 1 and not self._explicit:
            return f"theory (width N; alpha {self.alpha:g}, {self.features} features per task)"
        return "theory (width N; spectra from the task file)"


class CalibratedThreshold:
    """``f*(size) = 10**log10_c * size**slope`` for every task (a fitted calibration curve)."""

    def __init__(self, log10_c: float, slope: float, label: str = "calibration",
                 log10_sigma: float = 0.0):
        if not np.isfinite(log10_c) or not np.isfinite(slope):
            raise UserError(f"{label}: the calibration curve is not finite")
        self.log10_c, self.slope, self.label = float(log10_c), float(slope), label
        self.log10_sigma = float(log10_sigma)

    def at(self, size: float) -> float:
        if not size > 0:
            raise UserError(f"--size must be > 0, got {size:g}")
        return float(min(1.0, 10 ** (self.log10_c + self.slope * np.log10(size))))

    def required(self, shares: np.ndarray, size: float) -> np.ndarray:
        return np.full(len(shares), self.at(size))

    def learned(self, shares: np.ndarray, size: float) -> np.ndarray:
        return np.asarray(shares) >= self.at(size)

    def size_needed(self, shares: np.ndarray, task: int, margin: float = 1.0) -> float:
        """Size at which ``margin`` times the curve falls to this task's share (inf: never)."""
        s = float(shares[task]) / margin
        if s <= 0:
            return float("inf")
        if self.slope >= 0:
            return float("inf") if s < 10 ** self.log10_c else 1.0
        return float(10 ** ((np.log10(s) - self.log10_c) / self.slope))

    def frequent(self, shares: np.ndarray) -> np.ndarray:
        pi = np.asarray(shares, float)
        order = np.argsort(-pi, kind="stable")
        count = int(np.searchsorted(np.cumsum(pi[order]), DEFAULT_FREQUENT_MASS - 1e-12)) + 1
        mask = np.zeros(pi.size, dtype=bool)
        mask[order[:count]] = True
        return mask

    def describe(self) -> str:
        return (f"{self.label}: f*(size) = 10^{self.log10_c:.3f} * size^{self.slope:.3f}"
                f" (±{self.log10_sigma:.2f} in log10)")


class LawThreshold:
    """A calibrated law as the share a task needs, in the plan's unit.

    The law's rate f is instances per token (LM) or a share of samples (toy). A dataset's
    example of task k is one instance, so with ``t_k`` tokens per example:

    * share of tokens: ``s_k = f_k t_k`` (exact);
    * share of examples: ``q_k = f_k * sum_j q_j t_j`` (the mix's mean tokens per example,
      taken at the current weights: the plan iterates until it stops moving).

    Parameters
    ----------
    law:
        A fitted :class:`~raretask.mixing.learnability.Law` (a bound has no threshold: refused).
    tokens_per_instance:
        The calibration's tokens per instance: a rate per token (an LM law) needs each task's
        tokens per example to become a share; None (a toy law, a share of samples) is used as
        it is.
    unit:
        The plan's unit, "examples" or "tokens".
    budget:
        Training budget in the law's unit (LM: tokens; toy: samples).
    tokens_per_example:
        Tokens per example of each task (LM calibrations need it; None: refused).
    label:
        Names the calibration in messages and tables.
    """

    def __init__(self, law, tokens_per_instance: float | None, unit: str, budget: float,
                 tokens_per_example: Sequence[float] | None = None, label: str = "calibration"):
        if law.kind != "logistic":
            raise UserError(f"--curve: task {law.task!r} of {label} has no threshold "
                            f"({law.learned_cells} of {law.cells} cells learned); choose a "
                            "fitted task")
        per_token = tokens_per_instance is not None
        if per_token and tokens_per_example is None:
            raise UserError(f"--calibration: {label} is in instances per token; converting it to "
                            f"shares of {unit} needs each task's tokens per example (analyze "
                            "with a text field or --tokens-field)")
        if per_token and np.any(np.asarray(tokens_per_example, float) <= 0):
            raise UserError(f"--calibration: converting {label} needs tokens per example > 0 "
                            "for every task (a task has examples without tokens)")
        if not per_token and unit == "tokens":
            raise UserError(f"--unit tokens: {label} is a toy calibration (share of samples); "
                            "use --unit examples")
        if not (np.isfinite(budget) and budget > 0):
            raise UserError(f"--budget: the calibrated law needs a training budget > 0, got "
                            f"{budget}")
        self.law, self.per_token, self.unit, self.budget, self.label = (law, per_token, unit,
                                                                          budget, label)
        self.tpe = None if tokens_per_example is None else np.asarray(tokens_per_example, float)

    def _factor(self, shares: np.ndarray) -> np.ndarray:
        """Share in the plan's unit per unit of the law's rate, for every task."""
        q = np.asarray(shares, float)
        if not self.per_token:
            return np.ones(q.size)
        if self.unit == "tokens":
            return self.tpe
        return np.full(q.size, float(np.sum(q / q.sum() * self.tpe)))

    def at(self, size: float) -> float:
        """The law's f*(size) at the budget, in its own unit."""
        if not size > 0:
            raise UserError(f"--size must be > 0, got {size:g}")
        return self.law.required_frequency(size, self.budget)[0]

    def required(self, shares: np.ndarray, size: float) -> np.ndarray:
        return np.minimum(1.0, self.at(size) * self._factor(shares))

    def learned(self, shares: np.ndarray, size: float) -> np.ndarray:
        return np.asarray(shares) >= self.required(shares, size)

    def size_needed(self, shares: np.ndarray, task: int, margin: float = 1.0) -> float:
        """Size at which ``margin`` times the required share falls to this task's share."""
        s = float(shares[task]) / margin
        if s <= 0:
            return float("inf")
        return self.law.size_for(s / float(self._factor(shares)[task]), self.budget)

    def frequent(self, shares: np.ndarray) -> np.ndarray:
        return CalibratedThreshold.frequent(self, shares)

    def extrapolation(self, size: float) -> list[str]:
        return self.law.extrapolation(size, self.budget, None)

    def describe(self) -> str:
        return (f"{self.label} [{self.law.task}]: P(learned) = 1/2 at {self.law.threshold_law()}, "
                f"budget {self.budget:.3g}")
