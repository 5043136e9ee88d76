"""The scaling-law argument of the study (arXiv 2605.29548, Sec. 2).

Loss as a function of model size N (parameters) and data D (tokens)::

    L(N, D) = L0 + A / N**a + B / D**b

Under a compute budget C = 6 N D, minimising L over the split gives (derived in
:meth:`ScalingFit.optimal_tokens`) ``a A N**-a = b B D**-b``, hence the compute-optimal loss of a
model of size N, ``L_C(N) = L0 + (1 + a/b) A N**-a``, and with unlimited data
``L_inf(N) = L0 + A N**-a``.

The study's definitions (PAPER.md section 1), for sizes N_s < N_l:

* Def. 1, learnable via data scaling ("data"): ``L_inf(N_s) - L_C(N_l) < 0``: the small model,
  given unlimited data, reaches the large model's compute-optimal loss. Otherwise "model".
* Def. 2: ``N_s*(eps)`` is the largest N with ``L_inf(N) - L_C(N_l) > eps``; models at or below
  it need model scaling. With eps = 0 this is ``N_l / (1 + a/b)**(1/a)``, so a pair is "data"
  iff ``N_l / N_s < (1 + a/b)**(1/a)`` (:func:`max_data_scalable_ratio`).

Notes (ours, where the paper is loose):

* Under this law L_C(N) - L0 and L_inf(N) - L0 share the exponent a in N; they differ by the
  constant factor (1 + a/b). In compute, ``L_C - L0 ∝ C**-(a b / (a + b))``. The paper quotes
  a ~ 0.46, b ~ 0.51 and g = 0.34; with a = 0.46, b = 0.51 the compute exponent is 0.24, not 0.34
  (0.46 / 0.54 are Chinchilla's *allocation* exponents, 0.34 its N exponent). We implement the
  law as written and report whatever exponents a fit gives.
* The fit minimises squared log-loss residuals (optionally Huber, as Chinchilla did), starting
  from the best points of a grid over (a, b) where (L0, A, B) solve a non-negative linear
  least-squares problem exactly.

Example
-------
>>> from raretask.scaling import ScalingFit, classify, max_data_scalable_ratio
>>> law = ScalingFit(L0=1.7, A=400.0, B=410.0, a=0.46, b=0.51)
>>> round(max_data_scalable_ratio(law), 3)
4.045
>>> [(c.small, c.large, c.verdict) for c in classify(law, [1e8, 3e8, 1e9])]
[(100000000.0, 300000000.0, 'data'), (100000000.0, 1000000000.0, 'model'), \
(300000000.0, 1000000000.0, 'data')]
"""

from __future__ import annotations

import csv
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from typing import Literal

import numpy as np
from scipy.optimize import least_squares, nnls

from raretask.errors import UserError

COLUMNS = ("params", "tokens", "loss")
"""The CSV columns :func:`load_scaling_csv` requires (any order, no others)."""

MIN_POINTS = 5
"""Distinct (params, tokens) points a fit needs: five parameters are estimated."""

EXPONENT_BOUNDS = (1e-6, 3.0)
"""Bounds on the fitted exponents a and b (the open interval (0, 3), closed numerically)."""

_GRID = np.linspace(0.05, 2.95, 30)  # starting exponents for the (a, b) grid search
_STARTS = 4  # best grid points refined by the non-linear fit

Verdict = Literal["data", "model"]
FloatOrArray = float | np.ndarray


# -- the law ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScalingFit:
    """A loss law ``L(N, D) = L0 + A N**-a + B D**-b`` (fitted or given).

    Parameters
    ----------
    L0:
        Irreducible loss, >= 0.
    A, B:
        Model-size and data coefficients, > 0.
    a, b:
        Model-size and data exponents, > 0.
    rmse:
        Root-mean-square error of the fit in loss units (0 for a law given by hand).
    n_points:
        Number of data rows the fit used (0 for a law given by hand).

    All methods take floats or numpy arrays (sizes > 0) and return the same shape.

    Example
    -------
    >>> law = ScalingFit(L0=1.7, A=400.0, B=410.0, a=0.46, b=0.51)
    >>> round(law.loss(1e9, 2e10), 4), round(law.loss_infinite_data(1e9), 4)
    (1.7313, 1.729)
    >>> D = law.optimal_tokens(1e9)
    >>> round(D / 1e6, 1), round(law.loss(1e9, D), 4), round(law.loss_compute_optimal(1e9), 4)
    (168.5, 1.7551, 1.7551)
    >>> round(law.compute_exponent, 4), round(law.params_exponent, 4)
    (0.2419, 0.5258)
    """

    L0: float
    A: float
    B: float
    a: float
    b: float
    rmse: float = 0.0
    n_points: int = 0

    def __post_init__(self) -> None:
        checks = (
            ("L0", self.L0, 0.0, True),
            ("A", self.A, 0.0, False),
            ("B", self.B, 0.0, False),
            ("a", self.a, 0.0, False),
            ("b", self.b, 0.0, False),
        )
        for name, value, low, closed in checks:
            ok = math.isfinite(value) and (value >= low if closed else value > low)
            if not ok:
                relation = ">=" if closed else ">"
                raise UserError(f"{name} must be a finite number {relation} {low:g}, got {value}")

    # loss curves -------------------------------------------------------------------------------
    def loss(self, N: FloatOrArray, D: FloatOrArray) -> FloatOrArray:
        """L(N, D) for model size ``N`` and data ``D`` (tokens)."""
        n, d = _positive("N", N), _positive("D", D)
        return _out(self.L0 + self.A * n**-self.a + self.B * d**-self.b)

    def loss_infinite_data(self, N: FloatOrArray) -> FloatOrArray:
        """L_inf(N) = L0 + A N**-a: the loss of size ``N`` trained on unlimited data."""
        return _out(self.L0 + self.A * _positive("N", N) ** -self.a)

    # compute-optimal allocation (C = 6 N D) ----------------------------------------------------
    def optimal_tokens(self, N: FloatOrArray) -> FloatOrArray:
        """Tokens D that make size ``N`` compute-optimal.

        At fixed C, D = C / (6N) and dL/dN = (b B D**-b - a A N**-a) / N, which is zero at
        ``a A N**-a = b B D**-b``, i.e. ``D = (b B N**a / (a A))**(1/b)``. The stationary point
        is the minimum: A N**-a + B (C/6)**-b N**b is a sum of a decreasing and an increasing
        power of N.
        """
        n = _positive("N", N)
        return _out((self.b * self.B * n**self.a / (self.a * self.A)) ** (1.0 / self.b))

    def optimal_params(self, C: FloatOrArray) -> FloatOrArray:
        """Compute-optimal size N for a budget of ``C`` FLOPs (C = 6 N D), ∝ C**params_exponent.

        From C = 6 N optimal_tokens(N) = 6 k N**((a+b)/b) with k = (b B / (a A))**(1/b).
        """
        c = _positive("C", C)
        k = (self.b * self.B / (self.a * self.A)) ** (1.0 / self.b)
        return _out((c / (6.0 * k)) ** self.params_exponent)

    def loss_compute_optimal(self, N: FloatOrArray) -> FloatOrArray:
        """L_C(N) = L(N, optimal_tokens(N)) = L0 + (1 + a/b) A N**-a.

        At the optimum B D**-b = (a/b) A N**-a, so the data term is a fixed share of the model
        term.
        """
        n = _positive("N", N)
        return _out(self.L0 + (1.0 + self.a / self.b) * self.A * n**-self.a)

    @property
    def compute_exponent(self) -> float:
        """g_C = a b / (a + b): L_C - L0 ∝ C**-g_C along the compute-optimal frontier."""
        return self.a * self.b / (self.a + self.b)

    @property
    def params_exponent(self) -> float:
        """b / (a + b): compute-optimal N ∝ C**(b / (a + b))."""
        return self.b / (self.a + self.b)

    @property
    def tokens_exponent(self) -> float:
        """a / (a + b): compute-optimal D ∝ C**(a / (a + b))."""
        return self.a / (self.a + self.b)


# -- data ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ScalingData:
    """Loss measurements, one per (params, tokens) run; read-only float arrays of equal length.

    Parameters
    ----------
    params, tokens, loss:
        Model size N, training tokens D and final loss of each run, all positive and finite.
    source:
        Where the rows came from (a file name), for messages.
    """

    params: np.ndarray
    tokens: np.ndarray
    loss: np.ndarray
    source: str = "<memory>"

    def __post_init__(self) -> None:
        for name in COLUMNS:
            arr = np.array(getattr(self, name), dtype=float)
            arr.flags.writeable = False  # frozen all the way down
            object.__setattr__(self, name, arr)

    def fit(self, huber_delta: float | None = None) -> ScalingFit:
        """:func:`fit_scaling_law` on these rows."""
        return fit_scaling_law(self.params, self.tokens, self.loss, huber_delta=huber_delta)


def load_scaling_csv(path: str | PathLike[str]) -> ScalingData:
    """Read loss measurements from a CSV file with header ``params,tokens,loss``.

    Columns may come in any order; unknown or duplicate columns are refused. Blank lines are
    skipped. Every value must be a positive finite number. The file must hold at least
    ``MIN_POINTS`` distinct (params, tokens) points with two distinct values of each.

    Parameters
    ----------
    path:
        The CSV file.

    Returns
    -------
    ScalingData
        The rows, in file order.

    Raises
    ------
    UserError
        One line naming the file, and the line number and field where there is one, e.g.
        ``data.csv line 7: field 'loss' must be a positive number, got 'abc'``.

    Example
    -------
    >>> data = load_scaling_csv("examples/scaling_synthetic.csv")  # run from the repo root
    >>> data.params.size, round(data.fit().a, 2)
    (30, 0.45)
    """
    name = str(path)
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            rows = list(_numbered_rows(fh))
    except OSError as err:
        raise UserError(f"{name}: cannot read: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise UserError(f"{name}: not a UTF-8 text file ({err.reason})") from err
    except csv.Error as err:
        raise UserError(f"{name}: malformed CSV: {err}") from err
    if not rows:
        raise UserError(f"{name}: empty file, expected a header line 'params,tokens,loss'")
    header_line, header = rows[0]
    index = _column_index(name, header_line, header)
    values: dict[str, list[float]] = {col: [] for col in COLUMNS}
    for line, row in rows[1:]:
        if len(row) != len(header):
            raise UserError(
                f"{name} line {line}: expected {len(header)} fields "
                f"({','.join(h.strip() for h in header)}), got {len(row)}"
            )
        for col in COLUMNS:
            values[col].append(_parse_positive(name, line, col, row[index[col]]))
    _check_enough_points(name, values["params"], values["tokens"])
    return ScalingData(
        np.array(values["params"]), np.array(values["tokens"]), np.array(values["loss"]), name
    )


def _numbered_rows(fh):
    """(line number, fields) for each non-blank CSV record; the number is where it ends."""
    reader = csv.reader(fh)
    for row in reader:
        if any(field.strip() for field in row):
            yield reader.line_num, row


def _column_index(name: str, line: int, header: list[str]) -> dict[str, int]:
    """Position of each required column; refuse missing, unknown and duplicate names."""
    cols = [h.strip() for h in header]
    expected = ",".join(COLUMNS)
    duplicate = sorted({c for c in cols if cols.count(c) > 1})
    if duplicate:
        raise UserError(f"{name} line {line}: duplicate column {duplicate[0]!r}")
    unknown = [c for c in cols if c not in COLUMNS]
    if unknown:
        raise UserError(
            f"{name} line {line}: unknown column {unknown[0]!r}; expected exactly {expected}"
        )
    missing = [c for c in COLUMNS if c not in cols]
    if missing:
        raise UserError(f"{name} line {line}: missing column {missing[0]!r}; expected {expected}")
    return {c: cols.index(c) for c in COLUMNS}


def _parse_positive(name: str, line: int, field: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise UserError(
            f"{name} line {line}: field {field!r} must be a positive number, got {text.strip()!r}"
        )
    return value


def _check_enough_points(where: str, params: Sequence[float], tokens: Sequence[float]) -> None:
    if not params:
        raise UserError(f"{where}: no data rows after the header")
    points = len(set(zip(params, tokens, strict=True)))
    if points < MIN_POINTS:
        raise UserError(
            f"{where}: {points} distinct (params, tokens) points, the fit needs at least "
            f"{MIN_POINTS}"
        )
    for col, vals in (("params", params), ("tokens", tokens)):
        if len(set(vals)) < 2:
            raise UserError(f"{where}: column {col!r} needs at least 2 distinct values")


# -- fitting ------------------------------------------------------------------------------------
def fit_scaling_law(
    params: Sequence[float] | np.ndarray,
    tokens: Sequence[float] | np.ndarray,
    loss: Sequence[float] | np.ndarray,
    *,
    huber_delta: float | None = None,
) -> ScalingFit:
    """Fit ``L(N, D) = L0 + A N**-a + B D**-b`` to measured losses.

    Minimises the squared residuals of log-loss (or their Huber loss with threshold
    ``huber_delta``, Chinchilla used 1e-3) with ``scipy.optimize.least_squares`` under
    0 < a, b < 3, A, B > 0, L0 >= 0. Starts: for each (a, b) on a grid, (L0, A, B) is the exact
    non-negative least-squares solution of the (linear in them) relative residuals; the best
    few grid points are refined and the best result kept.

    Parameters
    ----------
    params, tokens, loss:
        Model sizes N, training tokens D and losses; equal length, positive, finite; at least
        ``MIN_POINTS`` distinct (N, D) points with two distinct N and two distinct D.
    huber_delta:
        None for plain least squares; a positive threshold for a Huber fit.

    Returns
    -------
    ScalingFit
        The fitted law with ``rmse`` in loss units and ``n_points`` = number of rows.

    Example
    -------
    >>> import numpy as np
    >>> N, D = np.meshgrid(np.logspace(6, 9, 6), np.logspace(8, 11, 5))
    >>> law = ScalingFit(L0=1.7, A=400.0, B=410.0, a=0.46, b=0.51)
    >>> fit = fit_scaling_law(N.ravel(), D.ravel(), law.loss(N, D).ravel())
    >>> round(fit.a, 4), round(fit.b, 4), round(fit.L0, 4)
    (0.46, 0.51, 1.7)
    """
    n, d, y = _validated_arrays(params, tokens, loss)
    if huber_delta is not None and not (math.isfinite(huber_delta) and huber_delta > 0):
        raise UserError(f"huber_delta must be a positive number or None, got {huber_delta}")
    x1, x2, log_y = np.log(n), np.log(d), np.log(y)
    best = None
    for start in _grid_starts(x1, x2, y):
        result = _refine(start, x1, x2, log_y, huber_delta)
        if best is None or result.cost < best.cost:
            best = result
    L0, log_A, log_B, a, b = (float(v) for v in best.x)
    law = ScalingFit(L0=L0, A=math.exp(log_A), B=math.exp(log_B), a=a, b=b)
    rmse = float(np.sqrt(np.mean((law.loss(n, d) - y) ** 2)))
    return ScalingFit(L0, law.A, law.B, a, b, rmse=rmse, n_points=int(y.size))


def _validated_arrays(params, tokens, loss) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = []
    for name, values in zip(COLUMNS, (params, tokens, loss), strict=True):
        try:
            arr = np.asarray(values, dtype=float)
        except (TypeError, ValueError) as err:
            raise UserError(f"{name}: expected numbers ({err})") from err
        if arr.ndim != 1:
            raise UserError(f"{name}: expected a 1-D sequence, got shape {arr.shape}")
        if not np.all(np.isfinite(arr) & (arr > 0)):
            raise UserError(f"{name}: every value must be a positive finite number")
        arrays.append(arr)
    sizes = {arr.size for arr in arrays}
    if len(sizes) != 1:
        lengths = ", ".join(f"{c}={a.size}" for c, a in zip(COLUMNS, arrays, strict=True))
        raise UserError(f"params, tokens, loss must have equal length, got {lengths}")
    _check_enough_points("params/tokens", arrays[0].tolist(), arrays[1].tolist())
    return arrays[0], arrays[1], arrays[2]


def _grid_starts(x1: np.ndarray, x2: np.ndarray, y: np.ndarray) -> list[np.ndarray]:
    """Best (L0, log A, log B, a, b) starts of an (a, b) grid with (L0, A, B) solved by NNLS."""
    scored = []
    for a, b in itertools.product(_GRID, _GRID):
        # columns in the reference scale of the largest N, D so they stay O(1)
        f1, f2 = np.exp(-a * (x1 - x1.max())), np.exp(-b * (x2 - x2.max()))
        design = np.column_stack([np.ones_like(y), f1, f2]) / y[:, None]  # relative residuals
        coef, residual = nnls(design, np.ones_like(y))
        L0 = coef[0]
        A = max(coef[1], 1e-12) * math.exp(a * x1.max())
        B = max(coef[2], 1e-12) * math.exp(b * x2.max())
        scored.append((residual, np.array([L0, math.log(A), math.log(B), a, b])))
    scored.sort(key=lambda item: item[0])
    return [start for _, start in scored[:_STARTS]]


def _refine(start: np.ndarray, x1, x2, log_y, huber_delta: float | None):
    lo = np.array([0.0, -np.inf, -np.inf, EXPONENT_BOUNDS[0], EXPONENT_BOUNDS[0]])
    hi = np.array([np.inf, np.inf, np.inf, EXPONENT_BOUNDS[1], EXPONENT_BOUNDS[1]])
    span = hi - lo
    margin = np.where(np.isfinite(span), 1e-9 * span, 1e-9)
    x0 = np.clip(start, lo + margin, hi - margin)  # least_squares wants a strictly inside start

    def terms(theta):
        L0, log_A, log_B, a, b = theta
        t1, t2 = np.exp(log_A - a * x1), np.exp(log_B - b * x2)
        return t1, t2, L0 + t1 + t2

    def residuals(theta):
        return np.log(terms(theta)[2]) - log_y

    def jacobian(theta):
        t1, t2, pred = terms(theta)
        return np.column_stack([np.ones_like(pred), t1, t2, -x1 * t1, -x2 * t2]) / pred[:, None]

    return least_squares(
        residuals,
        x0,
        jac=jacobian,
        bounds=(lo, hi),
        loss="linear" if huber_delta is None else "huber",
        f_scale=1.0 if huber_delta is None else huber_delta,
        x_scale="jac",
        ftol=1e-14,
        xtol=1e-14,
        gtol=1e-14,
        max_nfev=2000,
    )


# -- the study's definitions --------------------------------------------------------------------
@dataclass(frozen=True)
class Classification:
    """One (small, large) pair under Def. 1 / Def. 2.

    Attributes
    ----------
    small, large:
        Model sizes N_s < N_l.
    gap_compute_optimal:
        L_C(N_s) - L_C(N_l), > 0.
    gap_infinite_data:
        L_inf(N_s) - L_C(N_l); < 0 means unlimited data lets the small model catch up.
    verdict:
        "data" if ``gap_infinite_data < eps`` (Def. 1 at eps = 0), else "model".
    critical_small_size:
        N_s*(eps) for this large size (see :func:`critical_small_size`); the verdict is "model"
        exactly when ``small <= critical_small_size``.
    """

    small: float
    large: float
    gap_compute_optimal: float
    gap_infinite_data: float
    verdict: Verdict
    critical_small_size: float


def gap_compute_optimal(fit: ScalingFit, small: float, large: float) -> float:
    """L_C(small) - L_C(large): what compute-optimal scaling from small to large gains."""
    small, large = float(_positive("small", small)), float(_positive("large", large))
    # L0 cancels; dropping it keeps the difference exact where L0 would swamp it
    return (1.0 + fit.a / fit.b) * fit.A * (small**-fit.a - large**-fit.a)


def gap_infinite_data(fit: ScalingFit, small: float, large: float) -> float:
    """L_inf(small) - L_C(large): negative when unlimited data closes the gap (Def. 1)."""
    small, large = float(_positive("small", small)), float(_positive("large", large))
    return fit.A * (small**-fit.a - (1.0 + fit.a / fit.b) * large**-fit.a)  # L0 cancels


def critical_small_size(fit: ScalingFit, large: float, eps: float = 0.0) -> float:
    """N_s*(eps): the largest N with ``L_inf(N) - L_C(large) > eps`` (Def. 2).

    L_inf decreases in N, so the condition holds exactly for N below the root of
    ``L0 + A N**-a = L_C(large) + eps``: ``N* = (A / (L_C(large) + eps - L0))**(1/a)`` (the
    supremum, where the gap equals eps). If ``L_C(large) + eps <= L0`` every N qualifies and the
    result is ``math.inf``; since L_C(large) > L0 this needs eps < 0, which asks the small model
    to beat L_C(large) by |eps|. At eps = 0, ``N* = large / max_data_scalable_ratio(fit)``.

    Parameters
    ----------
    fit:
        The law.
    large:
        The large model size N_l (> 0).
    eps:
        Tolerance on the loss gap (finite; normally >= 0, see above for eps < 0).

    Returns
    -------
    float
        N_s*(eps); models at or below it need model scaling to reach L_C(large) + eps.

    Example
    -------
    >>> law = ScalingFit(L0=1.7, A=400.0, B=410.0, a=0.46, b=0.51)
    >>> round(critical_small_size(law, 1e9) / 1e6, 1)
    247.2
    """
    _check_eps(eps)
    large = float(_positive("large", large))
    headroom = float(fit.loss_compute_optimal(large)) + eps - fit.L0
    if headroom <= 0:
        return math.inf
    return (fit.A / headroom) ** (1.0 / fit.a)


def max_data_scalable_ratio(fit: ScalingFit) -> float:
    """(1 + a/b)**(1/a): with eps = 0 a pair is "data" iff ``large / small`` is below this.

    Follows from L_inf(N_s) < L_C(N_l)  <=>  A N_s**-a < (1 + a/b) A N_l**-a.
    """
    return (1.0 + fit.a / fit.b) ** (1.0 / fit.a)


def classify(fit: ScalingFit, sizes: Sequence[float], eps: float = 0.0) -> list[Classification]:
    """Classify every pair of model sizes as learnable via data scaling or model scaling.

    Parameters
    ----------
    fit:
        The law.
    sizes:
        Model sizes, positive and finite, at least two distinct; duplicates are dropped and the
        rest sorted ascending.
    eps:
        Loss tolerance (finite, normally >= 0). "data" iff ``gap_infinite_data < eps``; at
        eps = 0 this is Def. 1. Equivalently "model" iff ``small <= critical_small_size(fit,
        large, eps)`` (Def. 2).

    Returns
    -------
    list[Classification]
        One row per pair (N_i, N_j), i < j, in lexicographic order of (i, j).

    Example
    -------
    >>> law = ScalingFit(L0=1.7, A=400.0, B=410.0, a=0.46, b=0.51)
    >>> [(c.small, c.large, c.verdict) for c in classify(law, [1e9, 1e8])]
    [(100000000.0, 1000000000.0, 'model')]
    """
    _check_eps(eps)
    ordered = _validated_sizes(sizes)
    rows = []
    for small, large in itertools.combinations(ordered, 2):
        gap_inf = gap_infinite_data(fit, small, large)
        rows.append(
            Classification(
                small=small,
                large=large,
                gap_compute_optimal=gap_compute_optimal(fit, small, large),
                gap_infinite_data=gap_inf,
                verdict="data" if gap_inf < eps else "model",
                critical_small_size=critical_small_size(fit, large, eps),
            )
        )
    return rows


def _validated_sizes(sizes: Sequence[float]) -> list[float]:
    try:
        values = [float(s) for s in sizes]
    except (TypeError, ValueError) as err:
        raise UserError(f"sizes: expected a list of numbers ({err})") from err
    bad = [s for s in values if not (math.isfinite(s) and s > 0)]
    if bad:
        raise UserError(f"sizes: every size must be a positive finite number, got {bad[0]}")
    ordered = sorted(set(values))
    if len(ordered) < 2:
        raise UserError(f"sizes: at least two distinct sizes are needed, got {len(ordered)}")
    return ordered


def _check_eps(eps: float) -> None:
    if not math.isfinite(eps):
        raise UserError(f"eps must be a finite number, got {eps}")


# -- helpers ------------------------------------------------------------------------------------
def _positive(name: str, value: FloatOrArray) -> np.ndarray:
    arr = np.asarray(value, dtype=float)
    if not np.all(arr > 0):  # also refuses NaN
        raise UserError(f"{name} must be > 0")
    return arr


def _out(arr: np.ndarray) -> FloatOrArray:
    """A plain float for scalar input, the array otherwise."""
    return float(arr) if np.ndim(arr) == 0 else arr
