"""Claim 4 of the chaos-theory reproduction (``--parts lyapunov``): the windowed tangent exponent against
ln|1 − ηλ| of the batch Hessian, on a quadratic where both are exact, and a smoke run on fake MNIST (``slow``)."""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from reproductions import chaos_theory

TINY_MNIST = ["--subset", "384", "--batch-size", "64", "--epochs", "1", "--eval-every", "3", "--eval-size", "128"]


class Quadratic(pl.LightningModule):
    """L(θ) = ½ θᵀ diag(a) θ whatever the batch: the SGD Jacobian is I − η diag(a) at every step, so the
    tangent exponent is max_i ln|1 − η a_i| exactly, and λ_min, λ_max are min(a), max(a)."""

    def __init__(self, a: list[float], lr: float) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor(a, dtype=torch.float64))
        self.theta = torch.nn.Parameter(torch.linspace(1.0, 2.0, len(a), dtype=torch.float64))
        self.lr = lr

    def training_step(self, batch, batch_idx):
        return 0.5 * (self.a * self.theta**2).sum() + 0.0 * batch[0].sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(("a", "lr", "winner"), [
    ([-1.0, 0.2, 0.5, 1.0, 2.0, 4.0], 0.2, "min"),  # multipliers 1.2 (λ_min), …, 0.2: the negative eigenvalue wins
    ([-0.5, 0.2, 1.0, 2.0, 6.0], 0.5, "max"),  # 1.25 (λ_min) < |1 − 3| = 2 (λ_max): past the edge of stability
])  # fmt: skip
def test_windowed_tangent_exponent_equals_log_multiplier_on_a_quadratic(a, lr, winner, seed):
    window, steps = 10, 60
    args = argparse.Namespace(seed=seed, tol=1e-6, max_hvps=100)
    tangent, monitor = chaos_theory.make_lyapunov_callbacks(window, 5, args)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor, tangent])  # fmt: skip
    data = DataLoader(TensorDataset(torch.zeros(steps, 1, dtype=torch.float64)), batch_size=1)
    trainer.fit(Quadratic(a, lr), train_dataloaders=data)
    rows = chaos_theory.lyapunov_windows(tangent, monitor, lr, window)
    assert [r["window_end"] for r in rows] == list(range(window, steps + 1, window))
    exact_min, exact_max = math.log(abs(1 - lr * min(a))), math.log(abs(1 - lr * max(a)))
    for r in rows:
        assert r["estimates"] == 2
        assert r["lambda_min"] == pytest.approx(min(a), abs=1e-6) and r["lambda_max"] == pytest.approx(max(a), rel=1e-5)
        assert r["log_1_minus_lr_lambda_min"] == pytest.approx(exact_min, abs=1e-6)
        assert r["log_abs_1_minus_lr_lambda_max"] == pytest.approx(exact_max, abs=1e-5)
    for r in rows[2:]:  # after the alignment of the random start vector
        assert r["exponent"] == pytest.approx(max(exact_min, exact_max), abs=1e-4)
    summary = chaos_theory.lyapunov_summary(rows)
    assert summary["below_bound"] == 1.0
    assert summary["pred_max_wins"] == (1.0 if winner == "max" else 0.0)


@pytest.mark.slow
def test_chaos_theory_lyapunov_part_writes_its_tables_and_plot(fake_mnist_root: Path, tmp_path: Path):
    out = tmp_path / "out"
    chaos_theory.main(
        ["--data-root", str(fake_mnist_root), "--out", str(out), "--models", "mlp", "--parts", "lyapunov",
         "--lyap-lrs", "0.05", "0.3", "--lyap-window", "3", "--lyap-every", "1", *TINY_MNIST]
    )  # fmt: skip
    report = (out / "report.md").read_text()
    assert "Claim 4" in report and "per window" in report
    assert {p.name for p in out.glob("*.png")} == {"lyapunov_vs_hessian.png"}
    with open(out / "lyapunov_windows.csv") as file:
        rows = list(csv.DictReader(file))
    assert {float(r["lr"]) for r in rows} == {0.05, 0.3} and len(rows) == 2 * (6 // 3)
    for r in rows:  # every step estimated: the exponent of a window is at most the mean of ln ρ(I − ηH_batch)
        assert float(r["exponent"]) <= float(r["log_spectral_radius"]) + 1e-3
        assert float(r["lambda_min"]) <= 0.0 <= float(r["lambda_max"])
