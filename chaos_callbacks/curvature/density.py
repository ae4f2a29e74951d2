"""Spectral density of a symmetric operator by stochastic Lanczos quadrature (SLQ).

For a random unit vector ``v``, ``m`` Lanczos steps from ``v`` give the Gauss quadrature rule
with nodes ``θ_j`` (eigenvalues of ``T_m``) and weights ``τ_j = s_{1j}²`` (squared first
components of its eigenvectors), exact for ``vᵀ p(H) v`` with ``deg p ≤ 2m − 1`` (Golub & Meurant
2010). Averaging over ``n_v`` probes and broadening each node by a Gaussian of width ``σ`` gives the
smoothed density of states

    φ_σ(t) = (1 / n_v) Σ_l Σ_j τ_j^{(l)} · exp(−(t − θ_j^{(l)})² / 2σ²) / (σ √(2π)),

as used for neural-network Hessians by Ghorbani, Krishnan & Xiao (ICML 2019) and PyHessian
(Yao et al. 2020). ``φ_σ`` integrates to one; its first moment estimates ``tr(H)/n``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from chaos_callbacks.curvature.lanczos import MatVec, Rows, orthogonalize, tridiagonal


@dataclass(frozen=True)
class SpectralDensity:
    """Broadened SLQ density on ``grid`` plus the raw quadrature nodes and weights."""

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    num_matvecs: int


def lanczos_quadrature(matvec: MatVec, v: Tensor, steps: int, window: int = 20) -> tuple[Tensor, Tensor]:
    """Gauss quadrature nodes and weights of the spectral measure of ``H`` seen from unit ``v``.

    Only the tridiagonal is needed, so each new Lanczos vector is reorthogonalised against the last
    ``window`` vectors alone, kept in a ring (memory ``window + 1`` vectors of ``n``, allocated as the
    run grows). The loss of orthogonality to older vectors makes converged Ritz values reappear
    ("ghosts"); the quadrature stays accurate because the ghosts split the weight of the value they
    copy (Greenbaum 1989; Meurant & Strakoš 2006).
    """
    recent = Rows(v.numel(), v.dtype, v.device, limit=window)
    q = v / v.norm()
    alphas: list[float] = []
    betas: list[float] = []
    for step in range(steps):
        slot = step % window
        if len(recent) < window:
            recent.append(q)
        else:
            recent[slot].copy_(q)
        del q
        w = matvec(recent[slot]).to(v.dtype)
        coeffs, beta = orthogonalize(w, recent)
        alphas.append(float(coeffs[slot]))
        if step == steps - 1 or beta <= 1e-10 * max(abs(a) for a in alphas):
            break
        betas.append(beta)
        q = w.div_(beta)
    nodes, vecs = torch.linalg.eigh(tridiagonal(alphas, betas))
    return nodes, vecs[0, :] ** 2


def spectral_density(
    matvec: MatVec,
    n: int,
    *,
    num_probes: int = 3,
    steps: int = 90,
    grid_size: int = 400,
    sigma: float | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> SpectralDensity:
    """Stochastic Lanczos quadrature estimate of the Hessian's eigenvalue density.

    Args:
        num_probes: random Gaussian start vectors ``n_v``.
        steps: Lanczos steps per probe (at most ``n``); the budget is ``num_probes · steps``.
        grid_size: points of the output grid, spanning the nodes with a margin of ``3σ``.
        sigma: Gaussian broadening; default ``(θ_max − θ_min) / 200``.
    """
    if num_probes < 1 or steps < 1:
        raise ValueError(f"num_probes and steps must be >= 1, got {num_probes}, {steps}")
    all_nodes, all_weights, used = [], [], 0
    for _ in range(num_probes):
        v = torch.randn(n, generator=generator, dtype=dtype, device=device if generator is None else generator.device).to(device)
        nodes, weights = lanczos_quadrature(matvec, v, min(steps, n))
        used += nodes.numel()
        all_nodes.append(nodes)
        all_weights.append(weights / num_probes)
    nodes = torch.cat(all_nodes)
    weights = torch.cat(all_weights)
    span = float(nodes.max() - nodes.min())
    if sigma is None:
        sigma = max(span, float(nodes.abs().max()), 1e-12) / 200
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    grid = torch.linspace(float(nodes.min()) - 3 * sigma, float(nodes.max()) + 3 * sigma, grid_size, dtype=torch.float64)
    kernel = torch.exp(-((grid[:, None] - nodes[None, :]) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))
    return SpectralDensity(grid, kernel @ weights, nodes, weights, used)
