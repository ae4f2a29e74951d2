"""The chaos-theory paper's Lyapunov-map estimator of the largest Hessian eigenvalue, certified.

Sasdelli et al., "A chaos theory approach to understand neural network optimization"
(OpenReview 37Fh1MiR5Ze): under the gradient-ascent map ``θ ↦ θ + η_a ∇L(θ)`` a perturbation
evolves with the Jacobian ``J = I + η_a H``. Renormalised after every step (Benettin et al.
1980), its log growth ``Λ = ln ‖J δ‖`` (``‖δ‖ = 1``) tends to ``ln(1 + η_a λ_max)`` when
``1 + η_a λ_max`` is the dominant multiplier of ``J``, hence

    λ_max = (e^Λ − 1) / η_a.

The perturbation is propagated exactly by Hessian-vector products (the map's tangent dynamics),
so no finite ε is needed. ``J`` is fixed (one Hessian), so the growth of the *latest* step is the
estimate: it converges geometrically, at the map's rate ``max_{i≥2} |1 + η_a λ_i| / (1 + η_a λ_max)``
per product, whereas a mean of log growths since step 0 carries the start's transient,
``(1/T) ln |⟨δ_0, u_max⟩|``, and converges only as ``1/T``.

**Certificate.** One product gives ``Hδ``, hence the Rayleigh quotient ``ρ = δᵀHδ``, the residual
``r = ‖Hδ − ρδ‖`` and the step's growth exactly: ``‖Jδ‖² = (1 + η_a ρ)² + (η_a r)²``, i.e. with
``s = 1/η_a``

    λ̂ = (e^Λ − 1)/η_a = √((s + ρ)² + r²) − s ∈ [ρ, ρ + r]   (for s + ρ ≥ 0).

An eigenvalue of ``H`` lies in ``[ρ − r, ρ + r]`` (Krylov–Weinstein), so one lies within
``error_bound = (λ̂ − ρ) + r`` of ``λ̂`` (≈ ``r`` near convergence, where ``λ̂ − ρ ≈ r²/(2(s + ρ))``),
and ``λ̂ − error_bound = ρ − r ≤ λ_max`` always. The estimate is *converged* only when
``error_bound ≤ tol · |λ̂|``, the step's multiplier ``1 + η_a ρ`` is not negative, and no earlier
Rayleigh quotient (each a lower bound of ``λ_max``) lies above ``ρ + r``. As for every Krylov
method (Lanczos included), that the certified eigenvalue is the *top* one rests on the start
having a component along the top eigenvector: a random start has one with probability 1, but
when the top of the spectrum is a cluster (or a continuum) wider than ``tol · λ_max`` whose
members are not yet resolved, the certified eigenvalue may be a lower member of it.

**Ascent rate.** ``λ_max``'s multiplier dominates iff ``|1 + η_a λ_min| < 1 + η_a λ_max``; while it
does, the rate ``(1 + η_a λ_2)/(1 + η_a λ_max)`` of the positive part of the spectrum improves as
``η_a`` grows (``η_a → ∞`` is power iteration). Every Rayleigh quotient bounds ``λ_min ≤ ρ_t``, so
by default ``η_a = 1 / max(ε ‖Hδ‖_max, −min_t ρ_t)``: as large as possible while no direction seen
so far has a negative multiplier (``ε = 0.1`` keeps the map a finite step, at the cost of at most
~10% more products than power iteration on a positive spectrum with a small top gap). When an
unseen negative eigenvalue dominates, the iterate turns towards it, its Rayleigh quotient drops
and ``η_a`` shrinks at once; the current vector is kept (nothing is averaged, so nothing is
reset), and convergence is never declared on a direction whose multiplier is negative. With
``|λ_min| ≫ λ_max`` dominance needs ``η_a ≲ 2/|λ_min|``, so the map's rate is at best
``≈ 1 − 2(λ_max − λ_2)/|λ_min|`` per product (``≈ 1 − (λ_max − λ_2)/|λ_min|`` with the default
``η_a ≈ 1/|λ_min|``); Lanczos is the tool for such spectra.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from chaos_callbacks.curvature.lanczos import MatVec

SHIFT_FLOOR = 0.1
"""``ε``: the default ascent rate never exceeds ``1 / (ε ‖Hδ‖_max)``."""


@dataclass(frozen=True)
class LyapunovMapResult:
    """``lambda_max = (e^exponent − 1) / ascent_lr`` from the last renormalisation step.

    Attributes:
        lambda_max: the Lyapunov-map estimate of the largest eigenvalue.
        exponent: log growth ``Λ`` of the renormalised perturbation in the last step.
        ascent_lr: the ascent rate ``η_a`` of that step.
        vector: the (unit) perturbation whose step gave the estimate (a warm start for the next).
        num_matvecs: operator products used.
        converged: ``error_bound ≤ tol · |lambda_max|`` within the budget.
        error_bound: an eigenvalue of ``H`` lies within it of ``lambda_max`` (Krylov–Weinstein), and
            ``lambda_max − error_bound ≤ λ_max(H)``.
    """

    lambda_max: float
    exponent: float
    ascent_lr: float
    vector: Tensor
    num_matvecs: int
    converged: bool
    error_bound: float


def _start(
    n: int, init: Tensor | None, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """``init`` (rows ``[j, n]`` are normalised and summed) or a Gaussian vector, of unit norm."""
    if init is not None:
        rows = init.detach().reshape(-1, n).to(device=device, dtype=torch.float64)
        v = (rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-300)).sum(dim=0)
        if math.isfinite(float(v.norm())) and float(v.norm()) > 1e-8:
            return (v / v.norm()).to(dtype)
    cpu_or_generators = "cpu" if generator is None else generator.device
    v = torch.randn(n, generator=generator, dtype=torch.float64, device=cpu_or_generators)
    return (v / v.norm()).to(device=device, dtype=dtype)


def _certified_step(rho: float, residual: float, shift: float) -> tuple[float, float, float]:
    """The step's estimate ``λ̂ = (e^Λ − 1)/η_a``, its exponent ``Λ`` and its error bound.

    With ``s = 1/η_a``: ``e^Λ = ‖(I + η_a H)δ‖ = √((1 + ρ/s)² + (r/s)²)``, so
    ``λ̂ = √((s + ρ)² + r²) − s``; an eigenvalue lies in ``[ρ − r, ρ + r]`` (Krylov–Weinstein),
    hence within ``|λ̂ − ρ| + r`` of ``λ̂``.
    """
    estimate = math.hypot(shift + rho, residual) - shift
    growth = math.hypot(1.0 + rho / shift, residual / shift)
    exponent = math.log(growth) if growth > 0 else -math.inf
    return estimate, exponent, abs(estimate - rho) + residual


def lyapunov_map_lambda_max(
    matvec: MatVec,
    n: int,
    *,
    ascent_lr: float | None = None,
    tol: float = 1e-3,
    max_matvecs: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LyapunovMapResult:
    """Estimate ``λ_max`` from the growth of a renormalised perturbation under ``I + η_a H``.

    Args:
        matvec: ``v ↦ H v`` on flat vectors of length ``n`` (symmetric ``H``).
        n: dimension.
        ascent_lr: a fixed ``η_a > 0``; default: adaptive (see the module docstring). A fixed rate
            under which a negative eigenvalue dominates never converges.
        tol: relative tolerance: stop when ``error_bound ≤ tol · |λ̂|``.
        max_matvecs: budget of products; the result says whether it converged within it.
        init: warm-start direction(s) (e.g. the previous estimate's ``vector``).
        generator: random start when there is no ``init``.
        dtype, device: of the perturbation (bounds are computed in float64).

    Returns:
        A :class:`LyapunovMapResult` (the last step's estimate and bound even if not converged).
    """
    if ascent_lr is not None and not (math.isfinite(ascent_lr) and ascent_lr > 0):
        raise ValueError(f"ascent_lr must be a positive finite float, got {ascent_lr}")
    if not 0 < tol < 1:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    if max_matvecs < 1:
        raise ValueError(f"max_matvecs must be >= 1, got {max_matvecs}")
    delta = _start(n, init, generator, dtype, torch.device(device))
    hd_max, rho_min, rho_max = 0.0, math.inf, -math.inf
    estimate = exponent = bound = shift = math.nan
    for step in range(1, max_matvecs + 1):
        hd = matvec(delta).to(dtype)
        d64, h64 = delta.double(), hd.double()
        rho = float(d64 @ h64) / float(d64 @ d64)
        residual = float((h64 - rho * d64).norm() / d64.norm())
        if not (math.isfinite(rho) and math.isfinite(residual)):
            break
        hd_max = max(hd_max, float(h64.norm() / d64.norm()))
        rho_min, rho_max = min(rho_min, rho), max(rho_max, rho)
        shift = 1.0 / ascent_lr if ascent_lr is not None else max(SHIFT_FLOOR * hd_max, -rho_min, 1e-300)
        estimate, exponent, bound = _certified_step(rho, residual, shift)
        if shift + rho >= 0 and rho_max <= rho + residual and bound <= tol * abs(estimate):
            return LyapunovMapResult(estimate, exponent, 1.0 / shift, delta, step, True, bound)
        nxt = delta + hd / shift
        norm = float(nxt.double().norm())
        if not math.isfinite(norm) or norm == 0.0:
            break
        delta = nxt / norm
    return LyapunovMapResult(estimate, exponent, 1.0 / shift, delta, step, False, bound)
