"""The chaos-theory paper's Lyapunov-map estimator of the largest Hessian eigenvalue.

Sasdelli et al., "A chaos theory approach to understand neural network optimization"
(OpenReview 37Fh1MiR5Ze): under the gradient-ascent map ``θ ↦ θ + η_a ∇L(θ)`` a perturbation
evolves with the Jacobian ``J = I + η_a H``. Renormalising it after every iteration (Benettin et
al. 1980), the mean log growth ``Λ = (1/T) Σ_t ln(‖δ_{t+1}‖ / ‖δ_t‖)`` converges to
``ln(1 + η_a λ_max)`` (for ``η_a > 0`` and ``1 + η_a λ_max`` the dominant multiplier), hence

    λ_max = (e^Λ − 1) / η_a.

Here the perturbation is propagated exactly by Hessian-vector products (the map's tangent
dynamics), so no finite ε is needed. With ``η_a → ∞`` this is power iteration on ``H``.

The multiplier of ``λ_max`` dominates exactly when ``|1 + η_a λ_min| < 1 + η_a λ_max``, which
holds for every spectrum when ``η_a ‖H‖ ≤ 1``. Without a given ``η_a`` the estimator starts from
``1/|vᵀHv|`` and, whenever the current direction shows ``η_a ‖Hδ‖ > 1``, lowers ``η_a`` to
``1/‖Hδ‖`` and restarts the average — so a strongly negative eigenvalue cannot be returned as
``λ_max`` (its direction would have ``‖Hδ‖ ≈ |λ_min|``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from chaos_callbacks.curvature.lanczos import MatVec


@dataclass(frozen=True)
class LyapunovMapResult:
    """``lambda_max`` from the mean log growth ``exponent`` per ascent step."""

    lambda_max: float
    exponent: float
    ascent_lr: float
    vector: Tensor
    num_matvecs: int
    converged: bool


def lyapunov_map_lambda_max(
    matvec: MatVec,
    n: int,
    *,
    ascent_lr: float | None = None,
    tol: float = 1e-3,
    max_matvecs: int = 100,
    window: int = 3,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LyapunovMapResult:
    """Estimate ``λ_max`` from the Lyapunov exponent of the gradient-ascent map.

    Args:
        ascent_lr: a fixed ``η_a``; default: adaptive (see the module docstring).
        tol: stop when the exponent averaged over the last ``window`` iterations changes by
            less than ``tol`` relative between consecutive iterations.
        window: iterations in the running mean (Benettin average after the transient).
        init: warm-start direction (e.g. the previous estimate's vector).
    """
    if ascent_lr is not None and ascent_lr <= 0:
        raise ValueError(f"ascent_lr must be positive, got {ascent_lr}")
    if window < 1 or max_matvecs < window + 1:
        raise ValueError(f"need window >= 1 and max_matvecs > window, got {window}, {max_matvecs}")
    if init is not None:
        delta = init.reshape(-1).to(device=device, dtype=dtype).clone()
    else:
        delta = torch.randn(n, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    delta = delta / delta.norm()
    adaptive = ascent_lr is None
    growths: list[float] = []
    estimate = float("nan")
    for i in range(max_matvecs):
        hd = matvec(delta).to(dtype)
        hd_norm = float(hd.double().norm())
        if ascent_lr is None:
            ascent_lr = 1.0 / max(abs(float(torch.dot(hd.double(), delta.double()))), 1e-12)
        if adaptive and ascent_lr * hd_norm > 1.0:
            ascent_lr = 1.0 / hd_norm
            growths, estimate = [], float("nan")
        nxt = delta + ascent_lr * hd
        norm = float(nxt.double().norm())
        if not math.isfinite(norm) or norm == 0.0:
            break
        growths.append(math.log(norm))
        delta = nxt / norm
        if len(growths) > window:
            exponent = sum(growths[-window:]) / window
            new = (math.exp(exponent) - 1.0) / ascent_lr
            if abs(new - estimate) <= tol * abs(new):
                return LyapunovMapResult(new, exponent, ascent_lr, delta, i + 1, True)
            estimate = new
    exponent = sum(growths[-window:]) / max(len(growths[-window:]), 1)
    return LyapunovMapResult(estimate, exponent, float(ascent_lr or float("nan")), delta, max_matvecs, False)
