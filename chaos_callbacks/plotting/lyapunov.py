"""Figures of twin-trajectory separations."""

from __future__ import annotations

from collections.abc import Sequence

import chaos_callbacks.plotting  # noqa: F401  (selects the Agg backend)
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from chaos_callbacks.dynamics.lyapunov import LocalExponentFit


def log_distance_figure(
    curves: Sequence[tuple[Sequence[int], Sequence[float]]],
    fits: Sequence[LocalExponentFit | None] = (),
    mle: float | None = None,
) -> Figure:
    """ln d(t) of every twin against the optimizer step (the view of Jiménez-González et al., arXiv 2506.08523).

    ``curves`` holds one (steps, ln d) pair per twin. Where ``fits[i]`` is given, its line
    intercept + slope·t is drawn over the fitted exponential phase ``start:stop`` and the plateau,
    if detected, is marked; ``mle`` (a Benettin or tangent estimate) goes into the title.
    """
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    for i, (steps, log_d) in enumerate(curves):
        (line,) = ax.plot(steps, log_d, lw=1, label=f"twin {i}")
        fit = fits[i] if i < len(fits) else None
        if fit is not None:
            t = np.asarray(steps, dtype=np.float64)[fit.start : fit.stop]
            ax.plot(t, fit.intercept + fit.slope * t, "--", color=line.get_color(), lw=1.5)
            if fit.saturated:
                ax.axvline(t[-1], color=line.get_color(), ls=":", lw=1)
    slopes = [f.slope for f in fits if f is not None]
    title = "ln d(t)"
    if slopes:
        title += f", local exponent {np.mean(slopes):.4g}/step"
    if mle is not None and np.isfinite(mle):
        title += f", MLE {mle:.4g}/step"
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("ln d")
    if len(curves) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig
