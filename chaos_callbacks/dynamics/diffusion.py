"""Anomalous-diffusion statistics of a recorded weight trajectory.

Implements the measurements of Chen, Qu, Gong, "Anomalous diffusion dynamics of learning in
deep neural networks" (arXiv 2009.10588) on one window of T recorded (possibly sketched, see
:mod:`chaos_callbacks.dynamics.sketch`) weight vectors x_0, …, x_{T−1} ∈ R^d that starts at
waiting time t_w, together with the training losses L_0, …, L_{T−1}:

* time-averaged mean squared displacement MSD(τ) and its power law MSD ∝ τ^α (α > 1
  superdiffusive, α < 1 subdiffusive) with a standard error from a noise model of the MSD
  (lags correlated, the trajectory's effective dimension), a two-regime fit with crossover
  τ₀ reported only when a likelihood-ratio test prefers it to one power law, and the local
  exponent d log MSD / d log τ;
* mean squared loss MSL(Δr) = E[(L_i − L_j)²] over pairs at distance Δr = ||x_i − x_j||,
  MSL ∝ Δr^{2H} with Hurst exponent H of the loss landscape along the path (block-jackknife
  standard error);
* contour length against end-to-end distance of sub-trajectories, L ∝ R^{d_f};
* the SGD temperature T = η / (2B) (Chaudhari & Soatto, ICLR 2018).

All arithmetic is numpy float64. Displacements are always formed as differences of the
centred vectors, never as ||a||² + ||b||² − 2a·b, which cancels catastrophically when the
displacement is small against the weights' norm. :class:`WindowAccumulator` collects one
vector and loss per step and analyses each window when it fills.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Sequence

import numpy as np
import torch
from scipy import optimize, special

__all__ = [
    "MIN_WINDOW",
    "MSDFit",
    "WindowAccumulator",
    "WindowStats",
    "analyse_window",
    "fit_diffusion_exponent",
    "fit_msd",
    "fit_two_regime",
    "log_spaced_lags",
    "loss_variance",
    "mean_squared_loss_vs_distance",
    "moving_variance",
    "msd_log_derivative",
    "msd_noise_amplitude",
    "sgd_temperature",
    "tamsd_log_covariance",
    "time_averaged_msd",
    "trajectory_fractal_dimension",
]

MIN_WINDOW = 4
"""Fewest steps in an analysed window (lags 1, 2, 3: enough for a two-regime fit)."""

_DEFAULT_NUM_LAGS = 24
_MIN_PAIRS_PER_BIN = 5
_ROW_BLOCK = 256

_SHARPNESS = 0.5
"""Width ν, in log τ, of the bend of the broken power law (:func:`fit_two_regime`)."""
_MAX_LOG_MSD_VARIANCE = 0.1
"""Largest modelled variance of log MSD(τ) of a fitted lag (:func:`fit_msd`)."""
_MIN_NOISE_EXPONENT, _MAX_NOISE_EXPONENT = 0.05, 1.9
_MIN_CROSSOVER_LAGS = 6
"""Fewest fitted lags for the crossover test: 4 parameters and 2 residual degrees of freedom."""
_GRID_PER_LAG = 8
_MONTE_CARLO_DRAWS = 999
_MONTE_CARLO_SEED = 20090105
_JACKKNIFE_BLOCKS = 8
"""Blocks of the delete-a-block jackknifes of the Hurst exponent's and the loss variance's standard errors."""
_EXACT_FIT_RMS = 1e-9
"""A power law that fits log MSD to this RMS is exact up to rounding: no crossover."""


# ---------------------------------------------------------------------------------------------
# validation


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}; got {value}")
    return int(value)


def _as_trajectory(X: Any, min_steps: int) -> np.ndarray:
    """Validate a [T, dim] trajectory and return it centred on its mean, as float64."""
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[1] < 1:
        raise ValueError(f"X must be a 2-D array [T, dim] with dim >= 1; got shape {X.shape}")
    if X.shape[0] < min_steps:
        raise ValueError(f"X must hold at least {min_steps} steps; got T={X.shape[0]}")
    if not np.all(np.isfinite(X)):
        raise ValueError("X must be finite (no NaN or inf)")
    return X - X.mean(axis=0)


def _as_losses(losses: Any, num_steps: int) -> np.ndarray:
    losses = np.asarray(losses, dtype=np.float64)
    if losses.shape != (num_steps,):
        raise ValueError(f"losses must have shape ({num_steps},); got {losses.shape}")
    if not np.all(np.isfinite(losses)):
        raise ValueError("losses must be finite (no NaN or inf)")
    return losses


def _as_lags(lags: Any, num_steps: int) -> np.ndarray:
    """Validate strictly increasing integer lags in [1, num_steps − 1]."""
    arr = np.asarray(lags)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"lags must be a non-empty 1-D sequence of ints; got shape {arr.shape}")
    if arr.dtype == np.bool_ or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"lags must be integers; got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if arr[0] < 1 or arr[-1] > num_steps - 1 or np.any(np.diff(arr) <= 0):
        raise ValueError(
            f"lags must be strictly increasing ints in [1, {num_steps - 1}] "
            f"(window of {num_steps} steps); got {arr.tolist()}"
        )
    return arr


def _log_log(lags: Any, values: Any, min_points: int, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Validate (lags, values) for a log-log fit; return (log lags, log values)."""
    lags = np.asarray(lags, dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    if lags.ndim != 1 or lags.shape != values.shape:
        raise ValueError(
            f"lags and {name} must be 1-D arrays of equal length; got {lags.shape} and "
            f"{values.shape}"
        )
    if lags.size < min_points:
        raise ValueError(f"need at least {min_points} lags; got {lags.size}")
    if not (np.all(np.isfinite(lags)) and np.all(lags > 0) and np.all(np.diff(lags) > 0)):
        raise ValueError("lags must be finite, positive and strictly increasing")
    if not (np.all(np.isfinite(values)) and np.all(values > 0)):
        raise ValueError(f"{name} must be finite and strictly positive for a log-log fit")
    return np.log(lags), np.log(values)


def _slope(u: np.ndarray, y: np.ndarray) -> float:
    return float(np.polyfit(u, y, 1)[0])


# ---------------------------------------------------------------------------------------------
# mean squared displacement


def log_spaced_lags(window: int, num: int) -> np.ndarray:
    """About ``num`` log-spaced integer lags in [1, window − 1], unique and increasing.

    Rounding merges the densest small lags, so fewer than ``num`` may come back.
    """
    window = _check_int("window", window, 2)
    num = _check_int("num", num, 1)
    return np.unique(np.rint(np.geomspace(1, window - 1, num)).astype(np.int64))


def _msd(X: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """MSD by direct differences, in row blocks that stay in cache (no per-lag copies).

    The sums of squares use ``einsum`` rather than BLAS ``vdot``: a multithreaded BLAS competing
    with the training's own threads for the cores made a 1000 × 1024 window 8× slower.
    """
    num_steps = X.shape[0]
    block = np.empty((_ROW_BLOCK, X.shape[1]))
    msd = np.empty(lags.size)
    for k, tau in enumerate(lags):
        total = 0.0
        for start in range(0, num_steps - tau, _ROW_BLOCK):
            stop = min(start + _ROW_BLOCK, num_steps - tau)
            d = block[: stop - start]
            np.subtract(X[start + tau : stop + tau], X[start:stop], out=d)
            total += float(np.einsum("ij,ij->", d, d))
        msd[k] = total / (num_steps - tau)
    return msd


def time_averaged_msd(X: Any, lags: Any) -> np.ndarray:
    """Time-averaged mean squared displacement of one window.

        MSD(τ) = 1 / (T − τ) · Σ_{i=0}^{T−τ−1} ||x_{i+τ} − x_i||²

    (Chen, Qu, Gong 2020), averaged over the window that starts at waiting time t_w.

    Args:
        X: trajectory [T, dim].
        lags: strictly increasing ints τ in [1, T − 1].

    Returns:
        float64 array of MSD(τ), one per lag.
    """
    X = _as_trajectory(X, 2)
    return _msd(X, _as_lags(lags, X.shape[0]))


def fit_diffusion_exponent(lags: Any, msd: Any) -> float:
    """Diffusion exponent α of MSD(τ) ∝ τ^α: least-squares slope of log MSD on log τ.

    α = 1 is Brownian, α > 1 superdiffusive (α = 2 ballistic), α < 1 subdiffusive.
    """
    u, y = _log_log(lags, msd, 2, "msd")
    return _slope(u, y)


def msd_log_derivative(lags: Any, msd: Any) -> np.ndarray:
    """Local diffusion exponent α(τ) = d log MSD / d log τ (second-order finite differences)."""
    u, y = _log_log(lags, msd, 2, "msd")
    return np.gradient(y, u)


# ---------------------------------------------------------------------------------------------
# noise model of the time-averaged MSD


def msd_noise_amplitude(X: Any) -> float:
    """Noise amplitude s² = Σλ² / (Σλ)² of a trajectory: 1 / its effective number of dimensions.

    For a Gaussian process whose coordinates are a linear mix of independent processes with a
    common MSD shape, weighted by the eigenvalues λ_k of the increments' covariance, the time-
    averaged MSD of the trajectory has the covariance of a single coordinate's times s² (in
    relative units), whatever the mixing. s² is measured from the one-step increments Δx_t:

        s² = Var_t ||Δx_t||² / (2 (mean_t ||Δx_t||²)²),

    since Var ||Δx||² = 2 Σλ² and E ||Δx||² = Σλ for Gaussian increments. One coordinate gives
    1, d independent equal ones 1/d. Heavy-tailed increments or step sizes that change over the
    window make s² larger, so every test built on it becomes more conservative.
    """
    X = _as_trajectory(X, 3)
    squared = np.einsum("ij,ij->i", np.diff(X, axis=0), np.diff(X, axis=0))
    mean = float(np.mean(squared))
    if mean <= 0:
        raise ValueError("the trajectory does not move; its MSD noise amplitude is undefined")
    return float(np.var(squared)) / (2.0 * mean**2)


def _tamsd_covariance(variogram: np.ndarray, lags: np.ndarray, num_steps: int) -> np.ndarray:
    """Cov(MSD(a), MSD(b)) of one coordinate with Gaussian stationary increments (Isserlis).

    With m(t) = E (x_{s+t} − x_s)² the variogram, the increments Δ^a_i = x_{i+a} − x_i have
    Cov(Δ^a_i, Δ^b_{i+k}) = c(k) = ½ (m(a − k) + m(k + b) − m(a − b − k) − m(k)), and for
    Gaussian variables Cov((Δ^a_i)², (Δ^b_j)²) = 2 c(j − i)², so

        Cov(MSD(a), MSD(b)) = 2 / ((T − a)(T − b)) · Σ_k n_{ab}(k) c(k)²,

    where n_{ab}(k) counts the pairs (i, i + k) of the two time averages. O(L² T) for L lags.
    ``variogram[t]`` = m(t) for t = 0 … 2T.
    """
    T = num_steps
    k = np.arange(-(T - 1), T)
    m = lambda t: variogram[np.abs(t)]  # noqa: E731  (the variogram is even)
    cov = np.empty((lags.size, lags.size))
    for p, a in enumerate(lags):
        b = lags[p:, None]
        count = np.minimum(T - a - 1, T - b - 1 - k) - np.maximum(0, -k) + 1
        c = 0.5 * (m(a - k) + m(k + b) - m(a - b - k) - m(k))
        row = 2.0 * np.sum(np.clip(count, 0, None) * c * c, axis=1) / ((T - a) * (T - lags[p:]))
        cov[p, p:] = cov[p:, p] = row
    return cov


def tamsd_log_covariance(lags: Any, num_steps: int, exponent: float) -> np.ndarray:
    """Covariance of log MSD(τ) across lags for one coordinate of a fractional Brownian motion.

    The process has Gaussian stationary increments and MSD(τ) = τ^α with α = ``exponent``
    (Hurst index α / 2); the time-averaged MSD over a window of ``num_steps`` samples then has
    the exact covariance of :func:`_tamsd_covariance`, and to first order (delta method)

        Cov(log MSD(a), log MSD(b)) = Cov(MSD(a), MSD(b)) / (a^α b^α).

    Multiply by :func:`msd_noise_amplitude` for a trajectory of many coordinates. α is
    clipped to [0.05, 1.9]: at α = 2 (a straight line) the matrix is singular.
    """
    num_steps = _check_int("num_steps", num_steps, 2)
    lags = _as_lags(lags, num_steps)
    if isinstance(exponent, bool) or not isinstance(exponent, numbers.Real) or not np.isfinite(exponent):
        raise ValueError(f"exponent must be a finite number; got {exponent!r}")
    alpha = float(np.clip(exponent, _MIN_NOISE_EXPONENT, _MAX_NOISE_EXPONENT))
    variogram = np.arange(2 * num_steps + 1, dtype=np.float64) ** alpha
    msd = variogram[lags]
    return _tamsd_covariance(variogram, lags, num_steps) / np.outer(msd, msd)


# ---------------------------------------------------------------------------------------------
# power-law fits: one exponent, or two regimes with a crossover


@dataclasses.dataclass(frozen=True)
class _BrokenFit:
    short: float
    long: float
    log_crossover: float
    coef: np.ndarray
    rss: float


def _broken_design(u: np.ndarray, u0: np.ndarray | float) -> np.ndarray:
    """Columns (1, −ν softplus(−s/ν), ν softplus(s/ν)), s = u − u₀, one design per u₀: [..., n, 3]."""
    s = (u - np.asarray(u0, dtype=np.float64)[..., None]) / _SHARPNESS
    ones = np.ones_like(s)
    return np.stack([ones, -_SHARPNESS * np.logaddexp(0.0, -s), _SHARPNESS * np.logaddexp(0.0, s)], axis=-1)


def _broken_jacobian(u: np.ndarray, fit: _BrokenFit) -> np.ndarray:
    """d log MSD / d(a, α_s, α_l, log τ₀) of the broken power law at the fit: [n, 4]."""
    design = _broken_design(u, fit.log_crossover)
    rising = special.expit((u - fit.log_crossover) / _SHARPNESS)
    d_u0 = -(fit.short * (1.0 - rising) + fit.long * rising)
    return np.column_stack([design, d_u0])


def _crossover_grid(u: np.ndarray) -> np.ndarray:
    """Candidate log τ₀: evenly spaced between the second and the second-to-last lag."""
    return np.linspace(u[1], u[-2], _GRID_PER_LAG * max(u.size - 3, 1) + 1)


def _residual_sums(bases: np.ndarray, y: np.ndarray) -> np.ndarray:
    """||y − Q Qᵀ y||² for each orthonormal basis Q in ``bases`` [..., n, p] (residual formed, no cancellation)."""
    fitted = np.einsum("...np,...p->...n", bases, np.einsum("...np,n->...p", bases, y))
    return np.sum((y - fitted) ** 2, axis=-1)


def _fit_broken(u: np.ndarray, y: np.ndarray, grid: np.ndarray | None = None) -> _BrokenFit:
    """Least-squares broken power law: profile over log τ₀ on a grid, then refine in the best cell."""
    grid = _crossover_grid(u) if grid is None else grid

    def coef_rss(u0: float) -> tuple[np.ndarray, float]:
        design = _broken_design(u, u0)
        coef = np.linalg.lstsq(design, y, rcond=None)[0]
        return coef, float(np.sum((design @ coef - y) ** 2))

    best = int(np.argmin(_residual_sums(np.linalg.qr(_broken_design(u, grid))[0], y)))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, grid.size - 1)]
    u0 = grid[best]
    if hi > lo:
        refined = optimize.minimize_scalar(lambda v: coef_rss(v)[1], bounds=(lo, hi), method="bounded", options={"xatol": 1e-7})
        if refined.fun <= coef_rss(u0)[1]:
            u0 = float(refined.x)
    coef, rss = coef_rss(u0)
    return _BrokenFit(float(coef[1]), float(coef[2]), float(u0), coef, rss)


def _broken_log_covariance(fit: _BrokenFit, lags: np.ndarray, num_steps: int) -> np.ndarray:
    """Covariance of log MSD per unit noise amplitude for a process whose MSD is the fitted
    broken power law (its variogram at every lag 0 … 2T), as :func:`tamsd_log_covariance` does
    for one power law. Negative eigenvalues (a broken power law need not be a valid variogram)
    are clipped to zero."""
    t = np.arange(1, 2 * num_steps + 1, dtype=np.float64)
    variogram = np.concatenate([[0.0], np.exp(_broken_design(np.log(t), fit.log_crossover) @ fit.coef)])
    cov = _tamsd_covariance(variogram, lags, num_steps) / np.outer(variogram[lags], variogram[lags])
    values, vectors = np.linalg.eigh(cov)
    return (vectors * np.clip(values, 0.0, None)) @ vectors.T


def fit_two_regime(lags: Any, msd: Any) -> tuple[float, float, float]:
    """Smoothly broken power law fitted to MSD(τ) by least squares in log-log coordinates.

        MSD(τ) = A (τ/τ₀)^{α_s} (1 + (τ/τ₀)^{1/ν})^{ν (α_l − α_s)},   ν = 1/2,

    i.e. log MSD = a − α_s ν softplus(−s/ν) + α_l ν softplus(s/ν) with s = log(τ/τ₀). It tends
    to A (τ/τ₀)^{α_s} for τ ≪ τ₀ and to A (τ/τ₀)^{α_l} for τ ≫ τ₀, so the crossover τ₀ is
    exactly the lag where the short- and long-lag power laws intersect (the two regimes of
    Chen, Qu, Gong 2020). The bend of width ν in log τ replaces a sharp corner, which no
    physical MSD has: fitted to the exact Ornstein–Uhlenbeck MSD 1 − e^{−κτ}, whose asymptotes
    κτ and 1 cross at τ = 1/κ, it gives κτ₀ within 1.1–1.4 on lags 1 … 999, where a sharp
    corner gives up to 1.9. τ₀ is searched continuously between the second and the
    second-to-last lag. This is the fit alone, with no significance test: :func:`fit_msd`
    reports a crossover only when the data need one.

    Returns:
        ``(exponent_short, exponent_long, crossover)`` = (α_s, α_l, τ₀).
    """
    u, y = _log_log(lags, msd, 4, "msd")
    fit = _fit_broken(u, y)
    return fit.short, fit.long, math.exp(fit.log_crossover)


@dataclasses.dataclass(frozen=True)
class MSDFit:
    """Power-law fits of one window's time-averaged MSD, with standard errors (see :func:`fit_msd`).

    Attributes:
        exponent, exponent_stderr: α of MSD ∝ τ^α and its standard error.
        fit_max_lag: the largest lag fitted (lags beyond it are too noisy, see :func:`fit_msd`).
        crossover_pvalue: p-value of "one power law" against "two regimes" (NaN when fewer
            than 6 lags can be fitted).
        exponent_short, exponent_long, crossover: the broken power law (α_s, α_l, τ₀), NaN
            unless ``crossover_pvalue < level``; with their standard errors ``*_stderr``.
    """

    exponent: float
    exponent_stderr: float
    fit_max_lag: int
    crossover_pvalue: float = math.nan
    exponent_short: float = math.nan
    exponent_short_stderr: float = math.nan
    exponent_long: float = math.nan
    exponent_long_stderr: float = math.nan
    crossover: float = math.nan
    crossover_stderr: float = math.nan


def _fitted_lags(lags: np.ndarray, u: np.ndarray, y: np.ndarray, num_steps: int, noise: float) -> int:
    """How many of the first lags have a modelled variance of log MSD within the limit (at least 3).

    Beyond that, few independent displacements enter the time average, log MSD is skewed and
    biased low, and a Gaussian noise model for it would be wrong.
    """
    alpha = _slope(u, y)
    variance = noise * np.diag(tamsd_log_covariance(lags, num_steps, alpha))
    too_noisy = np.flatnonzero(variance > _MAX_LOG_MSD_VARIANCE)
    return lags.size if too_noisy.size == 0 else max(3, int(too_noisy[0]))


def _sandwich(design: np.ndarray, shape: np.ndarray) -> tuple[np.ndarray, float]:
    """Least-squares coefficient covariance P Σ Pᵀ (P = pinv(design)) per unit noise amplitude,
    and tr((I − H) Σ) = E[RSS] per unit amplitude (H the hat matrix)."""
    pinv = np.linalg.pinv(design)
    hat = design @ pinv
    return pinv @ shape @ pinv.T, float(np.trace(shape - hat @ shape))


def _amplitude(noise: float, rss: float, expected_rss: float) -> float:
    """The larger of the measured noise amplitude and the one implied by the fit's residuals."""
    return max(noise, rss / expected_rss) if expected_rss > 0 else noise


def _crossover_pvalue(u: np.ndarray, y: np.ndarray, shape: np.ndarray, noise: float, rss_one: float) -> float:
    """Monte Carlo p-value of the drop in residual from one power law to a broken one.

    Statistic: D = (RSS_one − min_{τ₀} RSS_broken(τ₀)) / s², the likelihood-ratio statistic of
    the two least-squares fits with noise amplitude s² known. Its null distribution is drawn
    from ``_MONTE_CARLO_DRAWS`` Gaussian errors with covariance ``shape`` (a fixed seed, so a
    window always gets the same answer): D does not depend on the power law's coefficients.
    """
    if rss_one <= u.size * _EXACT_FIT_RMS**2:
        return 1.0  # a power law to rounding error
    broken_bases = np.linalg.qr(_broken_design(u, _crossover_grid(u)))[0]
    rss_broken = float(np.min(_residual_sums(broken_bases, y)))
    statistic = math.inf if noise == 0 else (rss_one - rss_broken) / noise
    values, vectors = np.linalg.eigh(shape)  # a square root that tolerates a near-singular Σ₁
    root = vectors * np.sqrt(np.clip(values, 0.0, None))
    errors = root @ np.random.default_rng(_MONTE_CARLO_SEED).standard_normal((u.size, _MONTE_CARLO_DRAWS))
    total = np.sum(errors**2, axis=0)
    one_basis = np.linalg.qr(np.column_stack([np.ones_like(u), u]))[0]
    null_one = total - np.sum((one_basis.T @ errors) ** 2, axis=0)
    null_broken = total - np.max(np.sum(np.einsum("cnp,nm->cpm", broken_bases, errors) ** 2, axis=1), axis=0)
    exceed = int(np.sum(null_one - null_broken >= statistic))
    return (1 + exceed) / (_MONTE_CARLO_DRAWS + 1)


def fit_msd(lags: Any, msd: Any, num_steps: int, noise: float, level: float = 0.01) -> MSDFit:
    """Exponent of a window's time-averaged MSD with its standard error, and a tested crossover.

    Noise model: the window's trajectory is treated as Gaussian with stationary increments and
    a common MSD shape in all its directions (any linear mix of independent fractional Brownian
    motions). Then the covariance of log MSD across lags is ``noise`` · Σ₁, with Σ₁ =
    :func:`tamsd_log_covariance` at the fitted exponent and ``noise`` = :func:`msd_noise_amplitude`
    of the trajectory (1 / its effective number of dimensions). Time-averaged MSDs at different
    lags share their displacements, so Σ₁ is far from diagonal.

    1. Lags: the first lags whose modelled variance of log MSD is at most 0.1 (relative error
       ≲ 30 %); beyond, log MSD is skewed and biased. All lags for a trajectory of many
       independent dimensions, lags up to ~T/15 for a single coordinate.
    2. ``exponent``: least-squares slope of log MSD on log τ over those lags (every lag weighted
       equally, as in Chen, Qu, Gong 2020); ``exponent_stderr`` = sqrt(s² [P Σ₁ Pᵀ]_αα), the
       sandwich formula for correlated errors, with s² the larger of ``noise`` and the
       amplitude implied by the residuals (E RSS = s² tr((I − H) Σ₁)), so that neither a
       misfit nor heavy tails leave the error bar too small.
    3. Crossover: the broken power law of :func:`fit_two_regime` is reported only when it is
       significantly better than one power law: the likelihood-ratio statistic
       (RSS_one − RSS_broken) / noise exceeds its null distribution (τ₀ maximised over,
       Monte Carlo from N(0, Σ₁)) with p-value < ``level``. Calibrated by simulation: on exact
       fractional Brownian motion (H = 0.3 … 0.8, 1 … 200 dimensions) the false-crossover rate
       is about ``level``, and Ornstein–Uhlenbeck and persistent random walks are detected.
       The stderrs of α_s, α_l and log τ₀ come from the sandwich formula with the four-
       parameter Jacobian (τ₀ included); ``crossover_stderr`` = τ₀ · stderr(log τ₀).

    Args:
        lags: strictly increasing ints τ in [1, ``num_steps`` − 1].
        msd: time-averaged MSD(τ) of a window of ``num_steps`` samples (positive).
        num_steps: samples in the window, T.
        noise: :func:`msd_noise_amplitude` of the window's trajectory (>= 0; 0 for data
            without noise, where any deviation from a power law is significant).
        level: significance level of the crossover test, in (0, 1).
    """
    num_steps = _check_int("num_steps", num_steps, 2)
    lag_values = _as_lags(lags, num_steps)
    u, y = _log_log(lag_values, msd, 3, "msd")
    if isinstance(noise, bool) or not isinstance(noise, numbers.Real) or not np.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0; got {noise!r}")
    if isinstance(level, bool) or not isinstance(level, numbers.Real) or not 0 < level < 1:
        raise ValueError(f"level must be a number in (0, 1); got {level!r}")
    n = _fitted_lags(lag_values, u, y, num_steps, noise)
    lag_values, u, y = lag_values[:n], u[:n], y[:n]
    one = np.column_stack([np.ones_like(u), u])
    coef = np.linalg.lstsq(one, y, rcond=None)[0]
    rss_one = float(np.sum((one @ coef - y) ** 2))
    shape = tamsd_log_covariance(lag_values, num_steps, float(coef[1]))
    cov, expected = _sandwich(one, shape)
    result = MSDFit(
        exponent=float(coef[1]),
        exponent_stderr=math.sqrt(_amplitude(noise, rss_one, expected) * cov[1, 1]),
        fit_max_lag=int(lag_values[-1]),
    )
    if n < _MIN_CROSSOVER_LAGS:
        return result
    pvalue = _crossover_pvalue(u, y, shape, float(noise), rss_one)
    if pvalue >= level:
        return dataclasses.replace(result, crossover_pvalue=pvalue)
    broken = _fit_broken(u, y)
    shape = _broken_log_covariance(broken, lag_values, num_steps)
    cov, expected = _sandwich(_broken_jacobian(u, broken), shape)
    stderr = np.sqrt(_amplitude(noise, broken.rss, expected) * np.diag(cov))
    crossover = math.exp(broken.log_crossover)
    return dataclasses.replace(
        result,
        crossover_pvalue=pvalue,
        exponent_short=broken.short,
        exponent_short_stderr=float(stderr[1]),
        exponent_long=broken.long,
        exponent_long_stderr=float(stderr[2]),
        crossover=crossover,
        crossover_stderr=crossover * float(stderr[3]),
    )


# ---------------------------------------------------------------------------------------------
# loss roughness and path geometry


def _pair_distances(X: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """||x_i − x_j|| for index pairs, as direct differences, in cache-sized row blocks."""
    out = np.empty(i.size)
    left = np.empty((_ROW_BLOCK, X.shape[1]))
    right = np.empty((_ROW_BLOCK, X.shape[1]))
    for start in range(0, i.size, _ROW_BLOCK):
        stop = min(start + _ROW_BLOCK, i.size)
        a, b = left[: stop - start], right[: stop - start]
        np.take(X, i[start:stop], axis=0, out=a)
        np.take(X, j[start:stop], axis=0, out=b)
        np.subtract(a, b, out=a)
        out[start:stop] = np.sqrt(np.einsum("ij,ij->i", a, a))
    return out


def _sample_pairs(
    num_steps: int, max_lag: int, max_pairs: int, rng: np.random.Generator | int | None
) -> tuple[np.ndarray, np.ndarray]:
    """All pairs (i, j = i + k) with 1 <= k <= max_lag, or ``max_pairs`` of them uniformly."""
    lags = np.arange(1, max_lag + 1)
    per_lag = num_steps - lags
    if per_lag.sum() <= max_pairs:
        i = np.concatenate([np.arange(n) for n in per_lag])
        return i, i + np.repeat(lags, per_lag)
    gen = np.random.default_rng(rng)
    k = gen.choice(lags, size=max_pairs, p=per_lag / per_lag.sum())
    i = np.floor(gen.random(max_pairs) * (num_steps - k)).astype(np.int64)
    return i, i + k


def _binned_msl(
    which: np.ndarray, sq_loss: np.ndarray, centres: np.ndarray, num_bins: int
) -> tuple[np.ndarray, np.ndarray, float]:
    """MSL per bin with at least 5 pairs, and H = ½ slope of log MSL on log Δr (NaN: < 2 bins > 0)."""
    counts = np.bincount(which, minlength=num_bins)
    sums = np.bincount(which, weights=sq_loss, minlength=num_bins)
    kept = counts >= _MIN_PAIRS_PER_BIN
    msl = sums[kept] / counts[kept]
    positive = msl > 0
    if positive.sum() < 2:
        return centres[kept], msl, math.nan
    return centres[kept], msl, 0.5 * _slope(np.log(centres[kept][positive]), np.log(msl[positive]))


def _msl(
    X: np.ndarray,
    losses: np.ndarray,
    num_bins: int,
    max_pairs: int,
    max_lag: int,
    rng: np.random.Generator | int | None,
) -> tuple[np.ndarray, np.ndarray, float, float]:
    """(bin centres, MSL, H, stderr of H); see :func:`mean_squared_loss_vs_distance`."""
    i, j = _sample_pairs(X.shape[0], max_lag, max_pairs, rng)
    dist = _pair_distances(X, i, j)
    sq_loss = (losses[i] - losses[j]) ** 2
    moved = dist > 0
    i, j, dist, sq_loss = i[moved], j[moved], dist[moved], sq_loss[moved]
    if dist.size == 0 or dist.min() == dist.max():
        return np.empty(0), np.empty(0), math.nan, math.nan
    edges = np.geomspace(dist.min(), dist.max(), num_bins + 1)
    which = np.clip(np.searchsorted(edges, dist, side="right") - 1, 0, num_bins - 1)
    all_centres = np.sqrt(edges[:-1] * edges[1:])
    centres, msl, hurst = _binned_msl(which, sq_loss, all_centres, num_bins)
    if not math.isfinite(hurst):
        return centres, msl, hurst, math.nan
    # delete-a-block jackknife over K contiguous blocks of the window (Künsch 1989)
    block_i, block_j = i * _JACKKNIFE_BLOCKS // X.shape[0], j * _JACKKNIFE_BLOCKS // X.shape[0]
    leave_out = np.array([
        _binned_msl(which[keep], sq_loss[keep], all_centres, num_bins)[2]
        for keep in ((block_i != b) & (block_j != b) for b in range(_JACKKNIFE_BLOCKS))
    ])
    k = _JACKKNIFE_BLOCKS
    stderr = math.sqrt((k - 1) / k * float(np.sum((leave_out - leave_out.mean()) ** 2)))
    return centres, msl, hurst, stderr


def _check_max_lag(max_lag: int | None, num_steps: int) -> int:
    if max_lag is None:
        return max(1, num_steps // 4)
    max_lag = _check_int("max_lag", max_lag, 1)
    if max_lag > num_steps - 1:
        raise ValueError(f"max_lag must be in [1, {num_steps - 1}] or None; got {max_lag}")
    return max_lag


def mean_squared_loss_vs_distance(
    X: Any,
    losses: Any,
    num_bins: int = 20,
    max_pairs: int = 20000,
    rng: np.random.Generator | int | None = None,
    max_lag: int | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Mean squared loss difference against distance, and the landscape's Hurst exponent.

        MSL(Δr) = E[(L_i − L_j)² | ||x_i − x_j|| ≈ Δr] ∝ Δr^{2H}

    (Chen, Qu, Gong 2020). The pairs are all pairs i < j with j − i <= ``max_lag``
    (default T // 4) when there are at most ``max_pairs`` of them, otherwise ``max_pairs``
    of those drawn uniformly with ``rng``. The loss is a single scalar series, so pairs
    farther apart than a fraction of the window have few independent samples; bounding the
    lag keeps the largest-distance bins from dominating the fit with noise. Distances are
    binned into ``num_bins`` log-spaced bins between the smallest and largest nonzero
    distance; bins with fewer than 5 pairs are dropped. H is half the least-squares slope
    of log MSL on log Δr over bins with MSL > 0: a loss linear in the position gives H = 1,
    a loss that is fractional Brownian motion of index H along a straight path gives H.

    Returns:
        ``(bin_centres, msl, hurst)``: geometric bin centres, MSL per kept bin, and H
        (NaN when fewer than two bins have a positive MSL, e.g. a constant loss).
    """
    X = _as_trajectory(X, 2)
    losses = _as_losses(losses, X.shape[0])
    num_bins = _check_int("num_bins", num_bins, 1)
    max_pairs = _check_int("max_pairs", max_pairs, 1)
    max_lag = _check_max_lag(max_lag, X.shape[0])
    return _msl(X, losses, num_bins, max_pairs, max_lag, rng)[:3]


def _log_contour_lengths(X: np.ndarray, lags: np.ndarray, msd: np.ndarray) -> np.ndarray:
    """log C(s) of :func:`trajectory_fractal_dimension` for each segment length s in ``lags``."""
    step_lengths = np.linalg.norm(np.diff(X, axis=0), axis=1)
    cumulative = np.concatenate([[0.0], np.cumsum(step_lengths)])
    contour = np.array([np.mean(cumulative[s:] - cumulative[:-s]) for s in lags])
    if np.any(contour <= 0) or np.any(msd <= 0):
        raise ValueError("the trajectory does not move over some lag; d_f is undefined")
    return np.log(contour)


def _fractal_dimension(X: np.ndarray, lags: np.ndarray, msd: np.ndarray) -> float:
    return _slope(0.5 * np.log(msd), _log_contour_lengths(X, lags, msd))


def _fractal_dimension_fit(X: np.ndarray, lags: np.ndarray, msd: np.ndarray, noise: float) -> tuple[float, float]:
    """d_f over ``lags`` (those of the exponent fit) and its standard error, by the delta method.

    d_f = S_xy / S_xx, the least-squares slope of y_j = log C(τ_j) on x_j = ½ log MSD(τ_j). The
    noise is in x: log MSD has the covariance s² Σ₁ of :func:`fit_msd` (Σ₁ =
    :func:`tamsd_log_covariance` at the power-law exponent of these lags, s² the larger of
    ``noise`` and the amplitude implied by that power law's residuals, as for ``exponent_stderr``).
    With ∂d_f/∂x_j = g_j = ((y_j − ȳ) − 2 d_f (x_j − x̄)) / S_xx,

        stderr² = s² gᵀ Σ₁ g / 4.

    The contour lengths are taken as exact: C(s)/s is a weighted mean of the same step lengths at
    every s. For a steady walk (C ∝ s) this is the error of 2/α propagated from ``exponent_stderr``
    to first order; using the measured C keeps the curvature of C and the spread of x about the
    line. The lags of a single coordinate's time average beyond the fitted ones are skewed and
    biased low (see :func:`fit_msd`), which is why d_f is fitted on the same lags as α: on
    fractional Brownian motion of one coordinate (T = 500) all lags gave twice the spread and a
    bias of +0.13 at H = 0.8. Checked against the spread over seeds on fractional Brownian
    motion (H = 0.3, 0.5, 0.8; 1, 8, 200 coordinates): stderr / spread 1.1–1.3, conservative
    like ``exponent_stderr``. One more noise-model matrix, O(len(lags)² T): ~10 ms at T = 1000.
    """
    x = 0.5 * np.log(msd)
    y = _log_contour_lengths(X, lags, msd)
    x_dev, y_dev = x - x.mean(), y - y.mean()
    s_xx = float(x_dev @ x_dev)
    fractal_dim = float(x_dev @ y_dev) / s_xx
    u = np.log(lags.astype(np.float64))
    one = np.column_stack([np.ones_like(u), u])
    coef = np.linalg.lstsq(one, 2.0 * x, rcond=None)[0]
    rss = float(np.sum((one @ coef - 2.0 * x) ** 2))
    shape = tamsd_log_covariance(lags, X.shape[0], float(coef[1]))
    expected = _sandwich(one, shape)[1]
    gradient = (y_dev - 2.0 * fractal_dim * x_dev) / s_xx
    variance = _amplitude(noise, rss, expected) * float(gradient @ shape @ gradient) / 4.0
    return fractal_dim, math.sqrt(max(variance, 0.0))


def trajectory_fractal_dimension(X: Any, lags: Any = None) -> float:
    """Fractal dimension d_f of the path from contour length against end-to-end distance.

    For each segment length s (default: ``log_spaced_lags(T, 24)``), over all segments
    [i, i + s] of the window,

        C(s) = mean_i Σ_{k=i}^{i+s−1} ||x_{k+1} − x_k||      (contour length),
        R(s) = sqrt(mean_i ||x_{i+s} − x_i||²) = sqrt(MSD(s))  (end-to-end distance),

    and d_f is the least-squares slope of log C on log R, i.e. C ∝ R^{d_f} (the polymer
    picture of Chen, Qu, Gong 2020). Since C ∝ s for any walk with steady step lengths,
    MSD ∝ s^α gives d_f = 2 / α: ballistic 1, Brownian 2, confined → ∞.
    """
    X = _as_trajectory(X, 3)
    lags = log_spaced_lags(X.shape[0], _DEFAULT_NUM_LAGS) if lags is None else lags
    lags = _as_lags(lags, X.shape[0])
    if lags.size < 2:
        raise ValueError(f"need at least 2 segment lengths; got {lags.tolist()}")
    return _fractal_dimension(X, lags, _msd(X, lags))


# ---------------------------------------------------------------------------------------------
# loss fluctuations and temperature


def moving_variance(losses: Any, window: int) -> np.ndarray:
    """Population variance of every run of ``window`` consecutive losses.

        v_k = (1 / w) Σ_{i=k}^{k+w−1} (L_i − mean(L_k … L_{k+w−1}))²,  k = 0, …, T − w
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1 or not np.all(np.isfinite(losses)):
        raise ValueError(f"losses must be a finite 1-D array; got shape {losses.shape}")
    window = _check_int("window", window, 2)
    if window > losses.size:
        raise ValueError(f"window must be in [2, {losses.size}] (len(losses)); got {window}")
    centred = losses - losses.mean()
    return np.lib.stride_tricks.sliding_window_view(centred, window).var(axis=1)


def _loss_contributions(centred: np.ndarray, window: int | None) -> np.ndarray:
    """Per-step ψ_i whose mean is the loss variance (global, or mean moving variance of ``window``).

    Global: ψ_i = (L_i − L̄)². Moving, with R = T − w + 1 runs of means m_k:
    ψ_i = T / (R w) · Σ_{runs k ∋ i} (L_i − m_k)², from prefix sums of m_k and m_k² (O(T)).
    """
    if window is None:
        return centred**2
    T, runs = centred.size, centred.size - window + 1
    means = np.lib.stride_tricks.sliding_window_view(centred, window).mean(axis=1)
    sums = np.concatenate([[0.0], np.cumsum(means)])
    sums_sq = np.concatenate([[0.0], np.cumsum(means**2)])
    i = np.arange(T)
    first, stop = np.maximum(0, i - window + 1), np.minimum(i, runs - 1) + 1
    count = stop - first
    total = count * centred**2 - 2.0 * centred * (sums[stop] - sums[first]) + (sums_sq[stop] - sums_sq[first])
    return total * T / (runs * window)


def loss_variance(losses: Any, variance_window: int | None = None) -> tuple[float, float]:
    """Variance of a window's losses and its standard error.

    Value: ``variance_window=None`` gives the population variance of all T losses; an int w the
    mean of :func:`moving_variance` (which ignores a slow trend). Both are means over steps of
    contributions ψ_i (:func:`_loss_contributions`; the centring means enter only to second
    order). Consecutive losses are correlated, so the standard error is a delete-a-block
    jackknife (Künsch 1989) of mean ψ over 8 contiguous blocks: with θ_b the mean without block b,

        stderr² = (7/8) Σ_b (θ_b − mean θ)².

    It needs blocks (T/8 steps) longer than the losses' correlation time. Checked on AR(1)
    sequences with known variance (T = 1000, ρ = 0, 0.5, 0.9; global and w = 20): stderr /
    spread over seeds 0.97–1.04; at ρ = 0.97 (correlation time 65) 0.92, and at T = 200 with
    ρ = 0.97 (three independent stretches) 0.69. NaN for fewer than 16 losses.

    Returns:
        ``(variance, stderr)``.
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1 or losses.size < 2 or not np.all(np.isfinite(losses)):
        raise ValueError(f"losses must be a finite 1-D array of at least 2 values; got shape {losses.shape}")
    if variance_window is None:
        value = float(np.var(losses))
    else:
        value = float(np.mean(moving_variance(losses, variance_window)))
    if losses.size < 2 * _JACKKNIFE_BLOCKS:
        return value, math.nan
    contributions = _loss_contributions(losses - losses.mean(), variance_window)
    blocks = np.array([b.sum() for b in np.array_split(contributions, _JACKKNIFE_BLOCKS)])
    sizes = np.array([b.size for b in np.array_split(contributions, _JACKKNIFE_BLOCKS)])
    leave_out = (blocks.sum() - blocks) / (losses.size - sizes)
    k = _JACKKNIFE_BLOCKS
    return value, math.sqrt((k - 1) / k * float(np.sum((leave_out - leave_out.mean()) ** 2)))


def sgd_temperature(lr: float, batch_size: int) -> float:
    """SGD temperature T = η / (2B) for learning rate η and batch size B.

    The inverse temperature β⁻¹ of the stationary distribution of SGD (Chaudhari & Soatto,
    "Stochastic gradient descent performs variational inference, converges to limit cycles
    for deep networks", ICLR 2018).
    """
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not np.isfinite(lr) or lr <= 0:
        raise ValueError(f"lr must be a finite number > 0; got {lr!r}")
    batch_size = _check_int("batch_size", batch_size, 1)
    return float(lr) / (2.0 * batch_size)


# ---------------------------------------------------------------------------------------------
# one window


@dataclasses.dataclass(frozen=True, eq=False)
class WindowStats:
    """Statistics of one window starting at waiting time ``t_w`` (arrays are read-only).

    Attributes:
        t_w: training step of the window's first sample.
        lags: lags τ of the MSD.
        msd: time-averaged MSD(τ).
        exponent: single power-law exponent α of MSD ∝ τ^α (:func:`fit_msd`).
        exponent_short, exponent_long, crossover: two-regime fit (α_s, α_l, τ₀), NaN unless a
            broken power law is significantly better than one (:func:`fit_msd`).
        log_derivative: local exponent d log MSD / d log τ at each lag.
        msl_distances, msl: MSL(Δr) per distance bin (geometric bin centres; empty without losses).
        hurst: H of MSL ∝ Δr^{2H} (NaN for a constant loss or without losses).
        fractal_dim: d_f of contour length ∝ end-to-end distance^{d_f}, over the lags of the
            exponent fit (up to ``fit_max_lag``).
        loss_variance: variance of the window's losses (see :func:`analyse_window`; NaN without).
        exponent_stderr, exponent_short_stderr, exponent_long_stderr, crossover_stderr:
            standard errors (:func:`fit_msd`).
        crossover_pvalue: p-value of one power law against two regimes (NaN: too few lags).
        fit_max_lag: the largest lag the fits use (the noisier ones are not fitted).
        hurst_stderr: standard error of ``hurst`` (see :func:`analyse_window`).
        fractal_dim_stderr: standard error of ``fractal_dim`` (:func:`_fractal_dimension_fit`).
        loss_variance_stderr: standard error of ``loss_variance`` (:func:`loss_variance`).
    """

    t_w: int
    lags: np.ndarray
    msd: np.ndarray
    exponent: float
    exponent_short: float
    exponent_long: float
    crossover: float
    log_derivative: np.ndarray
    msl_distances: np.ndarray
    msl: np.ndarray
    hurst: float
    fractal_dim: float
    loss_variance: float
    exponent_stderr: float = math.nan
    exponent_short_stderr: float = math.nan
    exponent_long_stderr: float = math.nan
    crossover_stderr: float = math.nan
    crossover_pvalue: float = math.nan
    fit_max_lag: int = 0
    hurst_stderr: float = math.nan
    fractal_dim_stderr: float = math.nan
    loss_variance_stderr: float = math.nan

    def __post_init__(self) -> None:
        for field in ("lags", "msd", "log_derivative", "msl_distances", "msl"):
            getattr(self, field).setflags(write=False)

    def scalars(self) -> dict[str, float]:
        """The scalar statistics by name, for logging (NaN where not estimated)."""
        names = (
            "exponent",
            "exponent_stderr",
            "exponent_short",
            "exponent_short_stderr",
            "exponent_long",
            "exponent_long_stderr",
            "crossover",
            "crossover_stderr",
            "crossover_pvalue",
            "hurst",
            "hurst_stderr",
            "fractal_dim",
            "fractal_dim_stderr",
            "loss_variance",
            "loss_variance_stderr",
        )
        return {name: float(getattr(self, name)) for name in names}


def analyse_window(
    X: Any,
    losses: Any,
    t_w: int,
    lags: Any = None,
    num_bins: int = 20,
    max_pairs: int = 20000,
    rng: np.random.Generator | int | None = None,
    variance_window: int | None = None,
    max_lag: int | None = None,
    crossover_level: float = 0.01,
) -> WindowStats:
    """All diffusion statistics of one window of T >= 4 steps.

    Cost is O(len(lags) · T · dim) for the MSD and path geometry, O(len(lags)² · T) for its
    noise model, plus O(max_pairs · dim) for the subsampled MSL pairs: a 1000 × 1024 window
    takes about 0.2–0.3 s on one idle CPU core with the defaults (22 lags, 20000 pairs).

    Args:
        X: recorded (sketched) weights [T, dim].
        losses: training losses [T], or ``None`` when there are none (e.g. a manual-optimization
            ``training_step`` that returns nothing): then ``hurst`` and ``loss_variance`` are NaN
            and the MSL is empty; everything else needs only the weights.
        t_w: waiting time, the step of the first sample.
        lags: MSD lags (default ``log_spaced_lags(T, 24)``); those the exponent fit keeps
            (up to ``fit_max_lag``) are also the segment lengths of the fractal dimension.
        num_bins, max_pairs, rng, max_lag: see :func:`mean_squared_loss_vs_distance`.
        variance_window: ``None`` gives the variance of all T losses; an int w gives the
            mean of :func:`moving_variance` with window w, which ignores a slow trend.
        crossover_level: significance level of the crossover test (:func:`fit_msd`).

    The exponents and their standard errors come from :func:`fit_msd`. The standard error of
    ``hurst`` is a delete-a-block jackknife (Künsch 1989): the window is cut into 8 contiguous
    blocks, H is refitted 8 times without the pairs that touch one block (same bins), and
    stderr² = (7/8) Σ_b (H_b − mean H_b)². The losses form one correlated series, so pairs
    are far from independent; blocks keep that dependence. Checked by simulation: on
    fractional-Brownian losses along a straight path (H = 0.3, 0.7) and a linear loss along a
    Brownian path (H = 1), stderr / spread over seeds is 1.0–1.3. ``fractal_dim_stderr``: the
    delta method with the MSD's noise model (:func:`_fractal_dimension_fit`);
    ``loss_variance_stderr``: a block jackknife (:func:`loss_variance`).
    """
    X = _as_trajectory(X, MIN_WINDOW)
    T = X.shape[0]
    losses = None if losses is None else _as_losses(losses, T)
    t_w = _check_int("t_w", t_w, 0)
    lags = _as_lags(log_spaced_lags(T, _DEFAULT_NUM_LAGS) if lags is None else lags, T)
    if lags.size < 3:
        raise ValueError(f"need at least 3 lags; got {lags.tolist()}")
    num_bins = _check_int("num_bins", num_bins, 1)
    max_pairs = _check_int("max_pairs", max_pairs, 1)
    max_lag = _check_max_lag(max_lag, T)
    if losses is None:
        variance, variance_stderr = math.nan, math.nan
        centres, msl, hurst, hurst_stderr = np.empty(0), np.empty(0), math.nan, math.nan
    else:
        variance, variance_stderr = loss_variance(losses, variance_window)
        centres, msl, hurst, hurst_stderr = _msl(X, losses, num_bins, max_pairs, max_lag, rng)
    msd = _msd(X, lags)
    noise = msd_noise_amplitude(X)
    fit = fit_msd(lags, msd, T, noise, level=crossover_level)
    fitted = lags <= fit.fit_max_lag
    fractal_dim, fractal_dim_stderr = _fractal_dimension_fit(X, lags[fitted], msd[fitted], noise)
    return WindowStats(
        t_w=t_w,
        lags=lags,
        msd=msd,
        exponent=fit.exponent,
        exponent_short=fit.exponent_short,
        exponent_long=fit.exponent_long,
        crossover=fit.crossover,
        log_derivative=msd_log_derivative(lags, msd),
        msl_distances=centres,
        msl=msl,
        hurst=hurst,
        fractal_dim=fractal_dim,
        loss_variance=variance,
        exponent_stderr=fit.exponent_stderr,
        exponent_short_stderr=fit.exponent_short_stderr,
        exponent_long_stderr=fit.exponent_long_stderr,
        crossover_stderr=fit.crossover_stderr,
        crossover_pvalue=fit.crossover_pvalue,
        fit_max_lag=fit.fit_max_lag,
        hurst_stderr=hurst_stderr,
        fractal_dim_stderr=fractal_dim_stderr,
        loss_variance_stderr=variance_stderr,
    )


class WindowAccumulator:
    """Collects one projected weight vector and loss per step; analyses each full window.

    The first vector of a window is its origin; rows are stored as x_t − x_origin in a
    preallocated float64 [window, dim] buffer, so nothing grows with training length.
    :meth:`append` returns the :class:`WindowStats` of the window when it fills and starts
    a new one. The MSL subsampling uses ``numpy.random.default_rng([seed, t_w])``, so a
    window restored from :meth:`state_dict` yields identical statistics. A step may come
    without a loss; a window with any such step is analysed without losses (no Hurst
    exponent, no loss variance).

    Args:
        window: steps per window (>= 4).
        dim: length of each projected vector.
        lags, num_bins, max_pairs, variance_window, max_lag, crossover_level: passed to
            :func:`analyse_window`.
        seed: seed of the MSL pair subsampling.
    """

    def __init__(
        self,
        window: int,
        dim: int,
        lags: Sequence[int] | np.ndarray | None = None,
        num_bins: int = 20,
        max_pairs: int = 20000,
        variance_window: int | None = None,
        max_lag: int | None = None,
        seed: int = 0,
        crossover_level: float = 0.01,
    ) -> None:
        self.window = _check_int("window", window, MIN_WINDOW)
        self.dim = _check_int("dim", dim, 1)
        self.lags = _as_lags(
            log_spaced_lags(self.window, _DEFAULT_NUM_LAGS) if lags is None else lags, window
        )
        if self.lags.size < 3:
            raise ValueError(f"need at least 3 lags; got {self.lags}")
        self.num_bins = _check_int("num_bins", num_bins, 1)
        self.max_pairs = _check_int("max_pairs", max_pairs, 1)
        if variance_window is not None:
            _check_int("variance_window", variance_window, 2)
            if variance_window > window:
                raise ValueError(
                    f"variance_window must be in [2, {window}]; got {variance_window}"
                )
        self.variance_window = variance_window
        _check_max_lag(max_lag, self.window)
        self.max_lag = max_lag
        self.seed = _check_int("seed", seed, 0)
        if isinstance(crossover_level, bool) or not isinstance(crossover_level, numbers.Real) or not 0 < crossover_level < 1:
            raise ValueError(f"crossover_level must be a number in (0, 1); got {crossover_level!r}")
        self.crossover_level = float(crossover_level)
        self._buffer = np.zeros((self.window, self.dim))
        self._losses = np.zeros(self.window)
        self._origin = np.zeros(self.dim)
        self._count = 0
        self._t_w = 0

    @property
    def count(self) -> int:
        """Samples in the current, not yet full, window."""
        return self._count

    @property
    def t_w(self) -> int | None:
        """Waiting time (first step) of the current window; ``None`` while it is empty."""
        return self._t_w if self._count else None

    def reset(self) -> None:
        """Drop the current window."""
        self._count = 0

    def append(
        self, vector: torch.Tensor | np.ndarray, loss: float | None, step: int
    ) -> WindowStats | None:
        """Record the projected weights and loss (``None``: no loss) of training step ``step``.

        Returns:
            The window's :class:`WindowStats` when this sample fills it (the accumulator is
            then empty again, also when the analysis raises), else ``None``.
        """
        if isinstance(vector, torch.Tensor):
            vector = vector.detach().to(device="cpu", dtype=torch.float64).numpy()
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (self.dim,) or not np.all(np.isfinite(vector)):
            raise ValueError(f"vector must be finite with shape ({self.dim},); got {vector.shape}")
        if loss is not None and not math.isfinite(float(loss)):
            raise ValueError(f"loss must be finite or None; got {loss}")
        loss = math.nan if loss is None else float(loss)  # NaN marks a step without a loss
        step = _check_int("step", step, 0)
        if self._count == 0:
            self._origin[:] = vector
            self._t_w = step
        np.subtract(vector, self._origin, out=self._buffer[self._count])
        self._losses[self._count] = loss
        self._count += 1
        if self._count < self.window:
            return None
        try:
            losses = self._losses if np.all(np.isfinite(self._losses)) else None
            return analyse_window(
                self._buffer,
                losses,
                self._t_w,
                lags=self.lags,
                num_bins=self.num_bins,
                max_pairs=self.max_pairs,
                rng=np.random.default_rng([self.seed, self._t_w]),
                variance_window=self.variance_window,
                max_lag=self.max_lag,
                crossover_level=self.crossover_level,
            )
        finally:
            self.reset()

    def state_dict(self) -> dict[str, Any]:
        """The partially filled window as torch tensors (safe for ``weights_only`` loading)."""
        return {
            "window": self.window,
            "dim": self.dim,
            "count": self._count,
            "t_w": self._t_w,
            "origin": torch.from_numpy(self._origin.copy()),
            "buffer": torch.from_numpy(self._buffer[: self._count].copy()),
            "losses": torch.from_numpy(self._losses[: self._count].copy()),  # NaN: no loss
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a window saved by :meth:`state_dict` (same ``window`` and ``dim``)."""
        if (state["window"], state["dim"]) != (self.window, self.dim):
            raise ValueError(
                f"state is for window={state['window']}, dim={state['dim']}; this accumulator "
                f"has window={self.window}, dim={self.dim}"
            )
        count = _check_int("count", state["count"], 0)
        if count >= self.window:
            raise ValueError(f"state count must be in [0, {self.window - 1}]; got {count}")
        self._origin[:] = torch.as_tensor(state["origin"], dtype=torch.float64).numpy()
        self._buffer[:count] = torch.as_tensor(state["buffer"], dtype=torch.float64).numpy()
        self._losses[:count] = torch.as_tensor(state["losses"], dtype=torch.float64).numpy()
        self._t_w = int(state["t_w"])
        self._count = count
