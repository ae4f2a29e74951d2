"""Ground-truth tests of the pieces of ``reproductions/fractal_landscape.py`` (the 2-D toy
model of Chen, Qu & Gong, arXiv 2009.10588) and a slow smoke test of its ``main``."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from reproductions.fractal_landscape import (
    LR,
    NOISE,
    Landscape,
    bowl_grids,
    diamond_square,
    ensemble_msd,
    field_hurst,
    main,
    reflect,
    simulate,
    structure_function,
)


def test_diamond_square_shape_corners_and_seed() -> None:
    z = diamond_square(5, 0.7, seed=3)
    assert z.shape == (33, 33)
    assert z[0, 0] == z[0, -1] == z[-1, 0] == z[-1, -1] == 0.0
    assert np.all(np.isfinite(z)) and z.std() > 0
    np.testing.assert_array_equal(z, diamond_square(5, 0.7, seed=3))
    assert not np.array_equal(z, diamond_square(5, 0.7, seed=4))


def test_structure_function_of_a_ramp_is_exact() -> None:
    """z[i, j] = a·i: differences a·r along axis 0 and 0 along axis 1, so S(r) = a² r² / 2, H = 1."""
    a = 0.3
    ramp = a * np.arange(65.0)[:, None] * np.ones((1, 65))
    lags = [1, 2, 5, 9]
    np.testing.assert_allclose(structure_function(ramp, lags), a**2 * np.square(lags) / 2, rtol=1e-12)
    assert field_hurst(ramp) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("hurst", [0.3, 0.5, 0.8])
def test_diamond_square_structure_function_scales_as_r_to_2h(hurst: float) -> None:
    """The variogram of the field grows as r^{2H} over mid-range lags (2 … size/8)."""
    measured = np.mean([field_hurst(diamond_square(9, hurst, seed)) for seed in range(2)])
    assert measured == pytest.approx(hurst, abs=0.15)


def test_bilinear_interpolation_hits_the_nodes_and_its_gradient_matches_finite_differences() -> None:
    rng = np.random.default_rng(0)
    landscape = Landscape("random", rng.standard_normal((2, 9, 9)))
    h = landscape.spacing
    nodes = rng.integers(0, 8, size=(50, 2))
    which = rng.integers(0, 2, size=50)
    loss, _ = landscape.evaluate(nodes * h - 1.0, which)
    np.testing.assert_allclose(loss, landscape.grids[which, nodes[:, 0], nodes[:, 1]], atol=1e-12)

    # points well inside a cell, so that ±eps stays in it (the interpolant is smooth there)
    pos = (nodes + rng.uniform(0.1, 0.9, size=(50, 2))) * h - 1.0
    _, grad = landscape.evaluate(pos, which)
    eps = 1e-6
    for axis in range(2):
        step = np.zeros(2)
        step[axis] = eps
        plus, _ = landscape.evaluate(pos + step, which)
        minus, _ = landscape.evaluate(pos - step, which)
        np.testing.assert_allclose(grad[:, axis], (plus - minus) / (2 * eps), rtol=1e-6, atol=1e-6)


def test_bilinear_gradient_of_the_bowl_matches_the_exact_gradient() -> None:
    """L = R|x|²/2 has ∇L = R·x; the bilinear interpolant's slope is exact at cell midpoints and
    off by at most R·h/2 elsewhere."""
    bowl = Landscape("convex", bowl_grids(np.array([2.5]), 65))
    pos = np.random.default_rng(1).uniform(-0.99, 0.99, size=(200, 2))
    loss, grad = bowl.evaluate(pos, np.zeros(200, dtype=np.int64))
    np.testing.assert_allclose(grad, 2.5 * pos, atol=2.5 * bowl.spacing / 2 + 1e-12)
    np.testing.assert_allclose(loss, 2.5 * np.sum(pos**2, axis=1) / 2, atol=2.5 * bowl.spacing**2)
    np.testing.assert_allclose(bowl.minima(), [[0.0, 0.0]], atol=1e-12)


def test_reflect_folds_positions_into_the_square() -> None:
    np.testing.assert_allclose(reflect(np.array([-1.2, 1.3, 0.4, 3.5, -4.5])), [-0.8, 0.7, 0.4, -0.5, -0.5], atol=1e-12)


def test_flat_landscape_gives_brownian_motion() -> None:
    """Zero gradient: x_t is a Gaussian random walk, MSD(τ) = 2σ²τ (exponent 1)."""
    flat = Landscape("flat", np.zeros((1, 9, 9)))
    positions, _, _ = simulate(flat, (0.0, 0.0), 400, 256, np.random.default_rng(2))
    fit = ensemble_msd(positions)
    assert fit.alpha == pytest.approx(1.0, abs=0.05)
    np.testing.assert_allclose(fit.msd / fit.lags, 2 * NOISE**2, rtol=0.06)


def test_convex_bowl_msd_saturates() -> None:
    """In the bowl, x ← (1 − ηR)x + σξ relaxes in 1/(ηR) = 20 steps, so MSD(τ) saturates."""
    bowl = Landscape("convex", bowl_grids(np.array([2.5]), 65))
    positions, losses, _ = simulate(bowl, (0.0, 0.0), 1000, 64, np.random.default_rng(3))
    fit = ensemble_msd(positions)
    assert fit.alpha_long < 0.3
    stationary_variance = NOISE**2 / (1 - (1 - LR * 2.5) ** 2)
    assert np.mean(positions[200:] ** 2) == pytest.approx(stationary_variance, rel=0.15)
    assert losses.max() < 0.05


@pytest.mark.slow
def test_main_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    main(["--steps", "120", "--walkers", "12", "--landscapes", "2", "--levels", "6", "--smooth-sigma", "3",
          "--out", str(tmp_path)])
    for name in ("fractal_landscape.md", "fractal_landscape.csv", "fractal_landscape_msd.csv", "landscapes.png", "msd.png"):
        assert (tmp_path / name).stat().st_size > 0
    report = (tmp_path / "fractal_landscape.md").read_text()
    assert report.strip() in capsys.readouterr().out
    for landscape in ("fractal", "smooth", "convex"):
        assert f"| {landscape} |" in report
    with open(tmp_path / "fractal_landscape.csv") as fh:
        assert [row["landscape"] for row in csv.DictReader(fh)] == ["fractal", "smooth", "convex"]
