"""The toy retractions the GPU benchmarks compare, beside the library's two (Householder QR, the
reference; one third-order polar pass, the fastest: ``raretask.toy.model.RETRACTIONS``).

``register()`` adds them to the library's tables for this process, so a benchmark can build a
trainer with any of them (``TrainSettings(retraction=...)``); ``raretask run`` never sees them.
Their tests are ``tests/test_toy_retraction.py``.

* ``cholesky_qr``: the QR's Q through a Cholesky of the Gram and a triangular solve;
* ``series_qr``: the same Q from GEMMs only (two series Cholesky-QR passes);
* ``polar``: the polar factor from GEMMs only (two second-order passes), same span;
* ``polar_tf32``: ``polar`` with its last Gram under TF32 too.
"""

from __future__ import annotations

import torch
from torch import Tensor

from raretask.toy import model
from raretask.toy.model import gram_error, qr_retraction  # noqa: F401 (the reference, for tests)

_W: dict[tuple, Tensor] = {}


def _series_w(n: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """W for width n: 1 above the diagonal, 1/2 on it, 0 below (cached). Phi(A) = A * W is the
    strict upper triangle of A plus half its diagonal, so Phi(A) + Phi(A)^T = A for symmetric
    A; one multiply instead of triu + diag_embed."""
    key = (n, dtype, device)
    if key not in _W:
        eye = torch.eye(n, dtype=dtype, device=device)
        _W[key] = torch.triu(torch.ones_like(eye), 1) + 0.5 * eye
    return _W[key]


def cholesky_qr_retraction(u: Tensor) -> Tensor:
    """The same Q as :func:`qr_retraction` (R with positive diagonal), via Cholesky QR.

    U^T U = L L^T, Q = U L^-T: one [N, N] Gram matrix, a Cholesky and a triangular solve, much
    cheaper than Householder QR on GPUs. Accurate while U is well conditioned, which holds after
    one small Adam step from an orthonormal U (orthonormality error ~ cond(U)^2 * eps); no
    host sync (``cholesky_ex`` does not check errors). Measured on one H100 (torch 2.11, 63
    instances, widths 8..512, d = 1024, B = 512): 7.5 ms/step against 47 ms/step with "qr".
    """
    chol, _ = torch.linalg.cholesky_ex(u.mT @ u)
    return torch.linalg.solve_triangular(chol.mT, u, upper=True, left=False)




def _series_cholqr_pass(u: Tensor, order: int, exact_gram: bool, shift: Tensor | None) -> Tensor:
    """One Cholesky-QR pass U R^-1 with R and R^-1 from truncated series (GEMMs only).

    With U^T U = I + E and R = I + S (S upper triangular), S solves S + S^T + S^T S = E; the
    fixed point S <- Phi(E - S^T S) gains one order of |E| per iteration, and R^-1 = I - S + S^2
    - ... by Horner. The result is U times an upper-triangular matrix, orthonormal up to
    O(|E|^(order + 1)) plus the rounding of the GEMMs. Every line is one kernel (baddbmm folds
    the additions into the products): ten per pass, so many small groups stay cheap.
    ``shift`` replaces -I in E = U^T U + shift ([I, N, N]; zero diagonal entries mark padding
    columns, which are zero and stay zero).
    """
    w = _series_w(u.shape[-1], u.dtype, u.device)
    e = gram_error(u, shift, exact=exact_gram)
    s = e * w
    for _ in range(order - 1):
        s = torch.baddbmm(e, s.mT, s, alpha=-1.0).mul_(w)
    neg_s = -s
    c = neg_s  # R^-1 - I, by Horner: c <- -S - S c
    for _ in range(order - 1):
        c = torch.baddbmm(neg_s, s, c, alpha=-1.0)
    return torch.baddbmm(u, u, c)


def series_qr_retraction(u: Tensor, order: int = 3, shift: Tensor | None = None) -> Tensor:
    """The Q of :func:`qr_retraction` from GEMMs only: two series Cholesky-QR passes.

    Cholesky and triangular solves are sequential, latency-bound kernels on a GPU (measured on
    one H100 for 9 encoders of 1024 x 512: Cholesky 0.74 ms, triangular solve 0.42 ms). Here both
    come from power series in E = U^T U - I, which converge for the small E an Adam step leaves
    (|E|_2 up to 0.16 at lr 1e-3, 0.4 at 3e-3, measured): pass one brings E down to about
    |E|^4, pass two (Gram computed in full float32 even when TF32 is on) to rounding level.
    Each pass multiplies U on the right by an upper-triangular matrix with positive diagonal, so
    the product is U R'^-1 with R' upper triangular: by uniqueness of the QR with positive
    diag(R), the result is the same Q as :func:`qr_retraction` (checked in the tests). Other
    GEMMs follow the caller's TF32 setting (their inputs are O(|E|), so TF32's relative error
    stays far below float32 rounding of U).

    ``u`` is [d, N] or [I, d, N]. ``shift`` ([I, N, N], default -I): the trainer passes
    -diag(valid) for encoders padded with zero columns to a common width, so padding stays zero
    and the real columns get exactly the Q of their own QR.
    """
    flat = u.reshape(-1, *u.shape[-2:])
    out = _series_cholqr_pass(_series_cholqr_pass(flat, order, False, shift), order, True, shift)
    return out.reshape(u.shape)


def _polar_pass(u: Tensor, exact_gram: bool, shift: Tensor | None) -> Tensor:
    """One pass U (I + E)^(-1/2) ~ U (I - E/2 + 3/8 E^2), E = U^T U - I: three kernels.

    The Gram (with the shift folded in), the second-order series (one baddbmm: beta scales E,
    alpha the square) and the product (one baddbmm adding U). Leaves U^T U - I at about
    |E|^3; zero (padding) columns stay zero because E is zero on their rows and columns.
    """
    e = gram_error(u, shift, exact=exact_gram)
    c = torch.baddbmm(e, e, e, beta=-0.5, alpha=0.375)
    return torch.baddbmm(u, u, c)


def polar_retraction(u: Tensor, shift: Tensor | None = None, exact_gram: bool = True) -> Tensor:
    """The orthonormal polar factor U (U^T U)^(-1/2) from GEMMs only: two series passes.

    The polar factor is the orthonormal matrix nearest to U (Frobenius norm); it differs from
    the Q of :func:`qr_retraction` by a rotation within span(U) of the size of the Adam step's
    departure from orthonormality (O(lr)), so it spans the same subspace and every metric of
    the toy (signals, features, residuals) is a function of that subspace alone. It costs six
    kernels against the series QR's twenty: on a GPU the grid's retraction is latency-bound.
    From |E|_2 = 0.16 (the largest an Adam step at lr 1e-3 left, measured) the two passes reach
    1e-11 in float64 and rounding level in float32 (the second Gram in full float32 when
    ``exact_gram``, even under TF32); the series QR's radius is larger (0.4). ``shift`` as
    in :func:`series_qr_retraction`.
    """
    flat = u.reshape(-1, *u.shape[-2:])
    out = _polar_pass(_polar_pass(flat, False, shift), exact_gram, shift)
    return out.reshape(u.shape)




def polar_tf32_retraction(u: Tensor, shift: Tensor | None = None) -> Tensor:
    """:func:`polar_retraction` with its second Gram under TF32 as well (where TF32 is on).

    One float32 GEMM fewer per group: the columns are then orthonormal to about 3e-5 (TF32's
    rounding of the Gram) instead of float32 rounding, re-corrected at every step, so the
    departure does not accumulate.
    """
    return polar_retraction(u, shift, exact_gram=False)


def register() -> None:
    """Add these retractions to the library's tables (this process only)."""
    gemm = {"series_qr": series_qr_retraction, "polar": polar_retraction,
            "polar_tf32": polar_tf32_retraction}
    model.GEMM_RETRACTIONS.update(gemm)
    model.RETRACTIONS.update({"cholesky_qr": cholesky_qr_retraction, **gemm})
