"""The Lyapunov-map estimator of λ_max against exact spectra.

Operators are ``Q diag(λ) Qᵀ`` with a random orthogonal ``Q`` (or the exact dense Hessian of a
small net), so ``λ_max`` is known exactly. The certificate under test: whenever ``converged``,
an eigenvalue lies within ``error_bound ≤ tol · |lambda_max|`` of the estimate, and it is the top
one when the top eigenvalue is isolated; ``lambda_max − error_bound ≤ λ_max`` always.
"""

import math

import pytest
import torch

from chaos_callbacks.curvature import HessianOperator, lyapunov_map_lambda_max
from tests.helpers import ce_closure, exact_hessian, tanh_mlp

SEEDS = range(5)


def conjugated(evals: torch.Tensor, seed: int, dtype: torch.dtype = torch.float64):
    """``v ↦ Q diag(evals) Qᵀ v`` in ``dtype`` for a random orthogonal ``Q``."""
    n = evals.numel()
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    A = (Q @ torch.diag(evals.double()) @ Q.T).to(dtype)
    return lambda v: A @ v


def gap_10_9(n: int = 200, seed: int = 0) -> torch.Tensor:
    """Top gap 10 → 9 above a bulk uniform on [−1, 5] (the filed 'easy' spectrum)."""
    bulk = torch.rand(n - 2, generator=torch.Generator().manual_seed(100 + seed), dtype=torch.float64) * 6 - 1
    return torch.cat([torch.tensor([10.0, 9.0], dtype=torch.float64), bulk])


NEG_50 = torch.tensor([-50.0, -1.0, 0.1, 0.2, 0.3, 0.9, 1.0], dtype=torch.float64)  # the filed negative case


def run(matvec, n, seed, dtype=torch.float64, **kw):
    return lyapunov_map_lambda_max(matvec, n, dtype=dtype, generator=torch.Generator().manual_seed(seed), **kw)


def slack(evals: torch.Tensor, dtype: torch.dtype) -> float:
    """Rounding of the operator itself: ``Q diag Qᵀ`` stored in ``dtype``."""
    return (1e-5 if dtype == torch.float32 else 1e-12) * float(evals.abs().max())


def assert_certified(res, evals: torch.Tensor, tol: float, dtype: torch.dtype) -> None:
    """Converged ⇒ the top eigenvalue lies within ``error_bound ≤ tol · |λ̂|`` of the estimate."""
    lam = float(evals.max())
    assert res.converged
    assert res.error_bound <= tol * abs(res.lambda_max)
    assert abs(res.lambda_max - lam) <= res.error_bound + slack(evals, dtype)
    assert abs(res.lambda_max - lam) <= tol * abs(lam) + slack(evals, dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", SEEDS)
def test_top_gap_10_to_9_converges_within_the_default_budget(seed, dtype):
    # the map's rate with the default η_a is (9 + s)/(10 + s) ≈ 0.91 per product (s = 0.1 ‖H‖)
    evals = gap_10_9(seed=seed)
    res = run(conjugated(evals, seed, dtype), evals.numel(), seed, dtype)  # default tol=1e-3, max_matvecs=100
    assert_certified(res, evals, 1e-3, dtype)
    assert res.num_matvecs <= 100
    assert res.exponent == pytest.approx(math.log1p(res.ascent_lr * res.lambda_max), rel=1e-9)
    assert res.vector.dtype == dtype and float(res.vector.double().norm()) == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("seed", SEEDS)
def test_dominant_negative_eigenvalue_is_reported_unconverged_not_biased(seed, dtype):
    # |λ_min| = 50 forces η_a ≲ 1/50: the map's rate (50 + 0.9)/(50 + 1) ≈ 0.998 cannot reach
    # tol = 1e-3 in 100 products — it must say so, with a bound that shows how far it is
    matvec = conjugated(NEG_50, seed, dtype)
    res = run(matvec, 7, seed, dtype)
    assert not res.converged and res.num_matvecs == 100
    assert res.error_bound > 1e-3 * abs(res.lambda_max)
    assert res.lambda_max - res.error_bound <= 1.0 + slack(NEG_50, dtype)  # never above λ_max beyond the bound
    assert abs(1 - 50 * res.ascent_lr) < 1 + 1.0 * res.ascent_lr  # λ_max's multiplier dominates
    # with the budget its rate needs, it converges to the certified top eigenvalue
    res = run(matvec, 7, seed, dtype, max_matvecs=4000)
    assert_certified(res, NEG_50, 1e-3, dtype)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("tol", [1e-2, 1e-4, 1e-6])
def test_certificate_holds_on_random_indefinite_spectra(seed, tol):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(20, 120, (1,), generator=g))
    top = 1 + 10 * float(torch.rand(1, generator=g, dtype=torch.float64))
    low = -top * float(torch.rand(1, generator=g, dtype=torch.float64)) * 1.5  # |λ_min| up to 1.5 λ_max
    bulk = low + (0.7 * top - low) * torch.rand(n - 1, generator=g, dtype=torch.float64)
    evals = torch.cat([torch.tensor([top], dtype=torch.float64), bulk, torch.tensor([low], dtype=torch.float64)])
    res = run(conjugated(evals, seed), evals.numel(), seed, tol=tol, max_matvecs=400)
    assert_certified(res, evals, tol, torch.float64)


@pytest.mark.parametrize("seed", SEEDS)
def test_too_small_a_budget_is_reported(seed):
    evals = gap_10_9(seed=seed)
    res = run(conjugated(evals, seed), evals.numel(), seed, max_matvecs=8)
    assert not res.converged and res.num_matvecs == 8
    assert res.error_bound > 1e-3 * abs(res.lambda_max)
    assert res.lambda_max - res.error_bound <= 10.0 + 1e-12


@pytest.mark.parametrize("seed", SEEDS)
def test_clustered_top_bound_is_to_an_eigenvalue_and_never_overestimates(seed):
    # a top cluster wider than tol · λ_max: the certified eigenvalue may be a lower member, but one
    # lies within the bound, and the estimate never exceeds λ_max by more than the bound
    cluster = torch.tensor([10.0, 9.99, 9.98, 9.97, 9.96], dtype=torch.float64)
    bulk = 5 * torch.rand(95, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    evals = torch.cat([cluster, bulk])
    for budget in (100, 2000):
        res = run(conjugated(evals, seed), 100, seed, max_matvecs=budget)
        assert float((evals - res.lambda_max).abs().min()) <= res.error_bound + 1e-12
        assert res.lambda_max - res.error_bound <= 10.0 + 1e-12
        if res.converged:
            assert res.error_bound <= 1e-3 * res.lambda_max
            assert abs(res.lambda_max - 10.0) <= 0.04 + res.error_bound  # within the cluster


@pytest.mark.parametrize("seed", SEEDS)
def test_negative_definite_spectrum_gives_the_least_negative_eigenvalue(seed):
    evals = -torch.linspace(1.0, 10.0, 30, dtype=torch.float64)
    evals[1] = -3.0  # top gap −1 → −3
    res = run(conjugated(evals, seed), 30, seed, tol=1e-6, max_matvecs=1000)
    assert_certified(res, evals, 1e-6, torch.float64)


def test_fixed_ascent_rate_with_lambda_max_dominant():
    evals = torch.tensor([-10.0, -3.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    # J = I + 0.1 H has multipliers 0, 0.7, 1.05, 1.1, 1.2: the dominant one belongs to λ_max = 2
    res = run(lambda v: evals * v, 5, 0, ascent_lr=0.1, tol=1e-8, max_matvecs=2000)
    assert_certified(res, evals, 1e-8, torch.float64)
    assert res.ascent_lr == 0.1
    assert res.exponent == pytest.approx(math.log(1.2), rel=1e-6)


def test_fixed_ascent_rate_under_which_a_negative_eigenvalue_dominates_never_converges():
    evals = torch.tensor([-10.0, -3.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    # J = I + H: multipliers −9, −2, 1.5, 2, 3 — power iteration would settle on λ = −10
    res = run(conjugated(evals, 0), 5, 0, ascent_lr=1.0, tol=1e-2, max_matvecs=500)
    assert not res.converged


@pytest.mark.parametrize("seed", SEEDS)
def test_default_ascent_rate_is_not_fooled_by_a_dominant_negative_eigenvalue(seed):
    evals = torch.tensor([-10.0, -3.0, 0.5, 1.0, 2.0], dtype=torch.float64)
    res = run(conjugated(evals, seed), 5, seed, tol=1e-9, max_matvecs=3000)
    assert_certified(res, evals, 1e-9, torch.float64)
    assert abs(1 - 10.0 * res.ascent_lr) < 1 + 2.0 * res.ascent_lr  # λ_max's multiplier dominates


def test_exact_hessian_of_an_mlp():
    g = torch.Generator().manual_seed(3)
    model = tanh_mlp().double()
    x, y = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
    evals = torch.linalg.eigvalsh(exact_hessian(model, x, y))
    op = HessianOperator(list(model.parameters()), [ce_closure(model, x.double(), y)])
    res = run(op, op.dim, 0, tol=1e-6, max_matvecs=2000)
    assert_certified(res, evals, 1e-6, torch.float64)
    assert res.num_matvecs == op.num_matvecs


@pytest.mark.parametrize("seed", SEEDS)
def test_warm_start_from_the_previous_vector_is_cheaper(seed):
    evals = gap_10_9(seed=seed)
    matvec = conjugated(evals, seed)
    cold = run(matvec, evals.numel(), seed, tol=1e-4, max_matvecs=300)
    again = run(matvec, evals.numel(), seed, tol=1e-4, max_matvecs=300, init=cold.vector[None])
    assert again.converged and again.num_matvecs == 1  # the certificate is checked before any step
    nudged = lambda v: matvec(v) + 0.01 * (v.roll(1) + v.roll(-1))  # noqa: E731 — a nearby symmetric operator
    warm = run(nudged, evals.numel(), seed, tol=1e-4, max_matvecs=300, init=cold.vector)
    fresh = run(nudged, evals.numel(), seed + 1, tol=1e-4, max_matvecs=300)
    assert warm.converged and fresh.converged and warm.num_matvecs < fresh.num_matvecs


def test_zero_operator_and_one_dimension():
    res = run(lambda v: 0 * v, 10, 0)
    assert res.converged and res.lambda_max == 0.0 and res.error_bound == 0.0 and res.num_matvecs == 1
    res = run(lambda v: -3.0 * v, 1, 0)
    assert res.converged and res.lambda_max == pytest.approx(-3.0) and res.num_matvecs == 1


@pytest.mark.parametrize(
    "kw",
    [dict(ascent_lr=0.0), dict(ascent_lr=-1.0), dict(ascent_lr=math.inf), dict(ascent_lr=math.nan),
     dict(tol=0.0), dict(tol=1.0), dict(tol=math.nan), dict(max_matvecs=0)],
)
def test_bad_arguments_raise(kw):
    with pytest.raises(ValueError):
        run(lambda v: v, 3, 0, **kw)
