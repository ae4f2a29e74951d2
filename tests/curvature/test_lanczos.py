import math

import pytest
import torch

from chaos_callbacks.curvature import (
    HessianOperator,
    hutchinson_trace,
    lanczos,
    power_iteration,
    spectral_density,
)
from tests.helpers import bn_cnn, ce_closure, exact_hessian, tanh_mlp


def _problem(kind: str):
    g = torch.Generator().manual_seed(3)
    if kind == "bn_cnn":
        model = bn_cnn().double().train()
        x, y = torch.randn(24, 1, 6, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    else:
        model = tanh_mlp().double()
        x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
        if kind == "frozen":
            model[2].bias.requires_grad_(False)
    H = exact_hessian(model, x, y)
    op = HessianOperator(list(model.parameters()), [ce_closure(model, x.double(), y)])
    return op, torch.linalg.eigvalsh(H), H


@pytest.mark.parametrize("kind", ["mlp", "bn_cnn", "frozen"])
def test_lanczos_top_k_and_min_match_dense(kind):
    op, evals, _ = _problem(kind)
    # budget 2n: thick restarts and the deflation check (the index certificate of the top 5) cost more
    # than the n products of an exhaustive unrestarted Lanczos
    res = lanczos(op, op.dim, k=5, tol=1e-6, max_matvecs=2 * op.dim, dtype=torch.float64,
                  generator=torch.Generator().manual_seed(0))
    assert res.converged
    scale = evals.abs().max()
    torch.testing.assert_close(res.eigenvalues, evals.flip(0)[:5], atol=1e-5 * scale, rtol=0)
    assert res.lambda_min == pytest.approx(float(evals[0]), abs=1e-5 * float(scale))
    # Ritz vectors are eigenvectors: H u = θ u
    for theta, u in zip(res.eigenvalues, res.eigenvectors):
        assert torch.linalg.norm(op.matvec(u) - theta * u) < 1e-2 * scale


def test_lanczos_error_bounds_are_honest():
    op, evals, _ = _problem("mlp")
    res = lanczos(op, op.dim, k=3, tol=1e-3, max_matvecs=60, dtype=torch.float64,
                  generator=torch.Generator().manual_seed(1))
    assert res.converged
    err = (res.eigenvalues - evals.flip(0)[:3]).abs()
    assert (err <= res.error_bounds + 1e-12).all()
    assert (err <= 1e-3 * evals.abs().max()).all()


def test_warm_start_needs_fewer_matvecs():
    op, evals, _ = _problem("bn_cnn")
    cold = lanczos(op, op.dim, k=1, want_min=False, tol=1e-4, max_matvecs=100, dtype=torch.float64,
                   generator=torch.Generator().manual_seed(0))
    warm = lanczos(op, op.dim, k=1, want_min=False, tol=1e-4, max_matvecs=100, dtype=torch.float64, init=cold.eigenvectors)
    assert warm.converged and warm.num_matvecs < cold.num_matvecs
    assert float(warm.eigenvalues[0]) == pytest.approx(float(evals[-1]), rel=1e-4)


def test_topk_never_reports_a_negative_not_among_largest():
    # indefinite matrix whose largest-magnitude eigenvalue is negative
    evals = torch.tensor([-10.0, -3.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0)))
    A = Q @ torch.diag(evals) @ Q.T
    res = lanczos(lambda v: A @ v, 8, k=5, tol=1e-8, max_matvecs=8, dtype=torch.float64)
    torch.testing.assert_close(res.eigenvalues, torch.tensor([5.0, 4, 3, 2, 1], dtype=torch.float64))
    assert res.lambda_min == pytest.approx(-10.0)
    power = power_iteration(lambda v: A @ v, 8, tol=1e-10, max_matvecs=500, dtype=torch.float64)
    assert power.eigenvalue == pytest.approx(-10.0, rel=1e-6)  # largest magnitude, not the top


def test_budget_exhaustion_is_reported():
    op, _, _ = _problem("mlp")
    res = lanczos(op, op.dim, k=5, tol=1e-12, max_matvecs=6, dtype=torch.float64)
    assert not res.converged and res.num_matvecs == 6


@pytest.mark.parametrize("deflate", [False, True])
def test_hutchinson_trace_matches_dense(deflate):
    op, evals, H = _problem("mlp")
    kw = {}
    if deflate:
        res = lanczos(op, op.dim, k=5, tol=1e-8, max_matvecs=op.dim, dtype=torch.float64)
        kw = dict(deflate_vectors=res.eigenvectors, deflate_values=res.eigenvalues)
    est = hutchinson_trace(op, op.dim, num_samples=300, dtype=torch.float64,
                           generator=torch.Generator().manual_seed(0), **kw)
    exact = float(torch.trace(H))
    assert abs(est.trace - exact) <= 4 * est.stderr + 1e-9
    # the Rademacher variance is 2 Σ_{i≠j} H_ij²: check the reported stderr is of that size (undeflated)
    if not deflate:
        var = 2 * float((H**2).sum() - (torch.diag(H) ** 2).sum())
        assert est.stderr == pytest.approx(math.sqrt(var / 300), rel=0.3)


def test_deflation_reduces_variance():
    op, _, _ = _problem("bn_cnn")
    res = lanczos(op, op.dim, k=5, tol=1e-8, max_matvecs=op.dim, dtype=torch.float64)
    plain = hutchinson_trace(op, op.dim, num_samples=100, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    defl = hutchinson_trace(op, op.dim, num_samples=100, dtype=torch.float64, generator=torch.Generator().manual_seed(0),
                            deflate_vectors=res.eigenvectors, deflate_values=res.eigenvalues)
    assert defl.stderr < plain.stderr


def test_spectral_density_matches_exact_spectrum():
    op, evals, _ = _problem("mlp")
    n = op.dim
    dens = spectral_density(op, n, num_probes=8, steps=n, grid_size=2000, sigma=0.02, dtype=torch.float64,
                            generator=torch.Generator().manual_seed(0))
    dx = float(dens.grid[1] - dens.grid[0])
    assert float(dens.density.sum()) * dx == pytest.approx(1.0, abs=1e-3)
    # with m = n steps the nodes are the exact eigenvalues; the weights are random (mean 1/n each)
    for lam in (evals[0], evals[-1]):
        assert float((dens.nodes - lam).abs().min()) < 1e-6 * float(evals.abs().max())
    # first moment: Hutchinson-type estimate of the mean eigenvalue, within Monte-Carlo error
    mean = float((dens.nodes * dens.weights).sum())
    assert mean == pytest.approx(float(evals.mean()), abs=0.35 * float(evals.abs().max()) / math.sqrt(8 * n) * 3)


def test_top_k_tolerance_is_relative_to_lambda_max_even_when_lambda_min_dominates():
    evals = torch.tensor([-50.0, -1.0, 0.1, 0.2, 0.3, 0.9, 1.0], dtype=torch.float64)
    Q, _ = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2)))
    A = Q @ torch.diag(evals) @ Q.T
    res = lanczos(lambda v: A @ v, 7, k=1, tol=1e-3, min_tol=1e-2, max_matvecs=7, dtype=torch.float64,
                  generator=torch.Generator().manual_seed(0))
    assert abs(float(res.eigenvalues[0]) - 1.0) <= 1e-3
    assert abs(res.lambda_min + 50.0) <= 1e-2 * 50
