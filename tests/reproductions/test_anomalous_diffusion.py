"""Smoke tests of ``reproductions/anomalous_diffusion.py`` on a fake MNIST, and its box-counting
and pooled-tail helpers against exact answers."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from reproductions.anomalous_diffusion import (
    BOX_NUM_SIZES,
    BOX_SIZES,
    POOLED,
    POOLED_SCALED,
    box_counting_dimension,
    hessian_trend,
    main,
    pooled_and_layer_tails,
    project_2d,
    random_walk,
)

STEPS, WINDOW = 40, 20  # windows runs: 2 windows each
SHORTCUT_STEPS, SHORTCUT_WINDOW = 20, 10  # shortcuts runs: 2 windows each
TAIL_EVERY = 5
SEEDS = (0, 1, 2)


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_default_experiments_write_tables_and_figures(fake_mnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    main([
        "--data-root", str(fake_mnist_root), "--out", str(out), "--subset", "256", "--dim", "64",
        "--models", "mlp", "--lrs", "0.05", "--steps", str(STEPS), "--window", str(WINDOW), "--batch-size", "16",
        "--shortcut-steps", str(SHORTCUT_STEPS), "--shortcut-window", str(SHORTCUT_WINDOW), "--shortcut-batch-size", "8",
        "--tail-every", str(TAIL_EVERY), "--tail-samples", "500", "--loss-window", "5",
    ])  # fmt: skip

    runs = {("windows", "mlp"): STEPS // WINDOW, ("shortcuts", "resnet14"): SHORTCUT_STEPS // SHORTCUT_WINDOW,
            ("shortcuts", "plain14"): SHORTCUT_STEPS // SHORTCUT_WINDOW}  # fmt: skip
    windows = read_csv(out / "windows.csv")
    for (experiment, model), count in runs.items():
        assert sum(r["experiment"] == experiment and r["model"] == model for r in windows) == count
    summary = read_csv(out / "summary.csv")
    assert [(r["experiment"], r["model"]) for r in summary] == list(runs)
    assert all(r["over training"] in {"super → super", "super → sub", "sub → super", "sub → sub"} for r in summary)
    tails = [r for r in read_csv(out / "tails.csv") if r["layer"] == "all"]
    for experiment, model in runs:
        steps = [int(r["step"]) for r in tails if r["experiment"] == experiment and r["model"] == model]
        assert steps and all(step % TAIL_EVERY == 0 for step in steps)
        assert all(0 < float(r["alpha"]) <= 2 for r in tails)
    assert any(r["layer"] != "all" for r in read_csv(out / "tails.csv")), "per-layer alphas are recorded"

    crossover = read_csv(out / "crossover.csv")
    assert len(crossover) == sum(runs.values())
    for row in crossover:  # α_s, α_l, τ₀ exist exactly where two regimes are selected
        assert row["selected"] in {"one power law", "two regimes", "untested"}
        assert (row["selected"] == "two regimes") == math.isfinite(float(row["τ₀"]))

    layer = read_csv(out / "layer_tails.csv")
    mlp = [r for r in layer if r["model"] == "mlp"]
    assert {r["sample"] for r in mlp} == {"model.1", "model.3", POOLED, POOLED_SCALED}
    assert all(int(r["step"]) % TAIL_EVERY == 0 and 0 < float(r["alpha"]) <= 2 and float(r["t_df"]) > 0 for r in layer)

    box = read_csv(out / "boxcount.csv")
    assert [(r["model"], r["projection"]) for r in box] == [(m, p) for _, m in runs for p in ("pca", "random")]
    assert all(0.5 < float(r["D"]) < 2.2 and float(r["se D"]) >= 0 and int(r["steps"]) > 0 for r in box)

    variance = read_csv(out / "loss_variance.csv")
    assert len(variance) == sum(runs.values())
    assert all(float(r["moving var"]) >= 0 and float(r["mean loss"]) > 0 for r in variance)

    report = (out / "anomalous_diffusion.md").read_text()
    for heading in ("## windows", "## tails", "## shortcuts", "## crossover", "## layer_tails", "## boxcount",
                    "## loss_variance", "### Summary", "Total:"):  # fmt: skip
        assert heading in report
    tail_table = report.split("## tails", 1)[1].split("## shortcuts", 1)[0]
    assert sum(line.startswith("| mlp") or line.startswith("| resnet14") or line.startswith("| plain14")
               for line in tail_table.splitlines()) == len(runs)  # fmt: skip

    figures = ["windows_alpha.png", "tails_alpha.png", "shortcuts.png", "boxcount_projections.png", "loss_variance.png"]
    figures += [f"msd_{experiment}_{model}_lr{lr}.png" for (experiment, model), lr in zip(runs, (0.05, 0.1, 0.1))]
    for name in figures:
        assert (out / name).stat().st_size > 0, name


@pytest.mark.slow
def test_hessian_and_sweep_experiments(fake_mnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    main([
        "--experiments", "hessian", "sweep", "--data-root", str(fake_mnist_root), "--out", str(out), "--subset", "256",
        "--dim", "64", "--models", "mlp", "--lrs", "0.05", "--steps", "40", "--window", "20", "--batch-size", "16",
        "--hessian-every", "10", "--hessian-top-k", "2", "--hessian-probe", "64", "--sweep-lrs", "0.01", "0.1",
        "--sweep-batch-sizes", "8", "32", "--sweep-steps", "40",
    ])  # fmt: skip
    hessian = read_csv(out / "hessian.csv")
    assert [int(r["step"]) for r in hessian] == [0, 10, 20, 30]
    for row in hessian:  # certified: λ_1 ≥ λ_2 up to their error bounds
        assert float(row["hessian/eig_1"]) + float(row["hessian/eig_1_error"]) >= float(row["hessian/eig_2"])
        assert 0 <= float(row["hessian/lambda_max_error"]) <= 1e-2 * abs(float(row["hessian/eig_1"]))
    summary = read_csv(out / "hessian_summary.csv")
    assert [r["eigenvalue"] for r in summary] == ["λ_1", "λ_2"]
    assert all(r["over training"] in {"rises, then settles", "rises, then decays", "decays", "flat"} for r in summary)
    sweep = read_csv(out / "sweep.csv")
    assert [(float(r["lr"]), int(r["batch"])) for r in sweep] == [(0.01, 8), (0.01, 32), (0.1, 8), (0.1, 32)]
    for row in sweep:
        assert row["super → sub"] == ("yes" if float(row["α first"]) > 1 > float(row["α late"]) else "no")
    for name in ("hessian.png", "sweep_alpha.png", "anomalous_diffusion.md"):
        assert (out / name).stat().st_size > 0, name


def koch_curve(level: int) -> np.ndarray:
    """Vertices of the Koch curve on [0, 1]: dimension log 4 / log 3."""
    points = np.array([[0.0, 0.0], [1.0, 0.0]])
    turn = np.array([[0.5, -math.sqrt(3) / 2], [math.sqrt(3) / 2, 0.5]])
    for _ in range(level):
        a, b = points[:-1], points[1:]
        third = (b - a) / 3
        peak = a + third + third @ turn.T
        points = np.vstack([np.stack([a, a + third, peak, a + 2 * third], axis=1).reshape(-1, 2), points[-1:]])
    return points


def hilbert_curve(order: int) -> np.ndarray:
    """Vertices of the Hilbert curve through the 2^order × 2^order grid: dimension 2."""
    n = 2**order
    points = []
    for d in range(n * n):
        x = y = 0
        t, s = d, 1
        while s < n:
            rx, ry = 1 & (t // 2), 1 & (t ^ (t // 2))
            if ry == 0:
                if rx == 1:
                    x, y = s - 1 - x, s - 1 - y
                x, y = y, x
            x, y, t, s = x + s * rx, y + s * ry, t // 4, 2 * s
        points.append((x, y))
    return np.array(points, dtype=float)


def expected_slope(count_at: Callable[[np.ndarray], np.ndarray]) -> float:
    """Least-squares slope of log E[N(ε)] on log(1/ε) over the default box sizes (extent 1)."""
    sizes = np.geomspace(BOX_SIZES[0], BOX_SIZES[1], BOX_NUM_SIZES)
    return float(np.polyfit(np.log(1 / sizes), np.log(count_at(sizes)), 1)[0])


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_box_counting_exact_answers(seed: int) -> None:
    """Exact expected box counts over a random grid origin: a segment of length L at angle θ meets
    L(|cos θ| + |sin θ|)/ε + 1 boxes, a filled square of side L (L/ε + 1)² (the Hilbert curve fills
    its grid at boxes of at least one cell); the Koch curve has dimension log 4 / log 3."""
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, math.pi)
    c, s = abs(math.cos(angle)), abs(math.sin(angle))
    line = np.outer(np.linspace(0, 1, 500), [math.cos(angle), math.sin(angle)])
    expected = expected_slope(lambda e: (c + s) / max(c, s) / e + 1)
    assert box_counting_dimension(line, seed=seed).dimension == pytest.approx(expected, abs=0.01)
    assert expected == pytest.approx(1.0, abs=0.04)
    koch = box_counting_dimension(koch_curve(6), seed=seed)
    assert koch.dimension == pytest.approx(math.log(4) / math.log(3), abs=0.05)  # lacunarity: sizes are not powers of 3
    hilbert = box_counting_dimension(hilbert_curve(7), seed=seed)
    assert hilbert.dimension == pytest.approx(expected_slope(lambda e: (1 / e + 1) ** 2), abs=0.01)
    assert hilbert.dimension == pytest.approx(2.0, abs=0.08)


@pytest.mark.slow
def test_box_counting_brownian_path_approaches_two() -> None:
    """A planar Brownian path has dimension 2, reached only logarithmically in the number of steps
    (local slope ~ 2 − 2/ln(n/k²) at boxes of k steps): below 2, and closer to it for longer paths."""
    short = [box_counting_dimension(random_walk(2400, 2, s), seed=s).dimension for s in SEEDS]
    long = [box_counting_dimension(random_walk(100_000, 2, s), seed=s).dimension for s in SEEDS]
    assert 1.4 < np.mean(short) < np.mean(long) < 2.0
    assert np.mean(long) == pytest.approx(2 - 2 / math.log(100_000 / 16**2), abs=0.08)


@pytest.mark.slow
def test_pca_of_a_high_dimensional_random_walk_is_smooth() -> None:
    """The top two principal components of a random walk in many dimensions trace near-Lissajous
    curves (Antognini & Sohl-Dickstein 2018): D ≈ 1, while random directions give a planar walk."""
    walk = random_walk(2400, 500, 0)
    assert box_counting_dimension(project_2d(walk, "pca")).dimension < 1.25
    assert box_counting_dimension(project_2d(walk, "random", 0)).dimension > 1.4


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_pooling_layers_of_different_scales_lowers_alpha(seed: int) -> None:
    """Two Gaussian 'layers' (α = 2 each) with scales 1 and 10: the pooled entries are a scale
    mixture with a much smaller α; dividing by each layer's fitted scale restores α ≈ 2."""
    rng = np.random.default_rng(seed)
    samples = {"small": rng.normal(0, 1, 5000), "large": rng.normal(0, 10, 5000)}
    owners = rng.permutation(np.repeat(["small", "large"], 2500))
    pooled = np.array([samples[o][i] for i, o in enumerate(owners)])
    result = pooled_and_layer_tails(samples, pooled, owners)
    for layer in samples:
        assert result[layer]["alpha"] > 1.8
    assert result[POOLED]["alpha"] < 1.5
    assert result[POOLED_SCALED]["alpha"] > 1.8
    assert result[POOLED]["alpha"] + 0.4 < result[POOLED_SCALED]["alpha"]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("values", "expected"),
    [([1.0, 2.0, 3.0, 2.9, 3.0], "rises, then settles"), ([1.0, 3.0, 2.0, 1.5, 1.4], "rises, then decays"),
     ([3.0, 2.9, 2.0, 1.5, 1.4], "decays"), ([2.0, 2.2, 1.9, 2.1, 2.0], "flat")],
)  # fmt: skip
def test_hessian_trend_labels(values: list[float], expected: str) -> None:
    assert hessian_trend(values) == expected
