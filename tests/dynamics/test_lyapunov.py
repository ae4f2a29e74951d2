"""Lyapunov bookkeeping against closed forms: linear SGD maps on quadratics and a conjugate chaotic map."""

import math

import numpy as np
import pytest
import torch

from chaos_callbacks.dynamics.lyapunov import (
    BenettinAccumulator,
    DecimatedCurve,
    LocalExponentFit,
    TangentAccumulator,
    default_epsilon,
    local_exponent,
    parameter_distance,
    parameter_norm,
    random_perturbation,
    renormalize_,
    rounding_floor,
    tangent_sgd_step,
    unit_roundoff,
)

# Hessian spectrum of the least-squares problem; the parameters are two tensors, shapes (2, 2) and (2,).
LAMBDAS = np.array([0.3, 0.6, 0.9, 1.2, 1.5, 2.2])
SHAPES = [(2, 2), (2,)]


def _flat(ps):
    return torch.cat([p.reshape(-1) for p in ps])


def _split(vec):
    return [c.reshape(s) for c, s in zip(torch.split(vec, [math.prod(s) for s in SHAPES]), SHAPES)]


class LeastSquares:
    """L(w) = ½‖Aw − b‖² with A = U diag(√λ) Vᵀ, so H = AᵀA = V diag(λ) Vᵀ; b = A w*."""

    def __init__(self, dtype=torch.float64, seed=0):
        rng = np.random.default_rng(seed)
        n = len(LAMBDAS)
        U, _ = np.linalg.qr(rng.standard_normal((n, n)))
        V, _ = np.linalg.qr(rng.standard_normal((n, n)))
        self.H = torch.tensor(V @ np.diag(LAMBDAS) @ V.T)
        self.A = torch.tensor(U @ np.diag(np.sqrt(LAMBDAS)) @ V.T, dtype=dtype)
        w_star = torch.tensor(rng.standard_normal(n), dtype=dtype)
        self.b = self.A @ w_star
        # start off the minimum along the λ = 0.9 eigenvector, a direction every map below contracts
        self.w0 = w_star + 0.1 * torch.tensor(V[:, 2], dtype=dtype)

    def loss(self, ps):
        r = self.A @ _flat(ps) - self.b
        return 0.5 * (r @ r)

    def hvp(self, v):
        return _split(self.H @ _flat(v).double())


def _sgd_step(ps, opt, loss):
    opt.zero_grad()
    loss(ps).backward()
    opt.step()


def _twin_run(loss, w0, delta, *, steps, k, eps, norm, sgd):
    """Main and twin trained by torch.optim.SGD, twin renormalised every k steps (momentum buffers too).

    Returns the accumulator and the finite-time exponents of the intervals.
    """
    main = [p.clone().requires_grad_() for p in _split(w0)]
    twin = [(p + d).detach().requires_grad_() for p, d in zip(main, delta)]
    opt_main, opt_twin = torch.optim.SGD(main, **sgd), torch.optim.SGD(twin, **sgd)
    acc, interval_exponents = BenettinAccumulator(), []
    for step in range(1, steps + 1):
        _sgd_step(main, opt_main, loss)
        _sgd_step(twin, opt_twin, loss)
        assert _flat(main).abs().max() < 10  # the main run stays bounded
        if step % k == 0:
            bufs = [
                [opt.state[p]["momentum_buffer"] for p in ps] if sgd.get("momentum", 0) else []
                for opt, ps in ((opt_twin, twin), (opt_main, main))
            ]
            d = renormalize_(twin, main, eps, norm, twin_state=bufs[0], main_state=bufs[1])
            interval_exponents.append(acc.update(d, eps, k))
    return acc, interval_exponents


def _tangent_run(hvp, v0, *, steps, norm, sgd):
    tan = TangentAccumulator(v0, norm)
    exponents = [tan.step(hvp, **sgd) for _ in range(steps)]
    return tan, exponents


def _momentum_matrix(lam, lr, momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False):
    """Jacobian of one SGD step on the eigenmode λ, acting on (δθ, δbuf) after the first step."""
    g, mu, c = lam + weight_decay, momentum, 1 - dampening
    if nesterov:
        return np.array([[1 - lr * g * (1 + mu * c), -lr * mu * mu], [c * g, mu]])
    return np.array([[1 - lr * c * g, -lr * mu], [c * g, mu]])


def _spectral_exponent(sgd):
    """ln max_i ρ(M(λ_i)); for μ = 0 this is max_i ln|1 − η(λ_i + wd)| (Sasdelli et al.)."""
    return math.log(max(np.abs(np.linalg.eigvals(_momentum_matrix(lam, **sgd))).max() for lam in LAMBDAS))


# --------------------------------------------------------------------------- full-batch GD, quadratic

def _finite_time_exponent(problem, lr, delta, steps, norm):
    """(1/T) ln(‖M^T δ‖/‖δ‖) with M = I − ηH: what any renormalisation schedule must sum to."""
    M = torch.eye(len(LAMBDAS), dtype=torch.float64) - lr * problem.H
    start = _flat(delta).double()
    end = torch.linalg.matrix_power(M, steps) @ start
    order = 2 if norm == "l2" else 1
    return math.log(torch.linalg.vector_norm(end, order) / torch.linalg.vector_norm(start, order)) / steps


# (lr, burn-in steps, total steps): 0.5 is stable, max|1 − ηλ| = 0.85; 1.0 is unstable, 1.2.
GD_CASES = [(0.5, 60, 120), (1.0, 30, 60)]


@pytest.mark.parametrize("lr,burn,steps", GD_CASES)
@pytest.mark.parametrize("norm", ["l2", "l1"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_gd_twin_exponent_is_max_log_one_minus_lr_lambda(lr, burn, steps, norm, dtype):
    problem = LeastSquares(dtype)
    eps, k = default_epsilon(dtype), 5
    exact = max(math.log(abs(1 - lr * lam)) for lam in LAMBDAS)
    assert exact == pytest.approx(math.log(0.85) if lr == 0.5 else math.log(1.2), abs=1e-12)
    delta = random_perturbation(_split(problem.w0), eps, norm, torch.Generator().manual_seed(1))
    acc, exps = _twin_run(problem.loss, problem.w0, delta, steps=steps, k=k, eps=eps, norm=norm, sgd={"lr": lr})
    assert acc.steps == steps and acc.intervals == steps // k
    after_burn_in = float(np.mean(exps[burn // k :]))
    tol = 1e-7 if dtype == torch.float64 else 2e-3
    assert after_burn_in == pytest.approx(exact, abs=tol)
    # whole run, transient included: the finite-time exponent of the linear map
    assert acc.mle == pytest.approx(_finite_time_exponent(problem, lr, delta, steps, norm), abs=tol)


@pytest.mark.parametrize("lr,burn,steps", GD_CASES)
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_gd_tangent_matches_spectrum_and_twin(lr, burn, steps, norm):
    problem = LeastSquares()
    exact = _spectral_exponent({"lr": lr})
    delta = random_perturbation(_split(problem.w0), 1e-8, norm, torch.Generator().manual_seed(2))
    tan, exps = _tangent_run(problem.hvp, delta, steps=steps, norm=norm, sgd={"lr": lr})
    assert float(np.mean(exps[burn:])) == pytest.approx(exact, abs=1e-7)
    # Linear map: the Benettin sum telescopes, so twin (renormalised every 5 steps) and tangent
    # (every step) from the same direction agree over the whole run, transient included.
    acc, _ = _twin_run(problem.loss, problem.w0, delta, steps=steps, k=5, eps=1e-8, norm=norm, sgd={"lr": lr})
    assert acc.mle == pytest.approx(tan.mle, abs=1e-7)
    assert tan.mle == pytest.approx(_finite_time_exponent(problem, lr, delta, steps, norm), abs=1e-12)


# --------------------------------------------------------------------------- momentum, quadratic

MOMENTUM_CASES = [
    # sgd kwargs, burn-in, total; each has a real dominant multiplier, well separated
    ({"lr": 0.5, "momentum": 0.25}, 60, 120),
    ({"lr": 1.5, "momentum": 0.5}, 30, 50),  # unstable: ηλ_max = 3.3 > 2(1 + μ)
    ({"lr": 0.4, "momentum": 0.25, "nesterov": True}, 80, 140),
    ({"lr": 0.4, "momentum": 0.3, "weight_decay": 0.01, "dampening": 0.1}, 60, 120),
]


@pytest.mark.parametrize("sgd,burn,steps", MOMENTUM_CASES)
def test_momentum_exponent_is_log_spectral_radius_of_companion(sgd, burn, steps):
    problem = LeastSquares()
    exact = _spectral_exponent(sgd)
    mu = sgd["momentum"]
    if mu == 0.25 and sgd["lr"] == 0.5:  # hand check: z² − (1 + μ − ηλ)z + μ = 0 at λ = 0.3
        assert exact == pytest.approx(math.log((1.1 + math.sqrt(1.1**2 - 1)) / 2), abs=1e-12)
    delta = random_perturbation(_split(problem.w0), 1e-8, "l2", torch.Generator().manual_seed(3))
    tan, exps = _tangent_run(problem.hvp, delta, steps=steps, norm="l2", sgd=sgd)
    assert float(np.mean(exps[burn:])) == pytest.approx(exact, abs=1e-7)
    acc, twin_exps = _twin_run(problem.loss, problem.w0, delta, steps=steps, k=5, eps=1e-8, norm="l2", sgd=sgd)
    assert float(np.mean(twin_exps[burn // 5 :])) == pytest.approx(exact, abs=1e-6)
    assert acc.mle == pytest.approx(tan.mle, abs=1e-7)


@pytest.mark.parametrize(
    "sgd",
    [
        {"lr": 0.3},
        {"lr": 0.3, "weight_decay": 0.1},
        {"lr": 0.3, "momentum": 0.9},
        {"lr": 0.3, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.05},
        {"lr": 0.3, "momentum": 0.7, "nesterov": True, "weight_decay": 0.05},
    ],
)
def test_tangent_step_is_the_exact_difference_of_torch_sgd_on_a_quadratic(sgd):
    """SGD on a quadratic is affine in (θ, buf): two runs differ by exactly the tangent iterate."""
    problem = LeastSquares()
    v = _split(torch.linspace(-1.0, 1.0, len(LAMBDAS), dtype=torch.float64))
    a = [p.clone().requires_grad_() for p in _split(problem.w0)]
    b = [(p + x).detach().requires_grad_() for p, x in zip(a, v)]
    opt_a, opt_b = torch.optim.SGD(a, **sgd), torch.optim.SGD(b, **sgd)
    sgd_args = {key: sgd.get(key, 0.0) for key in ("momentum", "weight_decay", "dampening")}
    w = None
    for _ in range(4):
        nesterov = sgd.get("nesterov", False)
        v, w = tangent_sgd_step(v, problem.hvp, sgd["lr"], momentum_v=w, nesterov=nesterov, **sgd_args)
        _sgd_step(a, opt_a, problem.loss)
        _sgd_step(b, opt_b, problem.loss)
        torch.testing.assert_close(_flat(b) - _flat(a), _flat(v), rtol=0, atol=1e-13)
        if w is None:
            assert sgd_args["momentum"] == 0
        else:
            bufs = [_flat([opt.state[p]["momentum_buffer"] for p in ps]) for opt, ps in ((opt_b, b), (opt_a, a))]
            torch.testing.assert_close(bufs[0] - bufs[1], _flat(w), rtol=0, atol=1e-13)


def test_tangent_heavy_ball_by_hand():
    """λ = 2, η = 0.1, μ = 0.9, v = 1: buf = 2, v = 0.8; then buf = 0.9·2 + 1.6 = 3.4, v = 0.46."""
    hvp = lambda v: [2.0 * v[0]]  # noqa: E731
    v, w = tangent_sgd_step([torch.tensor(1.0, dtype=torch.float64)], hvp, 0.1, momentum=0.9)
    assert (v[0].item(), w[0].item()) == pytest.approx((0.8, 2.0), abs=1e-15)
    v, w = tangent_sgd_step(v, hvp, 0.1, momentum=0.9, momentum_v=w)
    assert (v[0].item(), w[0].item()) == pytest.approx((0.46, 3.4), abs=1e-15)


# --------------------------------------------------------------------------- chaos: 1-D double well


def test_double_well_gd_is_chaotic_with_exponent_ln3():
    """f(w) = w⁴/4 − w²/2, η = 2: the GD map φ(w) = w − ηf'(w) = 3w − 2w³ is conjugate to the
    Chebyshev map (w = √2 cos x, x ← π − 3x), so [−√2, √2] is invariant and the polynomial identity
    |φ'(w)|·√(1 − w²/2) = 3·√(1 − φ(w)²/2) holds exactly, with φ'(w) = 1 − η f''(w) = 3 − 6w².
    The orbit average of ln|1 − η f''(w_t)| therefore telescopes:
        (1/T) Σ ln|1 − η(3w_t² − 1)| = ln 3 + ln[(1 − w_T²/2)/(1 − w_0²/2)] / (2T).
    """
    lr, steps, k, eps = 2.0, 1000, 5, 1e-8

    def loss(ps):
        return (ps[0] ** 4 / 4 - ps[0] ** 2 / 2).sum()

    main = [torch.tensor([0.3], dtype=torch.float64, requires_grad=True)]
    delta = random_perturbation(main, eps, "l2", torch.Generator().manual_seed(4))
    twin = [(main[0] + delta[0]).detach().requires_grad_()]
    opt_main, opt_twin = torch.optim.SGD(main, lr=lr), torch.optim.SGD(twin, lr=lr)
    tangent, twin_acc = TangentAccumulator([torch.ones(1, dtype=torch.float64)], "l2"), BenettinAccumulator()

    def hvp(v):  # Hessian of the loss at the main run's current weights, by double backward
        (g,) = torch.autograd.grad(loss(main), main, create_graph=True)
        return list(torch.autograd.grad(g, main, grad_outputs=v))

    orbit = []
    for step in range(1, steps + 1):
        orbit.append(main[0].item())
        tangent.step(hvp, lr)
        _sgd_step(main, opt_main, loss)
        _sgd_step(twin, opt_twin, loss)
        if step % k == 0:
            twin_acc.update(renormalize_(twin, main, eps, "l2"), eps, k)
    w = np.array(orbit + [main[0].item()])
    assert np.abs(w).max() <= math.sqrt(2) + 1e-12  # bounded orbit
    orbit_average = float(np.mean(np.log(np.abs(1 - lr * (3 * w[:-1] ** 2 - 1)))))
    closed_form = math.log(3) + math.log((1 - w[-1] ** 2 / 2) / (1 - w[0] ** 2 / 2)) / (2 * steps)
    assert orbit_average == pytest.approx(closed_form, abs=1e-9)
    assert orbit_average == pytest.approx(math.log(3), rel=0.02)  # positive: chaotic
    assert tangent.mle == pytest.approx(orbit_average, abs=1e-10)
    # finite ε: the twin is not the tangent where the orbit passes near φ'(w) = 0 (w = ±1/√2)
    assert twin_acc.mle == pytest.approx(orbit_average, rel=1e-2)


# --------------------------------------------------------------------------- local exponent fits

T = np.arange(100.0)


def test_local_exponent_stops_before_a_sharp_plateau():
    log_d = math.log(1e-8) + 0.3 * np.minimum(T, 60)  # exponential phase until t = 60, then flat
    fit = local_exponent(log_d)
    assert fit.saturated and fit.start == 0
    # hinge found at t = 60 exactly; the fit ends one decade (ln 10 / 0.3 = 7.7 steps) earlier
    assert fit.stop == 53
    assert fit.slope == pytest.approx(0.3, abs=1e-12)
    assert fit.intercept == pytest.approx(math.log(1e-8), abs=1e-10)


def test_local_exponent_on_noisy_logistic_saturation():
    """d = ε e^{0.3t} / (1 + ε e^{0.3t}): smooth knee at t = ln(1/ε)/0.3 = 61.4, plus noise."""
    clean = math.log(1e-8) + 0.3 * T - np.log1p(1e-8 * np.exp(0.3 * T))
    for seed in range(3):
        fit = local_exponent(clean + 0.1 * np.random.default_rng(seed).standard_normal(T.size))
        assert fit.saturated
        assert fit.slope == pytest.approx(0.3, abs=0.01)
        assert 50 <= fit.stop <= 62


def test_local_exponent_decay_fits_whole_range_and_uses_steps():
    fit = local_exponent(-0.2 * T)
    assert fit == LocalExponentFit(pytest.approx(-0.2, abs=1e-14), pytest.approx(0.0, abs=1e-12), 0, 100, False)
    noisy = -0.2 * T + 0.3 * np.random.default_rng(0).standard_normal(T.size)
    assert not local_exponent(noisy).saturated
    # samples every 10 optimizer steps: slope per step, not per sample
    assert local_exponent(-0.2 * T, steps=10 * T).slope == pytest.approx(-0.02, abs=1e-15)


def test_local_exponent_skips_transient_and_detects_a_floor():
    log_d = np.maximum(-0.2 * T, -12.0)  # decay stalls on a rounding floor at t = 60
    fit = local_exponent(log_d)
    assert fit.saturated and fit.stop == 49 and fit.slope == pytest.approx(-0.2, abs=1e-12)
    transient = np.concatenate([np.linspace(0.0, -3.0, 10), -3.0 + 0.3 * np.arange(1.0, 91.0)])
    transient = np.minimum(transient, 15.0)  # alignment dip, growth, plateau from t = 69
    fit = local_exponent(transient, start=10)
    assert fit.start == 10 and fit.saturated
    assert fit.slope == pytest.approx(0.3, abs=1e-12)


# --------------------------------------------------------------------------- bookkeeping pieces


def test_default_epsilon_survives_its_dtype():
    assert default_epsilon(torch.float64) == 1e-8 and default_epsilon(torch.float32) == 1e-4
    assert default_epsilon(torch.bfloat16) == 1e-1
    assert default_epsilon(torch.float32, 0.0) == default_epsilon(torch.float32, 0.5) == 1e-4  # floor: norm 1
    assert default_epsilon(torch.float64, 3e10) == pytest.approx(300.0, rel=1e-15)
    one = torch.ones((), dtype=torch.float32)
    assert one + 1e-8 == one  # the paper's ε is erased in float32 ...
    assert (one + default_epsilon(torch.float32) / math.sqrt(1e4)) != one  # ... 1e-4 over 10⁴ weights is not
    for dtype in (torch.float16, torch.int64):
        with pytest.raises(ValueError, match="float64, torch.float32 and torch.bfloat16"):
            default_epsilon(dtype)
    for bad in (-1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="weight_norm"):
            default_epsilon(torch.float32, bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("scale", [1e-3, 1.0, 1e5, 1e10, 1e30])
@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_default_epsilon_is_resolved_at_any_weight_scale(dtype, scale, norm):
    """‖fl(θ + δ) − θ‖ = ‖δ‖ to within the predicted rounding u·‖θ‖/ε ≤ √u-ish, for weights from 1e-3 to 1e30."""
    g = torch.Generator().manual_seed(0)
    theta = [scale * torch.randn(50, 20, generator=g, dtype=torch.float64).to(dtype), scale * torch.randn(20, generator=g).to(dtype)]
    eps = default_epsilon(dtype, parameter_norm(theta, norm))
    delta = random_perturbation(theta, eps, norm, torch.Generator().manual_seed(1))
    twin = [t + d for t, d in zip(theta, delta)]
    realised = float(parameter_distance(twin, theta, norm))
    predicted = rounding_floor(theta, norm) / eps
    assert predicted <= 2.5 * math.sqrt(unit_roundoff(dtype))
    assert realised == pytest.approx(eps, rel=predicted + 4 * unit_roundoff(dtype))
    # an absolute ε of the same size at scale 1 is erased (or blurred) at large scales
    if scale >= 1e10:
        absolute = [t + d for t, d in zip(theta, random_perturbation(theta, default_epsilon(dtype), norm, torch.Generator().manual_seed(1)))]
        assert abs(float(parameter_distance(absolute, theta, norm)) - default_epsilon(dtype)) > 0.5 * default_epsilon(dtype)


def test_rounding_floor_and_parameter_norm():
    theta = [torch.tensor([3.0, -4.0]), torch.tensor([[12.0]], dtype=torch.float64)]
    assert parameter_norm(theta, "l2") == 13.0 and parameter_norm(theta, "l1") == 19.0
    assert rounding_floor(theta, "l2") == 13.0 * 2.0**-24  # the widest rounding among the dtypes: float32
    assert rounding_floor(theta, "l1", torch.bfloat16) == 19.0 * 2.0**-8
    assert unit_roundoff(torch.float64) == 2.0**-53


def test_decimated_curve_keeps_a_bounded_evenly_spaced_subsample():
    curve = DecimatedCurve(max_points=8)
    for i in range(100):
        curve.append(i, 2.0 * i)
        assert len(curve.t) <= 8
    t, y = curve.points()
    assert curve.stride == 16 and t == [0, 16, 32, 48, 64, 80, 96, 99] and y == [2.0 * x for x in t]
    copy = DecimatedCurve(max_points=8)
    copy.load_state_dict(curve.state_dict())
    for c in (curve, copy):
        c.append(100, 200.0)
    assert copy.points() == curve.points()
    curve.clear()
    assert curve.points() == ([], []) and len(curve) == 0
    with pytest.raises(ValueError, match="max_points"):
        DecimatedCurve(max_points=3)


def test_parameter_distance_is_exact_on_tiny_differences():
    a = [torch.tensor([2.0**14 + 2.0**-9, -3.0]), torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float64)]
    b = [torch.tensor([2.0**14, 1.0]), torch.tensor([[1.0, 2.0], [0.0, 4.0]], dtype=torch.float64)]
    d1, d2 = parameter_distance(a, b, "l1"), parameter_distance(a, b, "l2")
    assert d1.dtype == d2.dtype == torch.float64 and d1.ndim == 0
    assert d1.item() == 2.0**-9 + 4.0 + 3.0
    assert d2.item() == pytest.approx(math.sqrt(2.0**-18 + 16.0 + 9.0), rel=1e-15)


def test_parameter_distance_rounds_each_difference_once():
    """Far-apart float32 entries: one correctly rounded subtraction (relative error ≤ 2⁻²⁴); float16
    entries are promoted to float32, where their difference is exact."""
    a, b = [torch.tensor([1.0 + 2.0**-23])], [torch.tensor([-(2.0**-30)])]
    exact = 1.0 + 2.0**-23 + 2.0**-30
    assert parameter_distance(a, b, "l1").item() == pytest.approx(exact, rel=2.0**-24)
    half = parameter_distance([torch.tensor([1.0], dtype=torch.float16)], [torch.tensor([2.0**-14], dtype=torch.float16)], "l2")
    assert half.item() == 1.0 - 2.0**-14  # rounds to 1.0 in float16


@pytest.mark.parametrize("norm", ["l2", "l1"])
def test_random_perturbation_norm_determinism_and_global_rng(norm):
    params = [torch.zeros(3, 4, dtype=torch.float64), torch.zeros(5), torch.zeros(2, dtype=torch.float64)]
    state = torch.random.get_rng_state()
    delta = random_perturbation(params, 1e-3, norm, torch.Generator().manual_seed(7))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert [(x.shape, x.dtype) for x in delta] == [(p.shape, p.dtype) for p in params]
    assert parameter_distance(delta, params, norm).item() == pytest.approx(1e-3, rel=1e-7)  # float32 part rounds
    again = random_perturbation(params, 1e-3, norm, torch.Generator().manual_seed(7))
    other = random_perturbation(params, 1e-3, norm, torch.Generator().manual_seed(8))
    assert all(torch.equal(x, y) for x, y in zip(delta, again))
    assert not torch.equal(delta[0], other[0])
    pure = random_perturbation([torch.zeros(50, dtype=torch.float64)], 0.5, norm, torch.Generator().manual_seed(7))
    assert parameter_distance(pure, [torch.zeros(50)], norm).item() == pytest.approx(0.5, rel=1e-15)


def test_renormalize_rescales_parameters_and_state_by_the_same_factor():
    main = [torch.tensor([1.0, 2.0], dtype=torch.float64), torch.tensor([3.0], dtype=torch.float64)]
    # δ = twin − main = (0.3, 0, −0.4), d = 0.5
    twin = [torch.tensor([1.3, 2.0], dtype=torch.float64), torch.tensor([2.6], dtype=torch.float64)]
    main_buf, twin_buf = [torch.tensor([5.0])], [torch.tensor([7.0])]
    d = renormalize_(twin, main, 1e-2, "l2", twin_state=twin_buf, main_state=main_buf)
    assert d.item() == pytest.approx(0.5, rel=1e-15)
    assert parameter_distance(twin, main, "l2").item() == pytest.approx(1e-2, rel=1e-14)
    torch.testing.assert_close(_flat(twin) - _flat(main), torch.tensor([0.006, 0.0, -0.008], dtype=torch.float64))
    assert twin_buf[0].item() == pytest.approx(5.0 + 2.0 * 0.02, rel=1e-7)
    with pytest.raises(ValueError, match="cannot rescale a separation d = 0"):
        renormalize_(main, [m.clone() for m in main], 1e-2, "l2")


def test_benettin_accumulator_bookkeeping_and_state_round_trip():
    updates = [(0.5, 0.1, 5), (0.4, 0.1, 5), (2e-3, 1e-3, 3), (1e-3, 1e-3, 1)]
    acc = BenettinAccumulator()
    assert math.isnan(acc.mle)
    assert acc.update(*updates[0]) == pytest.approx(math.log(5) / 5, rel=1e-15)
    acc.update(*updates[1])
    resumed = BenettinAccumulator()
    resumed.load_state_dict(acc.state_dict())
    for u in updates[2:]:
        assert resumed.update(*u) == acc.update(*u)
    assert resumed.state_dict() == acc.state_dict()
    assert acc.mle == pytest.approx((math.log(5) + math.log(4) + math.log(2)) / 14, rel=1e-15)
    assert (acc.steps, acc.intervals) == (14, 4)
    with pytest.raises(ValueError, match="missing"):
        acc.load_state_dict({"steps": 1})


def test_tangent_accumulator_state_round_trip_continues_identically():
    problem = LeastSquares()
    sgd = {"lr": 0.5, "momentum": 0.25}
    ref, _ = _tangent_run(problem.hvp, _split(problem.w0), steps=20, norm="l1", sgd=sgd)
    first, _ = _tangent_run(problem.hvp, _split(problem.w0), steps=10, norm="l1", sgd=sgd)
    resumed = TangentAccumulator([torch.ones(s, dtype=torch.float64) for s in SHAPES], "l1")
    resumed.load_state_dict(first.state_dict())
    for _ in range(10):
        resumed.step(problem.hvp, **sgd)
    assert resumed.mle == ref.mle
    assert all(torch.equal(x, y) for x, y in zip(resumed.v, ref.v))
    assert all(torch.equal(x, y) for x, y in zip(resumed.momentum_v, ref.momentum_v))


def test_invalid_arguments_say_what_is_allowed():
    p = [torch.zeros(3, dtype=torch.float64)]
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="'l2' or 'l1'"):
        parameter_distance(p, p, "linf")
    with pytest.raises(ValueError, match="same number of tensors"):
        parameter_distance(p, p + p, "l2")
    with pytest.raises(ValueError, match="shape"):
        parameter_distance(p, [torch.zeros(4)], "l2")
    with pytest.raises(ValueError, match="eps must be a finite number > 0"):
        random_perturbation(p, 0.0, "l2", g)
    with pytest.raises(ValueError, match="torch.Generator"):
        random_perturbation(p, 1e-8, "l2", None)
    with pytest.raises(ValueError, match="non-floating"):
        random_perturbation([torch.zeros(3, dtype=torch.int64)], 1e-8, "l2", g)
    acc = BenettinAccumulator()
    with pytest.raises(ValueError, match="distance must be a finite number > 0"):
        acc.update(0.0, 1e-8, 1)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        acc.update(1e-8, 1e-8, 0)
    with pytest.raises(ValueError, match="at least 3 points"):
        local_exponent([1.0, 2.0])
    with pytest.raises(ValueError, match="finite"):
        local_exponent([1.0, -np.inf, 2.0])
    with pytest.raises(ValueError, match="strictly increasing"):
        local_exponent([1.0, 2.0, 3.0], steps=[0, 2, 1])
    with pytest.raises(ValueError, match="start must be an int in"):
        local_exponent(T, start=98)
    hvp = lambda v: v  # noqa: E731
    with pytest.raises(ValueError, match="nesterov requires momentum > 0 and dampening == 0"):
        tangent_sgd_step(p, hvp, 0.1, momentum=0.9, dampening=0.1, nesterov=True)
    with pytest.raises(ValueError, match="momentum_v was given"):
        tangent_sgd_step(p, hvp, 0.1, momentum_v=p)
    with pytest.raises(ValueError, match="lr must be"):
        tangent_sgd_step(p, hvp, -0.1)
    with pytest.raises(ValueError, match="hvp"):
        tangent_sgd_step(p, lambda v: [torch.zeros(2)], 0.1)
    with pytest.raises(ValueError, match="norm of v0"):
        TangentAccumulator([torch.zeros(3)], "l2")


def test_local_exponent_keeps_a_short_exponential_phase():
    # flat alignment for 5 steps, growth 0.2/step for 12 steps (2.4 e-folds < ln 10), then a plateau:
    # cutting a whole decade before the knee would leave only the flat steps (slope 0)
    t = np.arange(51.0)
    y = -18.4 + np.where(t < 5, 0.0, np.where(t < 17, 0.2 * (t - 5), 2.4 + 0.02 * (t - 17)))
    fit = local_exponent(y)
    assert fit.saturated and fit.stop > 6
    assert fit.slope > 0.1
    assert local_exponent(y, start=5).slope == pytest.approx(0.2, rel=0.05)
