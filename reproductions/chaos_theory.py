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

Tables (stdout and ``--out``/report.md): λ_max·η early and late per rate; map vs Lanczos agreement
and cost, warm-started (each estimate from the previous one's vectors) and cold (``warm_start=False``,
one more Lanczos and one more map monitor every ``--cold-every`` steps; 0 drops them); quasi-Newton vs the best
constant rate. CSV of every estimate and PNGs of λ_max·η along training, map-vs-Lanczos scatter and
accuracy curves.

``--parts lyapunov`` (alone or with ``claims``, the default) tests a fourth claim of the paper: the
largest Lyapunov exponent of SGD corresponds to the most negative Hessian eigenvalue. For each model
and rate of ``--lyap-lrs``, plain SGD runs with ``LyapunovTwinRun(mode="tangent",
renormalize_every=--lyap-window)`` — a unit tangent vector pushed through the exact linearisation
v ← (I − ηH_batch)v of every step, on the step's own batch, renormalised every window (Benettin),
giving one finite-time exponent per window — and a ``HessianSpectrumMonitor(probe="batch",
lambda_min=True)`` every ``--lyap-every`` steps on the same batches at the same weights. Per window
the exponent is compared with the window's means of ln(1 − ηλ_min) and ln|1 − ηλ_max| of the batch
Hessians (the Jacobian of a mini-batch step is I − ηH_batch) and of their maximum ln ρ(I − ηH_batch),
whose mean over the window bounds the exponent from above (‖J_k⋯J_1 v‖ ≤ ∏‖J_i‖, J_i symmetric).
Outputs: ``lyapunov_windows.csv``, ``lyapunov_vs_hessian.png`` and tables in report.md.

Run from the repository root (defaults: about 9 minutes on 2 shared CPU cores, 1 thread):
    .venv/bin/python -m reproductions.chaos_theory
The Lyapunov exponent against λ_min (MLP and LeNet-5 at η = 0.03, 0.1, 0.3):
    .venv/bin/python -m reproductions.chaos_theory --parts lyapunov
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

import lightning.pytorch as pl
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
from chaos_callbacks import LyapunovTwinRun
from reproductions.common import RESULTS, finish_report, markdown_table, open_outputs, save_figure

PARTS = ("claims", "lyapunov")


def make_monitors(args: argparse.Namespace) -> dict[str, RecordingMonitor]:
    """Lanczos on the fixed probe; Lanczos and the Lyapunov map on the batch, warm-started, and (every
    ``--cold-every`` steps) the same two with ``warm_start=False`` (every estimate from a random start)."""
    common = dict(every_n_steps=args.every, lambda_min=False, tol=args.tol, seed=args.seed)
    monitors = {
        "probe": RecordingMonitor(probe=args.probe, max_hvps=args.max_hvps, prefix="probe/", **common),
        "batch": RecordingMonitor(probe="batch", max_hvps=args.max_hvps, prefix="batch/", **common),
        "map": RecordingMonitor(probe="batch", method="lyapunov", max_hvps=args.map_max_hvps, prefix="map/", **common),
    }
    if args.cold_every:
        cold = {**common, "every_n_steps": args.cold_every, "warm_start": False}
        monitors["batch_cold"] = RecordingMonitor(probe="batch", max_hvps=args.max_hvps, prefix="batch_cold/", **cold)
        monitors["map_cold"] = RecordingMonitor(probe="batch", method="lyapunov", max_hvps=args.map_max_hvps,
                                                prefix="map_cold/", **cold)  # fmt: skip
    return monitors


def sharpness_lr(monitor: RecordingMonitor) -> tuple[list[int], list[float]]:
    return monitor.series("hessian/sharpness_lr")


def early_late(values: list[float], early_fraction: float = 0.1) -> tuple[float, float]:
    """Median over the first ``early_fraction`` of the estimates (at least one) and over the second half."""
    if not values:
        return math.nan, math.nan
    early = values[: max(1, int(len(values) * early_fraction))]
    return statistics.median(early), statistics.median(values[len(values) // 2 :])


def paired_estimates(monitors: dict[str, RecordingMonitor], name: str = "map", reference: str = "batch") -> list[tuple[float, float]]:
    """(λ of ``reference``, λ of ``name``) at the steps where both mini-batch estimates exist."""
    lanczos = dict(zip(*monitors[reference].series("hessian/lambda_max")))
    return [(lanczos[step], value) for step, value in zip(*monitors[name].series("hessian/lambda_max")) if step in lanczos]


def relative_gaps(monitors: dict[str, RecordingMonitor], name: str = "map", reference: str = "batch") -> list[float]:
    """|λ_name − λ_reference| / λ_reference over the paired estimates with λ_reference > 0."""
    return [abs(value - ref) / ref for ref, value in paired_estimates(monitors, name, reference) if ref > 0]


def mean_hvps(monitor: RecordingMonitor, skip_first: bool = False) -> float:
    """Mean ``hessian/hvps`` per estimate (``skip_first``: without the first, necessarily cold, estimate)."""
    values = monitor.series("hessian/hvps")[1][1 if skip_first else 0 :]
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
    """Per rate: agreement of the map with warm Lanczos on the same batch and weights, and the mean HVPs per
    estimate of the four estimators (warm: without the first estimate, which is cold for every monitor)."""
    rows = []
    for run, monitors in runs:
        gaps = relative_gaps(monitors)
        row = [
            run.const_lr, len(gaps), quantile(gaps, 0.5), quantile(gaps, 0.9),
            sum(g <= 0.01 for g in gaps) / len(gaps) if gaps else math.nan,
            mean_hvps(monitors["batch"], skip_first=True), mean_hvps(monitors["map"], skip_first=True),
            monitors["map"]._warn.count,
        ]  # fmt: skip
        if "map_cold" in monitors:
            cold = relative_gaps(monitors, "map_cold")
            lanczos_cold = relative_gaps(monitors, "batch_cold")
            row += [
                mean_hvps(monitors["batch_cold"]), mean_hvps(monitors["map_cold"]), quantile(cold, 0.5),
                max(lanczos_cold, default=math.nan), monitors["map_cold"]._warn.count + monitors["batch_cold"]._warn.count,
            ]  # fmt: skip
        rows.append(row)
    headers = [
        "lr η", "paired estimates", "median rel. gap", "90th pct rel. gap", "fraction within 1%",
        "HVPs Lanczos (warm)", "HVPs map (warm)", "map estimates skipped",
    ]  # fmt: skip
    if any("map_cold" in m for _, m in runs):
        headers += ["HVPs Lanczos (cold)", "HVPs map (cold)", "median rel. gap map cold", "max rel. gap Lanczos cold vs warm",
                    "cold estimates skipped"]  # fmt: skip
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
                for name, monitor in monitors.items():
                    for step, metrics in monitor.history:
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


# ----------------------------------------------------------------------------- Lyapunov exponent vs λ_min
class WindowedTangent(LyapunovTwinRun):
    """``LyapunovTwinRun(mode="tangent")`` renormalised every ``window`` steps that keeps ``(step, ftle)``
    of every window: the finite-time exponent of the steps ``step − window … step − 1``."""

    def __init__(self, window: int, seed: int) -> None:
        super().__init__(mode="tangent", renormalize_every=window, perturb="all", summary_every_n_steps=None, seed=seed)
        self.windows: list[tuple[int, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if "lyapunov/ftle" in self.last_metrics:
            self.windows.append((trainer.global_step, self.last_metrics["lyapunov/ftle"]))


def make_lyapunov_callbacks(window: int, every: int, args: argparse.Namespace) -> tuple[WindowedTangent, RecordingMonitor]:
    """The tangent exponent per window and λ_min, λ_max of the batch Hessian every ``every`` steps (same batches)."""
    tangent = WindowedTangent(window, args.seed)
    monitor = RecordingMonitor(
        probe="batch", every_n_steps=every, lambda_min=True, lambda_min_every_n_steps=every, tol=args.tol,
        max_hvps=args.max_hvps, seed=args.seed, prefix="spectrum/",
    )  # fmt: skip
    return tangent, monitor


def log_multiplier(lr: float, eigenvalue: float) -> float:
    """ln|1 − ηλ|: the log growth per step along an eigenvector of H under the Jacobian I − ηH."""
    value = abs(1.0 - lr * eigenvalue)
    return math.log(value) if value > 0 else -math.inf


def lyapunov_windows(tangent: WindowedTangent, monitor: RecordingMonitor, lr: float, window: int) -> list[dict[str, float]]:
    """One row per window: the tangent exponent and the window's means of ln(1 − ηλ_min), ln|1 − ηλ_max| and
    ln ρ(I − ηH) = max of the two over the batch-Hessian estimates made inside the window. The first window
    carries the alignment transient of the random start vector (``first`` = 1)."""
    estimates = [(step, m) for step, m in monitor.history if "hessian/lambda_min" in m and "hessian/lambda_max" in m]
    rows = []
    for k, (end, ftle) in enumerate(tangent.windows):
        inside = [m for step, m in estimates if end - window <= step < end]
        lmin = [m["hessian/lambda_min"] for m in inside]
        lmax = [m["hessian/lambda_max"] for m in inside]
        pred_min = [log_multiplier(lr, v) for v in lmin]
        pred_max = [log_multiplier(lr, v) for v in lmax]
        mean = lambda xs: statistics.fmean(xs) if xs else math.nan  # noqa: E731
        rows.append({
            "window_start": end - window, "window_end": end, "first": int(k == 0), "estimates": len(inside),
            "exponent": ftle, "lambda_min": mean(lmin), "lambda_max": mean(lmax),
            "lambda_min_error": max((m.get("hessian/lambda_min_error", math.nan) for m in inside), default=math.nan),
            "log_1_minus_lr_lambda_min": mean(pred_min), "log_abs_1_minus_lr_lambda_max": mean(pred_max),
            "log_spectral_radius": mean([max(a, b) for a, b in zip(pred_min, pred_max)]),
        })  # fmt: skip
    return rows


def lyapunov_summary(rows: list[dict[str, float]]) -> dict[str, float]:
    """Medians over the windows after the first: exponent, the two predictions, their ratios to the exponent,
    and the fraction of windows whose exponent is below the bound ln ρ (+10⁻⁶ for rounding)."""
    body = [r for r in rows if not r["first"] and r["estimates"]]
    med = lambda key: statistics.median([r[key] for r in body]) if body else math.nan  # noqa: E731
    ratio = [r["exponent"] / r["log_1_minus_lr_lambda_min"] for r in body if r["log_1_minus_lr_lambda_min"] > 0]
    return {
        "windows": len(body), "exponent": med("exponent"), "lambda_min": med("lambda_min"), "lambda_max": med("lambda_max"),
        "pred_min": med("log_1_minus_lr_lambda_min"), "pred_max": med("log_abs_1_minus_lr_lambda_max"),
        "pred_rho": med("log_spectral_radius"),
        "ratio_min": statistics.median(ratio) if ratio else math.nan,
        "below_bound": sum(r["exponent"] <= r["log_spectral_radius"] + 1e-6 for r in body) / len(body) if body else math.nan,
        "pred_max_wins": sum(r["log_abs_1_minus_lr_lambda_max"] > r["log_1_minus_lr_lambda_min"] for r in body) / len(body) if body else math.nan,
        "corr_min": correlation([r["exponent"] for r in body], [r["log_1_minus_lr_lambda_min"] for r in body]),
    }  # fmt: skip


def correlation(x: list[float], y: list[float]) -> float:
    """Pearson correlation (NaN for fewer than 3 points or a constant series)."""
    if len(x) < 3:
        return math.nan
    try:
        return statistics.correlation(x, y)
    except statistics.StatisticsError:
        return math.nan


def lyapunov_part(
    dm, x_test, y_test, args: argparse.Namespace, report: list[str],
) -> dict[str, list[tuple[float, float, list[dict[str, float]]]]]:  # fmt: skip
    """Train every model at every ``--lyap-lrs`` with the windowed tangent exponent and the batch-Hessian
    spectrum; append the tables to ``report``; return ``{model: [(lr, final acc, window rows)]}``."""
    results: dict[str, list[tuple[float, float, list[dict[str, float]]]]] = {}
    summary_rows = []
    report += [
        "\n## Claim 4: the largest Lyapunov exponent of SGD and the most negative Hessian eigenvalue\n",
        f"Tangent exponent (natural log per step) over windows of {args.lyap_window} steps "
        f"(`LyapunovTwinRun(mode='tangent', renormalize_every={args.lyap_window})`, the batch of every step), "
        f"against the window means of ln(1 − ηλ_min), ln|1 − ηλ_max| and ln ρ = their maximum, for the "
        f"*batch* Hessians of the steps at multiples of {args.lyap_every} (`HessianSpectrumMonitor(probe='batch', "
        "lambda_min=True)`, same weights and batches). Medians over windows, the first (alignment) window left out; "
        "ratio = exponent / ln(1 − ηλ_min); below bound = fraction of windows with exponent ≤ ln ρ (a bound: "
        "‖J_k⋯J_1v‖ ≤ ∏‖J_i‖); λ_max wins = fraction of windows where ln|1 − ηλ_max| > ln(1 − ηλ_min).\n",
    ]
    for model in args.models:
        results[model] = []
        for lr in args.lyap_lrs:
            tangent, monitor = make_lyapunov_callbacks(args.lyap_window, args.lyap_every, args)
            run = train_once(model, dm, x_test, y_test, args, f"tangent η={lr:g}", lr, None, [monitor, tangent])
            rows = lyapunov_windows(tangent, monitor, lr, args.lyap_window)
            results[model].append((lr, run.final_acc, rows))
            s = lyapunov_summary(rows)
            summary_rows.append([MODEL_LABELS[model], lr, s["windows"], s["exponent"], s["pred_min"], s["pred_max"], s["pred_rho"],
                                 s["ratio_min"], s["corr_min"], s["below_bound"], s["pred_max_wins"], s["lambda_min"],
                                 s["lambda_max"], mean_hvps(monitor), run.final_acc])  # fmt: skip
            print(f"  {MODEL_LABELS[model]} η={lr:g}: exponent {s['exponent']:+.4f}/step, ln(1−ηλ_min) {s['pred_min']:+.4f}, "
                  f"ln|1−ηλ_max| {s['pred_max']:+.4f}, final acc {run.final_acc:.4f}", flush=True)
    report.append(markdown_table(
        ["model", "η", "windows", "exponent", "ln(1 − ηλ_min)", "ln|1 − ηλ_max|", "ln ρ", "ratio", "corr. over windows",
         "below bound", "λ_max wins", "λ_min (batch)", "λ_max (batch)", "HVPs per estimate", "final test acc"],
        summary_rows,
    ))  # fmt: skip
    for model, runs in results.items():
        for lr, _, rows in runs:
            report += [f"\n{MODEL_LABELS[model]}, η = {lr:g}, per window:\n", markdown_table(
                ["steps", "exponent", "ln(1 − ηλ_min)", "ln|1 − ηλ_max|", "ln ρ", "λ_min", "λ_max", "estimates"],
                [[f"{r['window_start']}–{r['window_end'] - 1}" + (" (alignment)" if r["first"] else ""), r["exponent"],
                  r["log_1_minus_lr_lambda_min"], r["log_abs_1_minus_lr_lambda_max"], r["log_spectral_radius"],
                  r["lambda_min"], r["lambda_max"], r["estimates"]] for r in rows],
            )]  # fmt: skip
    return results


def write_lyapunov_csv(path: Path, results: dict[str, list[tuple[float, float, list[dict[str, float]]]]]) -> None:
    """One row per window of every (model, rate)."""
    with path.open("w", newline="") as file:
        writer = None
        for model, runs in results.items():
            for lr, _, rows in runs:
                for row in rows:
                    if writer is None:
                        writer = csv.DictWriter(file, fieldnames=["model", "lr", *row])
                        writer.writeheader()
                    writer.writerow({"model": model, "lr": lr, **row})


def plot_lyapunov(out: Path, results: dict[str, list[tuple[float, float, list[dict[str, float]]]]]) -> Path:
    """Per model: the tangent exponent per window (solid, markers) against ln(1 − ηλ_min) (dashed) and
    ln|1 − ηλ_max| (dotted) of the batch Hessians, one colour per rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(results)
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for i, (lr, _, rows) in enumerate(results[model]):
            mid = [(r["window_start"] + r["window_end"]) / 2 for r in rows]
            color = f"C{i}"
            ax.plot(mid, [r["exponent"] for r in rows], "o-", color=color, ms=3, label=f"η={lr:g}: tangent exponent")
            ax.plot(mid, [r["log_1_minus_lr_lambda_min"] for r in rows], "--", color=color, label="ln(1 − ηλ_min)")
            ax.plot(mid, [r["log_abs_1_minus_lr_lambda_max"] for r in rows], ":", color=color, label="ln|1 − ηλ_max|")
        ax.axhline(0, color="k", lw=0.6)
        ax.set(xlabel="step (window centre)", ylabel="natural log per step", title=f"{MODEL_LABELS[model]}: batch Hessians")
        ax.legend(fontsize=6, ncol=2)
    path = save_figure(fig, out / "lyapunov_vs_hessian.png")
    plt.close(fig)
    return path


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
    parser.add_argument("--cold-every", type=int, default=60,
                        help="cold (warm_start=False) Lanczos and map estimates on the batch every N steps, a multiple "
                             "of --every (0: none); a cold estimate's cost does not depend on the cadence")  # fmt: skip
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=["claims"],
                        help="claims: claims 1-3 (sharpness, map vs Lanczos, quasi-Newton); lyapunov: claim 4 "
                             "(tangent exponent vs λ_min and λ_max of the batch Hessian)")  # fmt: skip
    parser.add_argument("--lyap-lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3], help="rates of --parts lyapunov")
    parser.add_argument("--lyap-window", type=int, default=20, help="steps per window of the tangent exponent")
    parser.add_argument("--lyap-every", type=int, default=10,
                        help="λ_min and λ_max of the batch Hessian every N steps (--parts lyapunov)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "chaos_theory")
    args = parser.parse_args(argv)
    if args.lyap_window < 1 or args.lyap_every < 1:
        parser.error("--lyap-window and --lyap-every must be >= 1")
    if args.cold_every < 0 or args.cold_every % args.every:
        parser.error("--cold-every must be 0 or a multiple of --every")
    return args


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
    figures: list[Path] = []
    if "claims" in args.parts:
        figures += claims_part(dm, x_test, y_test, args, report)
    if "lyapunov" in args.parts:
        lyapunov = lyapunov_part(dm, x_test, y_test, args, report)
        write_lyapunov_csv(args.out / "lyapunov_windows.csv", lyapunov)
        figures.append(plot_lyapunov(args.out, lyapunov))
    finish_report(args.out, report, start, figures)


def claims_part(dm, x_test, y_test, args: argparse.Namespace, report: list[str]) -> list[Path]:
    """Claims 1–3: constant-rate runs with the three (five with ``--cold-every``) monitors, then the curvature rates;
    appends the tables to ``report``, writes ``estimates.csv`` and returns the figures."""
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
            "\nLyapunov-map estimate vs Lanczos (same mini-batch, same weights; HVPs: mean per estimate, warm ones "
            "without the first estimate):\n",
            map_table(const_runs),
            f"\nQuasi-Newton and edge-of-stability rates vs the constant rates (best constant: {reference.const_lr:g}):\n",
            qn_table,
        ]
    write_csv(args.out / "estimates.csv", results)
    return plot(args.out, results)


if __name__ == "__main__":
    main()
