"""Figures of the Hessian spectrum."""

from __future__ import annotations

import chaos_callbacks.plotting  # noqa: F401  (selects the Agg backend)
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from chaos_callbacks.curvature import SpectralDensity


def spectral_density_figure(density: SpectralDensity) -> Figure:
    """Broadened SLQ density on a log y-axis (the view of Ghorbani et al. 2019, Fig. 1)."""
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.semilogy(density.grid.numpy(), density.density.clamp_min(1e-12).numpy())
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density")
    ax.set_title(f"Hessian spectral density ({density.num_matvecs} HVPs)")
    fig.tight_layout()
    return fig
