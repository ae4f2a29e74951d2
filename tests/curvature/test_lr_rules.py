import math

import numpy as np
import pytest
import torch

from chaos_callbacks.curvature import HessianOperator, lanczos, principal_flow_coefficients, stability_regime
from chaos_callbacks.curvature.lr_rules import (
    adam_preconditioner,
    adam_threshold,
    clamp_lr,
    coordinate_scaling,
    curvature_problem,
    drift_adjusted_lr,
    edge_of_stability_lr,
    ema,
    quasi_newton_lr,
    scaled_operator,
    sgd_threshold,
)

# Rosca et al. (arXiv 2302.01952), principal-flow example: L(θ) = θᵀAθ, A = diag(1, 0.01), Hessian 2A
A = torch.tensor([1.0, 0.01], dtype=torch.float64)
THETA0 = torch.tensor([-0.35, -0.2], dtype=torch.float64)


def dal_loss(theta: torch.Tensor) -> torch.Tensor:
    return (A * theta**2).sum()


def gradient_descent(h: float, steps: int = 300) -> torch.Tensor:
    """The iterates θ_0 … θ_steps of GD with learning rate h (autograd gradients)."""
    theta, path = THETA0.clone().requires_grad_(), [THETA0.clone()]
    for _ in range(steps):
        (g,) = torch.autograd.grad(dal_loss(theta), theta)
        theta = (theta - h * g).detach().requires_grad_()
        path.append(theta.detach().clone())
    return torch.stack(path)


def test_lanczos_lambda_max_of_the_dal_example_is_two():
    theta = THETA0.clone().requires_grad_()
    op = HessianOperator([theta], [lambda: dal_loss(theta)])
    res = lanczos(op, op.dim, k=1, tol=1e-10, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    assert res.converged and float(res.eigenvalues[0]) == pytest.approx(2.0, rel=1e-14)
    assert res.lambda_min == pytest.approx(0.02, rel=1e-12)
    # a warm start on the exact top eigenvector is an invariant subspace: still certified
    warm = lanczos(op, op.dim, k=1, want_min=False, tol=1e-10, init=res.eigenvectors, dtype=torch.float64,
                   generator=torch.Generator().manual_seed(1))
    assert warm.converged and warm.num_matvecs == 2 and float(warm.eigenvalues[0]) == pytest.approx(2.0, rel=1e-14)


@pytest.mark.parametrize(
    "h, regime",
    [(0.5, "monotone"), (0.9, "oscillating"), (1.05, "divergent")],
)
def test_principal_flow_thresholds_of_the_dal_example(h, regime):
    lam_max = 2.0  # of the Hessian 2A
    assert stability_regime(lam_max, h) == regime
    assert stability_regime(0.02, h) == "monotone"  # the flat direction is always monotone here
    path = gradient_descent(h)
    stiff, flat = path[:, 0], path[:, 1]
    losses = torch.stack([dal_loss(t) for t in path])
    assert bool((flat.diff() > 0).all())  # the flat direction creeps monotonically towards 0
    if regime == "monotone":  # h·λ_max = 1: the stiff coordinate reaches 0 in one step
        assert stiff[1] == 0 and bool((losses.diff() <= 0).all()) and losses[-1] < 1e-3 * losses[0]
    elif regime == "oscillating":  # 1 − hλ = −0.8: the stiff coordinate flips sign and shrinks
        assert bool((stiff[1:40] * stiff[:39] < 0).all()) and abs(stiff[-1]) < 1e-20 and losses[-1] < 1e-3 * losses[0]
    else:  # |1 − hλ| = 1.1 > 1: it flips sign and grows
        assert bool((stiff[1:40] * stiff[:39] < 0).all()) and abs(stiff[-1]) > 1e10 and losses[-1] > 1e20
    # principal flow: ln(1 − hλ)/(hλ) is complex past hλ = 1 and its real part turns positive past hλ = 2
    if regime != "monotone":  # (at hλ = 1 exactly the coefficient is ln 0)
        coeff = principal_flow_coefficients(np.array([lam_max]), h)[0]
        assert coeff.imag != 0 and (coeff.real < 0) == (regime == "oscillating")


def test_lr_rules_exact_values():
    assert quasi_newton_lr(4.0) == 0.25 and quasi_newton_lr(4.0, scale=0.5) == 0.125
    assert edge_of_stability_lr(4.0, fraction=0.5) == 0.25
    assert edge_of_stability_lr(2.0, fraction=1.0, threshold=3.8) == 1.9
    assert drift_adjusted_lr(2.0) == 1.0  # L = w²: Hessian 2, v = 2
    assert drift_adjusted_lr(4.0, power=0.5) == 1.0 and drift_adjusted_lr(4.0, power=0.0) == 2.0
    assert drift_adjusted_lr(0.5, max_lr=3.0) == 3.0
    assert clamp_lr(0.5, 0.1, 0.3) == 0.3 and clamp_lr(0.05, 0.1, 0.3) == 0.1 and clamp_lr(7.0) == 7.0
    assert clamp_lr(math.inf, 0.0, 2.0) == 2.0


def test_ema_starts_at_the_first_value():
    s = None
    for value, expected in [(2.0, 2.0), (4.0, 3.0), (8.0, 5.5)]:
        s = ema(s, value, 0.5)
        assert s == expected
    assert ema(3.0, 9.0, 0.0) == 9.0


def test_curvature_problems():
    assert curvature_problem(1e-3) is None
    assert curvature_problem(None) == "zero gradient"
    assert curvature_problem(0.0) == curvature_problem(-2.0) == "non-positive curvature"
    assert curvature_problem(math.nan) == curvature_problem(math.inf) == "non-finite curvature"


@pytest.mark.parametrize(
    "kwargs, tau",
    [
        (dict(), 2.0),
        (dict(momentum=0.9), 3.8),
        (dict(momentum=0.9, dampening=0.5), 7.6),
        (dict(momentum=0.9, nesterov=True), 3.8 / 2.8),
        (dict(momentum=0.5, nesterov=True), 1.5),
    ],
)
def test_sgd_threshold_against_torch_sgd(kwargs, tau):
    assert sgd_threshold(**kwargs) == pytest.approx(tau, rel=1e-15)

    def final_distance(lr: float) -> float:
        w = torch.nn.Parameter(torch.ones(1, dtype=torch.float64))
        opt = torch.optim.SGD([w], lr=lr, **kwargs)
        for _ in range(400):
            opt.zero_grad()
            (0.5 * w**2).sum().backward()  # λ = 1
            opt.step()
        return abs(float(w.detach()))

    assert final_distance(0.97 * tau) < 1e-6
    assert final_distance(1.03 * tau) > 1e6


def test_sgd_threshold_with_full_dampening_is_refused():
    with pytest.raises(ValueError):
        sgd_threshold(momentum=0.9, dampening=1.0)


@pytest.mark.parametrize("beta1", [0.0, 0.5, 0.9])
def test_adam_threshold_is_the_stability_edge_of_ema_momentum(beta1):
    tau = adam_threshold(beta1)
    assert tau == pytest.approx((2 + 2 * beta1) / (1 - beta1), rel=1e-15)
    # m ← β₁m + (1 − β₁)λθ, θ ← θ − ηm with λ = 1: the iteration matrix has spectral radius 1 at ηλ = τ
    for x, stable in [(0.97 * tau, True), (1.03 * tau, False)]:
        M = torch.tensor([[1 - x * (1 - beta1), -x * beta1], [1 - beta1, beta1]], dtype=torch.float64)
        assert (float(torch.linalg.eigvals(M).abs().max()) < 1) == stable
    M = torch.tensor([[1 - tau * (1 - beta1), -tau * beta1], [1 - beta1, beta1]], dtype=torch.float64)
    assert float(torch.linalg.eigvals(M).abs().max()) == pytest.approx(1.0, rel=1e-9)


def test_adam_preconditioner_is_the_one_torch_adam_steps_with():
    # constant gradient c: v̂_t = c² for every t, so the preconditioner of step t + 1 is exact
    c = torch.tensor([0.3, -2.0, 5.0], dtype=torch.float64)
    w = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    beta1, beta2, eps, lr = 0.8, 0.95, 1e-3, 0.01
    opt = torch.optim.Adam([w], lr=lr, betas=(beta1, beta2), eps=eps)
    for t in range(6):
        opt.zero_grad()
        (c * w).sum().backward()
        before = w.detach().clone()
        P = adam_preconditioner(opt.state[w]["exp_avg_sq"], t, beta1, beta2, eps) if t else None
        opt.step()
        if P is not None:  # θ ← θ − η P⁻¹ m
            torch.testing.assert_close(w.detach() - before, -lr * opt.state[w]["exp_avg"] / P, rtol=1e-12, atol=0)
    with pytest.raises(ValueError):
        adam_preconditioner(torch.ones(3), 0, beta1, beta2, eps)


def test_scaled_operator_has_the_spectrum_of_the_preconditioned_hessian():
    g = torch.Generator().manual_seed(0)
    B = torch.randn(6, 6, generator=g, dtype=torch.float64)
    H = B + B.T
    scale = torch.rand(6, generator=g, dtype=torch.float64) + 0.1
    op = scaled_operator(lambda v: H @ v, scale)
    u, v = torch.randn(6, generator=g, dtype=torch.float64), torch.randn(6, generator=g, dtype=torch.float64)
    assert float(u @ op(v)) == pytest.approx(float(v @ op(u)), rel=1e-12)  # symmetric
    expected = torch.linalg.eigvals(torch.diag(scale**2) @ H).real.sort().values
    dense = torch.stack([op(e) for e in torch.eye(6, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(torch.linalg.eigvalsh(dense), expected, rtol=0, atol=1e-12)


def test_coordinate_scaling():
    params = [torch.zeros(2, dtype=torch.float32), torch.zeros(1, dtype=torch.float32)]
    s = coordinate_scaling(params, [0.25, 1.0], [None, torch.tensor([4.0])])
    assert s.dtype == torch.float32 and s.tolist() == [0.5, 0.5, 0.5]
    assert coordinate_scaling(params, [0.0, 1.0], [None, None]).tolist() == [0.0, 0.0, 1.0]
