"""Gradient-weighted curvature and principal-flow coefficients.

Rosca, Wu, Qin & Dherin, "On a continuous time model of gradient descent dynamics and
instability in deep learning" (arXiv 2302.01952):

- the drift-adjusted learning rate uses the curvature along the gradient,
  ``v = ‖H g‖ / ‖g‖`` (the Rayleigh-type quotient that replaces ``λ_max`` when the gradient is
  not aligned with the top eigenvector);
- the principal flow ``θ' = Σ_i (ln(1 − hλ_i) / (hλ_i)) (gᵀu_i) u_i`` rescales each eigen-direction
  by ``ln(1 − hλ_i)/(hλ_i)``, which is real for ``hλ_i < 1``, complex (oscillation) for
  ``1 < hλ_i``, and whose real part changes sign — instability — at ``hλ_i = 2``.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from chaos_callbacks.curvature.lanczos import MatVec


def gradient_weighted_curvature(matvec: MatVec, gradient: Tensor, eps: float = 1e-12) -> float | None:
    """``‖H g‖ / ‖g‖``, or ``None`` when ``‖g‖ ≤ eps`` (undefined at a stationary point)."""
    return gradient_curvatures(matvec, gradient, eps)[0]


def gradient_curvatures(matvec: MatVec, gradient: Tensor, eps: float = 1e-12) -> tuple[float | None, float | None]:
    """``(‖H g‖ / ‖g‖, gᵀH g / ‖g‖²)`` from one product ``H g``; ``(None, None)`` when ``‖g‖ ≤ eps``.

    The second is the *batch sharpness* of Andreyev & Beneventano (arXiv 2412.20553): the curvature
    along the probe gradient, which mini-batch SGD drives to ``2/η`` where full-batch gradient descent
    drives ``λ_max`` (its ``|·|`` is at most the first, by Cauchy–Schwarz).
    """
    g = gradient.double()
    g_norm = float(g.norm())
    if g_norm <= eps:
        return None, None
    hg = matvec(gradient).double()
    return float(hg.norm()) / g_norm, float(g @ hg) / g_norm**2


def principal_flow_coefficients(eigenvalues: np.ndarray | Tensor, lr: float) -> np.ndarray:
    """``ln(1 − hλ) / (hλ)`` for each eigenvalue (complex where ``hλ > 1``; limit −1 at ``λ = 0``,
    i.e. gradient flow ``θ' = −g`` for flat directions)."""
    if lr <= 0:
        raise ValueError(f"lr must be positive, got {lr}")
    lam = np.asarray(eigenvalues.detach().cpu() if isinstance(eigenvalues, Tensor) else eigenvalues, dtype=np.float64)
    x = lr * lam
    out = -np.ones_like(x, dtype=np.complex128)
    nz = x != 0
    out[nz] = np.log((1 - x[nz]).astype(np.complex128)) / x[nz]
    return out


def stability_regime(eigenvalue: float, lr: float) -> str:
    """Regime of GD along an eigen-direction: 'monotone' (hλ≤1), 'oscillating' (1<hλ<2), 'divergent' (hλ>2)."""
    x = lr * eigenvalue
    if x <= 1:
        return "monotone"
    if x < 2:
        return "oscillating"
    return "divergent"

