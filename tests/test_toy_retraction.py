"""Retractions: the GEMM-only series QR gives Householder QR's Q, the GEMM-only polar retraction
the SVD's polar factor, padded encoders included. The library keeps the reference QR and the
one-pass polar (raretask.toy.model); the others are the GPU benchmarks' (benchmarks/
toy_retractions.py)."""

from __future__ import annotations

import pytest
import torch
from bench_modules import toy_retractions

from raretask.toy.model import polar_once_retraction, qr_retraction

_bench = toy_retractions()
polar_retraction, series_qr_retraction = _bench.polar_retraction, _bench.series_qr_retraction


def _perturbed(i: int, d: int, n: int, size: float, dtype, seed: int = 0) -> torch.Tensor:
    """Orthonormal encoders moved by a random step with |U^T U - I|_2 of about ``size``."""
    g = torch.Generator().manual_seed(seed)
    u = qr_retraction(torch.randn(i, d, n, generator=g, dtype=torch.float64))
    step = torch.randn(i, d, n, generator=g, dtype=torch.float64)
    step *= size / torch.linalg.matrix_norm(step, ord=2, keepdim=True)
    return (u + step).to(dtype)


def _err(u: torch.Tensor) -> float:
    eye = torch.eye(u.shape[-1], dtype=u.dtype)
    return float((u.mT @ u - eye).abs().max())


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-11), (torch.float32, 2e-6)])
@pytest.mark.parametrize("size", [0.05, 0.3])
def test_series_qr_equals_householder_q(dtype, tol, size):
    u = _perturbed(3, 64, 24, size, dtype)
    before = _err(u.double())
    assert before > size / 10  # the step really left the manifold
    q_ref = qr_retraction(u.double())
    q = series_qr_retraction(u)
    assert q.dtype == dtype and q.shape == u.shape
    assert float((q.double() - q_ref).abs().max()) < tol
    assert _err(q) < tol


def test_series_qr_of_one_matrix_and_of_an_orthonormal_one():
    u = _perturbed(1, 40, 8, 0.1, torch.float64)[0]
    assert torch.allclose(series_qr_retraction(u), qr_retraction(u), atol=1e-13)
    q = qr_retraction(u)
    assert torch.allclose(series_qr_retraction(q), q, atol=1e-14)  # a fixed point


def test_padding_columns_stay_zero_and_real_columns_get_their_own_q():
    """Encoders of widths 5 and 12 padded to 12: the shift -diag(valid) keeps padding inert."""
    u = _perturbed(2, 48, 12, 0.2, torch.float64)
    widths = torch.tensor([5, 12])
    valid = (torch.arange(12) < widths[:, None]).double()
    u = u * valid[:, None, :]
    q = series_qr_retraction(u, shift=-torch.diag_embed(valid))
    assert torch.equal(q[0, :, 5:], torch.zeros(48, 7, dtype=torch.float64))
    assert torch.allclose(q[0, :, :5], qr_retraction(u[0, :, :5]), atol=1e-13)
    assert torch.allclose(q[1], qr_retraction(u[1]), atol=1e-13)


def _svd_polar(u: torch.Tensor) -> torch.Tensor:
    left, _, right = torch.linalg.svd(u, full_matrices=False)
    return left @ right


@pytest.mark.parametrize(("dtype", "tol"), [(torch.float64, 1e-10), (torch.float32, 2e-6)])
@pytest.mark.parametrize("size", [0.02, 0.08])
def test_polar_equals_the_svd_polar_factor(dtype, tol, size):
    """A step of norm 0.08 leaves |U^T U - I|_2 ~ 0.16, the most an Adam step at lr 1e-3 left
    (measured): the two passes reach 1e-11 in float64, rounding level in float32."""
    u = _perturbed(3, 64, 24, size, dtype, seed=1)
    assert _err(u.double()) > size / 10
    q = polar_retraction(u)
    assert q.dtype == dtype and q.shape == u.shape
    assert float((q.double() - _svd_polar(u.double())).abs().max()) < tol
    assert _err(q) < tol
    q_qr = qr_retraction(u.double())  # the same subspace as the QR's Q
    assert float((q.double() @ q.double().mT - q_qr @ q_qr.mT).abs().max()) < 10 * tol


def test_polar_keeps_orthonormal_encoders_and_padding():
    q = qr_retraction(_perturbed(1, 40, 8, 0.1, torch.float64))
    assert torch.allclose(polar_retraction(q), q, atol=1e-14)  # a fixed point
    u = _perturbed(2, 48, 12, 0.2, torch.float64)
    valid = (torch.arange(12) < torch.tensor([5, 12])[:, None]).double()
    u = u * valid[:, None, :]
    got = polar_retraction(u, shift=-torch.diag_embed(valid))
    assert torch.equal(got[0, :, 5:], torch.zeros(48, 7, dtype=torch.float64))
    assert torch.allclose(got[0, :, :5], _svd_polar(u[0, :, :5]), atol=1e-13)
    assert torch.allclose(got[1], _svd_polar(u[1]), atol=1e-13)
    assert torch.equal(polar_retraction(torch.zeros(1, 6, 3)), torch.zeros(1, 6, 3))  # 0 -> 0


@pytest.mark.parametrize("size", [0.01, 0.04, 0.08])
def test_polar_once_leaves_the_fourth_power_of_the_gram_error(size):
    """One third-order pass: U'^T U' - I = -(35/64) E^4 + O(E^5), in float64."""
    u = _perturbed(3, 64, 24, size, torch.float64, seed=2)
    e = u.mT @ u - torch.eye(24, dtype=torch.float64)
    e_norm = float(torch.linalg.matrix_norm(e, ord=2).max())
    q = polar_once_retraction(u)
    err = float(torch.linalg.matrix_norm(q.mT @ q - torch.eye(24, dtype=torch.float64),
                                         ord=2).max())
    assert err <= 0.6 * e_norm**4 * (1 + 2 * e_norm)
    assert err >= 0.4 * e_norm**4 * (1 - 2 * e_norm)  # the series really stops at E^3
    # the same subspace as the polar factor (a right factor does not change the span)
    p = _svd_polar(u)
    proj = q @ torch.linalg.solve(q.mT @ q, q.mT)  # the projector onto span(q)
    assert float((proj - p @ p.mT).abs().max()) < 1e-12


def test_polar_once_does_not_accumulate_error_over_steps():
    """Adam-like steps of |E| ~ 0.1, each followed by one pass: the error stays at ~|E|^4."""
    g = torch.Generator().manual_seed(3)
    u = qr_retraction(torch.randn(2, 64, 16, generator=g, dtype=torch.float64))
    worst = 0.0
    for _ in range(50):
        step = torch.randn(u.shape, generator=g, dtype=torch.float64)
        u = polar_once_retraction(u + 0.05 * step / torch.linalg.matrix_norm(step, ord=2,
                                                                             keepdim=True))
        worst = max(worst, _err(u))
    assert worst < 1e-4  # 0.6 * 0.1^4 = 6e-5 per step, not 50 times that


def test_polar_once_keeps_orthonormal_encoders_and_padding():
    q = qr_retraction(_perturbed(1, 40, 8, 0.1, torch.float64))
    assert torch.allclose(polar_once_retraction(q), q, atol=1e-14)  # a fixed point
    u = _perturbed(2, 48, 12, 0.02, torch.float64)
    valid = (torch.arange(12) < torch.tensor([5, 12])[:, None]).double()
    u = u * valid[:, None, :]
    got = polar_once_retraction(u, shift=-torch.diag_embed(valid))
    assert torch.equal(got[0, :, 5:], torch.zeros(48, 7, dtype=torch.float64))
    torch.testing.assert_close(got[0, :, :5], polar_once_retraction(u[:1, :, :5])[0])
    assert torch.equal(polar_once_retraction(torch.zeros(1, 6, 3)), torch.zeros(1, 6, 3))
