"""Does SGD sit at λ_max ≈ 1/η? Lyapunov-map vs Lanczos, and quasi-Newton vs the best constant rate.

Sasdelli, Ajanthan, Chin & Carneiro, "A chaos theory approach to understand neural network
optimization" (OpenReview 37Fh1MiR5Ze) claim, on CIFAR-10:

1. for a large range of learning rates η, SGD travels through regions whose largest Hessian
   eigenvalue is close to 1/η (λ_max·η ≈ 1) — not at the edge of stability λ_max·η = 2 of
   full-batch gradient descent (Cohen et al. 2021);
2. λ_max can be estimated from the largest Lyapunov exponent Λ of the gradient-*ascent* map
   θ ↦ θ + η_a∇L, λ_max = (e^Λ − 1)/η_a (``method="lyapunov"`` of ``HessianSpectrumMonitor``);
3. the quasi-Newton rate η_t = 1/λ_max(θ_t) trains as well as a tuned constant rate.

This script drives the product on real MNIST (``chaos_callbacks.recipes.module.ClassificationModule``, plain SGD,
batch 128, a seeded ``--subset``): for each model and constant rate in ``--lrs`` it attaches three
``HessianSpectrumMonitor`` s every ``--every`` steps — Lanczos on a fixed probe of ``--probe``
training examples (the sharpness of the training loss), Lanczos on the current mini-batch, and the
Lyapunov-map estimator on the same mini-batch at the same weights — and records λ_max·η and the
test accuracy. Then it trains with ``CurvatureLRScheduler`` in ``quasi_newton`` (η = 1/λ_max) and
``edge_of_stability`` (η = 0.9·2/λ_max) modes and compares them with the constant-rate sweep.

Tables (stdout and ``--out``/report.md): λ_max·η early and late per rate; map vs Lanczos agreement;
quasi-Newton vs the best constant rate. CSV of every estimate and PNGs of λ_max·η along training,
map-vs-Lanczos scatter and accuracy curves.

Run from the repository root (defaults: about 9 minutes on 2 shared CPU cores, 1 thread):
    .venv/bin/python -m reproductions.chaos_theory
Full size (all 54k training examples, 10 epochs, more rates):
    .venv/bin/python -m reproductions.chaos_theory --subset 54000 --epochs 10 \\
        --lrs 0.01 0.03 0.1 0.3 1.0 --every 50
The paper's data set, CIFAR-10, with a ResNet-20 on a GPU:
    .venv/bin/python -m reproductions.chaos_theory --dataset cifar10 \\
        --data-root /path/holding/cifar-10-batches-py --accelerator gpu --models resnet20 \\
        --subset 45000 --epochs 30 --lrs 0.01 0.03 0.1 0.3 1.0 --every 100 --target 0.85
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from pathlib import Path

import torch

from benchmarks.sgd_runs import (
    CURVATURE_METHODS,
    MODEL_LABELS,
    RecordingMonitor,
    RunResult,
    add_sgd_args,
    load_data,
    pick_reference,
    train_once,
)
from reproductions.common import RESULTS, finish_report, markdown_table, open_outputs, save_figure

MONITORS = ("probe", "batch", "map")


def make_monitors(args: argparse.Namespace) -> dict[str, RecordingMonitor]:
    """Lanczos on the fixed probe, Lanczos on the batch and the Lyapunov map on the batch."""
    common = dict(every_n_steps=args.every, lambda_min=False, tol=args.tol, seed=args.seed)
    return {
        "probe": RecordingMonitor(probe=args.probe, max_hvps=args.max_hvps, prefix="probe/", **common),
        "batch": RecordingMonitor(probe="batch", max_hvps=args.max_hvps, prefix="batch/", **common),
        "map": RecordingMonitor(probe="batch", method="lyapunov", max_hvps=args.map_max_hvps, prefix="map/", **common),
    }


def sharpness_lr(monitor: RecordingMonitor) -> tuple[list[int], list[float]]:
    return monitor.series("hessian/sharpness_lr")


def early_late(values: list[float], early_fraction: float = 0.1) -> tuple[float, float]:
    """Median over the first ``early_fraction`` of the estimates (at least one) and over the second half."""
    if not values:
        return math.nan, math.nan
    early = values[: max(1, int(len(values) * early_fraction))]
    return statistics.median(early), statistics.median(values[len(values) // 2 :])


def paired_estimates(monitors: dict[str, RecordingMonitor]) -> list[tuple[float, float]]:
    """(λ_Lanczos, λ_map) at the steps where both mini-batch estimates exist."""
    lanczos = dict(zip(*monitors["batch"].series("hessian/lambda_max")))
    return [(lanczos[step], value) for step, value in zip(*monitors["map"].series("hessian/lambda_max")) if step in lanczos]


def relative_gaps(monitors: dict[str, RecordingMonitor]) -> list[float]:
    """|λ_map − λ_Lanczos| / λ_Lanczos over the paired estimates with λ_Lanczos > 0."""
    return [abs(value - reference) / reference for reference, value in paired_estimates(monitors) if reference > 0]


def mean_hvps(monitor: RecordingMonitor) -> float:
    values = monitor.series("hessian/hvps")[1]
    return statistics.mean(values) if values else math.nan


def quantile(values: list[float], q: float) -> float:
    return float(torch.tensor(values).quantile(q)) if values else math.nan


# ----------------------------------------------------------------------------- tables
def sharpness_table(runs: list[tuple[RunResult, dict[str, RecordingMonitor]]]) -> str:
    rows = []
    for run, monitors in runs:
        probe, batch = sharpness_lr(monitors["probe"])[1], sharpness_lr(monitors["batch"])[1]
        rows.append([
            run.const_lr, *early_late(probe), *early_late(batch),
            sum(v > 2 for v in probe) / len(probe) if probe else math.nan,
            run.final_acc,
        ])  # fmt: skip
    headers = [
        "lr η", "λη probe, first 10%", "λη probe, 2nd half", "λη batch, first 10%", "λη batch, 2nd half",
        "fraction of probe estimates with λη > 2", "final test acc",
    ]  # fmt: skip
    return markdown_table(headers, rows)


def map_table(runs: list[tuple[RunResult, dict[str, RecordingMonitor]]]) -> str:
    rows = []
    for run, monitors in runs:
        gaps = relative_gaps(monitors)
        rows.append([
            run.const_lr, len(gaps), quantile(gaps, 0.5), quantile(gaps, 0.9),
            sum(g <= 0.01 for g in gaps) / len(gaps) if gaps else math.nan,
            mean_hvps(monitors["batch"]), mean_hvps(monitors["map"]),
            monitors["map"]._warn.count,
        ])  # fmt: skip
    headers = [
        "lr η", "paired estimates", "median rel. gap", "90th pct rel. gap", "fraction within 1%",
        "HVPs Lanczos", "HVPs map", "map estimates skipped",
    ]  # fmt: skip
    return markdown_table(headers, rows)


def quasi_newton_table(consts: list[RunResult], curvature: list[RunResult]) -> tuple[str, RunResult]:
    reference = pick_reference(consts)
    rows = []
    for run in consts + curvature:
        reached = run.reached
        used = run.used_lrs
        rows.append([
            run.method + (" (best constant)" if run is reference else ""),
            statistics.median(used) if used else math.nan,
            f"{min(used):.3g}–{max(used):.3g}" if used and run.const_lr is None else "–",
            reached[0] if reached else "not reached", run.final_acc, run.best_acc,
            "yes" if run.diverged_at is not None else "no",
        ])  # fmt: skip
    headers = ["method", "median lr", "lr range", f"steps to {100 * reference.target:g}%", "final test acc", "best test acc", "diverged"]
    return markdown_table(headers, rows), reference


# ----------------------------------------------------------------------------- outputs
def write_csv(path: Path, results: dict[str, tuple[list[tuple[RunResult, dict[str, RecordingMonitor]]], list[RunResult]]]) -> None:
    """One row per estimate of every monitor of every constant-rate run."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["model", "lr", "step", "monitor", "lambda_max", "sharpness_lr", "hvps"])
        for model, (const_runs, _) in results.items():
            for run, monitors in const_runs:
                for name in MONITORS:
                    for step, metrics in monitors[name].history:
                        writer.writerow([model, run.const_lr, step, name, metrics.get("hessian/lambda_max"),
                                         metrics.get("hessian/sharpness_lr"), metrics.get("hessian/hvps")])  # fmt: skip


def plot(out: Path, results: dict[str, tuple[list[tuple[RunResult, dict[str, RecordingMonitor]]], list[RunResult]]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    paths = []
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for (run, monitors), color in zip(results[model][0], plt.cm.viridis(torch.linspace(0, 0.9, len(results[model][0])).numpy())):
            ax.plot(*sharpness_lr(monitors["probe"]), color=color, label=f"η={run.const_lr:g} (probe)")
            ax.plot(*sharpness_lr(monitors["batch"]), color=color, ls=":", alpha=0.7)
        for level, style in ((1.0, "--"), (2.0, "-.")):
            ax.axhline(level, color="k", ls=style, lw=0.8)
        ax.set(yscale="log", xlabel="step", ylabel="λ_max · η", title=f"{MODEL_LABELS[model]} (dotted: mini-batch)")
        ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "sharpness_lr.png"))

    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for run, monitors in results[model][0]:
            pairs = paired_estimates(monitors)
            if pairs:
                ax.scatter(*zip(*pairs), s=10, label=f"η={run.const_lr:g}")
        lo, hi = ax.get_xlim()
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="λ_max, Lanczos", ylabel="λ_max, Lyapunov map", title=MODEL_LABELS[model])
        ax.legend(fontsize=7)
    paths.append(save_figure(fig, out / "map_vs_lanczos.png"))

    fig, axes = plt.subplots(2, len(models), figsize=(6 * len(models), 7), squeeze=False, sharex="col")
    for col, model in enumerate(models):
        consts, curvature = [r for r, _ in results[model][0]], results[model][1]
        for run in consts + curvature:
            style = "-" if run.const_lr is None else ":"
            axes[0][col].plot([e[0] for e in run.evals], [e[1] for e in run.evals], style, label=run.method)
            axes[1][col].plot(range(len(run.lrs)), run.lrs, style, label=run.method)
        axes[0][col].set(ylabel="test accuracy", title=MODEL_LABELS[model])
        axes[1][col].set(yscale="log", xlabel="step", ylabel="learning rate")
        axes[0][col].legend(fontsize=7)
    paths.append(save_figure(fig, out / "quasi_newton.png"))
    plt.close("all")
    return paths


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sgd_args(parser, epochs=3, subset=12_000)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3], help="constant rates")
    parser.add_argument("--methods", nargs="+", default=["qn", "eos"], choices=sorted(CURVATURE_METHODS),
                        help="CurvatureLRScheduler modes compared with the constant rates")  # fmt: skip
    parser.add_argument("--every", type=int, default=20, help="estimate every N optimizer steps")
    parser.add_argument("--probe", type=int, default=512, help="examples in the fixed probe set")
    parser.add_argument("--tol", type=float, default=1e-3, help="relative tolerance of Lanczos and of the map")
    parser.add_argument("--max-hvps", type=int, default=100, help="HVP budget of one Lanczos estimate")
    parser.add_argument("--map-max-hvps", type=int, default=250, help="HVP budget of one Lyapunov-map estimate")
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos_theory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = open_outputs(args.out)
    dm, x_test, y_test = load_data(args)
    steps = args.epochs * (len(dm.train_set) // args.batch_size)
    report = [
        f"# Chaos theory (Sasdelli et al., OpenReview 37Fh1MiR5Ze) on {args.dataset}\n",
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); train subset {len(dm.train_set)}, batch "
        f"{args.batch_size}, {args.epochs} epochs = {steps} steps of plain SGD; estimates every {args.every} steps "
        f"(Lanczos and Lyapunov map to rel. tol {args.tol}); fixed probe of {args.probe} examples; test accuracy "
        f"on {len(y_test)} test images every {args.eval_every} steps; seed {args.seed}.\n",
    ]
    results = {}
    for model in args.models:
        print(f"{MODEL_LABELS[model]}", flush=True)
        const_runs = []
        for lr in args.lrs:
            monitors = make_monitors(args)
            run = train_once(model, dm, x_test, y_test, args, f"constant η={lr:g}", lr, None, list(monitors.values()))
            const_runs.append((run, monitors))
            print(f"  η={lr:g}: final acc {run.final_acc:.4f}, {len(monitors['probe'].history)} estimates", flush=True)
        curvature = []
        for name in args.methods:
            label, kwargs = CURVATURE_METHODS[name]
            curvature.append(train_once(model, dm, x_test, y_test, args, label, None, {"every_n_steps": 10, **kwargs}))
            print(f"  {label}: final acc {curvature[-1].final_acc:.4f}", flush=True)
        results[model] = (const_runs, curvature)
        qn_table, reference = quasi_newton_table([r for r, _ in const_runs], curvature)
        report += [
            f"\n## {MODEL_LABELS[model]}\n",
            "λ_max·η along training (medians over estimates; probe = fixed probe set, batch = current mini-batch):\n",
            sharpness_table(const_runs),
            "\nLyapunov-map estimate vs Lanczos (same mini-batch, same weights):\n",
            map_table(const_runs),
            f"\nQuasi-Newton and edge-of-stability rates vs the constant rates (best constant: {reference.const_lr:g}):\n",
            qn_table,
        ]
    write_csv(args.out / "estimates.csv", results)
    finish_report(args.out, report, start, plot(args.out, results))


if __name__ == "__main__":
    main()
