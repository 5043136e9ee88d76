"""The linear multitask model (PAPER.md Sec. 2), batched over a leading instance axis I.

Pure tensor functions, no state; :mod:`raretask.toy.trainer` owns the loop. Shapes:

    z      [I, B, d]   feature coordinates of a batch, z ~ N(0, I_d); x = basis @ z ~ N(0, I_d)
    basis  [I, d, d]   orthogonal, column block k (columns k*M .. k*M+M-1) is B_k; None = identity
    U      [I, d, N]   encoder, orthonormal columns (the N neurons), in x coordinates
    D      [I, d, N]   decoders stacked: rows k*M .. k*M+M-1 are D_k [M, N]  (D viewed [I, K, M, N])
    lam    [I, K, M]   spectra lambda_{k,j}; C_k = B_k diag(lambda_k) B_k^T
    coef   [I, B, K]   per-sample loss weight on its task: 2/B_norm on the sampled task, else 0

Teacher y_k = diag(lambda_k)^(1/2) B_k^T x = sqrt(lambda_k) * z_k (z_k the k-th block of z), so
teacher outputs for all tasks are ``sqrt_lam * z`` [I, B, d]. Prediction for task k is
D_k U^T x. A sample of task t has loss ||y_t - D_t U^T x||^2; a batch loss is the sum over samples
divided by the ordinary batch size B_norm.

Efficiency choice: predictions of *all* tasks are computed as one matmul ``h @ D^T`` ([B, N] x
[N, d], the same cost as the encoder matmul) and the residual is masked to each sample's task by
``coef``. Every op is then a dense batched matmul or an elementwise op over [I, B, d]. A
per-sample gather of D_t would materialise [I, B, M, N], N/K times the [I, B, d] predictions (64x
at N = 1024, K = 16) and run as a slow gather; sorting the batch by task gives ragged segments
that cannot be batched across instances.

Gradients are written by hand (four bmm's; checked against autograd in the tests): no autograd
graph per step, few kernels, and the same function serves the training step and the measured
frequent/rare gradients.

With a random basis two exact rewritings exist; :func:`batch_gradients` picks per call:
``rotate=False`` forms x = z B^T (cost B d^2), ``rotate=True`` forms V = B^T U and its gradient
(cost 2 d^2 N). The trainer uses ``rotate = 2 N < B``, a function of the instance's own width and
the batch size only.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

Tensor = torch.Tensor


# -- init and retraction ------------------------------------------------------------------------
def random_orthonormal(rows: int, cols: int, generator: torch.Generator) -> Tensor:
    """[rows, cols] float64 matrix with orthonormal columns, Haar-distributed.

    QR of a standard Gaussian matrix with columns multiplied by sign(diag(R)) (without the sign
    fix the distribution is not Haar). Drawn on the generator's device (the trainer uses CPU, so
    the initial encoder and the basis are the same on every device).
    """
    g = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    return qr_retraction(g)


def qr_retraction(u: Tensor) -> Tensor:
    """Orthonormalise the columns of ``u`` [..., d, N]: Q of the QR, signs fixed by diag(R).

    Multiplying column j of Q by sign(R_jj) makes the map continuous (Q -> U when U is already
    orthonormal; plain Householder QR may flip column signs from one step to the next, which would
    scramble the decoders and Adam's moments). Zero diagonal entries count as +1.
    """
    q, r = torch.linalg.qr(u, mode="reduced")
    s = torch.diagonal(r, dim1=-2, dim2=-1).sign()
    s = torch.where(s == 0, torch.ones_like(s), s)
    return q * s.unsqueeze(-2)


_NEG_EYE: dict[tuple, Tensor] = {}


def gram_error(u: Tensor, shift: Tensor | None = None, exact: bool = False) -> Tensor:
    """E = U^T U + shift (default -I, cached per width) in one kernel; in full float32 when
    ``exact`` even under TF32. ``shift`` ([I, N, N]): -diag(valid) for encoders padded with
    zero columns to a common width, so padding stays zero."""
    if shift is None:
        key = (u.shape[-1], u.dtype, u.device)
        if key not in _NEG_EYE:
            _NEG_EYE[key] = -torch.eye(u.shape[-1], dtype=u.dtype, device=u.device)
        shift = _NEG_EYE[key]
    with tf32(False) if exact else contextlib.nullcontext():
        return torch.baddbmm(shift, u.mT, u)


class tf32:
    """Context manager: TF32 tensor cores for float32 CUDA matmuls on (True) or off (False)."""

    def __init__(self, enabled: bool):
        self.enabled = bool(enabled)

    def __enter__(self) -> None:
        self._old = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.enabled

    def __exit__(self, *exc) -> None:
        torch.backends.cuda.matmul.allow_tf32 = self._old


def polar_once_retraction(u: Tensor, shift: Tensor | None = None) -> Tensor:
    """One third-order polar pass U (I - E/2 + 3/8 E^2 - 5/16 E^3), E = U^T U + shift: 4 kernels.

    The error it leaves, U'^T U' - I ~ -(35/64) E^4, is not corrected later within the step but
    at the next one: starting from orthonormal columns, an Adam step at lr 1e-3 leaves |E|_2 at
    most 0.16 (measured), so the columns stay orthonormal to about 4e-4 after the worst step and
    to TF32 rounding once the steps shrink; the error does not accumulate, since each pass maps
    E to O(E^4). Against the two-pass polar factor (benchmarks/toy_retractions.py): half the
    Gram and U-product FLOPs and four kernels instead of six, which is what a latency-bound grid
    pays for. Every GEMM follows the caller's TF32 setting. ``shift`` as in :func:`gram_error`.
    It spans the same subspace as the QR's Q, and every metric of the toy (signals, features,
    residuals) is a function of that subspace alone.
    """
    flat = u.reshape(-1, *u.shape[-2:])
    e = gram_error(flat, shift)
    p = torch.baddbmm(e, e, e, beta=0.375, alpha=-0.3125)  # 3/8 E - 5/16 E^2
    c = torch.baddbmm(e, e, p, beta=-0.5)  # -E/2 + E p
    return torch.baddbmm(flat, flat, c).reshape(u.shape)


GEMM_RETRACTIONS: dict[str, Callable[..., Tensor]] = {"polar_once": polar_once_retraction}
"""Retractions made of GEMMs only: they take a padding ``shift`` and map U = 0 to 0."""

RETRACTIONS: dict[str, Callable[..., Tensor]] = {"qr": qr_retraction, **GEMM_RETRACTIONS}
"""Retractions by name (``TrainSettings.retraction``); each maps [I, d, N] to orthonormal
columns and must be continuous at orthonormal inputs (the identity on them): the reference
(Householder QR's Q, signs fixed) and the fastest on a GPU (one third-order polar pass, same
span). The variants the GPU benchmarks compare (Cholesky QR, a GEMM-only QR, two-pass polar)
live in ``benchmarks/toy_retractions.py``, which adds them here for a benchmark's process."""


# -- the batch gradient -------------------------------------------------------------------------
def masked_residual(e: Tensor, z: Tensor, sqrt_lam: Tensor, coef: Tensor) -> Tensor:
    """dL/dp [..., B, d]: the residual p - y of every task, kept on each sample's own task.

    ``e`` [..., B, d] holds the predictions and is overwritten (eager: two passes over it);
    ``z``, ``sqrt_lam`` and ``coef`` [..., B, K] broadcast against it.
    """
    k = coef.shape[-1]
    e.addcmul_(z, sqrt_lam, value=-1.0)
    return (e.unflatten(-1, (k, -1)) * coef.unsqueeze(-1)).flatten(-2)


def fused_masked_residual(e: Tensor, z: Tensor, sqrt_lam: Tensor, coef: Tensor) -> Tensor:
    """:func:`masked_residual` without the in-place update, for torch.compile to fuse.

    Compiled it is one kernel reading e, z and coef once (its timing: benchmarks/RESULTS.md,
    "Toy grid").
    """
    k = coef.shape[-1]
    r = (e - z * sqrt_lam).unflatten(-1, (k, -1))
    return (r * coef.unsqueeze(-1)).flatten(-2)


def seed_shared_gradients(
    u: Tensor,
    d: Tensor,
    x: Tensor,
    z: Tensor,
    coef: Tensor,
    sqrt_lam: Tensor,
    out: tuple[Tensor, Tensor],
    residual: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """:func:`batch_gradients` for I = J * S instances that read S seeds' inputs, tiled.

    Instance ``j * S + s`` reads seed s's ``x[s]`` and ``z[s]`` ([S, B, d]): the layout a grid
    with the seed as its fastest axis gives. Instead of copying the inputs once per instance
    (2 x [I, B, d]), the two products with x run once per seed over the J encoders' columns
    side by side (x @ [U_1 .. U_J], x^T @ [gh_1 .. gh_J]), and the residual reads z broadcast:
    what is copied is the encoders and their gradients ([I, d, N]) and h, gh ([I, B, N]).
    Same sums as :func:`batch_gradients` (each output entry sums the same products).
    """
    i, dim, n = u.shape
    s_n, b, _ = x.shape
    j_n = i // s_n
    gu_out, gd_out = out
    u_cat = u.view(j_n, s_n, dim, n).permute(1, 2, 0, 3).reshape(s_n, dim, j_n * n)
    h = torch.bmm(x, u_cat).view(s_n, b, j_n, n).permute(2, 0, 1, 3).reshape(i, b, n)
    e = torch.bmm(h, d.transpose(1, 2)).view(j_n, s_n, b, dim)
    g = (residual or masked_residual)(e, z.unsqueeze(0), sqrt_lam.view(j_n, s_n, 1, dim),
                                      coef.view(j_n, s_n, b, -1)).view(i, b, dim)
    torch.bmm(g.transpose(1, 2), h, out=gd_out)
    gh = torch.bmm(g, d).view(j_n, s_n, b, n).permute(1, 2, 0, 3).reshape(s_n, b, j_n * n)
    gu_cat = torch.bmm(x.transpose(1, 2), gh).view(s_n, dim, j_n, n)
    gu_out.view(j_n, s_n, dim, n).copy_(gu_cat.permute(2, 0, 1, 3))
    return gu_out, gd_out


def batch_gradients(
    u: Tensor,
    d: Tensor,
    z: Tensor,
    coef: Tensor,
    sqrt_lam: Tensor,
    basis: Tensor | None,
    rotate: bool,
    out: tuple[Tensor, Tensor] | None = None,
    x: Tensor | None = None,
    residual: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Gradients (dL/dU, dL/dD) of the weighted batch loss, by hand.

    Parameters
    ----------
    u, d:
        [I, d, N] encoder and stacked decoders.
    z:
        [I, B, d] feature coordinates of the samples (may be a strided view).
    coef:
        [I, B, K] per-sample, per-task weight: ``2 / B_norm`` on the sample's task, 0 elsewhere
        (0 on every task for a padding row). The 2 is the derivative of the square.
    sqrt_lam:
        [I, 1, d] square roots of the spectra, flattened task-major.
    basis:
        [I, d, d] feature basis, or None for the standard basis.
    rotate:
        Work with V = B^T U instead of x = B z (same result, cheaper when 2 N < B).
    out:
        Optional preallocated (gU, gD), contiguous [I, d, N].
    x:
        Optional precomputed inputs ``z @ basis^T`` [I, B, d] (shared by instances with the same
        seed, so a grid computes them once per seed); used instead of ``rotate``.
    residual:
        Replacement for :func:`masked_residual` with the same result (the trainer passes a
        compiled, one-kernel version on CUDA).

    Returns
    -------
    (gU, gD), each [I, d, N]. The loss itself is sum_b sum_k coef/2 * ||e_bk||^2.
    """
    gu_out, gd_out = out if out is not None else (None, None)
    if x is not None:
        h = torch.bmm(x, u)
    elif basis is None:
        x, h = z, torch.bmm(z, u)  # [I, B, N]
    elif rotate:
        v = torch.bmm(basis.transpose(1, 2), u)  # V = B^T U  [I, d, N]
        x, h = None, torch.bmm(z, v)
    else:
        x = torch.bmm(z, basis.transpose(1, 2))  # rows x_b = B z_b  [I, B, d]
        h = torch.bmm(x, u)
    e = torch.bmm(h, d.transpose(1, 2))  # all-task predictions  [I, B, d]
    g = (residual or masked_residual)(e, z, sqrt_lam, coef)  # dL/dp  [I, B, d]
    gd = torch.bmm(g.transpose(1, 2), h, out=gd_out)  # [I, d, N]
    gh = torch.bmm(g, d)  # dL/dh  [I, B, N]
    if x is not None:
        gu = torch.bmm(x.transpose(1, 2), gh, out=gu_out)
    else:
        gu = torch.bmm(basis, torch.bmm(z.transpose(1, 2), gh), out=gu_out)
    return gu, gd


# -- exact metrics ------------------------------------------------------------------------------
TASK_METRICS = ("signal", "signal_norm", "loss_norm", "features")
"""Per-task metrics of :func:`exact_metrics` (the trainer adds ``seen``)."""

MODEL_METRICS = ("loss", "residual_F", "ortho_error")
"""Per-instance metrics of :func:`exact_metrics` (the trainer adds the gradient metrics)."""


def normalise_signal(signal: Tensor, width: int | Tensor, dim: int) -> Tensor:
    """s~ = (s - N/d) / (1 - N/d): 0 for a random encoder, 1 fully captured; 1 when N == d.

    ``width`` is one int, or an [I] tensor of per-instance widths for ``signal`` [I, ...].
    """
    if isinstance(width, Tensor):
        base = (width.to(signal.dtype) / dim).reshape(-1, *([1] * (signal.dim() - 1)))
        out = (signal - base) / (1.0 - base).clamp_min(1e-300)
        return torch.where(base >= 1.0, torch.ones_like(signal), out)
    if width >= dim:
        return torch.ones_like(signal)
    return (signal - width / dim) / (1.0 - width / dim)


def exact_metrics(
    u: Tensor,
    d: Tensor,
    basis: Tensor | None,
    lam: Tensor,
    priors: Tensor,
    frequent: Tensor,
    widths: Tensor | None = None,
) -> dict[str, Tensor]:
    """Closed-form metrics of the current parameters (expectations over x, no sampling).

    Parameters
    ----------
    u, d:
        [I, d, N] encoder and stacked decoders (any float dtype; computed in that dtype).
    basis:
        [I, d, d] or None (identity).
    lam:
        [I, K, M] spectra.
    priors:
        [I, K] task priors pi.
    frequent:
        [I, K] bool frequent set F.
    widths:
        [I] real widths when encoders are padded with zero columns to ``u``'s width (padding
        then adds nothing to any metric); None: every column is real.

    Returns
    -------
    Per task, [I, K]: ``signal`` s_k = Tr(P_U C_k)/Tr(C_k) with P_U = U U^T; ``signal_norm``;
    ``loss_norm`` = E||y_k - D_k U^T x||^2 / Tr(C_k) = ||diag(lambda_k)^(1/2) B_k^T - D_k U^T||_F^2
    / Tr(C_k) (exact, U need not be orthonormal); ``features`` = Tr(U^T P_k U) = ||B_k^T U||_F^2.
    Per instance, [I]: ``loss`` = sum_k pi_k * (unnormalised loss_k); ``residual_F`` =
    Tr((I - P_U) M_F), M_F = sum_{k in F} pi_k C_k; ``ortho_error`` = max |U^T U - I|.
    """
    i, dim, n = u.shape
    k, m = lam.shape[1:]
    v = u if basis is None else torch.bmm(basis.transpose(1, 2), u)  # B^T U  [I, d, N]
    v4 = v.view(i, k, m, n)
    rowsq = v4.square().sum(-1)  # diag(B_k^T P_U B_k)  [I, K, M]
    tr_c = lam.sum(-1)  # Tr(C_k)  [I, K]
    captured = (lam * rowsq).sum(-1)  # Tr(P_U C_k)
    signal = captured / tr_c
    gram = torch.bmm(u.transpose(1, 2), u)  # U^T U  [I, N, N]
    d4 = d.view(i, k, m, n)
    cross = (lam.sqrt().unsqueeze(-1) * v4 * d4).sum((-1, -2))  # Tr(Lam^1/2 B_k^T U D_k^T)
    dgd = (torch.bmm(d, gram).view(i, k, m, n) * d4).sum((-1, -2))  # Tr(D_k U^T U D_k^T)
    loss_k = tr_c - 2.0 * cross + dgd
    if widths is None:
        eye = torch.eye(n, dtype=u.dtype, device=u.device)
    else:  # the identity on the real columns only
        eye = torch.diag_embed((torch.arange(n, device=u.device) < widths[:, None]).to(u.dtype))
    return {
        "signal": signal,
        "signal_norm": normalise_signal(signal, n if widths is None else widths, dim),
        "loss_norm": loss_k / tr_c,
        "features": rowsq.sum(-1),
        "loss": (priors * loss_k).sum(-1),
        "residual_F": (priors * frequent * (tr_c - captured)).sum(-1),
        "ortho_error": (gram - eye).abs().amax((-1, -2)),
    }


def rare_signal_norm(
    u: Tensor, rare_basis: Tensor, rare_lam: Tensor, dim: int, widths: Tensor | None = None
) -> Tensor:
    """[I] normalised signal of one task per instance, from its basis block only (cheap).

    ``rare_basis`` [I, d, M] is B_r, ``rare_lam`` [I, M] its spectrum; ``widths`` as in
    :func:`exact_metrics`.
    """
    rowsq = torch.bmm(rare_basis.transpose(1, 2), u).square().sum(-1)  # [I, M]
    signal = (rare_lam * rowsq).sum(-1) / rare_lam.sum(-1)
    return normalise_signal(signal, u.shape[-1] if widths is None else widths, dim)
