"""A phase diagram in one command: chaos, sharpness, diffusion and gradient tails against the learning rate.

The four source papers each describe SGD by one number that changes with the learning rate η:

* Jiménez-González, Soriano & Lacasa (arXiv 2506.08523): the maximal Lyapunov exponent Λ of twin
  runs crosses 0 (onset of chaos) as η grows;
* Sasdelli et al. (OpenReview 37Fh1MiR5Ze): SGD sits where λ_max ≈ 1/η, and Λ of the SGD map is
  max_i ln|1 − ηλ_i| on a quadratic, so Λ > 0 once λ_max·η > 2 — or through a negative eigenvalue,
  ln(1 − ηλ_min) > 0, at any η; Cohen et al. 2021 (edge of stability): full-batch GD holds
  λ_max·η at 2; Andreyev & Beneventano (arXiv 2412.20553): mini-batch SGD holds the *batch
  sharpness* E_B[g_Bᵀ H_B g_B / ‖g_B‖²] at 2/η, with λ_max of the full loss below it;
* Chen, Qu & Gong (arXiv 2009.10588): the weights diffuse super- (MSD exponent > 1) early and sub-
  (< 1) later, and minibatch-gradient entries are α-stable with α < 2 (2 = Gaussian).

This script sweeps a constant, plain-SGD learning rate (``--lrs``) on an MNIST model (default: MLP
784-64-10 tanh, the chaotic-transients network with PyTorch's initialisation, normalised pixels,
mini-batch SGD on a ``--subset``) and, for every η (and ``--seeds``), runs ONE Lightning Trainer
with the product's callbacks attached, read back from an in-memory Lightning logger:

* ``LyapunovTwinRun`` (twin mode, ``--twins`` twins, Benettin renormalisation every
  ``--renormalize-every`` steps): ``lyapunov/mle`` ± ``lyapunov/mle_stderr`` at the end of training
  (mean over all of training), and the mean of ``lyapunov/ftle`` over the second half;
* ``HessianSpectrumMonitor`` on a fixed probe of ``--probe`` training examples (prefix ``probe/``,
  every ``--hessian-every`` steps): λ_max ± ``_error`` (certified) of the training loss, and
  ``--lambda-min-every`` the most negative eigenvalue λ_min (probabilistic bound);
* ``HessianSpectrumMonitor`` on the current mini-batch (prefix ``batch/``): the batch sharpness
  ``batch/hessian/batch_sharpness`` (an exact number per batch; its mean over batches has a
  statistical standard error; at large η it is heavy-tailed over batches, so its median is given
  too) and the mini-batch λ_max;
* ``DiffusionTracker`` (windows of ``--window`` steps): the MSD exponent of the first (early) and
  the last (late) window, each ± ``diffusion/exponent_stderr``;
* ``GradientTailFitter`` (every ``--tail-every`` steps, ``--tail-samples`` entries): the pooled
  α ± ``grad_tail/alpha_stderr`` and α per layer, mean over the second half of the estimates, and
  the share of those fits at α = 0.5, the lower end of the estimator's range (a censored value:
  the tail may be heavier) and where the Vuong test prefers a Student t (finite variance) to it;

and the test accuracy on the 10k test images at the end. A time series is summarised by its mean
over the second half of training ("late"); its uncertainty propagates the logged ones (certified
``_error``: their mean bounds the error of the mean; statistical ``_stderr``: √(Σ se²)/n, the
estimates taken as independent), and ``<quantity>_sd`` is the spread of the estimates over that
half. With several seeds each quantity is the mean over seeds and the error bars are the standard
deviation over seeds. A run whose training loss turns non-finite is stopped and marked diverged.

Outputs (``--out``, default ``reproductions/results/phase_diagram/``): ``phase_diagram.png`` (the
stacked panels against η), ``phase_diagram.csv`` (one row per η, every quantity and uncertainty),
``phase_diagram_runs.csv`` (one row per η and seed), ``phase_diagram_steps.csv`` (every raw logged
value: lr, seed, step, tag, value) and ``report.md`` (the tables, also printed).

Default run (8 rates 0.01–3.2, 1,500 steps of batch 64 on a 12k subset, one seed): 3.5 minutes of
CPU time, 6–11 minutes wall on 2 CPU cores shared with other jobs, one torch thread (REPRODUCTION.md).
Run from the repository root::

    OMP_NUM_THREADS=1 .venv/bin/python -m reproductions.phase_diagram

Larger: more rates, longer training, three seeds (mean ± sd), or LeNet-5::

    .venv/bin/python -m reproductions.phase_diagram --lrs 0.003 0.01 0.03 0.1 0.2 0.4 0.8 1.6 3.2 \\
        --steps 4000 --window 500 --subset 60000 --seeds 0 1 2
    .venv/bin/python -m reproductions.phase_diagram --model lenet --activation relu
"""

from __future__ import annotations

import argparse
import csv
import math
import re
import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_only

from chaos_callbacks import DiffusionTracker, GradientTailFitter, HessianSpectrumMonitor, LyapunovTwinRun
from chaos_callbacks.dynamics.tails import ALPHA_MIN
from chaos_callbacks.recipes.data import MNISTDataModule
from chaos_callbacks.recipes.module import ClassificationModule
from reproductions.common import RESULTS, add_common_args, finish_report, markdown_table, open_outputs, quiet_lightning, save_figure

DEFAULT_OUT = RESULTS / "phase_diagram"
DEFAULT_LRS = [0.01, 0.03, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2]
LAYER_ALPHA = re.compile(r"^grad_tail/(.+)/alpha$")
LAYER_PREFIX = "tail_alpha_layer_"  #: columns of the per-layer tail α


# ----------------------------------------------------------------------------- reading the logs back
class MemoryLogger(Logger):
    """A Lightning logger that keeps every scalar it is given: ``rows[step][tag] = value``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[int, dict[str, float]] = defaultdict(dict)

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        for tag, value in metrics.items():
            self.rows[-1 if step is None else int(step)][tag] = float(value)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, tag: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``tag``, in step order."""
        pairs = [(step, row[tag]) for step, row in sorted(self.rows.items()) if tag in row]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def paired(self, tag: str, companion: str) -> list[tuple[int, float, float]]:
        """``(step, value, uncertainty)`` of ``tag`` where its companion (``_error``/``_stderr``) was logged too."""
        return [(step, row[tag], row[companion]) for step, row in sorted(self.rows.items()) if tag in row and companion in row]

    def tags(self) -> list[str]:
        return sorted({tag for row in self.rows.values() for tag in row})


class DivergenceGuard(pl.Callback):
    """Stops the fit at the first non-finite training loss and remembers the step."""

    def __init__(self) -> None:
        self.diverged_at: int | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None and not math.isfinite(float(loss)):
            self.diverged_at = trainer.global_step
            trainer.should_stop = True


# ----------------------------------------------------------------------------- summaries of one run
@dataclass(frozen=True)
class Estimate:
    """A number with its uncertainty: ``kind`` ``error`` (certified bound) or ``stderr`` (statistical)."""

    value: float
    uncertainty: float = math.nan
    kind: str = "stderr"
    spread: float = math.nan  # standard deviation of the estimates it summarises

    def scaled(self, factor: float) -> Estimate:
        return Estimate(self.value * factor, self.uncertainty * abs(factor), self.kind, self.spread * abs(factor))


NAN = Estimate(math.nan)


def late_mean(points: Sequence[tuple[int, float, float]], total: int, kind: str) -> Estimate:
    """Mean of the ``(step, value, uncertainty)`` logged in the second half of ``total`` steps (step ≥
    total / 2), with the propagated uncertainty.

    ``kind="error"``: certified bounds e_i, |mean − true mean| ≤ mean(e_i). ``kind="stderr"``:
    √(Σ se_i²)/n, the estimates taken as independent. ``kind="spread"``: values without an
    uncertainty of their own (exact per sample, e.g. one batch's sharpness): sd/√n over the samples.
    """
    kept = [p for p in points if p[0] >= total / 2]
    if not kept:
        return NAN
    values = [p[1] for p in kept]
    sd = statistics.stdev(values) if len(values) > 1 else math.nan
    if kind == "error":
        uncertainty = statistics.fmean(p[2] for p in kept)
    elif kind == "stderr":
        uncertainty = math.sqrt(sum(p[2] ** 2 for p in kept)) / len(kept)
    else:
        uncertainty, kind = sd / math.sqrt(len(values)), "stderr"
    return Estimate(statistics.fmean(values), uncertainty, kind, sd)


def last_value(log: MemoryLogger, tag: str, companion: str) -> Estimate:
    """The last logged value of ``tag`` with its standard error ``companion`` (NaN when not logged)."""
    points = log.paired(tag, companion) or _bare(log, tag)
    return Estimate(points[-1][1], points[-1][2]) if points else NAN


def window_exponent(log: MemoryLogger, which: int) -> Estimate:
    """MSD exponent ± stderr of the first (``which=0``) or last (``-1``) diffusion window."""
    points = log.paired("diffusion/exponent", "diffusion/exponent_stderr")
    return Estimate(points[which][1], points[which][2]) if points else NAN


def layer_tags(log: MemoryLogger) -> list[str]:
    """The per-layer tail tags' layer names, in the order the fitter logged them."""
    return [m[1] for tag in log.tags() if (m := LAYER_ALPHA.match(tag))]


def slug(layer: str) -> str:
    return re.sub(r"\W+", "_", layer).strip("_")


@dataclass
class Run:
    """One training run at one learning rate and seed: its summaries and its raw log."""

    lr: float
    seed: int
    steps: int
    log: MemoryLogger
    test_acc: float
    diverged_at: int | None
    quantities: dict[str, Estimate] = field(default_factory=dict)

    def summarise(self) -> None:
        """Fill :attr:`quantities` from the logged tags (see the module docstring)."""
        log, total, q = self.log, self.steps, self.quantities
        q["lyapunov_mle"] = last_value(log, "lyapunov/mle", "lyapunov/mle_stderr")
        q["lyapunov_late"] = late_mean(log.paired("lyapunov/ftle", "lyapunov/ftle_stderr") or _bare(log, "lyapunov/ftle"), total, "stderr")
        lam = late_mean(log.paired("probe/hessian/lambda_max", "probe/hessian/lambda_max_error"), total, "error")
        q["lambda_max"], q["lambda_max_lr"] = lam, lam.scaled(self.lr)
        q["lambda_min"] = late_mean(log.paired("probe/hessian/lambda_min", "probe/hessian/lambda_min_error"), total, "error")
        batch_lam = late_mean(log.paired("batch/hessian/lambda_max", "batch/hessian/lambda_max_error"), total, "error")
        q["batch_lambda_max_lr"] = batch_lam.scaled(self.lr)
        sharpness = late_mean(_bare(log, "batch/hessian/batch_sharpness"), total, "spread")
        q["batch_sharpness"], q["batch_sharpness_lr"] = sharpness, sharpness.scaled(self.lr)
        q["diffusion_early"], q["diffusion_late"] = window_exponent(log, 0), window_exponent(log, -1)
        q["batch_sharpness_lr_median"] = Estimate(self.lr * late_median(log, "batch/hessian/batch_sharpness", total))
        q["tail_alpha"] = late_mean(log.paired("grad_tail/alpha", "grad_tail/alpha_stderr"), total, "stderr")
        q["tail_censored"] = Estimate(at_bound(log, total))
        q["tail_student_t_preferred"] = Estimate(student_t_preferred(log, total))
        for layer in layer_tags(log):
            q[f"{LAYER_PREFIX}{slug(layer)}"] = late_mean(log.paired(f"grad_tail/{layer}/alpha", f"grad_tail/{layer}/alpha_stderr"), total, "stderr")
        q["test_acc"] = Estimate(self.test_acc)
        q["lyapunov_quadratic"] = quadratic_exponent(self.lr, q["lambda_max"].value, q["lambda_min"].value)


def late_median(log: MemoryLogger, tag: str, total: int) -> float:
    values = [v for s, v in zip(*log.series(tag)) if s >= total / 2]
    return statistics.median(values) if values else math.nan


def at_bound(log: MemoryLogger, total: int) -> float:
    """Fraction of the late pooled tail fits censored at α = ``ALPHA_MIN`` (0.5), the lower end of the range
    the estimator covers: ``GradientTailFitter`` draws the entries (``grad_tail/zero_fraction`` is logged)
    but skips the α of such a fit, the sample's tail being heavier than any law it fits."""
    drawn = [s for s, _ in zip(*log.series("grad_tail/zero_fraction")) if s >= total / 2]
    fitted = {s for s, _ in zip(*log.series("grad_tail/alpha")) if s >= total / 2}
    return sum(s not in fitted for s in drawn) / len(drawn) if drawn else math.nan


def student_t_preferred(log: MemoryLogger, total: int) -> float:
    """Fraction of the late pooled tail fits where the Vuong test prefers a Student t to the α-stable
    law (``grad_tail/llr_student_t`` < 0 at ``grad_tail/vuong_p_student_t`` < 0.05): heavy tails, but
    with a finite variance."""
    rows = [row for step, row in log.rows.items() if step >= total / 2 and "grad_tail/llr_student_t" in row]
    verdicts = [row["grad_tail/llr_student_t"] < 0 and row.get("grad_tail/vuong_p_student_t", 1.0) < 0.05 for row in rows]
    return sum(verdicts) / len(verdicts) if verdicts else math.nan


def _bare(log: MemoryLogger, tag: str) -> list[tuple[int, float, float]]:
    """``(step, value, NaN)`` of a tag logged without an uncertainty."""
    return [(s, v, math.nan) for s, v in zip(*log.series(tag))]


def quadratic_exponent(lr: float, lambda_max: float, lambda_min: float) -> Estimate:
    """Λ of gradient descent on a quadratic with the spectrum in [λ_min, λ_max]:
    max(ln|1 − ηλ_max|, ln|1 − ηλ_min|) (Sasdelli et al.); λ_min unknown: ln|1 − ηλ_max| alone."""
    terms = [math.log(abs(1 - lr * lam)) for lam in (lambda_max, lambda_min) if math.isfinite(lam) and lr * lam != 1]
    return Estimate(max(terms)) if terms else NAN


# ----------------------------------------------------------------------------- one run
def callbacks_for(args: argparse.Namespace, seed: int) -> list[pl.Callback]:
    """The product's four instruments, configured for the sweep."""
    hessian = dict(every_n_steps=args.hessian_every, tol=args.tol, seed=seed)
    return [
        LyapunovTwinRun(mode="twin", renormalize_every=args.renormalize_every, n_twins=args.twins, seed=seed, summary_every_n_steps=None),
        HessianSpectrumMonitor(probe=args.probe, prefix="probe/", lambda_min=args.lambda_min_every > 0,
                               lambda_min_every_n_steps=args.lambda_min_every or None, **hessian),  # fmt: skip
        HessianSpectrumMonitor(probe="batch", prefix="batch/", **hessian),
        DiffusionTracker(window=args.window, dim=args.dim, figure_every_n_windows=0, seed=seed),
        GradientTailFitter(every_n_steps=args.tail_every, num_samples=args.tail_samples, figure_every_n_estimates=0, seed=seed),
    ]


def make_data(args: argparse.Namespace, seed: int) -> MNISTDataModule:
    return MNISTDataModule(root=str(args.data_root), batch_size=args.batch_size, subset=args.subset, val_split=0.0, seed=seed)


def train(lr: float, seed: int, data: MNISTDataModule, args: argparse.Namespace) -> Run:
    """One Trainer at a constant rate ``lr`` with every instrument attached; test accuracy at the end.
    ``data`` is shared by the runs of one seed: its loader reseeds its shuffling, so they see the same batches."""
    pl.seed_everything(seed, verbose=False)
    widths = [args.width] if args.model == "mlp" else None
    module = ClassificationModule(10, (1, 28, 28), model=args.model, widths=widths, activation=args.activation, optimizer="sgd", lr=lr)
    log, guard = MemoryLogger(), DivergenceGuard()
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, max_steps=args.steps, max_epochs=-1, logger=log,
        log_every_n_steps=args.log_every, callbacks=[*callbacks_for(args, seed), guard], enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    accuracy = math.nan
    if guard.diverged_at is None:
        accuracy = float(trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"])
    run = Run(lr, seed, args.steps, log, accuracy, guard.diverged_at)
    run.summarise()
    return run


# ----------------------------------------------------------------------------- across seeds
def combine(estimates: Sequence[Estimate]) -> tuple[Estimate, float]:
    """Mean over seeds, its propagated uncertainty, and the standard deviation over seeds."""
    finite = [e for e in estimates if math.isfinite(e.value)]
    if not finite:
        return NAN, math.nan
    mean = statistics.fmean(e.value for e in finite)
    kind = finite[0].kind
    us = [e.uncertainty for e in finite]
    if kind == "error":
        uncertainty = statistics.fmean(us)
    else:
        uncertainty = math.sqrt(sum(u * u for u in us)) / len(us)
    spread = statistics.fmean(e.spread for e in finite)
    sd = statistics.stdev(e.value for e in finite) if len(finite) > 1 else math.nan
    return Estimate(mean, uncertainty, kind, spread), sd


UNCERTAINTY_SUFFIX = {"error": "_error", "stderr": "_stderr"}
#: columns without an uncertainty of their own
PLAIN = ("test_acc", "lyapunov_quadratic", "batch_sharpness_lr_median", "tail_censored", "tail_student_t_preferred")


def quantity_names(runs: Sequence[Run]) -> list[str]:
    return list(dict.fromkeys(name for run in runs for name in run.quantities))


def columns_of(name: str, estimate: Estimate) -> dict[str, float]:
    """``name``, ``name_error`` or ``name_stderr`` and ``name_sd`` (spread over the late estimates)."""
    row = {name: estimate.value}
    if name not in PLAIN:
        row[name + UNCERTAINTY_SUFFIX[estimate.kind]] = estimate.uncertainty
        row[name + "_sd"] = estimate.spread
    return row


def run_row(run: Run, names: Sequence[str]) -> dict[str, Any]:
    row: dict[str, Any] = {"lr": run.lr, "seed": run.seed, "steps": run.steps, "diverged_at": run.diverged_at}
    for name in names:
        row.update(columns_of(name, run.quantities.get(name, NAN)))
    return row


def lr_row(lr: float, runs: Sequence[Run], names: Sequence[str]) -> dict[str, Any]:
    """One row per learning rate: each quantity's mean over seeds with its uncertainty, and
    ``<name>_seed_sd`` (standard deviation over seeds, empty for one seed)."""
    row: dict[str, Any] = {"lr": lr, "seeds": len(runs), "diverged": sum(r.diverged_at is not None for r in runs)}
    for name in names:
        estimate, sd = combine([r.quantities.get(name, NAN) for r in runs])
        row.update(columns_of(name, estimate))
        row[name + "_seed_sd"] = sd
    return row


def uncertainty_of(row: dict[str, Any], name: str) -> float:
    """What the error bar of ``name`` shows: the sd over seeds when there are several, else the
    propagated ``_error``/``_stderr``."""
    if row["seeds"] > 1:
        return row.get(name + "_seed_sd", math.nan)
    return row.get(name + "_error", row.get(name + "_stderr", math.nan))


# ----------------------------------------------------------------------------- transitions
def crossing(lrs: Sequence[float], values: Sequence[float], level: float) -> tuple[float, str]:
    """The first η where ``values`` cross ``level`` (geometric interpolation between the two sweep
    points around it) and the direction (``"up"``/``"down"``); ``(NaN, "above"/"below")`` when every
    finite value lies on one side, ``(NaN, "")`` when there is none."""
    pairs = [(lr, v) for lr, v in zip(lrs, values) if math.isfinite(v)]
    for (lr0, v0), (lr1, v1) in zip(pairs, pairs[1:]):
        if (v0 - level) * (v1 - level) < 0 or (v0 != level and v1 == level):
            t = (level - v0) / (v1 - v0)
            return math.exp(math.log(lr0) + t * (math.log(lr1) - math.log(lr0))), "up" if v1 > v0 else "down"
    if not pairs:
        return math.nan, ""
    return math.nan, "above" if pairs[0][1] >= level else "below"


#: (transition, column, level, what it means)
TRANSITIONS: list[tuple[str, str, float, str]] = [
    ("onset of chaos", "lyapunov_mle", 0.0, "twin MLE Λ (whole run) = 0"),
    ("strong chaos", "lyapunov_mle", 0.01, "Λ = 0.01 / step (an e-fold in 100 steps)"),
    ("λ_max = 1/η", "lambda_max_lr", 1.0, "λ_max·η (fixed probe) = 1"),
    ("edge of stability", "lambda_max_lr", 2.0, "λ_max·η (fixed probe) = 2"),
    ("batch sharpness at 2/η", "batch_sharpness_lr", 2.0, "batch sharpness·η = 2"),
    ("early diffusion super → sub", "diffusion_early", 1.0, "first-window MSD exponent = 1"),
    ("late diffusion super → sub", "diffusion_late", 1.0, "last-window MSD exponent = 1"),
    ("tail index below 1", "tail_alpha", 1.0, "late tail α = 1"),
]


def describe_crossing(lrs: Sequence[float], lr: float, direction: str) -> str:
    if direction in ("up", "down"):
        return f"{lr:.3g} ({direction}wards)"
    if direction:
        return f"none: {direction} the level at every η in {lrs[0]:g}–{lrs[-1]:g}"
    return "no data"


def transition_rows(rows: Sequence[dict[str, Any]]) -> list[list[Any]]:
    lrs = [r["lr"] for r in rows]
    out = []
    for name, column, level, meaning in TRANSITIONS:
        lr, direction = crossing(lrs, [r.get(column, math.nan) for r in rows], level)
        out.append([name, meaning, describe_crossing(lrs, lr, direction)])
    return out


# ----------------------------------------------------------------------------- figure
@dataclass(frozen=True)
class Line:
    """One plotted quantity: its column, legend label and style."""

    column: str
    label: str
    style: dict[str, Any]
    bars: bool = True


#: (y label, lines, horizontal references (level, label, label placement), y scale: "linear", or the
#: linear threshold of a symlog axis, used when some value is ≤ 0, else the axis is logarithmic)
PANELS: list[tuple[str, list[Line], list[tuple[float, str, str]], str | float]] = [
    ("Lyapunov exponent Λ (nats / step)", [
        Line("lyapunov_mle", "twin MLE, whole run", {"marker": "o", "color": "C0"}),
        Line("lyapunov_late", "mean FTLE, second half", {"marker": "s", "color": "C1", "mfc": "none"}),
        Line("lyapunov_quadratic", "quadratic model max ln|1 − ηλ| (λ_max, λ_min of the probe)", {"ls": ":", "color": "k", "marker": "."}, False),
    ], [(0.0, "Λ = 0", "bottom")], 1e-5),
    ("sharpness × η", [
        Line("lambda_max_lr", "λ_max·η, fixed probe (certified)", {"marker": "o", "color": "C2"}),
        Line("batch_sharpness_lr", "batch sharpness·η, mean over batches", {"marker": "^", "color": "C3"}),
        Line("batch_sharpness_lr_median", "batch sharpness·η, median over batches", {"marker": "^", "color": "C3", "ls": ":", "mfc": "none"}, False),
        Line("batch_lambda_max_lr", "λ_max·η of the mini-batch", {"marker": "v", "color": "C4", "ls": "--", "mfc": "none"}),
    ], [(2.0, "2: edge of stability", "bottom"), (1.0, "1: λ_max = 1/η", "top")], 1e-2),
    ("weight MSD exponent", [
        Line("diffusion_early", "first window (early)", {"marker": "o", "color": "C5"}),
        Line("diffusion_late", "last window (late)", {"marker": "s", "color": "C6"}),
    ], [(1.0, "1: Brownian", "bottom")], "linear"),
    ("gradient tail index α", [Line("tail_alpha", "α, all entries pooled", {"marker": "o", "color": "C7"})], [(2.0, "2: Gaussian", "bottom"), (ALPHA_MIN, "0.5: lower end of the estimator's range (censored)", "bottom")], "linear"),
    ("test accuracy (%)", [Line("test_acc", "final test accuracy", {"marker": "o", "color": "C9"})], [], "linear"),
]


def layer_lines(rows: Sequence[dict[str, Any]]) -> list[Line]:
    names = [k for k in rows[0] if k.startswith(LAYER_PREFIX) and not k.endswith(("_stderr", "_sd"))]
    return [Line(n, f"α, layer {n.removeprefix(LAYER_PREFIX)}", {"marker": "x", "ls": ":", "lw": 0.8}) for n in names]


def draw(rows: Sequence[dict[str, Any]], path: Path, title: str) -> Path:
    """The stacked panels against η (log axis); vertical guides at the transitions of the sharpness
    and Lyapunov panels; diverged rates shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lrs = np.array([r["lr"] for r in rows])
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(8.5, 2.6 * len(PANELS) + 0.6), sharex=True)
    guides = [("lyapunov_mle", 0.0, "C0", ":", "Λ = 0"), ("lyapunov_mle", 0.01, "C0", "-.", "Λ = 0.01"),
              ("lambda_max_lr", 2.0, "C2", "-.", "λ_max·η = 2"), ("batch_sharpness_lr", 2.0, "C3", "-.", "batch sharpness·η = 2")]  # fmt: skip
    guide_lrs = [(crossing(lrs, [r.get(q, math.nan) for r in rows], level)[0], color, ls, label) for q, level, color, ls, label in guides]
    for ax, (ylabel, lines, references, scale) in zip(axes, PANELS):
        if ylabel.startswith("gradient tail"):
            lines = lines + layer_lines(rows)
        plotted = []
        for line in lines:
            unit = 100.0 if line.column == "test_acc" else 1.0
            y = unit * np.array([r.get(line.column, math.nan) for r in rows], dtype=float)
            plotted.append(y)
            err = None
            if line.bars:
                err = unit * np.array([uncertainty_of(r, line.column) for r in rows], dtype=float)
                err = np.where(np.isfinite(err), err, 0.0)
            ax.errorbar(lrs, y, yerr=err, label=line.label, capsize=3, **{"ms": 5, "lw": 1.2, **line.style})
        values = np.concatenate(plotted)
        positive = scale != "linear" and bool((values[np.isfinite(values)] > 0).all())
        if scale == "linear":
            ax.set_yscale("linear")
        elif positive:  # a log axis; error bars reaching below 0 are clipped
            ax.set_yscale("log", nonpositive="clip")
        else:
            ax.set_yscale("symlog", linthresh=scale)
        for level, label, va in references:
            if level <= 0 and positive:
                ax.annotate(f"{label}: every value is > 0 (log axis)", (0.01, 0.02), xycoords="axes fraction", fontsize=7, color="grey")
                continue
            ax.axhline(level, color="grey", ls="--", lw=0.9)
            ax.annotate(label, (1.0, level), xycoords=("axes fraction", "data"), fontsize=7, color="grey", ha="right", va=va)
        for lr, color, ls, _ in guide_lrs:
            if math.isfinite(lr):
                ax.axvline(lr, color=color, ls=ls, lw=0.9, alpha=0.8)
        for r in rows:
            if r["diverged"]:
                ax.axvspan(r["lr"] / 1.15, r["lr"] * 1.15, color="red", alpha=0.12)
        ax.set_ylabel(ylabel, fontsize=8)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=6.5, loc="best")
    axes[-1].set_xscale("log")
    axes[-1].set_xlabel("learning rate η (constant, plain SGD)")
    described = [f"{label} at η ≈ {lr:.3g}" for lr, _, _, label in guide_lrs if math.isfinite(lr)]
    bars = ("error bars: standard deviation over seeds" if rows[0]["seeds"] > 1 else
            "error bars: certified error (λ_max) or standard error (Λ over twins, batch sharpness over batches, MSD and tail fits)")  # fmt: skip
    lines = [title, bars] + (["vertical lines (colour of the quantity): " + "; ".join(described)] if described else [])
    fig.suptitle("\n".join(lines), fontsize=9)
    path = save_figure(fig, path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- outputs
def write_csv(path: Path, rows: Sequence[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(dict.fromkeys(k for row in rows for k in row)))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_steps(path: Path, runs: Sequence[Run]) -> Path:
    """Every raw logged value, long format: lr, seed, step, tag, value."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["lr", "seed", "step", "tag", "value"])
        for run in runs:
            for step, row in sorted(run.log.rows.items()):
                writer.writerows([run.lr, run.seed, step, tag, value] for tag, value in sorted(row.items()))
    return path


def cell(row: dict[str, Any], name: str, digits: int = 3) -> str:
    """``value ± uncertainty`` (the figure's error bar) in Markdown."""
    value, err = row.get(name, math.nan), uncertainty_of(row, name)
    if not math.isfinite(value):
        return "–"
    return f"{value:.{digits}g} ± {err:.2g}" if math.isfinite(err) else f"{value:.{digits}g}"


TABLE: list[tuple[str, str]] = [
    ("Λ twin MLE", "lyapunov_mle"),
    ("Λ late FTLE", "lyapunov_late"),
    ("Λ quadratic", "lyapunov_quadratic"),
    ("λ_max", "lambda_max"),
    ("λ_max·η", "lambda_max_lr"),
    ("λ_min", "lambda_min"),
    ("batch sharpness·η", "batch_sharpness_lr"),
    ("MSD exp. early", "diffusion_early"),
    ("MSD exp. late", "diffusion_late"),
    ("tail α", "tail_alpha"),
]


def percent_cell(row: dict[str, Any], name: str) -> str:
    share = row.get(name, math.nan)
    return f"{100 * share:.0f}" if math.isfinite(share) else "–"


def main_table(rows: Sequence[dict[str, Any]]) -> str:
    body = [
        [r["lr"], *[cell(r, name) for _, name in TABLE], percent_cell(r, "tail_censored"), percent_cell(r, "tail_student_t_preferred"),
         f"{100 * r['test_acc']:.1f}" if math.isfinite(r["test_acc"]) else "diverged"]
        for r in rows
    ]  # fmt: skip
    headers = ["η", *[h for h, _ in TABLE], "tail fits at α = 0.5 %", "Student t preferred %", "test acc %"]
    return markdown_table(headers, body)


def layer_table(rows: Sequence[dict[str, Any]]) -> str | None:
    names = [line.column for line in layer_lines(rows)]
    if not names:
        return None
    return markdown_table(["η", *[n.removeprefix(LAYER_PREFIX) for n in names]], [[r["lr"], *[cell(r, n) for n in names]] for r in rows])


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator, e.g. auto")
    parser.add_argument("--lrs", type=float, nargs="+", default=DEFAULT_LRS, help="constant SGD learning rates (sorted)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (init, data order, perturbations); mean ± sd over them")
    parser.add_argument("--model", choices=("mlp", "lenet"), default="mlp")
    parser.add_argument("--width", type=int, default=64, help="hidden width of the MLP 784-width-10")
    parser.add_argument("--activation", choices=("tanh", "relu", "gelu"), default="tanh")
    parser.add_argument("--subset", type=int, default=12_000, help="training examples (seeded subset)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1500, help="optimizer steps per run")
    parser.add_argument("--log-every", type=int, default=10, help="Lightning's log_every_n_steps (train/loss in the step CSV)")
    instruments = parser.add_argument_group("instruments")
    instruments.add_argument("--twins", type=int, default=3, help="LyapunovTwinRun n_twins (≥ 2 for a standard error)")
    instruments.add_argument("--renormalize-every", type=int, default=10, help="Benettin interval in steps")
    instruments.add_argument("--hessian-every", type=int, default=50, help="HessianSpectrumMonitor every_n_steps (both monitors)")
    instruments.add_argument("--probe", type=int, default=512, help="fixed probe examples of the λ_max monitor")
    instruments.add_argument("--lambda-min-every", type=int, default=500,
                             help="λ_min cadence of the probe monitor, a multiple of --hessian-every (0: no λ_min)")  # fmt: skip
    instruments.add_argument("--tol", type=float, default=1e-3, help="relative tolerance of λ_max")
    instruments.add_argument("--window", type=int, default=250, help="DiffusionTracker window (steps)")
    instruments.add_argument("--dim", type=int, default=1024, help="DiffusionTracker sketch dimension")
    instruments.add_argument("--tail-every", type=int, default=20, help="GradientTailFitter every_n_steps")
    instruments.add_argument("--tail-samples", type=int, default=5000, help="gradient entries per tail fit")
    args = parser.parse_args(argv)
    args.lrs = sorted(args.lrs)
    if args.steps < 2 * args.window:
        parser.error("--steps must hold at least two diffusion windows (an early and a late one)")
    if args.lambda_min_every and args.lambda_min_every % args.hessian_every:
        parser.error("--lambda-min-every must be a multiple of --hessian-every")
    return args


def setup_line(args: argparse.Namespace) -> str:
    model = f"MLP 784-{args.width}-10 {args.activation}" if args.model == "mlp" else f"LeNet-5 {args.activation}"
    return (
        f"{model}, plain SGD (no momentum), MNIST subset {args.subset}, batch {args.batch_size}, {args.steps} steps per run, "
        f"seeds {args.seeds}. Instruments: LyapunovTwinRun ({args.twins} twins, renormalised every {args.renormalize_every} steps); "
        f"HessianSpectrumMonitor every {args.hessian_every} steps on a fixed probe of {args.probe} examples (λ_max to rel. tol "
        f"{args.tol}, λ_min every {args.lambda_min_every or '–'} steps) and on the current mini-batch (batch sharpness); "
        f"DiffusionTracker windows of {args.window} steps (sketch {args.dim}); GradientTailFitter every {args.tail_every} steps "
        f"on {args.tail_samples} entries. torch {torch.__version__}, {torch.get_num_threads()} thread(s)."
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    start, cpu_start = open_outputs(args.out), time.process_time()
    runs: list[Run] = []
    data = {seed: make_data(args, seed) for seed in args.seeds}
    for lr in args.lrs:
        for seed in args.seeds:
            runs.append(train(lr, seed, data[seed], args))
            q = runs[-1].quantities
            print(f"η={lr:g} seed {seed}: Λ={q['lyapunov_mle'].value:.4g}, λ_max·η={q['lambda_max_lr'].value:.3g}, "
                  f"test acc {runs[-1].test_acc:.4f}" + (f", diverged at {runs[-1].diverged_at}" if runs[-1].diverged_at is not None else ""),
                  flush=True)  # fmt: skip
    names = quantity_names(runs)
    rows = [lr_row(lr, [r for r in runs if r.lr == lr], names) for lr in args.lrs]
    report = [
        "# Phase diagram: the four papers against the learning rate\n",
        setup_line(args) + "\n",
        "Late = mean over the second half of training; ± the propagated certified error (λ_max) or standard error "
        + ("(one seed)" if len(args.seeds) == 1 else "— here the standard deviation over seeds") + ".\n",
        main_table(rows),
    ]
    layers = layer_table(rows)
    if layers:
        report += ["\nTail α per layer (late mean):\n", layers]
    report += ["\nTransitions (geometric interpolation between neighbouring rates):\n",
               markdown_table(["transition", "criterion", "η"], transition_rows(rows))]  # fmt: skip
    outputs = [
        write_csv(args.out / "phase_diagram.csv", rows),
        write_csv(args.out / "phase_diagram_runs.csv", [run_row(r, names) for r in runs]),
        write_steps(args.out / "phase_diagram_steps.csv", runs),
    ]
    figure = draw(rows, args.out / "phase_diagram.png", setup_line(args).split(". Instruments")[0])
    report += [f"\nwrote {p}" for p in outputs]
    report.append(f"\nCPU time of this process {time.process_time() - cpu_start:.0f} s (the wall time below includes waiting for a shared CPU).")
    finish_report(args.out, report, start, [figure])


if __name__ == "__main__":
    main()
