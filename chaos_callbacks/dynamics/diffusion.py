"""Anomalous-diffusion statistics of a recorded weight trajectory.

Implements the measurements of Chen, Qu, Gong, "Anomalous diffusion dynamics of learning in
deep neural networks" (arXiv 2009.10588) on one window of T recorded (possibly sketched, see
:mod:`chaos_callbacks.dynamics.sketch`) weight vectors x_0, …, x_{T−1} ∈ R^d that starts at
waiting time t_w, together with the training losses L_0, …, L_{T−1}:

* time-averaged mean squared displacement MSD(τ) and its power law MSD ∝ τ^α (α > 1
  superdiffusive, α < 1 subdiffusive), a two-regime fit with crossover τ₀, and the local
  exponent d log MSD / d log τ;
* mean squared loss MSL(Δr) = E[(L_i − L_j)²] over pairs at distance Δr = ||x_i − x_j||,
  MSL ∝ Δr^{2H} with Hurst exponent H of the loss landscape along the path;
* contour length against end-to-end distance of sub-trajectories, L ∝ R^{d_f};
* the SGD temperature T = η / (2B) (Chaudhari & Soatto, ICLR 2018).

All arithmetic is numpy float64. Displacements are always formed as differences of the
centred vectors, never as ||a||² + ||b||² − 2a·b, which cancels catastrophically when the
displacement is small against the weights' norm. :class:`WindowAccumulator` collects one
vector and loss per step and analyses each window when it fills.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Sequence

import numpy as np
import torch

__all__ = [
    "MIN_WINDOW",
    "WindowAccumulator",
    "WindowStats",
    "analyse_window",
    "fit_diffusion_exponent",
    "fit_two_regime",
    "log_spaced_lags",
    "mean_squared_loss_vs_distance",
    "moving_variance",
    "msd_log_derivative",
    "sgd_temperature",
    "time_averaged_msd",
    "trajectory_fractal_dimension",
]

MIN_WINDOW = 4
"""Fewest steps in an analysed window (lags 1, 2, 3: enough for a two-regime fit)."""

_DEFAULT_NUM_LAGS = 24
_MIN_PAIRS_PER_BIN = 5
_ROW_BLOCK = 256


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


def fit_two_regime(lags: Any, msd: Any) -> tuple[float, float, float]:
    """Continuous two-segment power law fitted to MSD(τ) in log-log coordinates.

    For each interior lag τ_c (at least two lags on each side, the break shared) fit

        log MSD = a + α_s · min(log τ − log τ_c, 0) + α_l · max(log τ − log τ_c, 0)

    by least squares and keep the τ_c with the smallest residual; τ_c is the crossover τ₀
    between the short-lag and long-lag regimes (Chen, Qu, Gong 2020).

    Returns:
        ``(exponent_short, exponent_long, crossover)`` = (α_s, α_l, τ_c).
    """
    u, y = _log_log(lags, msd, 3, "msd")
    lag_values = np.asarray(lags, dtype=np.float64)
    best: tuple[float, float, float, float] | None = None
    for k in range(1, u.size - 1):
        shifted = u - u[k]
        design = np.column_stack(
            [np.ones_like(u), np.minimum(shifted, 0.0), np.maximum(shifted, 0.0)]
        )
        coef = np.linalg.lstsq(design, y, rcond=None)[0]
        residual = float(np.sum((design @ coef - y) ** 2))
        if best is None or residual < best[0]:
            best = (residual, float(coef[1]), float(coef[2]), float(lag_values[k]))
    assert best is not None  # u.size >= 3 guarantees one candidate
    return best[1], best[2], best[3]


def msd_log_derivative(lags: Any, msd: Any) -> np.ndarray:
    """Local diffusion exponent α(τ) = d log MSD / d log τ (second-order finite differences)."""
    u, y = _log_log(lags, msd, 2, "msd")
    return np.gradient(y, u)


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


def _msl(
    X: np.ndarray,
    losses: np.ndarray,
    num_bins: int,
    max_pairs: int,
    max_lag: int,
    rng: np.random.Generator | int | None,
) -> tuple[np.ndarray, np.ndarray, float]:
    i, j = _sample_pairs(X.shape[0], max_lag, max_pairs, rng)
    dist = _pair_distances(X, i, j)
    sq_loss = (losses[i] - losses[j]) ** 2
    moved = dist > 0
    dist, sq_loss = dist[moved], sq_loss[moved]
    if dist.size == 0 or dist.min() == dist.max():
        return np.empty(0), np.empty(0), float("nan")
    edges = np.geomspace(dist.min(), dist.max(), num_bins + 1)
    which = np.clip(np.searchsorted(edges, dist, side="right") - 1, 0, num_bins - 1)
    counts = np.bincount(which, minlength=num_bins)
    sums = np.bincount(which, weights=sq_loss, minlength=num_bins)
    kept = counts >= _MIN_PAIRS_PER_BIN
    centres = np.sqrt(edges[:-1] * edges[1:])[kept]
    msl = sums[kept] / counts[kept]
    positive = msl > 0
    if positive.sum() < 2:
        return centres, msl, float("nan")
    return centres, msl, 0.5 * _slope(np.log(centres[positive]), np.log(msl[positive]))


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
    return _msl(X, losses, num_bins, max_pairs, max_lag, rng)


def _fractal_dimension(X: np.ndarray, lags: np.ndarray, msd: np.ndarray) -> float:
    step_lengths = np.linalg.norm(np.diff(X, axis=0), axis=1)
    cumulative = np.concatenate([[0.0], np.cumsum(step_lengths)])
    contour = np.array([np.mean(cumulative[s:] - cumulative[:-s]) for s in lags])
    if np.any(contour <= 0) or np.any(msd <= 0):
        raise ValueError("the trajectory does not move over some lag; d_f is undefined")
    return _slope(0.5 * np.log(msd), np.log(contour))


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
        exponent: single power-law exponent α of MSD ∝ τ^α.
        exponent_short, exponent_long, crossover: two-regime fit (α_s, α_l, τ₀).
        log_derivative: local exponent d log MSD / d log τ at each lag.
        msl_distances, msl: MSL(Δr) per distance bin (geometric bin centres).
        hurst: H of MSL ∝ Δr^{2H} (NaN for a constant loss).
        fractal_dim: d_f of contour length ∝ end-to-end distance^{d_f}.
        loss_variance: variance of the window's losses (see :func:`analyse_window`).
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

    def __post_init__(self) -> None:
        for field in ("lags", "msd", "log_derivative", "msl_distances", "msl"):
            getattr(self, field).setflags(write=False)

    def scalars(self) -> dict[str, float]:
        """The scalar statistics by name, for logging."""
        names = (
            "exponent",
            "exponent_short",
            "exponent_long",
            "crossover",
            "hurst",
            "fractal_dim",
            "loss_variance",
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
) -> WindowStats:
    """All diffusion statistics of one window of T >= 4 steps.

    Cost is O(len(lags) · T · dim) for the MSD and path geometry plus
    O(max_pairs · dim) for the subsampled MSL pairs: a 1000 × 1024 window takes about
    0.15–0.2 s on one idle CPU core with the defaults (22 lags, 20000 pairs).

    Args:
        X: recorded (sketched) weights [T, dim].
        losses: training losses [T].
        t_w: waiting time, the step of the first sample.
        lags: MSD lags (default ``log_spaced_lags(T, 24)``); also the segment lengths of
            the fractal dimension.
        num_bins, max_pairs, rng, max_lag: see :func:`mean_squared_loss_vs_distance`.
        variance_window: ``None`` gives the variance of all T losses; an int w gives the
            mean of :func:`moving_variance` with window w, which ignores a slow trend.
    """
    X = _as_trajectory(X, MIN_WINDOW)
    T = X.shape[0]
    losses = _as_losses(losses, T)
    t_w = _check_int("t_w", t_w, 0)
    lags = _as_lags(log_spaced_lags(T, _DEFAULT_NUM_LAGS) if lags is None else lags, T)
    if lags.size < 3:
        raise ValueError(f"need at least 3 lags for the two-regime fit; got {lags.tolist()}")
    num_bins = _check_int("num_bins", num_bins, 1)
    max_pairs = _check_int("max_pairs", max_pairs, 1)
    max_lag = _check_max_lag(max_lag, T)
    if variance_window is None:
        loss_variance = float(np.var(losses))
    else:
        loss_variance = float(np.mean(moving_variance(losses, variance_window)))
    msd = _msd(X, lags)
    short, long, crossover = fit_two_regime(lags, msd)
    centres, msl, hurst = _msl(X, losses, num_bins, max_pairs, max_lag, rng)
    return WindowStats(
        t_w=t_w,
        lags=lags,
        msd=msd,
        exponent=fit_diffusion_exponent(lags, msd),
        exponent_short=short,
        exponent_long=long,
        crossover=crossover,
        log_derivative=msd_log_derivative(lags, msd),
        msl_distances=centres,
        msl=msl,
        hurst=hurst,
        fractal_dim=_fractal_dimension(X, lags, msd),
        loss_variance=loss_variance,
    )


class WindowAccumulator:
    """Collects one projected weight vector and loss per step; analyses each full window.

    The first vector of a window is its origin; rows are stored as x_t − x_origin in a
    preallocated float64 [window, dim] buffer, so nothing grows with training length.
    :meth:`append` returns the :class:`WindowStats` of the window when it fills and starts
    a new one. The MSL subsampling uses ``numpy.random.default_rng([seed, t_w])``, so a
    window restored from :meth:`state_dict` yields identical statistics.

    Args:
        window: steps per window (>= 4).
        dim: length of each projected vector.
        lags, num_bins, max_pairs, variance_window, max_lag: passed to
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
    ) -> None:
        self.window = _check_int("window", window, MIN_WINDOW)
        self.dim = _check_int("dim", dim, 1)
        self.lags = _as_lags(
            log_spaced_lags(self.window, _DEFAULT_NUM_LAGS) if lags is None else lags, window
        )
        if self.lags.size < 3:
            raise ValueError(f"need at least 3 lags for the two-regime fit; got {self.lags}")
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
        self, vector: torch.Tensor | np.ndarray, loss: float, step: int
    ) -> WindowStats | None:
        """Record the projected weights and loss of training step ``step``.

        Returns:
            The window's :class:`WindowStats` when this sample fills it (the accumulator is
            then empty again, also when the analysis raises), else ``None``.
        """
        if isinstance(vector, torch.Tensor):
            vector = vector.detach().to(device="cpu", dtype=torch.float64).numpy()
        vector = np.asarray(vector, dtype=np.float64)
        if vector.shape != (self.dim,) or not np.all(np.isfinite(vector)):
            raise ValueError(f"vector must be finite with shape ({self.dim},); got {vector.shape}")
        loss = float(loss)
        if not np.isfinite(loss):
            raise ValueError(f"loss must be finite; got {loss}")
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
            return analyse_window(
                self._buffer,
                self._losses,
                self._t_w,
                lags=self.lags,
                num_bins=self.num_bins,
                max_pairs=self.max_pairs,
                rng=np.random.default_rng([self.seed, self._t_w]),
                variance_window=self.variance_window,
                max_lag=self.max_lag,
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
            "losses": torch.from_numpy(self._losses[: self._count].copy()),
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
