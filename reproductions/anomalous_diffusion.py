"""Anomalous diffusion of SGD, heavy-tailed gradients, ResNet vs plain: a reduced reproduction.

Chen, Qu & Gong, "Anomalous diffusion dynamics of learning in deep neural networks" (arXiv
2009.10588; Neural Networks 2022), train ResNet-14 and VGG-like plain networks on CIFAR-10 with SGD
and report:

* the time-averaged weight MSD(τ) = ⟨‖w(t+τ) − w(t)‖²⟩_t ∝ τ^α, measured in windows starting at
  waiting time t_w, is superdiffusive early in training and subdiffusive later (α ≈ 1.21 → 0.78),
  with a crossover near τ₀ ≈ 70 steps;
* the mean squared loss difference MSL(Δr) = ⟨(L_i − L_j)²⟩ ∝ Δr^{2H} against the weight distance
  Δr gives a Hurst exponent H < 1 (a rough, fractal-like landscape along the path);
* the entries of the minibatch gradient follow a symmetric Lévy α-stable law rather than a
  Gaussian (likelihood-ratio test of Vuong 1989), and their tail index α rises over training;
* networks with and without shortcuts differ in these dynamics.

Three experiments drive the product (``lightning`` Trainer + ``ClassificationModule`` +
``DiffusionTracker`` + ``GradientTailFitter``); each run carries both callbacks:

* ``windows``: an MLP 784-64-10 and a LeNet-5 at two learning rates (``--models``, ``--lrs``),
  plain SGD (``--momentum``), ``--steps`` steps, MSD windows of ``--window`` steps. Per window:
  single exponent α, two-regime exponents α_s (short lags) and α_l (long lags) with crossover τ₀
  (``chaos_callbacks.dynamics.diffusion.fit_two_regime``), Hurst H of MSL and the path's fractal
  dimension d_f; a summary of the first window against the mean of the last three.
* ``tails``: the ``GradientTailFitter`` estimates of those runs (every ``--tail-every`` steps,
  ``--tail-samples`` gradient entries): α of S(α, 0, σ, 0) with characteristic function
  exp(−|σt|^α) (α = 2 Gaussian; P(|g| > x) ~ x^−α for α < 2), the Hill index, the Vuong p-value of
  stable vs Gaussian, and α per layer. Early = the first fifth of the estimates, late = the last
  fifth; "rises"/"falls" when the difference exceeds twice its standard error. With ``shortcuts``
  selected too, the table also covers the shortcut runs (and the ``windows`` runs are made only if
  ``windows`` is selected).
* ``shortcuts``: the paper's comparison, reduced for a CPU: ``resnet14`` (option-A shortcuts,
  BatchNorm) vs ``plain14`` (the same network without shortcuts) from ``chaos_callbacks.recipes.models``, SGD
  (``--shortcut-*`` flags), the same window and tail statistics.

The shortcut defaults follow the authors' training code (github ifgovh/Anomalous-diffusion-
dynamics-of-SGD, ``main.py``): plain SGD at lr 0.1, no momentum, no weight decay, no schedule; the
paper's headline ResNet-14 numbers (α 1.215 → 0.783, τ₀ = 70 steps) are at batch 1024, and the
authors also ran batch 128 (1.315 → 0.727, τ₀ = 180) and 512. On a CPU the default batch is 32.
``--shortcut-momentum 0.9`` makes the first ~1/(1 − β) lags ballistic (α_s → 2), which is part of
any "early superdiffusion" measured with momentum.

Outputs (``--out``, default ``reproductions/results/anomalous_diffusion/``): ``anomalous_diffusion.md``
(the Markdown tables, also printed), ``windows.csv`` (one row per run and window), ``summary.csv``
(one row per run), ``tails.csv`` (one row per estimate and layer, layer ``all`` = all parameters),
``msd_<run>.png`` (MSD(τ) per window with a slope-1 reference), ``windows_alpha.png`` (α per
window), ``tails_alpha.png`` (tail α against step) and ``shortcuts.png`` (ResNet vs plain: α and H
per window, tail α).

Default run (all three experiments on real MNIST, 12k-example subset; windows: batch 64, 2,400
steps, windows of 200; shortcuts: batch 32, lr 0.1, no momentum, 1,200 steps, windows of 200;
tail fits every 20 steps): see REPRODUCTION.md for the measured run time (about 8 minutes on 2
shared CPU cores, one torch thread; ResNet-14 takes about 0.11 s per step).
Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python -m reproductions.anomalous_diffusion

The paper's set-up, on a GPU: ResNet-14 / plain-14 on all of CIFAR-10, batch 1024, lr 0.1, no
momentum, crop-and-flip augmentation, 500 epochs (as in the authors' README)::

    .venv/bin/python -m reproductions.anomalous_diffusion --experiments shortcuts tails \\
        --dataset cifar10 --data-root /path/holding/cifar-10-batches-py --augment --subset 0 \\
        --accelerator auto --shortcut-batch-size 1024 --shortcut-lr 0.1 --shortcut-momentum 0 \\
        --shortcut-steps 24500 --shortcut-window 1000 --tail-every 100
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import matplotlib.pyplot as plt
import numpy as np
import torch

from chaos_callbacks.callbacks.diffusion_tracker import DiffusionTracker
from chaos_callbacks.callbacks.gradient_tails import GradientTailFitter
from chaos_callbacks.dynamics.diffusion import WindowStats  # noqa: E402
from chaos_callbacks.plotting.diffusion import msd_figure  # noqa: E402  (also selects Agg)
from chaos_callbacks.recipes.data import CIFAR10DataModule, ImageClassificationDataModule, MNISTDataModule  # noqa: E402
from chaos_callbacks.recipes.module import ClassificationModule  # noqa: E402

from reproductions.common import RESULTS, add_common_args, emit, markdown_table, quiet_lightning

EXPERIMENTS = ("windows", "tails", "shortcuts")
DEFAULT_OUT = RESULTS / "anomalous_diffusion"
EARLY_LATE_FRACTION = 0.2  # tail estimates: early = first fifth, late = last fifth
LATE_WINDOWS = 3  # diffusion windows: "late" = mean of the last three
ALPHA = "grad_tail/alpha"
LAYER_ALPHA = re.compile(r"^grad_tail/(.+)/alpha$")  # per-layer tags grad_tail/<layer>/alpha


def layer_alphas(metrics: dict[str, float]) -> dict[str, float]:
    """The per-layer α of one estimate, by layer name."""
    return {match[1]: v for k, v in metrics.items() if (match := LAYER_ALPHA.match(k))}


# ----------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class RunSpec:
    """One training run: which experiment asked for it, the network and its SGD settings."""

    experiment: str
    model: str
    lr: float
    momentum: float
    batch_size: int
    steps: int
    window: int

    @property
    def label(self) -> str:
        return f"{self.model}, lr {self.lr}" + (f", momentum {self.momentum}" if self.momentum else "")

    @property
    def slug(self) -> str:
        return f"{self.experiment}_{self.model}_lr{self.lr}"

    def context(self) -> dict[str, Any]:
        """The run's identity columns for the CSV files."""
        return {"experiment": self.experiment, "model": self.model, "lr": self.lr, "momentum": self.momentum}


class TailRecorder(pl.Callback):
    """Keeps every estimate of a ``GradientTailFitter``, which itself keeps only the last one.

    Listed after the fitter, its ``on_before_optimizer_step`` runs right after the fitter's; a new
    ``last_estimate`` dict means the fitter made an estimate at ``trainer.global_step``.
    """

    def __init__(self, fitter: GradientTailFitter) -> None:
        self.fitter = fitter
        self.estimates: list[tuple[int, dict[str, float]]] = []
        self._seen = fitter.last_estimate

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        if self.fitter.last_estimate is not self._seen:
            self._seen = self.fitter.last_estimate
            self.estimates.append((trainer.global_step, dict(self._seen)))


@dataclass
class RunResult:
    spec: RunSpec
    windows: list[WindowStats]
    tails: list[tuple[int, dict[str, float]]]
    accuracy: float
    seconds: float
    layers: list[str] = field(init=False)

    def __post_init__(self) -> None:
        names = (layer for _, m in self.tails for layer in layer_alphas(m))
        self.layers = list(dict.fromkeys(names))

    def tail_series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of one logged tail metric, over the estimates that carry it."""
        pairs = [(step, m[key]) for step, m in self.tails if key in m]
        return [s for s, _ in pairs], [v for _, v in pairs]


def make_data(args: argparse.Namespace, batch_size: int) -> ImageClassificationDataModule:
    """The seeded training subset (``--subset 0``: all) of MNIST or CIFAR-10, no validation split."""
    common = {"root": str(args.data_root), "batch_size": batch_size, "subset": args.subset or None,
              "val_split": 0.0, "seed": args.seed}  # fmt: skip
    if args.dataset == "cifar10":
        return CIFAR10DataModule(augment=args.augment, **common)
    return MNISTDataModule(**common)


def train(spec: RunSpec, args: argparse.Namespace) -> RunResult:
    """Fit one network with ``DiffusionTracker`` and ``GradientTailFitter``; test it on the test split."""
    pl.seed_everything(args.seed, verbose=False)
    data = make_data(args, spec.batch_size)
    module = ClassificationModule(data.num_classes, data.in_shape, model=spec.model, lr=spec.lr, momentum=spec.momentum)
    tracker = DiffusionTracker(window=spec.window, dim=args.dim, figure_every_n_windows=0, seed=args.seed)
    fitter = GradientTailFitter(
        every_n_steps=args.tail_every, num_samples=args.tail_samples, method=args.tail_method,
        target=args.tail_target, figure_every_n_estimates=0, seed=args.seed,
    )  # fmt: skip
    recorder = TailRecorder(fitter)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, max_steps=spec.steps, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[tracker, fitter, recorder],
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    accuracy = float(trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"])
    return RunResult(spec, tracker.windows, recorder.estimates, accuracy, seconds)


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    """The runs the selected experiments need (``tails`` alone analyses the ``windows`` runs)."""
    specs = []
    if "windows" in args.experiments or set(args.experiments) == {"tails"}:
        specs += [
            RunSpec("windows", model, lr, args.momentum, args.batch_size, args.steps, args.window)
            for model in args.models
            for lr in args.lrs
        ]
    if "shortcuts" in args.experiments:
        specs += [
            RunSpec("shortcuts", model, args.shortcut_lr, args.shortcut_momentum, args.shortcut_batch_size,
                    args.shortcut_steps, args.shortcut_window)
            for model in args.shortcut_models
        ]  # fmt: skip
    return specs


# ----------------------------------------------------------------------------- statistics
def mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else math.nan


def standard_error(values: Sequence[float]) -> float:
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.nan


def early_late(values: Sequence[float]) -> tuple[Sequence[float], Sequence[float]]:
    """The first and the last ``EARLY_LATE_FRACTION`` of ``values`` (at least one each)."""
    k = max(1, round(EARLY_LATE_FRACTION * len(values)))
    return values[:k], values[-k:]


def trend(early: Sequence[float], late: Sequence[float]) -> str:
    """``rises``/``falls`` when mean(late) − mean(early) exceeds twice its standard error, else ``flat``."""
    difference = mean(late) - mean(early)
    noise = 2 * math.hypot(standard_error(early), standard_error(late))
    if not math.isfinite(difference):
        return "–"
    if difference > noise:
        return "rises"
    return "falls" if difference < -noise else "flat"


def regime(alpha: float) -> str:
    if not math.isfinite(alpha):
        return "none"
    return "super" if alpha > 1 else "sub"


def late_mean(windows: Sequence[WindowStats], name: str) -> float:
    """Mean over the last windows of a statistic, over the windows that have it (a crossover and its
    two exponents exist only where the two-regime model is significantly better)."""
    values = [getattr(w, name) for w in windows[-LATE_WINDOWS:]]
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return mean(finite) if finite else math.nan


# ----------------------------------------------------------------------------- table rows
def window_rows(windows: Sequence[WindowStats]) -> list[dict[str, Any]]:
    return [
        {"t_w": w.t_w, "α": w.exponent, "α_s (short τ)": w.exponent_short, "α_l (long τ)": w.exponent_long,
         "τ₀ (steps)": w.crossover, "H": w.hurst, "d_f": w.fractal_dim}
        for w in windows
    ]  # fmt: skip


def summary_row(result: RunResult) -> dict[str, Any]:
    """First window vs the last ``LATE_WINDOWS`` (over training) and short vs long lags (in τ)."""
    first, windows = result.windows[0], result.windows
    short, long = late_mean(windows, "exponent_short"), late_mean(windows, "exponent_long")
    tail_early, tail_late = early_late(result.tail_series(ALPHA)[1])
    return {
        "model": result.spec.model, "lr": result.spec.lr, "β": result.spec.momentum,
        "test acc %": 100 * result.accuracy, "α first": first.exponent, "α late": late_mean(windows, "exponent"),
        "over training": f"{regime(first.exponent)} → {regime(late_mean(windows, 'exponent'))}",
        "α_s late": short, "α_l late": long, "τ₀ late": late_mean(windows, "crossover"),
        "late, in τ": f"{regime(short)} → {regime(long)}", "H first": first.hurst, "H late": late_mean(windows, "hurst"),
        "d_f late": late_mean(windows, "fractal_dim"), "tail α early": mean(tail_early), "tail α late": mean(tail_late),
        "s": result.seconds,
    }  # fmt: skip


def tail_row(result: RunResult) -> dict[str, Any]:
    """Early vs late tail statistics of one run; layers counted by the trend of their own α."""
    alpha_early, alpha_late = early_late(result.tail_series(ALPHA)[1])
    t_early, t_late = early_late(result.tail_series("grad_tail/llr_student_t")[1])
    p_early, p_late = early_late(result.tail_series("grad_tail/vuong_p")[1])
    stable = [m["grad_tail/llr_gauss"] > 0 and m["grad_tail/vuong_p"] < 0.05 for _, m in result.tails]
    over_t = [m.get("grad_tail/llr_student_t", math.nan) > 0 and m.get("grad_tail/vuong_p_student_t", 1.0) < 0.05 for _, m in result.tails]
    layer_trends = [trend(*early_late(result.tail_series(f"grad_tail/{layer}/alpha")[1])) for layer in result.layers]
    return {
        "model": result.spec.model, "lr": result.spec.lr, "β": result.spec.momentum, "estimates": len(result.tails),
        "α early": mean(alpha_early), "se early": standard_error(alpha_early), "α late": mean(alpha_late),
        "se late": standard_error(alpha_late), "α over training": trend(alpha_early, alpha_late),
        "llr vs t early": mean(t_early), "llr vs t late": mean(t_late),
        "Vuong p early (median)": statistics.median(p_early) if p_early else math.nan,
        "Vuong p late (median)": statistics.median(p_late) if p_late else math.nan,
        "stable over Gauss %": 100 * mean(stable), "stable over t %": 100 * mean(over_t),
        "layers α rises/falls/flat": "/".join(str(layer_trends.count(t)) for t in ("rises", "falls", "flat")),
    }  # fmt: skip


def tail_csv_rows(result: RunResult) -> list[dict[str, Any]]:
    """One row per estimate for all parameters (``layer`` = ``all``) and one per estimate and layer."""
    rows = []
    for step, m in result.tails:
        rows.append({"step": step, "layer": "all", "alpha": m[ALPHA], "scale": m["grad_tail/scale"],
                     "llr_gauss": m["grad_tail/llr_gauss"], "vuong_p": m["grad_tail/vuong_p"],
                     "llr_student_t": m.get("grad_tail/llr_student_t"), "vuong_p_student_t": m.get("grad_tail/vuong_p_student_t")})  # fmt: skip
        rows += [{"step": step, "layer": layer, "alpha": alpha} for layer, alpha in layer_alphas(m).items()]
    return rows


# ----------------------------------------------------------------------------- report
class Report:
    """Markdown printed and kept for the ``.md`` file; rows kept for the CSV files by name."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.csv_rows: dict[str, list[dict[str, Any]]] = {}

    def text(self, text: str) -> None:
        emit(text + "\n", self.lines)

    def table(self, rows: list[dict[str, Any]], csv_name: str | None = None, context: dict[str, Any] | None = None) -> None:
        """Print ``rows`` as a Markdown table; with ``csv_name`` also keep them, ``context`` columns first."""
        self.text(markdown_table(list(rows[0]), [list(row.values()) for row in rows]) if rows else "(no rows)")
        if csv_name:
            self.add_csv(csv_name, rows, context)

    def add_csv(self, name: str, rows: list[dict[str, Any]], context: dict[str, Any] | None = None) -> None:
        self.csv_rows.setdefault(name, []).extend({**(context or {}), **row} for row in rows)

    def save(self, out: Path) -> list[Path]:
        """Write ``anomalous_diffusion.md`` and one CSV per name (columns: union, in order of appearance)."""
        paths = [out / "anomalous_diffusion.md"]
        paths[0].write_text("\n".join(self.lines))
        for name, rows in self.csv_rows.items():
            paths.append(out / f"{name}.csv")
            with paths[-1].open("w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
                writer.writeheader()
                writer.writerows(rows)
        return paths


# ----------------------------------------------------------------------------- figures
Series = dict[str, tuple[Sequence[float], Sequence[float]]]


@dataclass(frozen=True)
class Panel:
    title: str
    xlabel: str
    ylabel: str
    series: Series
    reference: float | None = None  # a dashed horizontal line (α = 1 Brownian, α = 2 Gaussian)


def save_panels(path: Path, panels: Sequence[Panel]) -> Path:
    """One row of line plots, one line (with markers) per labelled series."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 3.8), dpi=100, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for label, (x, y) in panel.series.items():
            ax.plot(x, y, marker="o", ms=3, lw=1.2, label=label)
        if panel.reference is not None:
            ax.axhline(panel.reference, color="grey", ls="--", lw=0.8)
        ax.set(title=panel.title, xlabel=panel.xlabel, ylabel=panel.ylabel)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_msd_figure(result: RunResult, out: Path) -> Path:
    """``msd_figure`` of the run's windows with a slope-1 (Brownian) line through the first MSD point."""
    fig = msd_figure(result.windows)
    ax = fig.axes[0]
    first = result.windows[0]
    lags = np.asarray(first.lags, dtype=float)
    ax.plot(lags, first.msd[0] * lags / lags[0], color="black", ls="--", lw=1, label="slope 1 (Brownian)")
    ax.legend(fontsize=7)
    ax.set_title(f"weight MSD per window: {result.spec.label}", fontsize=9)
    path = out / f"msd_{result.spec.slug}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def window_series(results: Sequence[RunResult], name: str) -> Series:
    return {r.spec.label: ([w.t_w for w in r.windows], [getattr(w, name) for w in r.windows]) for r in results}


def tail_alpha_series(results: Sequence[RunResult]) -> Series:
    return {r.spec.label: r.tail_series(ALPHA) for r in results}


def alpha_panel(results: Sequence[RunResult]) -> Panel:
    return Panel("MSD exponent per window", "waiting time t_w (step)", "α", window_series(results, "exponent"), 1.0)


def tail_panel(results: Sequence[RunResult]) -> Panel:
    return Panel("gradient tail index", "step", "stable α", tail_alpha_series(results), 2.0)


# ----------------------------------------------------------------------------- experiments
def report_diffusion(report: Report, results: Sequence[RunResult]) -> None:
    """Per-run window tables and the summary of first vs late windows."""
    for r in results:
        report.text(f"### {r.spec.label}: test accuracy {100 * r.accuracy:.1f}%, {r.seconds:.0f} s, batch {r.spec.batch_size}, "
                    f"{r.spec.steps} steps, windows of {r.spec.window}")  # fmt: skip
        report.table(window_rows(r.windows), "windows", r.spec.context())
    report.text(f"### Summary: first window vs mean of the last {LATE_WINDOWS}\n\n"
                "\"over training\": α of the first window → of the late windows; \"late, in τ\": α_s (lags < τ₀) → α_l "
                "(lags > τ₀) of the late windows; tail α: mean of the first / last fifth of the estimates.")  # fmt: skip
    report.table([summary_row(r) for r in results], "summary", {"experiment": results[0].spec.experiment})


def windows_experiment(report: Report, results: Sequence[RunResult], out: Path) -> list[Path]:
    report.text("## windows: MSD exponent per window")
    report_diffusion(report, results)
    return [save_panels(out / "windows_alpha.png", [alpha_panel(results)])] + [save_msd_figure(r, out) for r in results]


def tails_experiment(report: Report, results: Sequence[RunResult], out: Path) -> list[Path]:
    report.text("## tails: symmetric α-stable fits of minibatch-gradient entries\n\n"
                "Early = first fifth of the estimates, late = last fifth (mean ± standard error); trend \"rises\"/\"falls\" "
                "when |late − early| > 2 se. Vuong p: stable vs Gaussian (two-sided); \"stable preferred\": estimates "
                "with log-likelihood ratio > 0 and p < 0.05. Layers: how many layers' own α rises / falls / stays flat.")  # fmt: skip
    report.table([tail_row(r) for r in results])
    for r in results:
        report.add_csv("tails", tail_csv_rows(r), r.spec.context())
    return [save_panels(out / "tails_alpha.png", [tail_panel(results)])]


def shortcuts_experiment(report: Report, results: Sequence[RunResult], out: Path) -> list[Path]:
    report.text("## shortcuts: ResNet vs plain network (same depth, BatchNorm, SGD)")
    report_diffusion(report, results)
    hurst = Panel("Hurst exponent of MSL(Δr)", "waiting time t_w (step)", "H", window_series(results, "hurst"))
    panels = [alpha_panel(results), hurst, tail_panel(results)]
    return [save_panels(out / "shortcuts.png", panels)] + [save_msd_figure(r, out) for r in results]


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(EXPERIMENTS))
    parser.add_argument("--dataset", choices=("mnist", "cifar10"), default="mnist")
    parser.add_argument("--augment", action="store_true", help="CIFAR-10 random crop and flip")
    parser.add_argument("--subset", type=int, default=12000, help="training examples (seeded subset; 0: all)")
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator, e.g. auto")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--dim", type=int, default=1024, help="CountSketch dimension of DiffusionTracker")
    parser.add_argument("--seed", type=int, default=0)
    windows = parser.add_argument_group("windows runs")
    windows.add_argument("--models", nargs="+", default=["mlp", "lenet"])
    windows.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.05])
    windows.add_argument("--steps", type=int, default=2400)
    windows.add_argument("--window", type=int, default=200)
    windows.add_argument("--batch-size", type=int, default=64)
    windows.add_argument("--momentum", type=float, default=0.0)
    shortcuts = parser.add_argument_group("shortcuts runs")
    shortcuts.add_argument("--shortcut-models", nargs="+", default=["resnet14", "plain14"])
    shortcuts.add_argument("--shortcut-lr", type=float, default=0.1)
    shortcuts.add_argument("--shortcut-momentum", type=float, default=0.0)
    shortcuts.add_argument("--shortcut-steps", type=int, default=1200)
    shortcuts.add_argument("--shortcut-window", type=int, default=200)
    shortcuts.add_argument("--shortcut-batch-size", type=int, default=32)
    tails = parser.add_argument_group("gradient tails (all runs)")
    tails.add_argument("--tail-every", type=int, default=20, help="GradientTailFitter every_n_steps")
    tails.add_argument("--tail-samples", type=int, default=5000, help="gradient entries per fit")
    tails.add_argument("--tail-method", choices=("quantile", "mle"), default="quantile")
    tails.add_argument("--tail-target", choices=("gradient", "noise"), default="gradient")
    args = parser.parse_args(argv)
    if args.augment and args.dataset != "cifar10":
        parser.error("--augment needs --dataset cifar10")
    if args.steps < args.window or args.shortcut_steps < args.shortcut_window:
        parser.error("steps must be at least one window")
    return args


def setup_line(args: argparse.Namespace) -> str:
    subset = "all" if not args.subset else f"{args.subset}"
    return (f"{args.dataset} (training examples: {subset}), seed {args.seed}, CountSketch dim {args.dim}, gradient-tail fits "
            f"every {args.tail_every} steps on {args.tail_samples} entries ({args.tail_method}, target {args.tail_target}), "
            f"torch {torch.__version__}, {args.threads} thread(s), accelerator {args.accelerator}")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    results = [train(spec, args) for spec in run_specs(args)]
    by_experiment = {name: [r for r in results if r.spec.experiment == name] for name in ("windows", "shortcuts")}
    report = Report()
    report.text("# Anomalous diffusion of SGD (Chen, Qu & Gong, arXiv 2009.10588), reduced reproduction\n\n" + setup_line(args))
    figures = []
    if "windows" in args.experiments:
        figures += windows_experiment(report, by_experiment["windows"], args.out)
    if "tails" in args.experiments:
        figures += tails_experiment(report, results, args.out)
    if "shortcuts" in args.experiments:
        figures += shortcuts_experiment(report, by_experiment["shortcuts"], args.out)
    report.text(f"Total: {time.perf_counter() - start:.0f} s wall time for {len(results)} runs.")
    for path in report.save(args.out) + figures:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
