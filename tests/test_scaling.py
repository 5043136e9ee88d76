"""The scaling-law argument (Sec. 2): fit, compute-optimal formulas, Def. 1 / Def. 2, CSV input."""

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize_scalar

from raretask.errors import UserError
from raretask.scaling import (
    ScalingData,
    ScalingFit,
    classify,
    critical_small_size,
    fit_scaling_law,
    gap_compute_optimal,
    gap_infinite_data,
    load_scaling_csv,
    max_data_scalable_ratio,
)

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "scaling_synthetic.csv"
PAPER_LAW = ScalingFit(L0=1.7, A=400.0, B=410.0, a=0.46, b=0.51)
EXAMPLE_LAW = ScalingFit(L0=1.7, A=400.0, B=5000.0, a=0.46, b=0.51)  # generated examples/ CSV


def _grid(law: ScalingFit):
    N, D = np.meshgrid(np.logspace(6, 9, 6), np.logspace(8, 11, 5))
    return N.ravel(), D.ravel(), law.loss(N, D).ravel()


def _write(tmp_path: Path, text: str, name: str = "data.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


GOOD_ROWS = "".join(
    f"{n:g},{d:g},{PAPER_LAW.loss(n, d):.6f}\n" for n in (1e6, 1e7, 1e8) for d in (1e8, 1e9)
)


# -- fitting ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "law",
    [
        PAPER_LAW,
        EXAMPLE_LAW,
        ScalingFit(L0=1.69, A=406.4, B=410.7, a=0.34, b=0.28),  # Chinchilla, approach 3
        ScalingFit(L0=0.0, A=50.0, B=2000.0, a=0.3, b=0.6),  # irreducible loss on the bound
    ],
)
def test_noise_free_fit_recovers_the_law(law):
    fit = fit_scaling_law(*_grid(law))
    for name in ("L0", "A", "B", "a", "b"):
        assert getattr(fit, name) == pytest.approx(getattr(law, name), rel=1e-3, abs=1e-9), name
    assert fit.rmse < 1e-9
    assert fit.n_points == 30


def test_example_csv_fit_is_close_to_the_generating_law():
    data = load_scaling_csv(EXAMPLE)
    assert data.params.size == 30
    fit = data.fit()
    # 0.5% noise: exponents and L0 are pinned, A and B trade off against them, so check the
    # curve itself rather than the coefficients
    assert fit.a == pytest.approx(0.46, abs=0.03)
    assert fit.b == pytest.approx(0.51, abs=0.06)
    assert abs(fit.L0 - 1.7) < 0.03
    assert fit.compute_exponent == pytest.approx(EXAMPLE_LAW.compute_exponent, abs=0.03)
    assert fit.rmse < 0.015
    N, D, truth = _grid(EXAMPLE_LAW)
    np.testing.assert_allclose(fit.loss(N, D), truth, rtol=0.01)


def test_huber_fit_on_the_example_agrees_with_least_squares():
    data = load_scaling_csv(EXAMPLE)
    plain, huber = data.fit(), data.fit(huber_delta=1e-3)
    assert huber.a == pytest.approx(plain.a, abs=0.02)
    assert huber.b == pytest.approx(plain.b, abs=0.03)


def test_fit_rejects_bad_arrays():
    N, D, L = _grid(PAPER_LAW)
    with pytest.raises(UserError, match="equal length"):
        fit_scaling_law(N, D, L[:-1])
    with pytest.raises(UserError, match="^loss: every value must be a positive"):
        fit_scaling_law(N, D, np.where(np.arange(L.size) == 3, -1.0, L))
    with pytest.raises(UserError, match="needs at least 5"):
        fit_scaling_law(N[:4], D[:4], L[:4])
    with pytest.raises(UserError, match="huber_delta"):
        fit_scaling_law(N, D, L, huber_delta=0.0)


def test_law_parameters_are_validated():
    with pytest.raises(UserError, match="^A must be"):
        ScalingFit(L0=1.0, A=-1.0, B=1.0, a=0.5, b=0.5)
    with pytest.raises(UserError, match="^L0 must be"):
        ScalingFit(L0=math.nan, A=1.0, B=1.0, a=0.5, b=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        PAPER_LAW.a = 1.0  # type: ignore[misc]


# -- compute-optimal allocation -----------------------------------------------------------------
@pytest.mark.parametrize(
    "law", [PAPER_LAW, EXAMPLE_LAW, ScalingFit(1.69, 406.4, 410.7, 0.34, 0.28)]
)
@pytest.mark.parametrize("C", [1e18, 1e21, 1e24])
def test_optimal_tokens_matches_numeric_minimum(law, C):
    # minimise L(C / 6D, D) over log D at fixed C, then compare with the closed forms
    res = minimize_scalar(
        lambda logD: law.loss(C / (6 * math.exp(logD)), math.exp(logD)),
        bounds=(math.log(C) / 2 - 40, math.log(C) / 2 + 40),
        method="bounded",
        options={"xatol": 1e-10},
    )
    D_opt = math.exp(res.x)
    N_opt = C / (6 * D_opt)
    assert law.optimal_tokens(N_opt) == pytest.approx(D_opt, rel=1e-5)
    assert law.optimal_params(C) == pytest.approx(N_opt, rel=1e-5)
    # at the closed-form split of the same budget the loss is the true minimum: never above the
    # numeric one, and equal to it up to the optimiser's tolerance
    closed = law.loss_compute_optimal(law.optimal_params(C))
    assert closed <= res.fun + 1e-15
    assert closed == pytest.approx(res.fun, rel=1e-9)


def test_allocation_exponents_match_their_log_slopes():
    law = PAPER_LAW
    C = np.array([1e20, 1e22])
    N = law.optimal_params(C)
    D = law.optimal_tokens(N)
    np.testing.assert_allclose(6 * N * D, C, rtol=1e-10)  # on the budget

    def slope(y):
        return np.diff(np.log(y))[0] / np.diff(np.log(C))[0]

    assert slope(N) == pytest.approx(law.params_exponent, rel=1e-10)
    assert slope(D) == pytest.approx(law.tokens_exponent, rel=1e-10)
    assert -slope(law.loss_compute_optimal(N) - law.L0) == pytest.approx(law.compute_exponent)
    assert law.params_exponent + law.tokens_exponent == pytest.approx(1.0)


def test_compute_optimal_loss_lies_between_infinite_data_and_any_fixed_data():
    N = np.logspace(6, 10, 9)
    lc = PAPER_LAW.loss_compute_optimal(N)
    assert np.all(PAPER_LAW.loss_infinite_data(N) < lc)
    np.testing.assert_allclose(PAPER_LAW.loss(N, PAPER_LAW.optimal_tokens(N)), lc, rtol=1e-12)


# -- Def. 1 / Def. 2 ----------------------------------------------------------------------------
def test_classify_agrees_with_the_ratio_rule():
    ratio = max_data_scalable_ratio(PAPER_LAW)
    assert ratio == pytest.approx((1 + 0.46 / 0.51) ** (1 / 0.46))
    sizes = list(np.logspace(6, 10, 23))
    rows = classify(PAPER_LAW, sizes)
    assert len(rows) == 23 * 22 // 2
    verdicts = {"data", "model"}
    for row in rows:
        assert row.small < row.large
        assert row.gap_compute_optimal > 0
        assert row.verdict in verdicts
        r = row.large / row.small
        if abs(math.log(r / ratio)) > 1e-9:  # skip exact ties at the boundary
            assert (row.verdict == "data") == (r < ratio), (row.small, row.large)
        assert row.critical_small_size == pytest.approx(row.large / ratio, rel=1e-12)
        assert (row.verdict == "model") == (row.small <= row.critical_small_size)
    assert {row.verdict for row in rows} == verdicts  # both occur on this grid


def test_classify_sorts_deduplicates_and_uses_gap_functions():
    rows = classify(PAPER_LAW, [1e9, 1e8, 1e9, 3e8])
    assert [(r.small, r.large) for r in rows] == [(1e8, 3e8), (1e8, 1e9), (3e8, 1e9)]
    assert [r.verdict for r in rows] == ["data", "model", "data"]
    for r in rows:
        assert r.gap_compute_optimal == gap_compute_optimal(PAPER_LAW, r.small, r.large)
        assert r.gap_infinite_data == gap_infinite_data(PAPER_LAW, r.small, r.large)


@pytest.mark.parametrize("sizes", [[1e8], [1e8, 1e8], [], [1e8, -1.0], [1e8, math.inf], ["x", 1]])
def test_classify_rejects_bad_sizes(sizes):
    with pytest.raises(UserError, match="^sizes: "):
        classify(PAPER_LAW, sizes)


@pytest.mark.parametrize("large", [1e7, 1e9, 1e12])
@pytest.mark.parametrize("eps", [0.0, 1e-3, 0.05, -1e-3])
def test_critical_small_size_round_trip(large, eps):
    n_star = critical_small_size(PAPER_LAW, large, eps)
    gap = PAPER_LAW.loss_infinite_data(n_star) - PAPER_LAW.loss_compute_optimal(large)
    assert gap == pytest.approx(eps, abs=1e-12)
    # just below N* the gap exceeds eps (model scaling needed), just above it does not
    assert gap_infinite_data(PAPER_LAW, n_star * 0.999, large) > eps
    assert gap_infinite_data(PAPER_LAW, n_star * 1.001, large) < eps


def test_critical_small_size_is_infinite_when_the_target_is_below_the_floor():
    eps = -(PAPER_LAW.loss_compute_optimal(1e9) - PAPER_LAW.L0)  # target exactly L0
    assert critical_small_size(PAPER_LAW, 1e9, eps) == math.inf
    rows = classify(PAPER_LAW, [1e6, 1e9], eps=eps - 0.1)
    assert [r.verdict for r in rows] == ["model"]
    assert rows[0].critical_small_size == math.inf
    with pytest.raises(UserError, match="^eps"):
        classify(PAPER_LAW, [1e6, 1e9], eps=math.nan)


laws = st.builds(
    ScalingFit,
    L0=st.floats(0.0, 3.0),
    A=st.floats(1.0, 1e4),
    B=st.floats(1.0, 1e4),
    a=st.floats(0.05, 2.0),
    b=st.floats(0.05, 2.0),
)
log_sizes = st.integers(40, 120).map(lambda k: k / 10)  # 1e4 .. 1e12, distinct when unique


@settings(max_examples=200, deadline=None)
@given(
    law=laws,
    logs=st.lists(log_sizes, min_size=3, max_size=3, unique=True),
    eps=st.floats(0.0, 0.1),
)
def test_data_verdict_is_monotone_in_the_small_size(law, logs, eps):
    small, middle, large = sorted(10.0**x for x in logs)
    by_pair = {(r.small, r.large): r for r in classify(law, [small, middle, large], eps)}
    # a bigger small model only gets closer: if (small, large) is "data", so is (middle, large)
    if by_pair[(small, large)].verdict == "data":
        assert by_pair[(middle, large)].verdict == "data"
    # a bigger large model only moves the target away: "model" stays "model"
    if by_pair[(small, middle)].verdict == "model":
        assert by_pair[(small, large)].verdict == "model"
    assert all(r.gap_compute_optimal > 0 for r in by_pair.values())


@settings(max_examples=200, deadline=None)
@given(law=laws, logs=st.lists(log_sizes, min_size=2, max_size=2, unique=True))
def test_ratio_rule_holds_for_any_law(law, logs):
    small, large = sorted(10.0**x for x in logs)
    (row,) = classify(law, [small, large])
    ratio = max_data_scalable_ratio(law)
    if abs(math.log(large / small) - math.log(ratio)) > 1e-6:
        assert (row.verdict == "data") == (large / small < ratio)


# -- CSV input ----------------------------------------------------------------------------------
def test_csv_columns_in_any_order_and_blank_lines_are_fine(tmp_path):
    plain = load_scaling_csv(_write(tmp_path, "params,tokens,loss\n" + GOOD_ROWS, "a.csv"))
    swapped_rows = "".join(
        f"{loss}, {n} ,{d}\n\n" for n, d, loss in (r.split(",") for r in GOOD_ROWS.split())
    )
    swapped = load_scaling_csv(_write(tmp_path, " loss,params,tokens\n" + swapped_rows, "b.csv"))
    for col in ("params", "tokens", "loss"):
        np.testing.assert_array_equal(getattr(plain, col), getattr(swapped, col))
    assert isinstance(plain, ScalingData)
    assert plain.source.endswith("a.csv")
    with pytest.raises(ValueError):
        plain.loss[0] = 1.0  # read-only


@pytest.mark.parametrize(
    ("bad_row", "field", "shown"),
    [
        ("1e9,1e10,abc", "loss", "'abc'"),  # bad number
        ("1e9,-1e10,2.0", "tokens", "'-1e10'"),  # negative
        ("0,1e10,2.0", "params", "'0'"),  # zero
        ("1e9,1e10,nan", "loss", "'nan'"),  # NaN
        ("1e9,inf,2.0", "tokens", "'inf'"),  # infinity
        ("1e9,,2.0", "tokens", "''"),  # empty field
    ],
)
def test_csv_bad_value_names_line_and_field(tmp_path, bad_row, field, shown):
    rows = GOOD_ROWS.splitlines()
    rows.insert(3, bad_row)  # becomes file line 5 (header is line 1)
    path = _write(tmp_path, "params,tokens,loss\n" + "\n".join(rows) + "\n")
    with pytest.raises(UserError) as err:
        load_scaling_csv(path)
    assert str(err.value) == (
        f"{path} line 5: field '{field}' must be a positive number, got {shown}"
    )


def test_csv_wrong_field_count_names_line(tmp_path):
    path = _write(tmp_path, "params,tokens,loss\n" + GOOD_ROWS + "1e9,1e10\n")
    with pytest.raises(UserError, match=r"data\.csv line 8: expected 3 fields .* got 2$"):
        load_scaling_csv(path)


def test_csv_missing_column(tmp_path):
    path = _write(tmp_path, "params,loss\n1e9,2.0\n")
    with pytest.raises(UserError, match=r"data\.csv line 1: missing column 'tokens'"):
        load_scaling_csv(path)


def test_csv_unknown_column(tmp_path):
    path = _write(tmp_path, "params,tokens,loss,seed\n1e9,1e10,2.0,0\n")
    with pytest.raises(UserError, match=r"data\.csv line 1: unknown column 'seed'"):
        load_scaling_csv(path)


def test_csv_duplicate_column(tmp_path):
    path = _write(tmp_path, "params,tokens,loss,loss\n")
    with pytest.raises(UserError, match=r"data\.csv line 1: duplicate column 'loss'"):
        load_scaling_csv(path)


@pytest.mark.parametrize("text", ["", "\n\n  \n"])
def test_csv_empty_file(tmp_path, text):
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match=r"data\.csv: empty file"):
        load_scaling_csv(path)


def test_csv_header_only(tmp_path):
    path = _write(tmp_path, "params,tokens,loss\n")
    with pytest.raises(UserError, match=r"data\.csv: no data rows"):
        load_scaling_csv(path)


def test_csv_too_few_points(tmp_path):
    rows = GOOD_ROWS.splitlines()[:4]
    path = _write(tmp_path, "params,tokens,loss\n" + "\n".join(rows + rows) + "\n")  # 4 distinct
    with pytest.raises(UserError, match=r"data\.csv: 4 distinct \(params, tokens\) points"):
        load_scaling_csv(path)


def test_csv_needs_two_distinct_token_counts(tmp_path):
    rows = "".join(f"{n:g},1e9,{2 + 1 / n:.6f}\n" for n in (1e6, 2e6, 4e6, 8e6, 16e6))
    path = _write(tmp_path, "params,tokens,loss\n" + rows)
    with pytest.raises(UserError, match=r"data\.csv: column 'tokens' needs at least 2 distinct"):
        load_scaling_csv(path)


def test_csv_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"nope\.csv: cannot read"):
        load_scaling_csv(tmp_path / "nope.csv")
