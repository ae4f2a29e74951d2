"""``reproductions/phase_diagram.py``: its summary rules against exact answers (default suite) and a
smoke run of the script on fake MNIST whose numbers are checked against the raw log (``slow``)."""

from __future__ import annotations

import csv
import math
import statistics
from collections import defaultdict
from pathlib import Path

import pytest

from reproductions import phase_diagram
from reproductions.phase_diagram import Estimate, crossing, late_mean, quadratic_exponent

LRS = (0.05, 0.5)
SEEDS = (0, 1)
STEPS = 40


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def number(text: str) -> float:
    return float(text) if text else math.nan


@pytest.mark.parametrize("level, expected", [(0.0, 0.2), (0.5, 0.1 * 4**0.75)])
def test_crossing_interpolates_geometrically_between_the_neighbouring_rates(level, expected):
    """Values −1 at η = 0.1 and 1 at η = 0.4: the level v is reached at log η linear in v."""
    lr, direction = crossing([0.05, 0.1, 0.4, 0.8], [-2.0, -1.0, 1.0, 3.0], level)
    assert lr == pytest.approx(expected, rel=1e-12) and direction == "up"
    assert crossing([0.1, 0.4], [1.0, -1.0], 0.0) == (pytest.approx(0.2, rel=1e-12), "down")
    assert crossing([0.1, 0.4], [1.0, 2.0], 0.0)[1] == "above"
    assert crossing([0.1, 0.4], [math.nan, math.nan], 0.0)[1] == ""


def test_late_mean_propagates_certified_bounds_and_standard_errors():
    """Second half of 10 steps = steps 5..9; errors average, standard errors add in quadrature / n."""
    points = [(step, float(step), 0.1 * step) for step in range(10)]
    late = [p for p in points if p[0] >= 5]
    values = [p[1] for p in late]
    certified = late_mean(points, 10, "error")
    assert certified.value == statistics.fmean(values) and certified.kind == "error"
    assert certified.uncertainty == pytest.approx(statistics.fmean(p[2] for p in late), rel=1e-12)
    assert certified.spread == pytest.approx(statistics.stdev(values), rel=1e-12)
    statistical = late_mean(points, 10, "stderr")
    assert statistical.uncertainty == pytest.approx(math.sqrt(sum(p[2] ** 2 for p in late)) / 5, rel=1e-12)
    bare = late_mean([(s, v, math.nan) for s, v, _ in points], 10, "spread")
    assert bare.kind == "stderr" and bare.uncertainty == pytest.approx(statistics.stdev(values) / math.sqrt(5), rel=1e-12)
    assert math.isnan(late_mean([], 10, "error").value)


def test_quadratic_exponent_is_the_largest_log_contraction_factor():
    """GD on a quadratic with eigenvalues in [λ_min, λ_max]: Λ = max(ln|1 − ηλ_max|, ln|1 − ηλ_min|)."""
    assert quadratic_exponent(0.5, 10.0, -1.0).value == pytest.approx(math.log(4.0), rel=1e-12)
    assert quadratic_exponent(0.1, 5.0, -2.0).value == pytest.approx(math.log(1.2), rel=1e-12)
    assert quadratic_exponent(0.1, 5.0, math.nan).value == pytest.approx(math.log(0.5), rel=1e-12)
    assert Estimate(2.0, 0.1, "error", 0.3).scaled(-2) == Estimate(-4.0, 0.2, "error", 0.6)


@pytest.mark.slow
def test_phase_diagram_script_writes_its_tables_figure_and_consistent_numbers(fake_mnist_root: Path, tmp_path: Path):
    out = tmp_path / "out"
    phase_diagram.main([
        "--data-root", str(fake_mnist_root), "--out", str(out), "--lrs", *map(str, LRS), "--seeds", *map(str, SEEDS),
        "--subset", "256", "--batch-size", "16", "--steps", str(STEPS), "--window", "20", "--dim", "64",
        "--twins", "2", "--renormalize-every", "5", "--hessian-every", "10", "--lambda-min-every", "20", "--probe", "64",
        "--tail-every", "5", "--tail-samples", "500", "--width", "16",
    ])  # fmt: skip

    assert (out / "phase_diagram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    for text in ("# Phase diagram", "| η |", "edge of stability", "onset of chaos", "Total run time"):
        assert text in report

    rows = read_csv(out / "phase_diagram.csv")
    assert [float(r["lr"]) for r in rows] == list(LRS) and all(r["seeds"] == str(len(SEEDS)) for r in rows)
    expected = {
        "lyapunov_mle", "lyapunov_mle_stderr", "lyapunov_late", "lambda_max", "lambda_max_error", "lambda_max_lr",
        "lambda_max_lr_error", "lambda_min", "lambda_min_error", "batch_sharpness_lr", "batch_sharpness_lr_stderr",
        "batch_lambda_max_lr", "diffusion_early", "diffusion_early_stderr", "diffusion_late", "diffusion_late_stderr",
        "tail_alpha", "tail_alpha_stderr", "tail_alpha_layer_model_1", "tail_alpha_layer_model_3", "lyapunov_quadratic", "test_acc",
        "lambda_max_lr_seed_sd", "tail_alpha_seed_sd", "batch_sharpness_lr_median", "tail_censored",
        "tail_student_t_preferred",
    }  # fmt: skip
    assert expected <= set(rows[0]), expected - set(rows[0])
    assert not {k for k in rows[0] if k.startswith("tail_alpha_layer_")} - {
        f"tail_alpha_layer_model_{i}{suffix}" for i in (1, 3) for suffix in ("", "_stderr", "_sd", "_seed_sd")
    }, "only the two layers' α are per-layer columns"
    runs = read_csv(out / "phase_diagram_runs.csv")
    assert [(float(r["lr"]), int(r["seed"])) for r in runs] == [(lr, s) for lr in LRS for s in SEEDS]

    # the raw log: (lr, seed) -> tag -> [(step, value)]
    raw: dict[tuple[float, int], dict[str, list[tuple[int, float]]]] = defaultdict(lambda: defaultdict(list))
    for r in read_csv(out / "phase_diagram_steps.csv"):
        raw[float(r["lr"]), int(r["seed"])][r["tag"]].append((int(r["step"]), float(r["value"])))
    for run in runs:
        lr, log = float(run["lr"]), raw[float(run["lr"]), int(run["seed"])]
        late_lambda = [v for s, v in log["probe/hessian/lambda_max"] if s >= STEPS / 2]
        assert late_lambda, "the probe monitor logged λ_max in the second half"
        # λ_max·η: η × the late mean of the logged λ_max, and the late mean of the product's own sharpness_lr tag
        assert number(run["lambda_max_lr"]) == pytest.approx(lr * statistics.fmean(late_lambda), rel=1e-9)
        late_sharpness_lr = [v for s, v in log["probe/hessian/sharpness_lr"] if s >= STEPS / 2]
        assert number(run["lambda_max_lr"]) == pytest.approx(statistics.fmean(late_sharpness_lr), rel=1e-6)
        late_errors = [v for s, v in log["probe/hessian/lambda_max_error"] if s >= STEPS / 2]
        assert number(run["lambda_max_lr_error"]) == pytest.approx(lr * statistics.fmean(late_errors), rel=1e-9)
        assert number(run["lyapunov_mle"]) == log["lyapunov/mle"][-1][1]
        assert number(run["lyapunov_mle_stderr"]) == log["lyapunov/mle_stderr"][-1][1]
        windows = log["diffusion/exponent"]
        assert len(windows) == 2 and number(run["diffusion_early"]) == windows[0][1] and number(run["diffusion_late"]) == windows[1][1]
        assert 0 < number(run["tail_alpha"]) <= 2 and 0 <= number(run["test_acc"]) <= 1
        late_alpha = [v for s, v in log["grad_tail/alpha"] if s >= STEPS / 2]
        assert number(run["tail_alpha"]) == pytest.approx(statistics.fmean(late_alpha), rel=1e-9)
        late_drawn = [s for s, _ in log["grad_tail/zero_fraction"] if s >= STEPS / 2]  # fits censored at 0.5 log no α
        assert number(run["tail_censored"]) == 1 - len(late_alpha) / len(late_drawn)
        llr, p = (dict(log[tag]) for tag in ("grad_tail/llr_student_t", "grad_tail/vuong_p_student_t"))
        late_t = [llr[s] < 0 and p[s] < 0.05 for s in llr if s >= STEPS / 2]
        assert number(run["tail_student_t_preferred"]) == sum(late_t) / len(late_t)
        late_sharpness = [v for s, v in log["batch/hessian/batch_sharpness"] if s >= STEPS / 2]
        assert number(run["batch_sharpness_lr_median"]) == pytest.approx(lr * statistics.median(late_sharpness), rel=1e-9)
        quadratic = max(math.log(abs(1 - lr * number(run[k]))) for k in ("lambda_max", "lambda_min"))
        assert number(run["lyapunov_quadratic"]) == pytest.approx(quadratic, rel=1e-9)
    # a row per η is the mean over its seeds, its *_seed_sd their standard deviation
    for row in rows:
        mine = [number(r["lambda_max_lr"]) for r in runs if float(r["lr"]) == float(row["lr"])]
        assert number(row["lambda_max_lr"]) == pytest.approx(statistics.fmean(mine), rel=1e-9)
        assert number(row["lambda_max_lr_seed_sd"]) == pytest.approx(statistics.stdev(mine), rel=1e-9)


@pytest.mark.slow
def test_phase_diagram_script_runs_lenet(fake_mnist_root: Path, tmp_path: Path):
    """``--model lenet``: one run, every LeNet layer gets its own tail α column, the figure is drawn."""
    out = tmp_path / "out"
    phase_diagram.main([
        "--data-root", str(fake_mnist_root), "--out", str(out), "--lrs", "0.05", "--model", "lenet", "--activation", "relu",
        "--subset", "256", "--batch-size", "16", "--steps", "40", "--window", "20", "--dim", "64", "--twins", "2",
        "--renormalize-every", "5", "--hessian-every", "10", "--lambda-min-every", "0", "--probe", "64", "--tail-every", "5",
        "--tail-samples", "500",
    ])  # fmt: skip
    (row,) = read_csv(out / "phase_diagram.csv")
    layers = {k for k in row if k.startswith("tail_alpha_layer_") and not k.endswith(("_stderr", "_sd"))}
    assert layers == {f"tail_alpha_layer_model_{part}" for part in ("features_0", "features_3", "classifier_1", "classifier_3", "classifier_5")}
    assert math.isnan(number(row["lambda_min"])), "--lambda-min-every 0 estimates no λ_min"
    assert number(row["lyapunov_quadratic"]) == pytest.approx(math.log(abs(1 - 0.05 * number(row["lambda_max"]))), rel=1e-9)
    assert (out / "phase_diagram.png").stat().st_size > 0
