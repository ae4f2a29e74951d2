"""Extremal eigenvalues of a symmetric operator: Lanczos and power iteration.

Lanczos (1950) with full reorthogonalisation builds an orthonormal Krylov basis
``V_m = [v_1 … v_m]`` of ``K_m(H, v_1)`` and the tridiagonal ``T_m = V_mᵀ H V_m``. The eigenpairs
``(θ_i, s_i)`` of ``T_m`` give Ritz pairs ``(θ_i, V_m s_i)`` whose residual norm is exactly
``r_i = ‖H V_m s_i − θ_i V_m s_i‖ = β_m |s_{m,i}|`` (Parlett, *The Symmetric Eigenvalue
Problem*, §13.1). An eigenvalue of ``H`` lies within ``r_i`` of ``θ_i`` (Krylov–Weinstein), and
within ``r_i² / gap_i`` when the rest of the spectrum is at least ``gap_i`` away (Kato–Temple);
iteration stops when ``min(r_i, r_i²/gap_i) ≤ tol · |θ_1|`` for the top-``k`` Ritz values and
``≤ min_tol · max_j |θ_j|`` for the most negative one.

The top ``k`` (largest algebraic) and the most negative eigenvalue come from the same basis.
A warm start begins the Krylov space at the sum of the previous estimate's Ritz vectors, which
makes a refresh after a few optimizer steps cost a handful of products.

Power iteration is kept as a baseline only: it converges to the eigenvalue of largest
*magnitude*, which may be negative, so its result is never "the top eigenvalue".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class LanczosResult:
    """Ritz estimates of the extremal spectrum.

    Attributes:
        eigenvalues: the ``k`` largest Ritz values, descending.
        eigenvectors: their Ritz vectors, shape ``[k, n]``.
        lambda_min: the smallest (most negative) Ritz value, or ``None`` if not requested.
        min_vector: its Ritz vector.
        error_bounds: certified error bound of each top-k value (same order).
        num_matvecs: operator products used.
        converged: whether every requested value met the tolerance within the budget.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    lambda_min: float | None
    min_vector: Tensor | None
    error_bounds: Tensor
    num_matvecs: int
    converged: bool


def _start_vector(
    n: int, init: Tensor | None, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    if init is not None:
        init = init.reshape(-1, n).to(dtype=torch.float64, device=device)
        init = init / init.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        v = init.sum(dim=0)
        if v.norm() > 1e-8:
            return (v / v.norm()).to(dtype)
    v = torch.randn(n, generator=generator, dtype=torch.float64, device="cpu" if generator is None else generator.device)
    v = v.to(device)
    return (v / v.norm()).to(dtype)


class KrylovBasis:
    """Orthonormal vectors in a preallocated ``[capacity, n]`` buffer, with full reorthogonalisation.

    ``orthogonalize`` is classical Gram–Schmidt applied twice ("twice is enough", Giraud et al.
    2005) as two matrix-vector products on the filled rows — no per-step stacking of the basis.
    """

    def __init__(self, capacity: int, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.vectors = torch.empty(capacity, n, dtype=dtype, device=device)
        self.size = 0

    @property
    def filled(self) -> Tensor:
        return self.vectors[: self.size]

    def append(self, v: Tensor) -> None:
        self.vectors[self.size] = v
        self.size += 1

    def orthogonalize(self, w: Tensor) -> Tensor:
        V = self.filled
        for _ in range(2):
            w = w - (V @ w) @ V
        return w


def tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    """The symmetric tridiagonal ``T`` with diagonal ``alphas`` and off-diagonal ``betas`` (float64)."""
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return T


def _error_bounds(theta: Tensor, residuals: Tensor) -> Tensor:
    """``min(r, r²/gap)`` with ``gap`` the distance to the nearest other Ritz value."""
    if theta.numel() == 1:
        return residuals
    diff = (theta[:, None] - theta[None, :]).abs()
    diff.fill_diagonal_(float("inf"))
    gap = diff.min(dim=1).values
    return torch.minimum(residuals, residuals**2 / gap.clamp_min(1e-300))


def lanczos(
    matvec: MatVec,
    n: int,
    k: int = 1,
    *,
    want_min: bool = True,
    tol: float = 1e-3,
    min_tol: float | None = None,
    max_matvecs: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LanczosResult:
    """Top-``k`` and most negative eigenpairs of a symmetric operator by Lanczos.

    Args:
        matvec: ``v ↦ H v`` on flat vectors of length ``n``.
        n: dimension.
        k: number of largest (algebraic) eigenvalues wanted.
        want_min: also certify the most negative eigenvalue.
        tol: relative tolerance of the top-``k`` values: bounds ``≤ tol · |θ_1|`` (the largest
            Ritz value's magnitude, or ``max|θ|`` if that is larger than ``|θ_1|`` by 10³).
        min_tol: tolerance of the most negative value, relative to ``max|θ|`` (default ``tol``).
        max_matvecs: budget of products; the result says whether it converged within it.
        init: previous Ritz vectors ``[j, n]`` (or one vector) to warm-start from.
        generator: random start when there is no ``init``.
        dtype, device: of the Krylov vectors (products are computed in the operator's dtype).

    Returns:
        A :class:`LanczosResult`; Ritz values are computed in float64.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0 < tol < 1 or (min_tol is not None and not 0 < min_tol < 1):
        raise ValueError(f"tol and min_tol must be in (0, 1), got {tol}, {min_tol}")
    if max_matvecs < k + 1:
        raise ValueError(f"max_matvecs must be at least k + 1 = {k + 1}, got {max_matvecs}")
    min_tol = tol if min_tol is None else min_tol
    device = torch.device(device)
    max_steps = min(max_matvecs, n)
    basis = KrylovBasis(max_steps, n, dtype, device)
    basis.append(_start_vector(n, init, generator, dtype, device))
    alphas: list[float] = []
    betas: list[float] = []
    theta = s = None
    bounds = torch.empty(0, dtype=torch.float64)
    converged = False
    for step in range(max_steps):
        v = basis.vectors[step]
        w = matvec(v).to(dtype)
        alphas.append(float(torch.dot(w.double(), v.double())))
        w = basis.orthogonalize(w)
        beta = float(w.double().norm())
        theta, s = torch.linalg.eigh(tridiagonal(alphas, betas))  # ascending
        bounds_all = _error_bounds(theta, beta * s[-1, :].abs())
        scale = float(theta.abs().max())
        top_scale = max(abs(float(theta[-1])), 1e-3 * scale)
        top = list(range(len(alphas) - 1, max(len(alphas) - 1 - k, -1), -1))
        bounds = bounds_all[top]
        ok = bool((bounds <= tol * top_scale).all())
        if want_min:
            ok = ok and float(bounds_all[0]) <= min_tol * scale
        invariant = beta <= 1e-10 * max(scale, 1e-30)
        if len(alphas) >= min(k + 1, n) and (invariant or ok):
            converged = True
            break
        if step == max_steps - 1 or (invariant and scale == 0):  # a zero operator: nothing to certify
            break
        if invariant:  # e.g. a warm start on an eigenvector: go on from a random direction orthogonal to
            # the basis, uncoupled (β = 0), so that the wanted Ritz values can still be certified
            w = basis.orthogonalize(_start_vector(n, None, generator, dtype, device))
            betas.append(0.0)
            basis.append(w / w.norm())
            continue
        betas.append(beta)
        basis.append(w / beta)
    V = basis.vectors[: len(alphas)]
    kk = min(k, len(alphas))
    top_idx = torch.arange(len(alphas) - 1, len(alphas) - 1 - kk, -1)
    vecs = (s[:, top_idx].T.to(dtype) @ V) if theta is not None else V[:0]
    lam_min = float(theta[0]) if want_min else None
    min_vec = (s[:, 0].to(dtype) @ V) if want_min else None
    return LanczosResult(
        eigenvalues=theta[top_idx],
        eigenvectors=vecs,
        lambda_min=lam_min,
        min_vector=min_vec,
        error_bounds=bounds[:kk],
        num_matvecs=len(alphas),
        converged=converged or len(alphas) == n,
    )


@dataclass(frozen=True)
class PowerResult:
    """Dominant (largest-magnitude) eigenpair: ``eigenvalue`` may be negative."""

    eigenvalue: float
    eigenvector: Tensor
    num_matvecs: int
    converged: bool


def power_iteration(
    matvec: MatVec,
    n: int,
    *,
    tol: float = 1e-3,
    max_matvecs: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> PowerResult:
    """Power iteration ``v ← Hv/‖Hv‖`` with Rayleigh quotient ``vᵀHv``.

    Converges to the eigenvalue of largest **magnitude** (von Mises 1929), at rate
    ``|λ_2/λ_1|`` per product; it is a baseline, not an estimator of the top eigenvalue.
    Stops when the Rayleigh quotient changes by less than ``tol`` relative.
    """
    if max_matvecs < 1:
        raise ValueError(f"max_matvecs must be >= 1, got {max_matvecs}")
    v = _start_vector(n, init, generator, dtype, torch.device(device))
    rayleigh = float("nan")
    for i in range(max_matvecs):
        w = matvec(v).to(dtype)
        new = float(torch.dot(w.double(), v.double()))
        norm = float(w.double().norm())
        if norm == 0.0:
            return PowerResult(0.0, v, i + 1, True)
        v = w / norm
        if abs(new - rayleigh) <= tol * abs(new):
            return PowerResult(new, v, i + 1, True)
        rayleigh = new
    return PowerResult(rayleigh, v, max_matvecs, False)
