"""Known answers for the anomalous-diffusion statistics.

Trajectories are produced by a real ``torch.optim.SGD`` on a ``torch.nn.Parameter`` whose
``.grad`` is set by hand each step, so the recorded weights are exactly what an optimizer
would produce: Brownian (MSD ∝ τ), ballistic (τ²), Ornstein–Uhlenbeck (τ⁰ at long lags),
fractional Brownian (τ^{2H}) and a persistent random walk (τ² → τ at a known crossover).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np
import pytest
import torch

from chaos_callbacks.dynamics.diffusion import (
    WindowAccumulator,
    analyse_window,
    fit_diffusion_exponent,
    fit_two_regime,
    log_spaced_lags,
    loss_variance,
    mean_squared_loss_vs_distance,
    moving_variance,
    msd_log_derivative,
    sgd_temperature,
    time_averaged_msd,
    trajectory_fractal_dimension,
)

GradFn = Callable[[int, torch.Tensor], torch.Tensor]


def sgd_trajectory(grad_fn: GradFn, steps: int, num_params: int, lr: float) -> np.ndarray:
    """Weights before each of ``steps`` SGD updates with hand-set gradients, [steps, n]."""
    param = torch.nn.Parameter(torch.zeros(num_params, dtype=torch.float64))
    opt = torch.optim.SGD([param], lr=lr)
    out = np.empty((steps, num_params))
    for t in range(steps):
        out[t] = param.detach().numpy()
        param.grad = grad_fn(t, param.detach())
        opt.step()
    return out


def noise(seed: int) -> Callable[[int], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return lambda n: torch.randn(n, generator=gen, dtype=torch.float64)


def fgn(steps: int, hurst: float, columns: int, seed: int) -> np.ndarray:
    """Exact fractional Gaussian noise [steps, columns] by circulant embedding (Davies–Harte).

    γ(k) = ½ (|k + 1|^{2H} − 2|k|^{2H} + |k − 1|^{2H}) is embedded in a circulant of size
    m = 2·steps with nonnegative eigenvalues λ; Re FFT(sqrt(λ / m) (Z₁ + iZ₂)) has covariance
    exactly γ, and its cumulative sums are fBm with E (B_{t+τ} − B_t)² = τ^{2H}.
    """
    k = np.arange(steps + 1, dtype=np.float64)
    two_h = 2 * hurst
    gamma = 0.5 * (np.abs(k + 1) ** two_h - 2 * k**two_h + np.abs(k - 1) ** two_h)
    eigenvalues = np.fft.fft(np.concatenate([gamma, gamma[-2:0:-1]])).real
    assert eigenvalues.min() > -1e-9
    m = eigenvalues.size
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((m, columns)) + 1j * rng.standard_normal((m, columns))
    scale = np.sqrt(np.clip(eigenvalues, 0.0, None) / m)[:, None]
    return np.fft.fft(scale * z, axis=0).real[:steps]


def test_fgn_generator_has_the_exact_covariance() -> None:
    samples = fgn(8, 0.7, 40000, seed=0)
    k = np.arange(8.0)
    gamma = 0.5 * (np.abs(k + 1) ** 1.4 - 2 * k**1.4 + np.abs(k - 1) ** 1.4)
    empirical = samples @ samples.T / samples.shape[1]
    np.testing.assert_allclose(empirical[0], gamma, atol=0.03)


# ---------------------------------------------------------------------------------------------
# small exact cases


def test_log_spaced_lags_are_unique_increasing_and_cover_the_window() -> None:
    lags = log_spaced_lags(1000, 20)
    assert lags.dtype.kind == "i"
    assert lags[0] == 1 and lags[-1] == 999
    assert np.all(np.diff(lags) > 0)
    assert 15 <= lags.size <= 20
    assert log_spaced_lags(4, 10).tolist() == [1, 2, 3]


def test_time_averaged_msd_hand_computed() -> None:
    X = np.array([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [3.0, 1.0]])
    # lag 1: (1 + 1 + 4) / 3; lag 2: (|(1,1)|² + |(2,1)|²) / 2; lag 3: |(3,1)|²
    np.testing.assert_allclose(time_averaged_msd(X, [1, 2, 3]), [2.0, 3.5, 10.0])


def test_msd_survives_a_huge_common_offset() -> None:
    rng = np.random.default_rng(0)
    walk = np.cumsum(1e-3 * rng.standard_normal((200, 50)), axis=0)
    lags = np.array([1, 5, 50])
    reference = time_averaged_msd(walk, lags)
    # ||a||² + ||b||² − 2a·b would lose every digit here: ||x||² ≈ 5e17, MSD ≈ 5e-5
    np.testing.assert_allclose(time_averaged_msd(walk + 1e8, lags), reference, rtol=1e-6)


def test_exponent_fits_recover_exact_power_laws() -> None:
    lags = np.unique(np.concatenate([log_spaced_lags(500, 30), [30]]))
    np.testing.assert_allclose(fit_diffusion_exponent(lags, 3.0 * lags**1.4), 1.4, rtol=1e-12)
    np.testing.assert_allclose(msd_log_derivative(lags, lags**0.6), 0.6, rtol=1e-9)
    # the model of fit_two_regime itself, asymptotes 2τ² / 30 and 2τ crossing at τ₀ = 30
    smooth = 2 * (lags / 30) ** 2.0 * (1 + (lags / 30) ** 2) ** ((1.0 - 2.0) / 2) * 30
    short, long, crossover = fit_two_regime(lags, smooth)
    assert short == pytest.approx(2.0, abs=1e-6)
    assert long == pytest.approx(1.0, abs=1e-6)
    assert crossover == pytest.approx(30.0, rel=1e-6)
    # a sharp corner, which the smooth bend only approximates
    short, long, crossover = fit_two_regime(lags, np.where(lags <= 30, lags**2.0, 30.0 * lags))
    assert short == pytest.approx(2.0, abs=0.15) and long == pytest.approx(1.0, abs=0.15)
    assert crossover == pytest.approx(30.0, rel=0.05)


def test_moving_variance_and_temperature_hand_computed() -> None:
    losses = np.array([0.0, 2.0, 4.0, 6.0])
    np.testing.assert_allclose(moving_variance(losses, 2), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(moving_variance(losses, 3), [8 / 3, 8 / 3])
    assert sgd_temperature(0.1, 128) == pytest.approx(0.1 / 256)


# ---------------------------------------------------------------------------------------------
# trajectories driven through torch.optim.SGD


def brownian(seed: int, steps: int = 1000, n: int = 200) -> np.ndarray:
    draw = noise(seed)
    return sgd_trajectory(lambda t, p: draw(n), steps, n, lr=0.01)


def ballistic(seed: int, steps: int = 1000, n: int = 200) -> np.ndarray:
    draw = noise(seed)
    velocity = draw(n)
    return sgd_trajectory(lambda t, p: velocity + 1e-3 * draw(n), steps, n, lr=0.01)


def test_brownian_motion_has_exponent_one_and_fractal_dimension_two() -> None:
    X = brownian(1)
    lags = log_spaced_lags(len(X), 20)
    assert fit_diffusion_exponent(lags, time_averaged_msd(X, lags)) == pytest.approx(1.0, abs=0.1)
    assert trajectory_fractal_dimension(X) == pytest.approx(2.0, abs=0.15)


def test_ballistic_motion_has_exponent_two_and_fractal_dimension_one() -> None:
    X = ballistic(2)
    lags = log_spaced_lags(len(X), 20)
    assert fit_diffusion_exponent(lags, time_averaged_msd(X, lags)) == pytest.approx(2.0, abs=0.1)
    assert trajectory_fractal_dimension(X) == pytest.approx(1.0, abs=0.15)


def test_confined_ornstein_uhlenbeck_motion_stops_diffusing_at_long_lags() -> None:
    n, stiffness, lr = 200, 1.0, 0.1  # x ← (1 − lr·k) x − lr·ξ: relaxation time 10 steps
    draw = noise(3)
    X = sgd_trajectory(lambda t, p: stiffness * p + draw(n), 2000, n, lr=lr)
    lags = np.arange(100, 1001, 100)  # ≥ 10 relaxation times
    assert abs(fit_diffusion_exponent(lags, time_averaged_msd(X, lags))) < 0.2


@pytest.mark.parametrize("hurst", [0.3, 0.7])
def test_fractional_brownian_motion_has_exponent_two_h(hurst: float) -> None:
    increments = torch.from_numpy(fgn(1000, hurst, 200, seed=4))
    X = sgd_trajectory(lambda t, p: -increments[t], 1000, 200, lr=1.0)
    lags = log_spaced_lags(len(X), 20)
    exponent = fit_diffusion_exponent(lags, time_averaged_msd(X, lags))
    assert exponent == pytest.approx(2 * hurst, abs=0.1)


def test_two_regime_fit_finds_the_persistent_walk_crossover() -> None:
    # velocity v ← ρ v + sqrt(1 − ρ²) ξ, ρ = exp(−1/20): MSD ≈ τ² for τ ≪ 20 and
    # MSD ≈ τ (1 + ρ) / (1 − ρ) for τ ≫ 20; the asymptotes cross at τ₀ = (1 + ρ) / (1 − ρ) ≈ 39.
    n, rho = 200, math.exp(-1 / 20)
    draw = noise(5)
    velocity = draw(n)

    def grad(t: int, p: torch.Tensor) -> torch.Tensor:
        nonlocal velocity
        velocity = rho * velocity + math.sqrt(1 - rho**2) * draw(n)
        return -velocity

    X = sgd_trajectory(grad, 3000, n, lr=1.0)
    lags = log_spaced_lags(len(X), 40)
    short, long, crossover = fit_two_regime(lags, time_averaged_msd(X, lags))
    known = (1 + rho) / (1 - rho)
    assert short > 1.7
    assert long == pytest.approx(1.0, abs=0.15)
    assert known / 2 <= crossover <= known * 2


# ---------------------------------------------------------------------------------------------
# mean squared loss


def test_linear_loss_along_a_straight_path_has_hurst_one() -> None:
    X = ballistic(6)
    losses = 3.0 * X[:, 0] - X[:, 1]  # (L_i − L_j)² ∝ Δr² exactly
    centres, msl, hurst = mean_squared_loss_vs_distance(X, losses, rng=0)
    assert hurst == pytest.approx(1.0, abs=0.05)
    assert centres.shape == msl.shape and np.all(np.diff(centres) > 0)


def test_linear_loss_along_a_brownian_path_has_hurst_one() -> None:
    # E[(a·Δx)² | ||Δx|| = r] = r² ||a||² / n for isotropic increments, so MSL ∝ Δr².
    # The loss is one scalar series per path, so average four paths.
    hursts = []
    for seed in range(4):
        X = brownian(10 + seed)
        hursts.append(mean_squared_loss_vs_distance(X, X[:, 0], rng=seed)[2])
    assert np.mean(hursts) == pytest.approx(1.0, abs=0.1)


@pytest.mark.parametrize("hurst", [0.3, 0.7])
def test_fbm_loss_along_a_straight_path_has_its_hurst_exponent(hurst: float) -> None:
    # Δr = |v| τ exactly, so MSL(Δr) = E(B_H(t+τ) − B_H(t))² = τ^{2H} ∝ Δr^{2H}.
    X = ballistic(7)
    losses = np.cumsum(fgn(len(X), hurst, 4, seed=8), axis=0)
    estimates = [mean_squared_loss_vs_distance(X, losses[:, c], rng=c)[2] for c in range(4)]
    assert np.mean(estimates) == pytest.approx(hurst, abs=0.1)


def test_constant_loss_gives_nan_hurst() -> None:
    X = brownian(9, steps=50, n=5)
    centres, msl, hurst = mean_squared_loss_vs_distance(X, np.ones(50), num_bins=5)
    assert math.isnan(hurst)
    np.testing.assert_array_equal(msl, 0.0)


# ---------------------------------------------------------------------------------------------
# window analysis and accumulation


def test_analyse_window_matches_the_parts_and_is_fast() -> None:
    rng = np.random.default_rng(11)
    X = np.cumsum(rng.standard_normal((1000, 1024)), axis=0)
    losses = X[:, 0] + 0.1 * rng.standard_normal(1000)
    cpu_seconds = []
    for _ in range(3):  # best of three, in CPU time: the machine may be shared
        start = time.process_time()
        stats = analyse_window(X, losses, t_w=500, rng=0)
        cpu_seconds.append(time.process_time() - start)
    assert min(cpu_seconds) < 1.0, f"analyse_window took {min(cpu_seconds):.2f} s CPU"
    np.testing.assert_allclose(stats.msd, time_averaged_msd(X, stats.lags))
    assert stats.exponent == pytest.approx(fit_diffusion_exponent(stats.lags, stats.msd))
    assert stats.exponent == pytest.approx(1.0, abs=0.1)
    assert stats.fractal_dim == pytest.approx(trajectory_fractal_dimension(X, stats.lags[stats.lags <= stats.fit_max_lag]))
    assert stats.hurst == pytest.approx(mean_squared_loss_vs_distance(X, losses, rng=0)[2])
    assert stats.loss_variance == pytest.approx(np.var(losses))
    assert (stats.loss_variance, stats.loss_variance_stderr) == loss_variance(losses)
    assert stats.t_w == 500 and set(stats.scalars()) >= {"exponent", "hurst", "crossover", "fractal_dim_stderr", "loss_variance_stderr"}
    assert 0 < stats.fractal_dim_stderr < 0.1 and 0 < stats.loss_variance_stderr < stats.loss_variance
    with pytest.raises(ValueError):
        stats.msd[0] = 0.0  # read-only


def test_accumulator_emits_stats_per_window_and_resumes_identically() -> None:
    X = brownian(12, steps=150, n=64)
    losses = X[:, 0] ** 2
    first, second = WindowAccumulator(64, 64, seed=3), WindowAccumulator(64, 64, seed=3)
    emitted = []
    for t in range(100):  # one full window, then 36 steps into the next
        stats = first.append(torch.from_numpy(X[t]), losses[t], step=t)
        if stats is not None:
            emitted.append((t, stats))
    assert [t for t, _ in emitted] == [63] and emitted[0][1].t_w == 0
    expected = analyse_window(
        X[:64] - X[0], losses[:64], 0, lags=first.lags, rng=np.random.default_rng([3, 0])
    )
    np.testing.assert_array_equal(emitted[0][1].msd, expected.msd)
    assert first.count == 36 and first.t_w == 64

    state = first.state_dict()
    second.load_state_dict(state)
    results = [
        acc.append(X[t], losses[t], step=t) for acc in (first, second) for t in range(100, 128)
    ]
    a, b = results[27], results[55]
    assert a is not None and b is not None and a.t_w == b.t_w == 64
    for name in ("msd", "log_derivative", "msl_distances", "msl"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.scalars() == b.scalars()


@pytest.mark.parametrize(
    "call",
    [
        lambda: WindowAccumulator(3, 10),
        lambda: WindowAccumulator(10, 0),
        lambda: WindowAccumulator(10, 4, lags=[1, 10]),
        lambda: time_averaged_msd(np.zeros((10, 2)), [0, 1]),
        lambda: time_averaged_msd(np.zeros((10, 2)), [1, 10]),
        lambda: time_averaged_msd(np.zeros((10, 2)), [3, 2]),
        lambda: time_averaged_msd(np.zeros((10, 2)), [1.5, 2.0]),
        lambda: time_averaged_msd(np.zeros(10), [1]),
        lambda: time_averaged_msd(np.full((10, 2), np.nan), [1]),
        lambda: fit_diffusion_exponent([1, 2, 3], [1.0, 0.0, 2.0]),
        lambda: fit_two_regime([1, 2], [1.0, 2.0]),
        lambda: analyse_window(np.zeros((3, 2)), np.zeros(3), 0),
        lambda: analyse_window(np.ones((10, 2)).cumsum(0), np.zeros(9), 0),
        lambda: mean_squared_loss_vs_distance(np.zeros((10, 2)), np.zeros(10), max_lag=10),
        lambda: moving_variance(np.zeros(5), 6),
        lambda: log_spaced_lags(1, 5),
        lambda: sgd_temperature(0.0, 32),
        lambda: sgd_temperature(0.1, 0),
    ],
)
def test_bad_inputs_raise_value_error(call: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        call()


def test_accumulator_rejects_wrong_vectors_and_foreign_state() -> None:
    acc = WindowAccumulator(8, 4)
    with pytest.raises(ValueError, match="shape"):
        acc.append(np.zeros(5), 0.0, step=0)
    with pytest.raises(ValueError, match="finite"):
        acc.append(np.zeros(4), float("nan"), step=0)
    with pytest.raises(ValueError, match="window=8"):
        acc.load_state_dict(WindowAccumulator(16, 4).state_dict())
