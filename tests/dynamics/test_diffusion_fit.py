"""Known answers for the MSD fits with a noise model: exponent, standard error, crossover test.

Processes with an exact MSD, generated exactly:

* fractional Brownian motion (Davies–Harte), MSD(τ) = τ^{2H}: one power law, no crossover;
* Brownian motion from ``torch.optim.SGD`` with random gradients: MSD ∝ τ, no crossover;
* Ornstein–Uhlenbeck (AR(1) x ← a x + sqrt(1 − a²) ξ, stationary start, a = e^{−κ}):
  MSD(τ) = 2 (1 − e^{−κτ}) per coordinate, whose asymptotes 2κτ and 2 cross at τ = 1/κ;
* persistent random walk (AR(1) velocity with ρ = e^{−1/t_c}, unit variance):
  MSD(τ) = τ (1 + ρ)/(1 − ρ) − 2ρ (1 − ρ^τ)/(1 − ρ)², asymptotes τ² and τ (1 + ρ)/(1 − ρ)
  crossing at τ₀ = (1 + ρ)/(1 − ρ).

τ₀ as reported is the intersection of the asymptotes of the fitted smoothly broken power law
(``fit_two_regime``), so for OU it estimates 1/κ and for the persistent walk (1 + ρ)/(1 − ρ).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import signal

from chaos_callbacks.dynamics import diffusion
from chaos_callbacks.dynamics.diffusion import (
    WindowAccumulator,
    analyse_window,
    fit_msd,
    fit_two_regime,
    log_spaced_lags,
    loss_variance,
    moving_variance,
    msd_noise_amplitude,
    tamsd_log_covariance,
    time_averaged_msd,
)
from tests.dynamics.test_diffusion import ballistic, brownian, fgn


def fbm(steps: int, hurst: float, columns: int, seed: int) -> np.ndarray:
    """Exact fractional Brownian motion [steps, columns] from x_0 = 0, MSD(τ) = τ^{2H}."""
    increments = fgn(steps - 1, hurst, columns, seed)
    return np.concatenate([np.zeros((1, columns)), np.cumsum(increments, axis=0)])


def ar1(steps: int, rho: float, columns: int, seed: int) -> np.ndarray:
    """Stationary AR(1) with unit variance: x_t = ρ x_{t−1} + sqrt(1 − ρ²) ξ_t, [steps, columns]."""
    rng = np.random.default_rng(seed)
    start = rng.standard_normal(columns)
    drive = math.sqrt(1 - rho**2) * rng.standard_normal((steps - 1, columns))
    rest = signal.lfilter([1.0], [1.0, -rho], drive, axis=0, zi=rho * start[None, :])[0]
    return np.concatenate([start[None, :], rest])


def ornstein_uhlenbeck(steps: int, relaxation: float, columns: int, seed: int) -> np.ndarray:
    return ar1(steps, math.exp(-1 / relaxation), columns, seed)


def persistent_walk(steps: int, correlation: float, columns: int, seed: int) -> tuple[np.ndarray, float]:
    """Positions of a walk with AR(1) velocity, and the known crossover (1 + ρ)/(1 − ρ)."""
    rho = math.exp(-1 / correlation)
    velocity = ar1(steps - 1, rho, columns, seed)
    return np.concatenate([np.zeros((1, columns)), np.cumsum(velocity, axis=0)]), (1 + rho) / (1 - rho)


def window_fit(X: np.ndarray, num_lags: int = 24):
    lags = log_spaced_lags(len(X), num_lags)
    return fit_msd(lags, time_averaged_msd(X, lags), len(X), msd_noise_amplitude(X))


# ---------------------------------------------------------------------------------------------
# the noise model


@pytest.mark.parametrize("hurst", [0.3, 0.5, 0.8])
def test_tamsd_covariance_matches_simulated_fbm(hurst: float) -> None:
    T, lags = 64, np.array([1, 2, 4, 8, 16, 32, 63])
    X = fbm(T, hurst, 20000, seed=1)
    per_column = np.stack([np.mean((X[tau:] - X[:-tau]) ** 2, axis=0) for tau in lags])  # [lags, columns]
    empirical = np.cov(per_column) / np.outer(lags ** (2 * hurst), lags ** (2 * hurst))
    exact = tamsd_log_covariance(lags, T, 2 * hurst)  # Cov(MSD)/(m m) exactly; log only to first order
    np.testing.assert_allclose(empirical, exact, rtol=0.1, atol=0.03 * exact.max())


def test_noise_amplitude_is_one_over_the_effective_dimension() -> None:
    rng = np.random.default_rng(0)
    steps = np.cumsum(rng.standard_normal((20000, 1)), axis=0)
    assert msd_noise_amplitude(steps) == pytest.approx(1.0, rel=0.05)
    assert msd_noise_amplitude(np.cumsum(rng.standard_normal((4000, 50)), axis=0)) == pytest.approx(1 / 50, rel=0.1)
    # anisotropic and rotated: Σλ² / (Σλ)² whatever the mixing
    lam = np.array([4.0, 2.0, 1.0, 1.0, 0.5, 0.25])
    rotation = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    X = np.cumsum(rng.standard_normal((20000, 6)) * np.sqrt(lam), axis=0) @ rotation
    assert msd_noise_amplitude(X) == pytest.approx(np.sum(lam**2) / np.sum(lam) ** 2, rel=0.05)
    with pytest.raises(ValueError, match="does not move"):
        msd_noise_amplitude(np.ones((10, 3)))


def test_lags_too_noisy_for_a_gaussian_model_are_not_fitted() -> None:
    assert window_fit(fbm(1000, 0.5, 1, seed=2)).fit_max_lag < 150  # one coordinate: ~T/15
    assert window_fit(fbm(1000, 0.5, 200, seed=2)).fit_max_lag == 999


# ---------------------------------------------------------------------------------------------
# pure power laws: no crossover, exponent 2H with an honest standard error


@pytest.mark.parametrize("hurst", [0.3, 0.5, 0.8])
def test_fbm_has_no_crossover_and_exponent_two_h_with_calibrated_stderr(hurst: float) -> None:
    fits = [window_fit(fbm(500, hurst, 8, seed=100 + s)) for s in range(40)]
    exponents = np.array([f.exponent for f in fits])
    stderrs = np.array([f.exponent_stderr for f in fits])
    false_crossovers = sum(math.isfinite(f.crossover) for f in fits)
    assert false_crossovers <= 2, f"{false_crossovers}/40 false crossovers"  # ≤ 5 % (level 1 %)
    assert all(math.isnan(f.exponent_short) and math.isnan(f.exponent_long) for f in fits if math.isnan(f.crossover))
    assert np.mean(exponents) == pytest.approx(2 * hurst, abs=0.03)
    assert np.all(np.abs(exponents - 2 * hurst) < 4 * stderrs)
    spread, stderr = np.std(exponents, ddof=1), np.sqrt(np.mean(stderrs**2))
    assert 1 / 1.5 < stderr / spread < 1.5, (stderr, spread)


@pytest.mark.parametrize("columns", [1, 200])
def test_fbm_in_one_and_many_dimensions_has_no_crossover(columns: int) -> None:
    for hurst in (0.3, 0.5, 0.8):
        fits = [window_fit(fbm(1000, hurst, columns, seed=200 + s)) for s in range(5)]
        assert sum(math.isfinite(f.crossover) for f in fits) <= 1
        for f in fits:
            assert abs(f.exponent - 2 * hurst) < max(4 * f.exponent_stderr, 0.02)


def test_brownian_sgd_walk_has_no_crossover_and_exponent_one() -> None:
    for seed in range(2):
        X = brownian(300 + seed, steps=500)
        stats = analyse_window(X, X[:, 0], t_w=0, rng=0)
        assert math.isnan(stats.crossover) and stats.crossover_pvalue >= 0.01
        assert "crossover" in stats.scalars() and math.isnan(stats.scalars()["exponent_short"])
        assert stats.exponent == pytest.approx(1.0, abs=max(4 * stats.exponent_stderr, 0.02))
        assert 0 < stats.exponent_stderr < 0.05


def test_exact_power_law_and_noise_free_broken_law() -> None:
    lags, T = log_spaced_lags(500, 24), 500
    exact = fit_msd(lags, 3.0 * lags**1.4, T, noise=0.0)
    assert exact.exponent == pytest.approx(1.4, rel=1e-12) and exact.exponent_stderr < 1e-9
    assert exact.crossover_pvalue == 1.0 and math.isnan(exact.crossover)
    broken = 2 * (lags / 30) ** 2.0 * (1 + (lags / 30) ** 2) ** -0.5 * 30  # τ² → τ, τ₀ = 30
    fit = fit_msd(lags, broken, T, noise=0.0)
    assert fit.crossover == pytest.approx(30.0, rel=1e-6)
    assert fit.exponent_short == pytest.approx(2.0, abs=1e-6) and fit.exponent_long == pytest.approx(1.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# genuine crossovers


@pytest.mark.parametrize("relaxation", [5.0, 20.0, 50.0])
def test_ornstein_uhlenbeck_crossover_is_near_the_relaxation_time(relaxation: float) -> None:
    T = 1000
    lags = log_spaced_lags(T, 24)
    exact_curve = fit_two_regime(lags, 1 - np.exp(-lags / relaxation))  # the estimator without noise
    for seed in range(3):
        fit = window_fit(ornstein_uhlenbeck(T, relaxation, 64, seed=10 + seed))
        assert fit.crossover_pvalue < 0.01
        assert 1 / 1.6 < fit.crossover / relaxation < 1.6, fit.crossover  # asymptotes cross at 1/κ
        assert fit.crossover == pytest.approx(exact_curve[2], rel=0.3)
        assert fit.exponent_short == pytest.approx(exact_curve[0], abs=max(3 * fit.exponent_short_stderr, 0.03))
        assert abs(fit.exponent_long) < max(3 * fit.exponent_long_stderr, 0.05)  # confined: flat


@pytest.mark.parametrize("correlation", [5.0, 20.0])
def test_persistent_walk_crossover_from_ballistic_to_diffusive_is_detected(correlation: float) -> None:
    T, lags = 3000, log_spaced_lags(3000, 40)
    rho = math.exp(-1 / correlation)
    exact_msd = lags * (1 + rho) / (1 - rho) - 2 * rho * (1 - rho**lags) / (1 - rho) ** 2
    target = fit_two_regime(lags, exact_msd)[2]  # the estimator without noise
    for seed in range(2):
        X, known = persistent_walk(T, correlation, 16, seed=20 + seed)
        assert 1 / 1.5 < target / known < 1.5, (target, known)
        fit = window_fit(X, num_lags=40)
        assert fit.crossover_pvalue < 0.01
        assert fit.exponent_short > 1.7 and fit.exponent_long == pytest.approx(1.0, abs=0.2)
        # within 3 standard errors of the noise-free value (log τ₀ is about Gaussian)
        assert abs(math.log(fit.crossover / target)) < 3 * fit.crossover_stderr / fit.crossover


def test_two_regime_stderrs_match_the_spread_over_seeds() -> None:
    fits = [window_fit(ornstein_uhlenbeck(1000, 20.0, 16, seed=400 + s)) for s in range(30)]
    assert all(f.crossover_pvalue < 0.01 for f in fits)
    for values, stderrs in (
        ([f.exponent_short for f in fits], [f.exponent_short_stderr for f in fits]),
        ([f.exponent_long for f in fits], [f.exponent_long_stderr for f in fits]),
        ([math.log(f.crossover) for f in fits], [f.crossover_stderr / f.crossover for f in fits]),
    ):
        ratio = np.sqrt(np.mean(np.square(stderrs))) / np.std(values, ddof=1)
        assert 1 / 1.6 < ratio < 1.6, ratio


# ---------------------------------------------------------------------------------------------
# windows without losses


def test_window_without_losses_has_everything_but_the_loss_statistics() -> None:
    X = brownian(12, steps=200, n=32)
    full = analyse_window(X, X[:, 0], t_w=0, rng=0)
    bare = analyse_window(X, None, t_w=0, rng=0)
    assert math.isnan(bare.hurst) and math.isnan(bare.loss_variance) and bare.msl.size == 0
    assert math.isnan(bare.loss_variance_stderr) and math.isfinite(full.loss_variance_stderr)
    for name in ("exponent", "exponent_stderr", "fractal_dim", "fractal_dim_stderr", "crossover_pvalue"):
        assert getattr(bare, name) == getattr(full, name)
    np.testing.assert_array_equal(bare.msd, full.msd)

    acc = WindowAccumulator(50, 32)
    results = [acc.append(X[t], None if t == 7 else float(X[t, 0]), step=t) for t in range(50)]
    assert results[-1] is not None and math.isnan(results[-1].hurst)
    assert math.isfinite(results[-1].exponent)
    restored = WindowAccumulator(50, 32)
    for t in range(10):
        acc.append(X[t], None if t == 3 else 1.0, step=t)
    restored.load_state_dict(acc.state_dict())
    assert np.isnan(restored.state_dict()["losses"][3])


@pytest.mark.parametrize(
    "call",
    [
        lambda: fit_msd([1, 2, 3], [1.0, 2.0, 3.0], 10, noise=-1.0),
        lambda: fit_msd([1, 2, 3], [1.0, 2.0, 3.0], 10, noise=float("nan")),
        lambda: fit_msd([1, 2, 3], [1.0, 2.0, 3.0], 10, noise=0.1, level=1.0),
        lambda: fit_msd([1, 2, 30], [1.0, 2.0, 3.0], 10, noise=0.1),
        lambda: tamsd_log_covariance([1, 2], 10, float("nan")),
        lambda: WindowAccumulator(10, 4, crossover_level=0.0),
        lambda: WindowAccumulator(10, 4).append(np.zeros(4), float("inf"), step=0),
    ],
)
def test_bad_inputs_raise_value_error(call) -> None:
    with pytest.raises(ValueError):
        call()


# ---------------------------------------------------------------------------------------------
# Hurst exponent of the loss along the path


@pytest.mark.parametrize("hurst", [0.3, 0.7])
def test_hurst_stderr_matches_the_spread_over_seeds(hurst: float) -> None:
    # Δr = |v| τ exactly on a straight path, so MSL(Δr) = τ^{2H} ∝ Δr^{2H}
    X = ballistic(7)
    stats = [
        analyse_window(X, np.cumsum(fgn(len(X), hurst, 1, seed=500 + s)[:, 0]), t_w=0, rng=s) for s in range(30)
    ]
    estimates = np.array([w.hurst for w in stats])
    stderrs = np.array([w.hurst_stderr for w in stats])
    assert np.mean(estimates) == pytest.approx(hurst, abs=0.03)
    ratio = np.sqrt(np.mean(stderrs**2)) / np.std(estimates, ddof=1)
    assert 1 / 1.5 < ratio < 1.5, ratio


# ---------------------------------------------------------------------------------------------
# fractal dimension: d_f = 2 / α for a walk with steady steps, with a standard error


def rms(values) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


@pytest.mark.parametrize(("hurst", "columns"), [(0.3, 8), (0.5, 8), (0.8, 8), (0.5, 1)])
def test_fractal_dimension_stderr_matches_the_spread_over_seeds(hurst: float, columns: int) -> None:
    """fBm has C ∝ s and MSD ∝ s^{2H}: d_f = 1/H exactly. Measured stderr / spread over 100 seeds:
    1.19, 1.16, 1.15 (8 coordinates), 1.21 (one; 1.32 at H = 0.8), 1.12–1.14 (200 coordinates),
    conservative like ``exponent_stderr`` (the same amplitude rule)."""
    stats = [analyse_window(fbm(500, hurst, columns, seed=700 + s), None, t_w=0) for s in range(50)]
    values = np.array([w.fractal_dim for w in stats])
    stderrs = np.array([w.fractal_dim_stderr for w in stats])
    assert np.mean(values) == pytest.approx(1 / hurst, abs=3 * np.std(values) / math.sqrt(len(values)) + 0.03 / hurst)
    ratio = rms(stderrs) / np.std(values, ddof=1)
    assert 0.75 < ratio < 1.33, ratio
    assert np.all(np.abs(values - 1 / hurst) < 4 * stderrs)


def test_fractal_dimension_is_fitted_on_the_exponent_lags() -> None:
    """One coordinate: lags beyond ``fit_max_lag`` are left out (all lags: twice the spread, biased)."""
    X = fbm(500, 0.8, 1, seed=3)
    stats = analyse_window(X, None, t_w=0)
    kept = stats.lags[stats.lags <= stats.fit_max_lag]
    assert kept.size < stats.lags.size
    centred = X - X.mean(axis=0)
    value, stderr = diffusion._fractal_dimension_fit(centred, kept, time_averaged_msd(X, kept), msd_noise_amplitude(X))
    assert stats.fractal_dim == pytest.approx(value, rel=1e-12) and stats.fractal_dim_stderr == pytest.approx(stderr, rel=1e-9)
    assert value == pytest.approx(diffusion._fractal_dimension(centred, kept, time_averaged_msd(X, kept)), rel=1e-12)
    # for a steady walk: the propagated error of 2/α to first order
    assert stderr == pytest.approx(2 * stats.exponent_stderr / stats.exponent**2, rel=0.3)


def test_straight_line_has_fractal_dimension_one_without_error() -> None:
    X = np.outer(np.arange(300.0), np.random.default_rng(0).standard_normal(16))
    stats = analyse_window(X, None, t_w=0)
    assert stats.fractal_dim == pytest.approx(1.0, abs=1e-9) and stats.fractal_dim_stderr < 1e-9


def test_brownian_sgd_walk_has_fractal_dimension_two_within_its_error() -> None:
    for seed in range(3):
        stats = analyse_window(brownian(400 + seed, steps=500), None, t_w=0)
        assert abs(stats.fractal_dim - 2.0) < 4 * stats.fractal_dim_stderr
        assert 0 < stats.fractal_dim_stderr < 0.1


# ---------------------------------------------------------------------------------------------
# loss variance: block jackknife against AR(1) losses of known variance


def ar1_expected_variance(rho: float, length: int) -> float:
    """E of the population variance of ``length`` consecutive values of a unit-variance AR(1):
    1 − Var(mean) = 1 − (1/n²) Σ_{i,j} ρ^{|i−j|}."""
    k = np.arange(1, length)
    return 1 - (length + 2 * np.sum((length - k) * rho**k)) / length**2


@pytest.mark.parametrize("window", [None, 20])
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9])
def test_loss_variance_stderr_matches_the_spread_over_seeds(rho: float, window: int | None) -> None:
    """Measured stderr / spread over 400 seeds: 1.00, 1.04, 0.97 (global), 1.03, 1.03, 0.98 (w = 20)."""
    seeds, scale = 300, 0.1
    estimates = [loss_variance(2.3 + scale * ar1(1000, rho, 1, seed=900 + s)[:, 0], window) for s in range(seeds)]
    values, stderrs = np.array(estimates).T
    expected = scale**2 * ar1_expected_variance(rho, 1000 if window is None else window)
    assert np.mean(values) == pytest.approx(expected, abs=4 * np.std(values) / math.sqrt(seeds))
    ratio = rms(stderrs) / np.std(values, ddof=1)
    assert 0.75 < ratio < 1.33, ratio


def test_loss_variance_values_and_jackknife_by_hand() -> None:
    losses = 1.0 + ar1(64, 0.7, 1, seed=5)[:, 0]
    assert loss_variance(losses)[0] == np.var(losses)
    assert loss_variance(losses, 5)[0] == np.mean(moving_variance(losses, 5))
    for window in (None, 5, 64):
        psi = diffusion._loss_contributions(losses - losses.mean(), window)
        assert np.mean(psi) == pytest.approx(loss_variance(losses, window)[0], rel=1e-12)
        leave_out = np.array([np.mean(np.delete(psi, np.arange(8 * b, 8 * b + 8))) for b in range(8)])
        jackknife = math.sqrt(7 / 8 * np.sum((leave_out - leave_out.mean()) ** 2))
        assert loss_variance(losses, window)[1] == pytest.approx(jackknife, rel=1e-12)
    assert math.isnan(loss_variance(losses[:15])[1])  # fewer than two losses per block
    assert loss_variance(np.full(64, 0.5)) == (0.0, 0.0)
    with pytest.raises(ValueError):
        loss_variance(np.array([1.0, np.nan, 2.0]))
