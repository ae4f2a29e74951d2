"""Smoke run of the chaotic-transients reproduction on fake MNIST (``slow``)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

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
