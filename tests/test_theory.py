"""Theorem 3, Prop. 6, Thm 4 / Cor. 5 and the inverse question, pinned to exact values."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raretask.errors import UserError
from raretask.theory import TaskSet, Theory


# -- the check values of PAPER.md / the issue: exact ---------------------------------------------
@pytest.mark.parametrize(
    ("features", "beta", "first", "critical", "frequent"),
    [(32, 1.5, 70, 37, 6), (32, 2.0, 119, 57, 3), (16, 1.0, 46, 27, 14)],
)
def test_paper_check_values(features, beta, first, critical, frequent):
    th = Theory(TaskSet.power_law(32, features, alpha=2.0, beta=beta))
    assert th.first_feature_width()[-1] == first
    assert th.critical_width()[-1] == critical
    assert th.frequent_tasks().size == frequent


def test_rarest_task_share_is_the_headline_quarter_percent():
    ts = TaskSet.power_law(32, 32, alpha=2.0, beta=1.5)
    assert ts.frequencies[-1] == pytest.approx(0.002443, abs=1e-6)


def test_strictly_larger_count_matches_paper_untied_values():
    # counting only strictly larger utilities the rarest task enters at 44, 69, 114 (PAPER.md)
    for features, beta, expect in [(16, 1.0, 44), (32, 1.5, 69), (32, 2.0, 114)]:
        th = Theory(TaskSet.power_law(32, features, alpha=2.0, beta=beta))
        u = th.ranked_utilities()
        rare = th.tasks.frequencies[-1] * 1.0
        strictly = np.sum(u > rare * (1 + 1e-9))
        assert strictly + 1 == expect


# -- Theorem 3 two ways -----------------------------------------------------------------------
def _random_blocks(rng, sizes):
    d = int(sum(sizes))
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    out, start = [], 0
    for m in sizes:
        out.append(q[:, start:start + m])
        start += m
    return out


@pytest.mark.parametrize("seed", range(5))
def test_theorem3_greedy_equals_eigendecomposition(seed):
    rng = np.random.default_rng(seed)
    k = 5
    sizes = rng.integers(1, 6, size=k)
    spectra = [np.sort(rng.uniform(0.05, 1.0, m))[::-1] for m in sizes]
    pi = rng.dirichlet(np.ones(k))
    ts = TaskSet.from_specs([f"t{i}" for i in range(k)], pi, spectra)
    th = Theory(ts)
    blocks = _random_blocks(rng, sizes)
    covs = [b @ np.diag(s) @ b.T for b, s in zip(blocks, spectra, strict=True)]
    m = sum(p * c for p, c in zip(pi, covs, strict=True))
    w, v = np.linalg.eigh(m)
    v = v[:, np.argsort(w)[::-1]]
    for n in range(1, ts.total_features + 1):
        u = v[:, :n]
        p_u = u @ u.T
        kept_eig = [np.trace(b.T @ p_u @ b) for b in blocks]
        np.testing.assert_allclose(kept_eig, th.features_kept(n), atol=1e-6)
        loss_eig = [np.trace(c) - np.trace(p_u @ c) for c in covs]
        np.testing.assert_allclose(loss_eig, th.loss(n), atol=1e-9)
        # total loss = Tr(M) - Tr(U^T M U) (Theorem 3)
        total = float(np.dot(pi, th.loss(n)))
        assert total == pytest.approx(np.trace(m) - np.trace(u.T @ m @ u), abs=1e-9)


def test_ties_rank_by_task_then_feature():
    # task b's first feature ties task a's second: 0.5*0.5 == 0.25*1 -> a goes first
    ts = TaskSet.from_specs(["a", "b"], [0.5, 0.25], [[1.0, 0.5], [1.0]])
    th = Theory(ts)
    assert list(th.features_kept(2)) == [2, 0]
    assert list(th.first_feature_width()) == [1, 3]
    # the same tie with b listed first puts b ahead
    th2 = Theory(TaskSet.from_specs(["b", "a"], [0.25, 0.5], [[1.0], [1.0, 0.5]]))
    assert list(th2.features_kept(2)) == [1, 1]


def test_tie_tolerance_absorbs_floating_point_noise():
    ts = TaskSet.from_specs(["a", "b"], [0.5, 0.5], [[1.0, 0.3], [0.1 + 0.2, 0.2]])
    # 0.1 + 0.2 != 0.3 in floating point, but they are a tie: task a first
    assert list(Theory(ts).features_kept(2)) == [2, 0]


def test_explicit_eigenvalues_are_sorted_and_normalised_loss():
    ts = TaskSet.from_specs(["x", "y"], [3, 1], [[0.25, 1.0, 0.5], [2.0]])
    th = Theory(ts)
    # utilities: x: .75 .375 .1875; y: .5 -> order x1 y1 x2 x3
    assert list(th.features_kept(2)) == [1, 1]
    np.testing.assert_allclose(th.normalized_loss(2), [0.75 / 1.75, 0.0])
    np.testing.assert_allclose(th.loss(1), [0.75, 2.0])


# -- Prop. 6 / Thm 4 / Cor. 5 ---------------------------------------------------------------------
def test_critical_width_matches_eigenvalues_of_m_f():
    ts = TaskSet.power_law(12, 8, alpha=1.3, beta=1.7)
    th = Theory(ts)
    f = th.frequent_tasks()
    rng = np.random.default_rng(0)
    blocks = _random_blocks(rng, [8] * 12)
    m_f = sum(ts.frequencies[k] * blocks[k] @ np.diag(ts.spectra[k]) @ blocks[k].T for k in f)
    mu = np.sort(np.linalg.eigvalsh(m_f))[::-1]
    for k in range(ts.size):
        u = ts.frequencies[k] * ts.spectra[k][0]
        expect = int(np.flatnonzero(mu <= u * (1 + 1e-9))[0]) + 1
        assert th.critical_width()[k] == expect


def test_frequent_set_reaches_the_mass():
    ts = TaskSet.from_specs(list("abcd"), [0.1, 0.5, 0.3, 0.1], [[1.0]] * 4)
    assert list(Theory(ts).frequent_tasks()) == [1, 2]  # 0.5 + 0.3 = 0.8 reaches it exactly
    assert list(Theory(ts, frequent_mass=0.85).frequent_tasks()) == [0, 1, 2]  # tie -> order
    assert list(Theory(ts, frequent_mass=0.4).frequent_tasks()) == [1]


def test_gradient_bound_holds_for_random_encoders():
    ts = TaskSet.power_law(6, 6, alpha=2.0, beta=1.5)
    th = Theory(ts)
    d = ts.total_features
    f = th.frequent_tasks()
    m_f = np.zeros((d, d))
    for k in f:  # standard-basis blocks
        idx = slice(6 * k, 6 * k + 6)
        m_f[idx, idx] = np.diag(ts.frequencies[k] * ts.spectra[k])
    rng = np.random.default_rng(1)
    for n in (3, 8, 20):
        for _ in range(20):
            u, _ = np.linalg.qr(rng.standard_normal((d, n)))
            resid = np.trace(m_f) - np.trace(u.T @ m_f @ u)
            grad = 2 * (np.eye(d) - u @ u.T) @ m_f @ u  # Riemannian gradient of Tr(U^T M_F U)
            assert np.linalg.norm(grad) <= th.gradient_bound(n, residual=resid) + 1e-12
        # the best residual is reached by the top-N eigenvectors of M_F and no encoder beats it
        assert th.best_residual(n) <= resid + 1e-12
        assert th.best_residual(n) <= th.optimal_residual(n) + 1e-15


def test_frequent_width_and_width_for_tasks():
    ts = TaskSet.from_specs(list("ab"), [0.8, 0.2], [[1.0, 0.5, 0.25], [1.0]])
    th = Theory(ts)  # F = {a}; mu = .8 .4 .2
    assert th.frequent_width(0.0) == 3
    assert th.frequent_width(0.2) == 2
    assert th.frequent_width(0.6) == 1
    assert th.frequent_width(1.4) == 0
    assert th.best_residual(1) == pytest.approx(0.6)
    assert th.gradient_bound(1) == pytest.approx(2 * np.sqrt(0.8 * 0.6))
    # utilities a: .8 .4 .2, b: .2 (tie with a3, a first) -> b enters at 4
    assert list(th.first_feature_width()) == [1, 4]
    assert th.width_for_tasks(1) == 1 and th.width_for_tasks(2) == 4


# -- the inverse question ----------------------------------------------------------------------
@pytest.mark.parametrize(("beta", "width"), [(1.5, 64), (2.0, 64), (1.0, 32), (1.5, 16)])
def test_required_frequency_round_trip(beta, width):
    ts = TaskSet.power_law(32, 32, alpha=2.0, beta=beta)
    th = Theory(ts)
    for task in (31, 20, 5):
        r = th.required_frequency(task, width)
        assert Theory(ts.with_share(task, r)).learned(width)[task]
        assert not Theory(ts.with_share(task, r * 0.99)).learned(width)[task]


def test_required_frequency_zero_when_nothing_competes():
    ts = TaskSet.from_specs(list("ab"), [0.9, 0.1], [[1.0], [1.0]])
    assert Theory(ts).required_frequency(1, 2) == 0.0


def test_with_share_keeps_other_proportions():
    ts = TaskSet.from_specs(list("abc"), [0.5, 0.3, 0.2], [[1.0]] * 3)
    new = ts.with_share(2, 0.6)
    np.testing.assert_allclose(new.frequencies, [0.25, 0.15, 0.6])


# -- properties ----------------------------------------------------------------------------------
@st.composite
def task_sets(draw):
    k = draw(st.integers(2, 6))
    pis = draw(st.lists(st.floats(0.01, 10), min_size=k, max_size=k))
    spectra = []
    for _ in range(k):
        m = draw(st.integers(1, 6))
        alpha = draw(st.sampled_from([0.0, 0.5, 1.0, 2.0, 2.7]))
        spectra.append(np.arange(1, m + 1, dtype=float) ** -alpha)
    return TaskSet.from_specs([str(i) for i in range(k)], pis, spectra)


@settings(max_examples=60, deadline=None)
@given(task_sets())
def test_kept_counts_sum_to_width_and_loss_falls(ts):
    th = Theory(ts)
    prev = None
    for n in range(1, ts.total_features + 1):
        kept = th.features_kept(n)
        assert kept.sum() == n
        assert np.all(kept <= ts.feature_counts)
        loss = th.normalized_loss(n)
        assert np.all((loss >= -1e-12) & (loss <= 1 + 1e-12))
        if prev is not None:
            assert np.all(loss <= prev + 1e-12)
        prev = loss


@settings(max_examples=40, deadline=None)
@given(task_sets(), st.data())
def test_required_frequency_round_trip_property(ts, data):
    th = Theory(ts)
    n = data.draw(st.integers(1, ts.total_features))
    k = data.draw(st.integers(0, ts.size - 1))
    r = th.required_frequency(k, n)
    assert 0.0 <= r <= 1.0
    if r > 0:
        assert Theory(ts.with_share(k, r)).learned(n)[k]
        assert not Theory(ts.with_share(k, r * 0.99)).learned(n)[k]
    else:
        assert Theory(ts.with_share(k, 1e-6)).learned(n)[k]


# -- invalid values: one test each, matching the message ------------------------------------------
@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: TaskSet.from_specs(["a", "b"], [-1, 2], [[1.0], [1.0]]), "frequency of task 'a'"),
        (lambda: TaskSet.from_specs(["a", "b"], [0, 0], [[1.0], [1.0]]), "all task frequencies"),
        (lambda: TaskSet.from_specs(["a"], [1], [[-1.0]]), "eigenvalues of task 'a'"),
        (lambda: TaskSet.from_specs(["a"], [1], [[]]), "at least one feature"),
        (lambda: TaskSet.power_law(0, 4), "tasks must be >= 1"),
        (lambda: TaskSet.power_law(4, 4, beta=float("nan")), "beta"),
        (lambda: Theory(TaskSet.power_law(4, 4)).features_kept(17), r"width must be .*\[1, 16\]"),
        (lambda: Theory(TaskSet.power_law(4, 4)).features_kept(0), "width"),
        (lambda: Theory(TaskSet.power_law(4, 4), frequent_mass=0), "frequent_mass"),
        (lambda: Theory(TaskSet.power_law(4, 4)).frequent_width(-1), "eps"),
    ],
)
def test_invalid_values_raise_user_error(make, match):
    with pytest.raises(UserError, match=match):
        make()
