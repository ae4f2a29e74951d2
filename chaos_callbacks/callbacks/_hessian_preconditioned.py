"""Adam's preconditioned sharpness for ``HessianSpectrumMonitor`` (Cohen et al., arXiv 2207.14484).

Adam steps ``θ ← θ − η P⁻¹ m`` with the diagonal preconditioner ``P`` of
:func:`~chaos_callbacks.curvature.lr_rules.adam_preconditioner`; with a frozen ``P`` it is stable on
a quadratic iff ``η λ_max(P⁻¹H) < (2 + 2β₁)/(1 − β₁)`` (38 for ``β₁ = 0.9``). ``λ_max(P⁻¹H)`` is the
top eigenvalue of the symmetric ``P^{-1/2} H P^{-1/2}``, built by the same code as
``CurvatureLRScheduler``'s (:func:`~chaos_callbacks.curvature.lr_rules.step_scaling`): parameter
groups with rates ``η_i`` below the largest ``η`` enter as ``(η_i/η) P⁻¹``, parameters Adam has not
moved yet (or outside the optimizer) with 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.optim import Optimizer

from chaos_callbacks.curvature import lanczos
from chaos_callbacks.curvature.lanczos import MatVec
from chaos_callbacks.curvature.lr_rules import adam_started, adam_threshold, scaled_operator, step_scaling


@dataclass(frozen=True)
class PreconditionedTop:
    """``λ_max(S H S)`` with its certified bound, its Ritz vector, and the ratio ``η λ / τ`` to Adam's
    threshold ``τ`` with its bound (``None`` when the groups' ``β₁`` differ: no single threshold);
    ``vectors`` is ``[1, n]`` (a warm start for the next solve)."""

    value: float
    error: float
    vectors: Tensor
    ratio: float | None
    ratio_error: float | None


def preconditioned_top(
    op: MatVec, dim: int, params: Sequence[Tensor], optimizer: Optimizer, *, tol: float, max_matvecs: int,
    init: Tensor | None, generator: torch.Generator, dtype: torch.dtype, device: torch.device,
) -> PreconditionedTop | None:
    """The top of Adam's preconditioned Hessian over ``params`` by Lanczos on ``S H S`` (``op`` is
    ``H`` in the coordinates of ``params``); ``None`` before Adam's first step (no preconditioner).

    Raises ``RuntimeError`` when Lanczos does not certify it to ``tol`` within ``max_matvecs``.
    """
    if not adam_started(optimizer):
        return None
    lrs = [float(g["lr"]) for g in optimizer.param_groups]
    eta = max(lrs)
    ratios = [lr / eta if eta > 0 else 1.0 for lr in lrs]
    _, scale = step_scaling(optimizer, ratios, params)
    if scale is None:  # no parameter here is moved by the optimizer
        return None
    res = lanczos(scaled_operator(op, scale), dim, k=1, want_min=False, tol=tol, max_matvecs=max_matvecs, init=init,
                  generator=generator, dtype=dtype, device=device)
    if not res.converged:
        raise RuntimeError(f"Lanczos did not certify the preconditioned lambda_max to tol={tol} in {max_matvecs} HVPs ({res.stop_reason})")
    value, error = float(res.eigenvalues[0]), float(res.error_bounds[0])
    beta1 = {g["betas"][0] for g in optimizer.param_groups}
    ratio = ratio_error = None
    if len(beta1) == 1 and eta > 0:
        tau = adam_threshold(beta1.pop())
        ratio, ratio_error = eta * value / tau, eta * error / tau
    return PreconditionedTop(value, error, res.eigenvectors.detach(), ratio, ratio_error)
