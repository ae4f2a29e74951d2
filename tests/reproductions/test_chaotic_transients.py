"""Smoke run of the chaotic-transients reproduction on fake MNIST (``slow``)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
import torch

from reproductions import chaotic_transients


@pytest.mark.slow
def test_chaotic_transients_script_writes_its_tables_and_plots(fake_mnist_root: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    chaotic_transients.main(
        ["--data-root", str(fake_mnist_root), "--out", str(out), "--subset", "200", "--lrs", "1", "20",
         "--seeds", "2", "--steps", "8", "--lyap-steps", "6", "--eval-every", "2", "--crosscheck-lr", "20",
         "--crosscheck-steps", "3"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "identical" in printed.lower()  # the plain-torch and Lightning engines agree bit for bit
    with open(out / "chaotic_transients_summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert [float(r["lr"]) for r in rows] == [1.0, 20.0]
    assert (out / "chaotic_transients.png").stat().st_size > 0


@pytest.mark.parametrize("model", ["mlp", "deep_mlp", "cnn"])
def test_models_have_the_papers_initialisation(model: str):
    """Every ``--model`` is float64 with N(0, 1) weights and zero biases, and has the documented shape."""
    module = chaotic_transients.make_module(0.1, seed=0, model=model)
    params = {n: p.detach() for n, p in module.named_parameters()}
    sizes = {"mlp": 785 * 64 + 65 * 10, "deep_mlp": 785 * 64 + 2 * 65 * 64 + 65 * 10,
             "cnn": 4 * 25 + 4 + 8 * 4 * 25 + 8 + 392 * 10 + 10}  # fmt: skip
    assert sum(p.numel() for p in params.values()) == sizes[model]
    weights = torch.cat([p.flatten() for p in params.values() if p.ndim >= 2])
    assert all(p.dtype == torch.float64 for p in params.values())
    assert abs(float(weights.std()) - 1.0) < 0.05 and abs(float(weights.mean())) < 0.05
    assert all(float(p.abs().max()) == 0.0 for p in params.values() if p.ndim == 1)
    assert module(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    again = chaotic_transients.make_module(0.1, seed=0, model=model)
    assert all(torch.equal(p, q) for p, q in zip(module.parameters(), again.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["deep_mlp", "cnn"])
def test_chaotic_transients_runs_the_deeper_models(fake_mnist_root: Path, tmp_path: Path, capsys, model: str):
    """``--model deep_mlp|cnn --inits N``: the plain-torch and Lightning engines agree bit for bit on the
    model, and the tables hold one row per lr and one run per (lr, init)."""
    out = tmp_path / "out"
    chaotic_transients.main(
        ["--data-root", str(fake_mnist_root), "--out", str(out), "--model", model, "--subset", "200", "--lrs", "0.5", "5",
         "--inits", "3", "--steps", "6", "--lyap-steps", "5", "--eval-every", "2", "--crosscheck-lr", "5",
         "--crosscheck-steps", "3"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert "bit-identical" in printed and chaotic_transients.MODELS[model] in printed
    with open(out / "chaotic_transients_runs.csv") as file:
        runs = list(csv.DictReader(file))
    assert sorted((float(r["lr"]), int(r["seed"])) for r in runs) == [(lr, s) for lr in (0.5, 5.0) for s in range(3)]
    assert all(math.isfinite(float(r["mle"])) for r in runs)
    assert (out / "chaotic_transients.png").stat().st_size > 0
