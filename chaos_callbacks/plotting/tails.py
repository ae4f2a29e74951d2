"""Figures of heavy-tailed gradient samples."""

from __future__ import annotations

import chaos_callbacks.plotting  # noqa: F401  (selects the Agg backend)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from chaos_callbacks.dynamics.tails import symmetric_stable_logpdf

_BINS = 60
_LOWEST_QUANTILE = 1e-3  # the first bins below it hold a handful of points


def tail_density_figure(samples: np.ndarray, alpha: float, scale: float, what: str = "gradient") -> Figure:
    """Density of |x - median| on log-log axes with the fitted stable law and the Gaussian MLE.

    Folding about the median (the fitted location) shows both tails at once: the empirical density
    of r = |x - median| in logarithmic bins, the folded stable density 2 p_S(r; alpha, scale) —
    a straight line of slope -(1 + alpha) in the tail — and the folded Gaussian 2 N(r; 0, sigma^2)
    with sigma the sample standard deviation, which drops off a cliff (the view of Chen, Gong et
    al., arXiv 2009.10588, and Şimşekli et al. 2019).
    """
    x = np.asarray(samples, dtype=float)
    r = np.abs(x - np.median(x))
    r = r[r > 0]
    edges = np.geomspace(np.quantile(r, _LOWEST_QUANTILE), r.max(), _BINS + 1)
    counts, _ = np.histogram(r, bins=edges)
    density = counts / (x.size * np.diff(edges))  # normalised over all x.size samples
    centres = np.sqrt(edges[:-1] * edges[1:])
    grid = np.geomspace(edges[0], edges[-1], 400)
    sigma = float(np.std(x))
    stable = 2.0 * np.exp(symmetric_stable_logpdf(grid, alpha, scale))
    gauss = 2.0 * np.exp(-0.5 * (grid / sigma) ** 2) / (sigma * np.sqrt(2.0 * np.pi))

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
    shown = counts > 0
    ax.loglog(centres[shown], density[shown], "o", ms=3, color="0.3", label=f"{x.size} samples")
    ax.loglog(grid, stable, label=f"stable α={alpha:.3f}")
    ax.loglog(grid, gauss, "--", label=f"Gaussian σ={sigma:.3g}")
    ax.set_ylim(0.5 * density[shown].min(), 2.0 * max(density.max(), stable.max(), gauss.max()))
    ax.set_xlabel(f"|{what} entry − median|")
    ax.set_ylabel("density")
    ax.set_title(f"{what} entries: stable fit vs Gaussian")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
