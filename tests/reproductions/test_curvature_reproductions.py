"""The chaos-theory and principal-flow reproductions: the 2-D quadratic against its closed form
(default suite) and smoke runs of both scripts on fake MNIST (``slow``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from chaos_callbacks.curvature import stability_regime
from reproductions import chaos_theory, principal_flow
from reproductions.principal_flow import LAMBDA_MAX, THETA0, gradient_descent

TINY_MNIST = ["--subset", "384", "--batch-size", "64", "--epochs", "1", "--eval-every", "3", "--eval-size", "128"]


@pytest.mark.parametrize("h", [0.1, 0.5, 0.6, 0.9, 0.99, 1.01, 1.05])
def test_quadratic_gradient_descent_matches_its_closed_form(h):
    """GD on θᵀdiag(1, 0.01)θ is θ_t = (1 − 2h·a)^t θ₀ per coordinate; the observed regime is the
    one the principal-flow thresholds h·λ_max = 1, 2 predict."""
    run = gradient_descent(h, steps=200)
    exact = np.stack([(1 - 2 * h * np.array([1.0, 0.01])) ** t * THETA0 for t in range(201)])
    np.testing.assert_allclose(run.path, exact, rtol=1e-10, atol=1e-300)
    assert run.observed_regime() == stability_regime(LAMBDA_MAX, h)


@pytest.mark.slow
def test_chaos_theory_script_writes_its_tables_and_plots(fake_mnist_root: Path, tmp_path: Path):
    out = tmp_path / "out"
    chaos_theory.main(
        ["--data-root", str(fake_mnist_root), "--out", str(out), "--models", "mlp", "--lrs", "0.05", "0.2",
         "--every", "2", "--cold-every", "2", "--probe", "64", *TINY_MNIST]
    )  # fmt: skip
    report = (out / "report.md").read_text()
    for heading in ("λ_max·η along training", "Lyapunov-map estimate vs Lanczos", "Quasi-Newton", "HVPs map (cold)"):
        assert heading in report
    assert "quasi-Newton (1/λmax)" in report and "EoS (0.9·2/λmax)" in report
    assert {p.name for p in out.glob("*.png")} == {"sharpness_lr.png", "map_vs_lanczos.png", "quasi_newton.png"}
    rows = (out / "estimates.csv").read_text().splitlines()
    assert rows[0].startswith("model,lr,step,monitor") and len(rows) > 6
    monitors = {row.split(",")[3] for row in rows[1:]}
    assert monitors == {"probe", "batch", "map", "batch_cold", "map_cold"}


@pytest.mark.slow
def test_principal_flow_script_writes_its_tables_and_plots(fake_mnist_root: Path, tmp_path: Path):
    out = tmp_path / "out"
    principal_flow.main(
        ["--data-root", str(fake_mnist_root), "--out", str(out), "--models", "mlp", "--lrs", "0.1",
         "--powers", "0.5", "1", "--every", "2", "--monitor-every", "2", "--probe", "64", *TINY_MNIST]
    )  # fmt: skip
    report = (out / "report.md").read_text()
    assert report.count("| yes |") == 10  # every default h: observed regime == predicted regime
    for label in ("constant η=0.1", "DAL p=0.5", "DAL p=1"):
        assert label in report
    assert {p.name for p in out.glob("*.png")} == {"quadratic.png", "dal_mnist.png"}


@pytest.mark.slow
def test_principal_flow_script_runs_on_cifar10(cifar_root: Path, tmp_path: Path):
    """The documented CIFAR-10 path (ResNet-20, full batch) on fake CIFAR-10 files."""
    out = tmp_path / "out"
    principal_flow.main(
        ["--dataset", "cifar10", "--data-root", str(cifar_root), "--out", str(out), "--models", "resnet20",
         "--subset", "32", "--batch-size", "32", "--epochs", "3", "--lrs", "0.1", "--powers", "1",
         "--monitor-every", "2", "--eval-every", "1", "--eval-size", "20", "--hs", "0.5"]
    )  # fmt: skip
    report = (out / "report.md").read_text()
    assert "DAL vs constant rates on cifar10" in report and "ResNet-20" in report and "DAL p=1" in report
