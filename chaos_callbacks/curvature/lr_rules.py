"""Learning rates from curvature: quasi-Newton, edge of stability, drift-adjusted; EMA smoothing.

On a quadratic model with Hessian ``H``, gradient descent ``θ ← θ − η∇L`` is the linear map
``I − ηH``; along an eigenvector of eigenvalue ``λ`` it multiplies the error by ``1 − ηλ``
(monotone for ``ηλ ≤ 1``, oscillating for ``1 < ηλ < 2``, divergent for ``ηλ > 2``: see
:func:`chaos_callbacks.curvature.drift.stability_regime`). The rules below turn a live
curvature estimate ``c`` into a learning rate:

- **quasi-Newton** (Sasdelli et al., "A chaos theory approach to understand neural network
  optimization", OpenReview 37Fh1MiR5Ze): ``η = s / λ_max``. With ``s = 1`` the stiffest
  direction takes the Newton step (``ηλ_max = 1``, its Lyapunov exponent ``log|1 − ηλ|`` is −∞);
  SGD is observed to sit where ``λ_max ≈ 1/η``.
- **edge of stability** (Cohen et al., "Gradient descent on neural networks typically occurs at
  the edge of stability", ICLR 2021; "Adaptive gradient methods at the edge of stability",
  arXiv 2207.14484): ``η = f · τ / λ_max`` with ``τ`` the optimizer's stability threshold on
  ``ηλ`` (:func:`sgd_threshold`, :func:`adam_threshold`; 2 for plain gradient descent).
- **drift-adjusted** (DAL, Rosca et al., arXiv 2302.01952): ``η = min(2 / v^p, max_lr)`` with
  ``v = ‖Hg‖/‖g‖`` the curvature along the gradient, ``p ∈ [0, 1]``.

Optimizers that rescale coordinates (several parameter groups with different learning rates,
Adam's diagonal preconditioner ``P``) step ``θ ← θ − η S² g`` with a diagonal ``S²``. In the
coordinates ``θ = S θ'`` that step is plain gradient descent with Hessian ``S H S`` and
gradient ``S g``; ``S H S`` is symmetric with the spectrum of ``S² H`` (for Adam, ``P⁻¹H``: the
*preconditioned sharpness* of Cohen et al. 2022). :func:`scaled_operator` builds it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from torch.optim import Adam, AdamW, Optimizer

from chaos_callbacks.curvature.lanczos import MatVec


def quasi_newton_lr(lambda_max: float, scale: float = 1.0) -> float:
    """``η = scale / λ_max`` (Sasdelli et al.)."""
    return scale / lambda_max


def edge_of_stability_lr(lambda_max: float, fraction: float, threshold: float = 2.0) -> float:
    """``η = fraction · threshold / λ_max``: a ``fraction`` of the largest stable rate."""
    return fraction * threshold / lambda_max


def drift_adjusted_lr(v: float, power: float = 1.0, max_lr: float = math.inf) -> float:
    """``η = min(2 / v^p, max_lr)`` with ``v = ‖Hg‖/‖g‖`` (Rosca et al., DAL)."""
    return min(2.0 / v**power, max_lr)


def sgd_threshold(momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    """Largest stable ``ηλ`` of ``torch.optim.SGD`` on a quadratic.

    Heavy ball ``b ← βb + (1 − d)g, θ ← θ − ηb`` is stable iff ``ηλ < (2 + 2β)/(1 − d)``;
    Nesterov (``d = 0``) ``θ ← θ − η(g + βb)`` iff ``ηλ < (2 + 2β)/(1 + 2β)``; plain gradient
    descent (``β = 0``) iff ``ηλ < 2``. These are the roots ``−1`` of the characteristic
    polynomial of the two-step recurrence (Goh, "Why momentum really works", Distill 2017).
    """
    if momentum == 0:
        return 2.0
    if nesterov:
        return (2 + 2 * momentum) / (1 + 2 * momentum)
    if dampening >= 1:
        raise ValueError(f"SGD with momentum and dampening={dampening} ignores the gradient")
    return (2 + 2 * momentum) / (1 - dampening)


def momentum_factor(momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> float:
    """``(1 − β)/(1 − d)``: the rate of plain gradient descent over the rate of ``torch.optim.SGD`` with
    momentum ``β`` and dampening ``d`` that take the same step on a slowly varying gradient.

    Heavy ball ``b ← βb + (1 − d)g, θ ← θ − ηb`` settles at ``b = (1 − d)g/(1 − β)``, a step of
    ``η(1 − d)/(1 − β) · g``; Nesterov (``d = 0``) ``θ ← θ − η(g + βb)`` at ``η/(1 − β) · g``. A rate
    meant for gradient descent is multiplied by this factor to give the same *effective* rate
    (Goh, "Why momentum really works", Distill 2017). ``1`` without momentum.
    """
    if momentum == 0:
        return 1.0
    if nesterov:
        return 1.0 - momentum
    if dampening >= 1:
        raise ValueError(f"SGD with momentum and dampening={dampening} ignores the gradient")
    return (1.0 - momentum) / (1.0 - dampening)


def adam_threshold(beta1: float) -> float:
    """Largest stable ``ηλ(P⁻¹H)`` of Adam with a frozen preconditioner: ``(2 + 2β₁)/(1 − β₁)``.

    Adam's first moment ``m ← β₁m + (1 − β₁)g`` is heavy ball in EMA form (Cohen et al. 2022,
    38 for ``β₁ = 0.9``), with ``P`` from :func:`adam_preconditioner`.
    """
    return (2 + 2 * beta1) / (1 - beta1)


def adam_preconditioner(exp_avg_sq: Tensor, step: int, beta1: float, beta2: float, eps: float) -> Tensor:
    """Adam's diagonal preconditioner for the step ``t + 1`` after ``t = step`` steps taken.

    Adam steps ``θ ← θ − η m/(1 − β₁^{t+1}) / (sqrt(v̂) + ε)``, i.e. ``θ ← θ − η P⁻¹ m`` with
    ``P = (1 − β₁^{t+1}) (sqrt(v_t / (1 − β₂^t)) + ε)`` (the first-moment bias correction folded
    into ``P`` as in Cohen et al. 2022, ``v̂`` the latest bias-corrected second moment).
    """
    if step < 1:
        raise ValueError(f"Adam's preconditioner needs at least one step taken, got step={step}")
    v_hat = exp_avg_sq.double() / (1 - beta2**step)
    return (1 - beta1 ** (step + 1)) * (v_hat.sqrt() + eps)


def coordinate_scaling(params: Sequence[Tensor], ratios: Sequence[float], preconditioners: Sequence[Tensor | None]) -> Tensor:
    """Flat ``S = sqrt(r / P)`` over ``params``: ``r`` the parameter's learning-rate ratio, ``P`` its
    diagonal preconditioner (``None``: ``P = 1``). The optimizer steps ``θ ← θ − η S² g``."""
    parts = []
    for p, r, P in zip(params, ratios, preconditioners):
        s2 = torch.full(p.shape, float(r), dtype=torch.float64, device=p.device) if P is None else float(r) / P.double()
        parts.append(s2.sqrt().reshape(-1))
    return torch.cat(parts).to(params[0].dtype)


def is_adam(optimizer: Optimizer) -> bool:
    """``torch.optim.Adam`` or ``AdamW`` (whose step is preconditioned by :func:`adam_preconditioner`)."""
    return isinstance(optimizer, (Adam, AdamW))


def adam_started(optimizer: Optimizer) -> bool:
    """Adam/AdamW has a second moment, i.e. a preconditioner (it has taken a step)."""
    return is_adam(optimizer) and len(optimizer.state) > 0


def step_scaling(optimizer: Optimizer, ratios: Sequence[float], params: Sequence[Tensor] | None = None) -> tuple[list[Tensor], Tensor | None]:
    """The coordinates of the optimizer's next step ``θ ← θ − η S² g``: parameters and flat ``S``.

    ``ratios[i]`` is the learning rate of parameter group ``i`` over ``η``; for Adam/AdamW each
    parameter's ``S² = r / P`` with ``P`` from :func:`adam_preconditioner` (a parameter Adam has not
    moved yet: ``S = 0``), otherwise ``S² = r``. ``params``: the coordinates (any order; a parameter
    outside the optimizer gets ``S = 0``); default: the optimizer's trainable parameters in group
    order. Returns ``(params, S)``, ``S = None`` when it is the identity (``S H S`` is then ``H``).
    """
    rules: dict[int, tuple[float, Tensor | None]] = {}
    order: list[Tensor] = []
    for group, ratio in zip(optimizer.param_groups, ratios):
        for p in group["params"]:
            if not p.requires_grad:
                continue
            r, P = ratio, None
            if is_adam(optimizer):
                state = optimizer.state.get(p, {})
                key = "max_exp_avg_sq" if group["amsgrad"] else "exp_avg_sq"
                if key in state:
                    beta1, beta2 = group["betas"]
                    P = adam_preconditioner(state[key], int(state["step"]), beta1, beta2, group["eps"])
                else:  # Adam has not moved this parameter yet
                    r = 0.0
            rules[id(p)] = (r, P)
            order.append(p)
    params = order if params is None else list(params)
    if not params:
        return params, None
    ratios_, preconditioners = zip(*(rules.get(id(p), (0.0, None)) for p in params))
    if all(r == 1.0 for r in ratios_) and all(P is None for P in preconditioners):
        return params, None
    return params, coordinate_scaling(params, ratios_, preconditioners)


def scaled_operator(matvec: MatVec, scale: Tensor) -> MatVec:
    """``v ↦ S H S v`` with ``S = diag(scale)``: symmetric, with the spectrum of ``S² H``."""
    return lambda v: scale * matvec(scale * v)


def ema(previous: float | None, value: float, decay: float) -> float:
    """Exponential moving average ``decay · previous + (1 − decay) · value``, starting at ``value``."""
    if previous is None:
        return value
    return decay * previous + (1 - decay) * value


def clamp_lr(lr: float, min_lr: float = 0.0, max_lr: float | None = None) -> float:
    """``lr`` clipped to ``[min_lr, max_lr]`` (``max_lr=None``: no upper bound)."""
    return max(min(lr, max_lr if max_lr is not None else math.inf), min_lr)


def curvature_problem(value: float | None) -> str | None:
    """Why a curvature cannot give a learning rate (``None``: it can): it must be finite and positive."""
    if value is None:
        return "zero gradient"
    if not math.isfinite(value):
        return "non-finite curvature"
    if value <= 0:
        return "non-positive curvature"
    return None
