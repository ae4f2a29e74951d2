"""Smoke test of ``reproductions/anomalous_diffusion.py`` on a fake MNIST (all three experiments)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from reproductions.anomalous_diffusion import main

STEPS, WINDOW = 40, 20  # windows runs: 2 windows each
SHORTCUT_STEPS, SHORTCUT_WINDOW = 20, 10  # shortcuts runs: 2 windows each
TAIL_EVERY = 5


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_all_experiments_write_tables_and_figures(fake_mnist_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    main([
        "--data-root", str(fake_mnist_root), "--out", str(out), "--subset", "256", "--dim", "64",
        "--models", "mlp", "--lrs", "0.05", "--steps", str(STEPS), "--window", str(WINDOW), "--batch-size", "16",
        "--shortcut-steps", str(SHORTCUT_STEPS), "--shortcut-window", str(SHORTCUT_WINDOW), "--shortcut-batch-size", "8",
        "--tail-every", str(TAIL_EVERY), "--tail-samples", "500",
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

    report = (out / "anomalous_diffusion.md").read_text()
    for heading in ("## windows", "## tails", "## shortcuts", "### Summary", "Total:"):
        assert heading in report
    tail_table = report.split("## tails", 1)[1].split("## shortcuts", 1)[0]
    assert sum(line.startswith("| mlp") or line.startswith("| resnet14") or line.startswith("| plain14")
               for line in tail_table.splitlines()) == len(runs)  # fmt: skip

    figures = ["windows_alpha.png", "tails_alpha.png", "shortcuts.png"]
    figures += [f"msd_{experiment}_{model}_lr{lr}.png" for (experiment, model), lr in zip(runs, (0.05, 0.1, 0.1))]
    for name in figures:
        assert (out / name).stat().st_size > 0, name
