"""Gradient-weighted curvature and principal-flow coefficients.

Rosca, Wu, Qin & Dherin, "On a continuous time model of gradient descent dynamics and
instability in deep learning" (arXiv 2302.01952):

- the drift-adjusted learning rate uses the curvature along the gradient,
  ``v = ‖H g‖ / ‖g‖`` (the Rayleigh-type quotient that replaces ``λ_max`` when the gradient is
  not aligned with the top eigenvector);
- on mini-batches the gradient ``g`` is the expected gradient ``ḡ`` plus batch noise, and
  ``‖Hg‖/‖g‖`` is the curvature along the noise as much as along ``ḡ``;
  :func:`split_gradient_curvature` removes the noise from both norms with two independent
  half-batch gradients (the two-batch trick of McCandlish et al., arXiv 1812.06162, App. A);
- the principal flow ``θ' = Σ_i (ln(1 − hλ_i) / (hλ_i)) (gᵀu_i) u_i`` rescales each eigen-direction
  by ``ln(1 − hλ_i)/(hλ_i)``, which is real for ``hλ_i < 1``, complex (oscillation) for
  ``1 < hλ_i``, and whose real part changes sign — instability — at ``hλ_i = 2``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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


@dataclass(frozen=True)
class SplitCurvature:
    """``v² = (Hg₁)·(Hg₂) / (g₁·g₂)`` from two independent gradients (:func:`split_gradient_curvature`).

    Attributes:
        numerator: ``(Hg₁)·(Hg₂)``, whose expectation is ``‖Hḡ‖²`` when ``H`` is independent of the halves.
        denominator: ``g₁·g₂``, whose expectation is ``‖ḡ‖²``.
        plain: ``‖Hg‖/‖g‖`` of the mean ``g = (g₁ + g₂)/2`` of the two (from the same products), ``None``
            when ``‖g‖ ≤ eps`` (a stationary point: no curvature along the gradient).
    """

    numerator: float
    denominator: float
    plain: float | None

    @property
    def problem(self) -> str | None:
        """Why the pair gives no curvature (``None``: it does): a cross product that is not positive
        means the batch noise outweighs the signal in it."""
        if not (math.isfinite(self.numerator) and math.isfinite(self.denominator)):
            return "non-finite curvature"
        if self.denominator <= 0:
            return "noise-dominated gradient halves (g₁·g₂ ≤ 0)"
        if self.numerator <= 0:
            return "noise-dominated gradient halves ((Hg₁)·(Hg₂) ≤ 0)"
        return None

    @property
    def value(self) -> float | None:
        """``v = sqrt((Hg₁)·(Hg₂) / (g₁·g₂))``, or ``None`` when :attr:`problem` is set."""
        return None if self.problem is not None else math.sqrt(self.numerator / self.denominator)


def split_gradient_curvature(matvec: MatVec, g1: Tensor, g2: Tensor, eps: float = 1e-12) -> SplitCurvature:
    """The curvature along the expected gradient from two independent gradients ``g₁, g₂`` (two products).

    A mini-batch gradient is ``g = ḡ + ξ`` with zero-mean noise ``ξ`` (covariance ``Σ/B``), so the plain
    estimate is biased: ``E‖Hg‖² = ‖Hḡ‖² + tr(HΣH)/B`` and ``E‖g‖² = ‖ḡ‖² + tr Σ/B``. Two gradients
    with independent noise (the two halves of a batch) have ``E[g₁·g₂] = ‖ḡ‖²`` and, for a matrix ``H``
    independent of them, ``E[(Hg₁)·(Hg₂)] = ‖Hḡ‖²``: both noise terms drop out in expectation (as in
    the gradient-noise estimates of McCandlish et al., arXiv 1812.06162, App. A), and the ratio
    estimates ``v² = ‖Hḡ‖²/‖ḡ‖²`` of the drift-adjusted rate (Rosca et al., arXiv 2302.01952) without
    the noise. When ``H`` is the Hessian of the same batch it is correlated with the halves (examples
    with large gradients have large Hessians), which leaves a bias of order ``1/B`` that does not
    involve ``tr(HΣH)``.
    """
    a, b = g1.double(), g2.double()
    ha, hb = matvec(g1).double(), matvec(g2).double()
    g, hg = (a + b) / 2, (ha + hb) / 2
    g_norm = float(g.norm())
    plain = float(hg.norm()) / g_norm if g_norm > eps else None
    return SplitCurvature(float(ha @ hb), float(a @ b), plain)


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

