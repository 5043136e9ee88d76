"""Retractions: the GEMM-only series QR gives Householder QR's Q, padded encoders included."""

from __future__ import annotations

import pytest
import torch

from raretask.toy.model import qr_retraction, series_qr_retraction


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
