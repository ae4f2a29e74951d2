"""Figures of the Hessian spectrum."""

from __future__ import annotations

import chaos_callbacks.plotting  # noqa: F401  (selects the Agg backend)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from chaos_callbacks.curvature import SpectralDensity
from chaos_callbacks.curvature.landscape import Landscape

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


def landscape_figure(landscape: Landscape) -> Figure:
    """The loss along ``±t·v₁`` with its quadratic model (PyHessian's view) and, when there is a plane,
    filled contours of the loss over the ``v₁–v₂`` plane with the model's contours drawn over them.

    The panels are stacked and drawn with thick lines and few ticks: TensorBoard shows an image in a
    card about 370 px wide, where a side-by-side layout's text was ~5 px high."""
    from matplotlib.ticker import MaxNLocator

    planar = landscape.plane is not None
    fig, axes = plt.subplots(2 if planar else 1, 1, figsize=(5, 7.2 if planar else 3.8), dpi=100, squeeze=False)
    ax = axes[0, 0]
    t = landscape.t.numpy()
    ax.plot(t, landscape.line.numpy(), lw=2, label="loss")
    ax.plot(t, landscape.line_model.numpy(), "--", lw=2, label="quadratic model")
    ax.set_xlabel("t (along v1)")
    ax.set_ylabel("loss")
    ax.set_title(f"along v1, lambda_1 = {landscape.eigenvalues[0]:.4g}")
    ax.legend()
    if planar:
        ax = axes[1, 0]
        s = landscape.s.numpy()
        plane, model = landscape.plane.numpy().T, landscape.plane_model.numpy().T  # rows: v2, columns: v1
        levels = np.linspace(float(plane.min()), float(plane.max()), 11) if plane.max() > plane.min() else 11
        filled = ax.contourf(t, s, plane, levels=levels, cmap="viridis")
        ax.contour(t, s, model, levels=levels, colors="white", linestyles="dashed", linewidths=1.2)
        bar = fig.colorbar(filled, ax=ax, label="loss")
        bar.locator = MaxNLocator(5)
        bar.update_ticks()
        ax.set_xlabel("a (along v1)")
        ax.set_ylabel("b (along v2)")
        ax.set_title(f"v1-v2 plane, lambda_2 = {landscape.eigenvalues[1]:.4g}\n(white dashed: quadratic model)")
    fig.tight_layout()
    return fig
