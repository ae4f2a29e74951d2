"""Figures of the anomalous-diffusion statistics, one curve per window coloured by its waiting time.

The views of Chen, Qu, Gong, "Anomalous diffusion dynamics of learning in deep neural networks"
(arXiv 2009.10588): MSD(τ) on log-log axes (their Fig. 2a), the local exponent
d log MSD / d log τ, and the mean squared loss MSL(Δr) against distance (MSL ∝ Δr^{2H}).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import chaos_callbacks.plotting  # noqa: F401  (selects the Agg backend)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from chaos_callbacks.dynamics.diffusion import WindowStats

Curve = Callable[[WindowStats], tuple[np.ndarray, np.ndarray]]


def _by_waiting_time(windows: Sequence[WindowStats], curve: Curve, log_y: bool) -> tuple[Figure, Axes]:
    """One line per window, from ``curve(window) -> (x, y)``, coloured by ``t_w`` (viridis)."""
    if not windows:
        raise ValueError("need at least one window to plot")
    t_ws = [w.t_w for w in windows]
    norm = Normalize(min(t_ws), max(max(t_ws), min(t_ws) + 1))
    cmap = plt.get_cmap("viridis")
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=100)
    plotted = False
    for w in windows:
        x, y = curve(w)
        keep = (x > 0) & (y > 0) if log_y else x > 0  # log axes show positive values only
        if keep.any():
            ax.plot(x[keep], y[keep], color=cmap(norm(w.t_w)), lw=1.2)
            plotted = True
    if plotted:  # a log axis without data cannot place its ticks
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="waiting time $t_w$ (step)")
    return fig, ax


def msd_figure(windows: Sequence[WindowStats]) -> Figure:
    """Time-averaged MSD(τ) of every window on log-log axes (Chen, Qu, Gong 2020, Fig. 2a)."""
    fig, ax = _by_waiting_time(windows, lambda w: (np.asarray(w.lags, float), w.msd), log_y=True)
    ax.set_xlabel("lag τ (steps)")
    ax.set_ylabel("MSD(τ)")
    ax.set_title("weight MSD per window")
    fig.tight_layout()
    return fig


def msd_log_derivative_figure(windows: Sequence[WindowStats]) -> Figure:
    """Local exponent d log MSD / d log τ of every window; 1 (dashed) is Brownian motion."""
    fig, ax = _by_waiting_time(windows, lambda w: (np.asarray(w.lags, float), w.log_derivative), log_y=False)
    ax.axhline(1.0, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("lag τ (steps)")
    ax.set_ylabel("d log MSD / d log τ")
    ax.set_title("local diffusion exponent")
    fig.tight_layout()
    return fig


def msl_figure(windows: Sequence[WindowStats]) -> Figure:
    """Mean squared loss difference MSL(Δr) against weight distance Δr, log-log (slope 2H)."""
    fig, ax = _by_waiting_time(windows, lambda w: (w.msl_distances, w.msl), log_y=True)
    ax.set_xlabel("distance Δr")
    ax.set_ylabel("MSL(Δr)")
    ax.set_title("loss roughness along the path")
    fig.tight_layout()
    return fig


def _errorbars(ax: Axes, windows: Sequence[WindowStats], name: str, label: str, marker: str) -> bool:
    """Plot ``name`` ± ``name_stderr`` against ``t_w`` for the windows where it is finite."""
    points = [(w.t_w, getattr(w, name), getattr(w, f"{name}_stderr")) for w in windows]
    points = [(t, v, e if np.isfinite(e) else 0.0) for t, v, e in points if np.isfinite(v)]
    if not points:
        return False
    t, v, e = map(np.asarray, zip(*points))
    ax.errorbar(t, v, yerr=e, fmt=marker, ms=4, capsize=2, lw=1, label=label)
    return True


def exponents_figure(windows: Sequence[WindowStats]) -> Figure:
    """Fitted exponents and crossover of every window against its waiting time, ± one stderr.

    Top: α (one power law) and, where a crossover is significant, α_s and α_l; 1 (dashed) is
    Brownian motion. Bottom: the crossover lag τ₀. Each window is one marker, unsmoothed, so the
    few windows of a run stay readable (TensorBoard's scalar smoothing hides sparse points).
    """
    if not windows:
        raise ValueError("need at least one window to plot")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(5.2, 5.0), dpi=100, sharex=True, height_ratios=(3, 2))
    _errorbars(top, windows, "exponent", "α (one power law)", "o")
    _errorbars(top, windows, "exponent_short", "α_s (short lags)", "v")
    _errorbars(top, windows, "exponent_long", "α_l (long lags)", "^")
    top.axhline(1.0, color="grey", ls="--", lw=0.8)
    top.set_ylabel("MSD exponent")
    top.legend(fontsize=7, loc="best")
    top.set_title("diffusion exponents per window (± stderr)")
    if _errorbars(bottom, windows, "crossover", "τ₀", "s"):
        bottom.set_yscale("log")
    else:
        bottom.text(0.5, 0.5, "no significant crossover", ha="center", va="center", transform=bottom.transAxes)
    bottom.set_ylabel("crossover τ₀ (steps)")
    bottom.set_xlabel("waiting time $t_w$ (step)")
    fig.tight_layout()
    return fig
