"""The diffusion figures show exactly the windows' fitted values, one unsmoothed marker per window."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np

from chaos_callbacks.dynamics.diffusion import analyse_window
from chaos_callbacks.plotting.diffusion import exponents_figure, msd_figure, msd_log_derivative_figure, msl_figure
from tests.dynamics.test_diffusion_fit import fbm, ornstein_uhlenbeck


def windows():
    pure = analyse_window(fbm(300, 0.4, 16, seed=1), None, t_w=0)
    confined = ornstein_uhlenbeck(300, 10.0, 16, seed=2)
    bent = analyse_window(confined, confined[:, 0], t_w=300, rng=0)
    assert math.isnan(pure.crossover) and math.isfinite(bent.crossover)
    return [pure, bent]


def test_exponents_figure_marks_every_fitted_value_at_its_waiting_time():
    pure, bent = windows()
    fig = exponents_figure([pure, bent])
    top, bottom = fig.axes[:2]
    lines = {c.get_label(): c for c in top.containers}
    x, y = lines["α (one power law)"].lines[0].get_data()
    np.testing.assert_array_equal(x, [0, 300])
    np.testing.assert_allclose(y, [pure.exponent, bent.exponent])
    for label, name in (("α_s (short lags)", "exponent_short"), ("α_l (long lags)", "exponent_long")):
        x, y = lines[label].lines[0].get_data()  # only the window with a significant crossover
        np.testing.assert_array_equal(x, [300])
        np.testing.assert_allclose(y, [getattr(bent, name)])
    (crossover,) = bottom.containers
    np.testing.assert_allclose(crossover.lines[0].get_ydata(), [bent.crossover])
    plt.close(fig)

    fig = exponents_figure([pure])
    assert any(t.get_text() == "no significant crossover" for t in fig.axes[1].texts)
    plt.close(fig)


def test_curve_figures_draw_one_line_per_window():
    ws = windows()
    for make in (msd_figure, msd_log_derivative_figure, msl_figure):
        fig = make(ws)
        expected = 1 if make is msl_figure else 2  # the first window has no losses, so no MSL
        assert len([line for line in fig.axes[0].lines if line.get_linestyle() == "-"]) == expected, make.__name__
        plt.close(fig)
