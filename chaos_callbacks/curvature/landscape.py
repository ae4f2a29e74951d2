"""The loss along the top Hessian eigenvectors, and its quadratic model.

PyHessian (Yao et al., arXiv 1912.07145) draws ``L(θ + t v₁)`` along the top eigenvector; the
plane ``L(θ + a v₁ + b v₂)`` is the two-dimensional view of Li et al. (NeurIPS 2018) in the
eigenvector directions. Beside the loss the second-order model

    ``Q(c) = L₀ + Σ_j c_j gᵀv_j + ½ Σ_j λ_j c_j²``

is drawn (``v_j`` orthonormal Ritz vectors of ``H`` with Ritz values ``λ_j``, so ``v₁ᵀHv₂ ≈ 0``):
where the two part, the quadratic picture of the curvature estimate stops describing the loss.

**Range.** ``t`` runs over ``±radius · t*`` with ``t* = sqrt(2|L₀|/|λ|)``: the distance at which the
curvature term ``½λt²`` alone equals the loss. It is invariant to scaling the loss (``L → cL``
scales ``λ`` alike), tracks the estimate as the loss falls and the curvature rises, and shows the
parabola's bottom (``|t| ≪ t*``) as well as where the loss leaves it; a scale set by ``‖θ‖`` would
show a sharp direction as a spike and a flat one as a line.

The loss is evaluated by a closure ``loss_at(δ)`` returning ``L(θ + δ)`` for a flat ``δ``: the
caller decides how the weights are perturbed (and restored).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

LossAt = Callable[[Tensor], float]


@dataclass(frozen=True)
class Landscape:
    """The loss and its quadratic model along ``v₁`` and (with two directions) over the ``v₁–v₂`` plane.

    Attributes:
        t: offsets along ``v₁`` ``[m]`` (symmetric, 0 in the middle).
        line, line_model: ``L(θ + t v₁)`` and ``Q(t, 0)`` ``[m]``.
        s: offsets along ``v₂`` ``[m]``, or ``None`` (one direction).
        plane, plane_model: ``L(θ + t_i v₁ + s_j v₂)`` and ``Q`` ``[m, m]``, or ``None``.
        loss0, slopes, eigenvalues: ``L₀``, ``gᵀv_j`` and ``λ_j`` of the model.
    """

    t: Tensor
    line: Tensor
    line_model: Tensor
    s: Tensor | None
    plane: Tensor | None
    plane_model: Tensor | None
    loss0: float
    slopes: list[float]
    eigenvalues: list[float]


def loss_along(loss_at: LossAt, directions: Tensor, coefficients: Tensor) -> Tensor:
    """``L(θ + Σ_j c_ij d_j)`` for every row ``c_i`` of ``coefficients [m, k]``, directions ``[k, n]``."""
    out = torch.empty(coefficients.shape[0], dtype=torch.float64)
    for i, c in enumerate(coefficients):
        delta = (c.to(directions.dtype)[:, None] * directions).sum(dim=0)
        out[i] = float(loss_at(delta))
    return out


def quadratic_model(loss0: float, slopes: list[float], eigenvalues: list[float], coefficients: Tensor) -> Tensor:
    """``Q(c) = L₀ + Σ_j c_j s_j + ½ Σ_j λ_j c_j²`` for every row of ``coefficients [m, k]``."""
    c = coefficients.double()
    s, lam = torch.tensor(slopes, dtype=torch.float64), torch.tensor(eigenvalues, dtype=torch.float64)
    return loss0 + c @ s + 0.5 * (c**2) @ lam


def offsets(loss0: float, eigenvalue: float, radius: float, points: int) -> Tensor:
    """``points`` offsets evenly over ``±radius · sqrt(2|L₀|/|λ|)`` (module docstring)."""
    if not (math.isfinite(loss0) and math.isfinite(eigenvalue)) or loss0 == 0 or eigenvalue == 0:
        raise ValueError(f"the landscape range needs a finite non-zero loss and eigenvalue, got L0={loss0}, lambda={eigenvalue}")
    half = radius * math.sqrt(2 * abs(loss0) / abs(eigenvalue))
    return torch.linspace(-half, half, points, dtype=torch.float64)


def loss_landscape(loss_at: LossAt, vectors: Tensor, eigenvalues: list[float], loss0: float, slopes: list[float],
                   points: int = 15, radius: float = 2.0) -> Landscape:
    """The line along ``vectors[0]`` and, with two or more vectors, the plane of ``vectors[:2]``
    (``points`` per axis: ``points + points²`` evaluations of ``loss_at``)."""
    t = offsets(loss0, eigenvalues[0], radius, points)
    line_c = t[:, None]
    line = loss_along(loss_at, vectors[:1], line_c)
    line_model = quadratic_model(loss0, slopes[:1], eigenvalues[:1], line_c)
    if vectors.shape[0] < 2:
        return Landscape(t, line, line_model, None, None, None, loss0, slopes[:1], eigenvalues[:1])
    s = offsets(loss0, eigenvalues[1], radius, points) if eigenvalues[1] != 0 else t.clone()
    grid = torch.cartesian_prod(t, s)
    plane = loss_along(loss_at, vectors[:2], grid).reshape(points, points)
    plane_model = quadratic_model(loss0, slopes[:2], eigenvalues[:2], grid).reshape(points, points)
    return Landscape(t, line, line_model, s, plane, plane_model, loss0, slopes[:2], eigenvalues[:2])
