"""Figures of the Hessian spectrum."""

from __future__ import annotations

import chaos_callbacks.plotting  # noqa: F401  (selects the Agg backend)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from chaos_callbacks.curvature import SpectralDensity

#: The y-range spans at least ``MIN_DECADES`` and at most ``MAX_DECADES`` decades below the peak.
MIN_DECADES, MAX_DECADES = 2, 8
#: Quadrature nodes lighter than this fraction of the heaviest are rounding ghosts, not spectrum.
NODE_WEIGHT_FLOOR = 1e-6


def density_floor(density: SpectralDensity) -> float:
    """Lowest density worth showing: a tenth of the density at the lightest real quadrature node.

    The Gaussian-broadened SLQ density falls to 1e-12 and below between and beyond the Ritz values;
    those tails are the broadening, not the spectrum. Every node (an isolated outlier eigenvalue
    carries weight ~1/dim) stays in view; the floor is kept within [``MIN_DECADES``,
    ``MAX_DECADES``] decades below the peak.
    """
    grid, values = density.grid.double().numpy(), density.density.double().numpy()
    peak = float(values.max()) if values.size and values.max() > 0 else 1.0
    nodes, weights = density.nodes.double().flatten().numpy(), density.weights.double().flatten().numpy()
    real = nodes[weights >= NODE_WEIGHT_FLOOR * weights.max()] if weights.size and weights.max() > 0 else nodes
    at_nodes = np.interp(real, grid, values) if real.size else np.array([peak])
    floor = 0.1 * float(at_nodes.min())
    return float(np.clip(floor, peak * 10.0**-MAX_DECADES, peak * 10.0**-MIN_DECADES))


def spectral_density_figure(density: SpectralDensity) -> Figure:
    """Broadened SLQ density on a log y-axis (the view of Ghorbani et al. 2019, Fig. 1), the
    y-range clipped at :func:`density_floor` and the x-range to where the density lies above it."""
    grid, values = density.grid.double().numpy(), density.density.double().numpy()
    floor = density_floor(density)
    peak = float(values.max()) if values.size and values.max() > 0 else 1.0
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.semilogy(grid, values.clip(min=floor * 1e-3))
    ax.set_ylim(floor, peak * 2.0)
    shown = grid[values >= floor]
    if shown.size and shown[-1] > shown[0]:
        pad = 0.03 * (shown[-1] - shown[0])
        ax.set_xlim(shown[0] - pad, shown[-1] + pad)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"Hessian spectral density ({density.num_matvecs} HVPs)")
    fig.tight_layout()
    return fig
