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

Three experiments train the networks (``lightning`` Trainer + ``ClassificationModule`` +
``DiffusionTracker`` + ``GradientTailFitter``); each of their runs carries both callbacks:

* ``windows``: an MLP 784-64-10 and a LeNet-5 at two learning rates (``--models``, ``--lrs``),
  plain SGD (``--momentum``), ``--steps`` steps, MSD windows of ``--window`` steps. Per window:
  single exponent α, two-regime exponents α_s (short lags) and α_l (long lags) with crossover τ₀
  (``chaos_callbacks.dynamics.diffusion.fit_msd``: only where the crossover test selects two
  regimes), Hurst H of MSL and the path's fractal dimension d_f; a summary of the first window
  against the mean of the last three.
* ``tails``: the ``GradientTailFitter`` estimates of those runs (every ``--tail-every`` steps,
  ``--tail-samples`` gradient entries): α of S(α, 0, σ, 0) with characteristic function
  exp(−|σt|^α) (α = 2 Gaussian; P(|g| > x) ~ x^−α for α < 2), the Vuong p-values of stable vs
  Gaussian and vs Student t, and α per layer. Early = the first fifth of the estimates, late = the
  last fifth; "rises"/"falls" when the difference exceeds twice its standard error.
* ``shortcuts``: the paper's comparison, reduced for a CPU: ``resnet14`` (option-A shortcuts,
  BatchNorm) vs ``plain14`` (the same network without shortcuts) from ``chaos_callbacks.recipes.models``, SGD
  (``--shortcut-*`` flags), the same window and tail statistics.

Four analyses cover the windows and shortcut runs made (with none of those selected, the windows
runs are made for them):

* ``crossover``: per window, the crossover test's p-value (one power law against a smoothly broken
  one, ``DiffusionTracker(crossover_level=--crossover-level)``), the model it selects, and where two
  regimes are selected α_s, α_l and τ₀ with standard errors.
* ``layer_tails``: ``analyse_tails`` (stable fit, Vuong tests against a Gaussian and a Student t) on
  each layer's gradient entries, on entries pooled over all parameters, and on the same pooled
  entries divided by their layer's scale (:class:`LayerTailTests`): does the stable law beat a
  finite-variance Student t per layer, and how much of the pooled tail is a mixture of scales?
* ``boxcount``: box-counting dimension (:func:`box_counting_dimension`) of the sketched weight
  trajectory projected on its first two principal components and on two random directions, with
  Brownian controls through the same projection (paper: ≈ 1.8).
* ``loss_variance``: the minibatch loss's moving variance (runs of ``--loss-window`` steps) per
  window, absolute and relative to the squared mean loss, first window vs late.

Two more train runs of their own and are not in the default:

* ``hessian``: the windows runs again with a recording ``HessianSpectrumMonitor`` (top
  ``--hessian-top-k`` eigenvalues on a fixed probe of ``--hessian-probe`` examples every
  ``--hessian-every`` steps): do they decay, rise (progressive sharpening) or settle?
* ``sweep``: ``--sweep-model`` at every ``--sweep-lrs`` × ``--sweep-batch-sizes`` for
  ``--sweep-steps`` steps: super → sub per cell (the paper: insensitive to lr and batch size).

The shortcut defaults follow the authors' training code (github ifgovh/Anomalous-diffusion-
dynamics-of-SGD, ``main.py``): plain SGD at lr 0.1, no momentum, no weight decay, no schedule; the
paper's headline ResNet-14 numbers (α 1.215 → 0.783, τ₀ = 70 steps) are at batch 1024, and the
authors also ran batch 128 (1.315 → 0.727, τ₀ = 180) and 512. On a CPU the default batch is 32.
``--shortcut-momentum 0.9`` makes the first ~1/(1 − β) lags ballistic (α_s → 2), which is part of
any "early superdiffusion" measured with momentum.

Outputs (``--out``, default ``reproductions/results/anomalous_diffusion/``): ``anomalous_diffusion.md``
(the Markdown tables, also printed), ``windows.csv`` (one row per run and window), ``summary.csv``
(one row per run), ``tails.csv`` (one row per estimate and layer, layer ``all`` = all parameters),
``crossover.csv`` (per run and window), ``layer_tails.csv`` (per estimate and sample) and
``layer_tails_summary.csv``, ``boxcount.csv``, ``loss_variance.csv`` (per run and window),
``hessian.csv`` (every estimate) and ``hessian_summary.csv``, ``sweep.csv``; figures
``msd_<run>.png`` (MSD(τ) per window with a slope-1 reference), ``windows_alpha.png`` (α per
window), ``tails_alpha.png`` (tail α against step), ``shortcuts.png`` (ResNet vs plain: α and H
per window, tail α), ``boxcount_projections.png``, ``loss_variance.png``, ``hessian.png`` and
``sweep_alpha.png``.

Default run (``windows tails shortcuts crossover layer_tails boxcount loss_variance`` on real
MNIST, 12k-example subset; windows: batch 64, 2,400 steps, windows of 200; shortcuts: batch 32,
lr 0.1, no momentum, 1,200 steps, windows of 200; tail fits every 20 steps): see REPRODUCTION.md
for the measured run times (about 7 minutes of CPU time, one torch thread; ResNet-14 takes about
0.11 s per step). ``--experiments hessian --hessian-every 300`` and ``--experiments sweep
--sweep-steps 1600`` take about 5 and 2 minutes of CPU time.
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

from benchmarks.sgd_runs import RecordingMonitor
from chaos_callbacks.callbacks.diffusion_tracker import DiffusionTracker
from chaos_callbacks.callbacks.gradient_tails import GradientTailFitter, layer_name, sample_nonzero_entries
from chaos_callbacks.dynamics.diffusion import WindowStats, loss_variance, moving_variance  # noqa: E402
from chaos_callbacks.dynamics.sketch import StridedSignSketch, largest_prime_at_most
from chaos_callbacks.dynamics.tails import MIN_SAMPLES, TailSummary, analyse_tails
from chaos_callbacks.plotting.diffusion import msd_figure  # noqa: E402  (also selects Agg)
from chaos_callbacks.recipes.data import CIFAR10DataModule, ImageClassificationDataModule, MNISTDataModule  # noqa: E402
from chaos_callbacks.recipes.module import ClassificationModule  # noqa: E402

from reproductions.common import RESULTS, add_common_args, emit, markdown_table, quiet_lightning

EXPERIMENTS = ("windows", "tails", "shortcuts", "crossover", "layer_tails", "boxcount", "loss_variance", "hessian", "sweep")
DEFAULT_EXPERIMENTS = ("windows", "tails", "shortcuts", "crossover", "layer_tails", "boxcount", "loss_variance")
TRAINING = ("windows", "shortcuts", "sweep", "hessian")  # experiments that train runs of their own
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
        return f"{self.experiment}_{self.model}_lr{self.lr}" + (f"_bs{self.batch_size}" if self.experiment == "sweep" else "")

    def context(self) -> dict[str, Any]:
        """The run's identity columns for the CSV files."""
        return {"experiment": self.experiment, "model": self.model, "lr": self.lr, "momentum": self.momentum, "batch": self.batch_size}


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


POOLED, POOLED_SCALED = "all", "all, per-layer scaled"  # the two pooled samples of LayerTailTests


def tail_record(summary: TailSummary) -> dict[str, float]:
    """The numbers kept of one ``analyse_tails`` result."""
    t = summary.student_t
    return {"n": summary.n, "alpha": summary.fit.alpha, "alpha_stderr": summary.fit.alpha_stderr, "scale": summary.fit.scale,
            "llr_gauss": summary.gaussian.llr, "p_gauss": summary.gaussian.p_value, "llr_t": t.llr, "llr_t_stderr": t.llr_stderr,
            "p_t": t.p_value, "t_df": t.alternative.df}  # fmt: skip


def pooled_and_layer_tails(samples: dict[str, np.ndarray], pooled: np.ndarray, owners: np.ndarray) -> dict[str, dict[str, float]]:
    """``analyse_tails`` of each layer's own sample, of the pooled sample, and of the pooled sample
    with every entry divided by its layer's fitted stable scale (``owners[i]``: the layer of
    ``pooled[i]``; entries of layers without a fit are dropped).

    Pooling entries of different scales is a scale mixture, which has heavier tails than each
    part: two Gaussian layers with scales 1 and 10 give α ≈ 2 each but a pooled α well below 2.
    Dividing by each layer's scale removes that mixture, so a pooled α that rises back to the
    per-layer values says the pooled tail came from the scales, not from the layers' own tails.
    """
    fits = {layer: tail_fit(values) for layer, values in samples.items()}
    result = {layer: record for layer, record in fits.items() if record is not None}
    if (record := tail_fit(pooled)) is not None:
        result[POOLED] = record
        scales = np.array([result[o]["scale"] if o in result else math.nan for o in owners])
        if (record := tail_fit((pooled / scales)[np.isfinite(scales)])) is not None:
            result[POOLED_SCALED] = record
    return result


def tail_fit(values: np.ndarray) -> dict[str, float] | None:
    """:func:`tail_record` of ``analyse_tails(values)``; ``None`` for fewer than ``MIN_SAMPLES`` values
    or a sample it refuses (constant, or over half the values equal)."""
    if values.size < MIN_SAMPLES:
        return None
    try:
        return tail_record(analyse_tails(values))
    except ValueError:
        return None


class LayerTailTests(pl.Callback):
    """Stable vs Gaussian and vs Student t, per layer and pooled, every ``every_n_steps`` steps.

    ``GradientTailFitter`` tests only the pooled entries against the Student t and fits α alone per
    layer; this repeats the whole ``analyse_tails`` (stable fit, Vuong tests against a Gaussian
    and a Student t) on each layer's ``num_samples`` nonzero gradient entries (a layer = the module
    owning the parameters, as in the fitter), on ``num_samples`` entries drawn uniformly over all
    parameters, and on those same entries divided by their layer's fitted scale
    (:func:`pooled_and_layer_tails`). Entries are drawn by the fitter's ``sample_nonzero_entries``
    with a generator seeded by ``seed + step``.
    """

    def __init__(self, every_n_steps: int, num_samples: int, seed: int) -> None:
        self.every_n_steps, self.num_samples, self.seed = every_n_steps, num_samples, seed
        self.estimates: list[tuple[int, dict[str, dict[str, float]]]] = []

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if step % self.every_n_steps:
            return
        grads = {name: p.grad.detach() for name, p in pl_module.named_parameters() if p.grad is not None}
        layers: dict[str, list[torch.Tensor]] = {}
        for name, grad in grads.items():
            layers.setdefault(layer_name(name), []).append(grad)
        generator = torch.Generator().manual_seed(self.seed + step)
        samples = {layer: sample_nonzero_entries([(g, None) for g in gs], self.num_samples, generator).values.numpy()
                   for layer, gs in layers.items()}  # fmt: skip
        pooled, owners = self._pooled(list(grads.items()), generator)
        self.estimates.append((step, pooled_and_layer_tails(samples, pooled, owners)))

    def _pooled(self, grads: list[tuple[str, torch.Tensor]], generator: torch.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Nonzero entries drawn uniformly over all parameters, with the layer of each."""
        sizes = np.array([g.numel() for _, g in grads])
        index = torch.randperm(int(sizes.sum()), generator=generator).numpy()
        flat = torch.cat([g.reshape(-1) for _, g in grads]).double().numpy()[index]
        owner = np.repeat(np.array([layer_name(n) for n, _ in grads]), sizes)[index]
        keep = np.flatnonzero(flat != 0)[: self.num_samples]
        return flat[keep], owner[keep]


class TrajectoryRecorder(pl.Callback):
    """Every step: the weights before it, sketched to ``dim`` coordinates (``StridedSignSketch``,
    squared distances kept to about sqrt(2/p)), and the step's minibatch loss.

    Kept as float32 rows (``steps × dim × 4`` bytes: 10 MB for 2,400 steps at dim 1021); for the
    box-counting dimension of projected trajectories and the loss's moving variance.
    """

    def __init__(self, dim: int, seed: int) -> None:
        self.dim, self.seed = dim, seed
        self.rows: list[np.ndarray] = []
        self.losses: list[float] = []
        self._sketch: StridedSignSketch | None = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        params = [p for p in pl_module.parameters() if p.requires_grad]
        if self._sketch is None:
            self._sketch = StridedSignSketch(sum(p.numel() for p in params), largest_prime_at_most(self.dim), seed=self.seed)
        self.rows.append(self._sketch.project(params).float().cpu().numpy())

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.losses.append(float(outputs["loss"]))

    def trajectory(self) -> np.ndarray:
        return np.asarray(self.rows, dtype=np.float64)


@dataclass
class RunResult:
    spec: RunSpec
    windows: list[WindowStats]
    tails: list[tuple[int, dict[str, float]]]
    accuracy: float
    seconds: float
    layer_tests: list[tuple[int, dict[str, dict[str, float]]]] = field(default_factory=list)
    hessian: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    trajectory: np.ndarray | None = None  # sketched weights before every step [steps, dim]
    losses: np.ndarray | None = None  # minibatch loss of every step
    layers: list[str] = field(init=False)

    def __post_init__(self) -> None:
        names = (layer for _, m in self.tails for layer in layer_alphas(m))
        self.layers = list(dict.fromkeys(names))

    def tail_series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of one logged tail metric, over the estimates that carry it."""
        pairs = [(step, m[key]) for step, m in self.tails if key in m]
        return [s for s, _ in pairs], [v for _, v in pairs]

    def hessian_series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of one ``HessianSpectrumMonitor`` metric over its estimates."""
        pairs = [(step, m[key]) for step, m in self.hessian if key in m]
        return [s for s, _ in pairs], [v for _, v in pairs]


def make_data(args: argparse.Namespace, batch_size: int) -> ImageClassificationDataModule:
    """The seeded training subset (``--subset 0``: all) of MNIST or CIFAR-10, no validation split."""
    common = {"root": str(args.data_root), "batch_size": batch_size, "subset": args.subset or None,
              "val_split": 0.0, "seed": args.seed}  # fmt: skip
    if args.dataset == "cifar10":
        return CIFAR10DataModule(augment=args.augment, **common)
    return MNISTDataModule(**common)


def instruments(spec: RunSpec, args: argparse.Namespace) -> dict[str, pl.Callback]:
    """The callbacks of one run: ``DiffusionTracker`` always; on the windows and shortcut runs the
    ``GradientTailFitter`` (and its recorder), ``LayerTailTests`` (``layer_tails``), the
    ``TrajectoryRecorder`` (``boxcount``, ``loss_variance``); on the windows runs a recording
    ``HessianSpectrumMonitor`` (``hessian``)."""
    selected = set(args.experiments)
    tracker = DiffusionTracker(window=spec.window, dim=args.dim, figure_every_n_windows=0, seed=args.seed,
                               crossover_level=args.crossover_level)  # fmt: skip
    callbacks: dict[str, pl.Callback] = {"tracker": tracker}
    if spec.experiment == "sweep":
        return callbacks
    fitter = GradientTailFitter(
        every_n_steps=args.tail_every, num_samples=args.tail_samples, method=args.tail_method,
        target=args.tail_target, figure_every_n_estimates=0, seed=args.seed,
    )  # fmt: skip
    callbacks |= {"fitter": fitter, "tails": TailRecorder(fitter)}
    if "layer_tails" in selected:
        callbacks["layer_tests"] = LayerTailTests(args.tail_every, args.tail_samples, args.seed)
    if selected & {"boxcount", "loss_variance"}:
        callbacks["trajectory"] = TrajectoryRecorder(args.dim, args.seed)
    if "hessian" in selected and spec.experiment == "windows":
        callbacks["hessian"] = RecordingMonitor(every_n_steps=args.hessian_every, top_k=args.hessian_top_k, probe=args.hessian_probe,
                                                max_hvps=args.hessian_max_hvps, seed=args.seed)  # fmt: skip
    return callbacks


def train(spec: RunSpec, args: argparse.Namespace) -> RunResult:
    """Fit one network with its :func:`instruments`; test it on the test split."""
    pl.seed_everything(args.seed, verbose=False)
    data = make_data(args, spec.batch_size)
    module = ClassificationModule(data.num_classes, data.in_shape, model=spec.model, lr=spec.lr, momentum=spec.momentum)
    callbacks = instruments(spec, args)
    trainer = pl.Trainer(
        accelerator=args.accelerator, devices=1, max_steps=spec.steps, max_epochs=-1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=list(callbacks.values()),
    )  # fmt: skip
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    accuracy = float(trainer.test(module, datamodule=data, verbose=False)[0]["test/acc"])
    recorder = callbacks.get("trajectory")
    result = RunResult(
        spec, callbacks["tracker"].windows, callbacks["tails"].estimates if "tails" in callbacks else [], accuracy, seconds,
        layer_tests=callbacks["layer_tests"].estimates if "layer_tests" in callbacks else [],
        hessian=callbacks["hessian"].history if "hessian" in callbacks else [],
        trajectory=None if recorder is None else recorder.trajectory(),
        losses=None if recorder is None else np.asarray(recorder.losses),
    )  # fmt: skip
    print(f"run {spec.slug}: {seconds:.0f} s, test accuracy {100 * accuracy:.1f}%", flush=True)
    return result


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    """The runs the selected experiments need: the windows runs for ``windows`` and ``hessian`` (and for
    the analyses ``tails``, ``crossover``, ``layer_tails``, ``boxcount``, ``loss_variance`` when no
    experiment that trains is selected), the shortcut runs for ``shortcuts``, the grid for ``sweep``."""
    specs = []
    selected = set(args.experiments)
    if selected & {"windows", "hessian"} or not selected & set(TRAINING):
        specs += [
            RunSpec("windows", model, lr, args.momentum, args.batch_size, args.steps, args.window)
            for model in args.models
            for lr in args.lrs
        ]
    if "shortcuts" in selected:
        specs += [
            RunSpec("shortcuts", model, args.shortcut_lr, args.shortcut_momentum, args.shortcut_batch_size,
                    args.shortcut_steps, args.shortcut_window)
            for model in args.shortcut_models
        ]  # fmt: skip
    if "sweep" in selected:
        specs += [
            RunSpec("sweep", args.sweep_model, lr, args.momentum, batch_size, args.sweep_steps, args.window)
            for lr in args.sweep_lrs
            for batch_size in args.sweep_batch_sizes
        ]
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


# ----------------------------------------------------------------------------- box counting
BOX_SIZES = (1 / 128, 1 / 8)  # smallest and largest box, as fractions of the path's extent
BOX_NUM_SIZES = 10
BOX_OFFSETS = 8  # random grid origins averaged over
CONTROL_SEEDS = 8


@dataclass(frozen=True)
class BoxCount:
    """Box-counting dimension of a 2-D path: ``dimension`` ± ``stderr`` over ``sizes`` (mean box ``counts``)."""

    dimension: float
    stderr: float
    sizes: np.ndarray
    counts: np.ndarray


def densify_path(points: np.ndarray, spacing: float) -> np.ndarray:
    """The polyline through ``points`` [T, 2] sampled at most ``spacing`` apart (each segment cut
    into ceil(length / spacing) equal parts), so that boxes smaller than a step are counted along
    the segments, not only at their ends."""
    segments = np.diff(points, axis=0)
    parts = np.maximum(1, np.ceil(np.linalg.norm(segments, axis=1) / spacing).astype(np.int64))
    index = np.repeat(np.arange(segments.shape[0]), parts)
    fraction = np.arange(index.size) - np.repeat(np.cumsum(parts) - parts, parts)
    fraction = fraction / np.repeat(parts, parts)
    return np.vstack([points[index] + fraction[:, None] * segments[index], points[-1:]])


def occupied_cells(points: np.ndarray) -> int:
    """Number of distinct unit cells ``floor(points)`` [n, 2] (one int64 key per cell)."""
    cells = np.floor(points).astype(np.int64)
    cells -= cells.min(axis=0)
    return int(np.unique(cells[:, 0] * (int(cells[:, 1].max()) + 1) + cells[:, 1]).size)


def box_counting_dimension(
    points: np.ndarray, sizes: tuple[float, float] = BOX_SIZES, num_sizes: int = BOX_NUM_SIZES,
    offsets: int = BOX_OFFSETS, seed: int = 0,
) -> BoxCount:  # fmt: skip
    """Box-counting dimension D of the path through ``points`` [T, 2]: N(ε) ∝ ε^{−D}.

    N(ε) = number of ε × ε grid cells the polyline (:func:`densify_path`, spacing ε_min/16) touches,
    averaged over ``offsets`` uniformly random grid origins, at ``num_sizes`` log-spaced ε from
    ``sizes[0]`` to ``sizes[1]`` times the extent (the larger side of the bounding box). D is the
    least-squares slope of log N on log(1/ε); ``stderr`` combines the slope's regression standard
    error (it grows when log N is curved, i.e. when no single power law holds over the range) and
    the spread of the slopes of the single grid origins. It is a fit uncertainty for this one
    path, not a spread over paths. Finite extent biases D low: over a random origin a segment of
    length L at angle θ meets L(|cos θ| + |sin θ|)/ε + 1 boxes on average and a filled square of side
    L (L/ε + 1)², so a line gives 0.97 and a plane-filling curve 1.93 over the default range (the
    slopes of those exact counts). Checked against exact answers (``tests/reproductions``): those
    two slopes for lines and a Hilbert curve, and log 4 / log 3 = 1.262 for the Koch curve
    within 0.05 (lacunarity: the sizes are not powers of 3). A Brownian path approaches 2 only logarithmically
    (a 2-D walk of n steps visits ~ πn/ln n sites, so the local slope is ~ 2 − 2/ln(n/k²) at boxes of
    k steps): 1.50–1.61 at 2,400 steps, 1.64–1.71 at 10⁵ with the default range (5 seeds).
    """
    points = np.asarray(points, dtype=np.float64)
    extent = float(np.ptp(points, axis=0).max())
    if points.ndim != 2 or points.shape[1] != 2 or points.shape[0] < 2 or not extent > 0:
        raise ValueError(f"need a 2-D path of at least 2 distinct points; got shape {points.shape}")
    boxes = extent * np.geomspace(sizes[0], sizes[1], num_sizes)
    dense = densify_path(points, boxes[0] / 16) / boxes[:, None, None]  # [sizes, points, 2] in box units
    shifts = np.random.default_rng(seed).random((offsets, 2))
    counts = np.array([[occupied_cells(d + shift) for d in dense] for shift in shifts])
    x, y = np.log(1.0 / boxes), np.log(counts.mean(axis=0))
    (slope, _), cov = np.polyfit(x, y, 1, cov=True)
    per_origin = [np.polyfit(x, np.log(c), 1)[0] for c in counts]
    stderr = math.sqrt(cov[0, 0] + np.var(per_origin, ddof=1))
    return BoxCount(float(slope), stderr, boxes, counts.mean(axis=0))


def project_2d(X: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """A trajectory [T, d] in 2-D: its first two principal components (``pca``: scores on the top two
    right singular vectors of the centred trajectory) or two random Gaussian directions (``random``)."""
    centred = X - X.mean(axis=0)
    if method == "pca":
        u, s, _ = np.linalg.svd(centred, full_matrices=False)
        return u[:, :2] * s[:2]
    return centred @ np.random.default_rng(seed).standard_normal((X.shape[1], 2))


def random_walk(num_steps: int, dim: int, seed: int) -> np.ndarray:
    """A Gaussian random walk (Brownian path) of ``num_steps`` steps in ``dim`` dimensions: the control."""
    return np.cumsum(np.random.default_rng(seed).standard_normal((num_steps, dim)), axis=0)


# ----------------------------------------------------------------------------- crossover (model selection)
def selected_model(w: WindowStats, level: float) -> str:
    """What the crossover test selects for one window (``DiffusionTracker(crossover_level=level)``)."""
    if not math.isfinite(w.crossover_pvalue):
        return "untested"
    return "two regimes" if w.crossover_pvalue < level else "one power law"


def lag_order(w: WindowStats) -> str:
    """Order of the two regimes in τ where a crossover was selected: the paper's is super → sub."""
    if not math.isfinite(w.crossover):
        return "–"
    return f"{regime(w.exponent_short)} → {regime(w.exponent_long)}"


def crossover_rows(windows: Sequence[WindowStats], level: float) -> list[dict[str, Any]]:
    return [
        {"t_w": w.t_w, "p (one vs two)": w.crossover_pvalue, "selected": selected_model(w, level),
         "α": w.exponent, "se α": w.exponent_stderr, "α_s": w.exponent_short, "se α_s": w.exponent_short_stderr,
         "α_l": w.exponent_long, "se α_l": w.exponent_long_stderr, "τ₀": w.crossover, "se τ₀": w.crossover_stderr,
         "order in τ": lag_order(w), "fitted lags ≤": w.fit_max_lag}
        for w in windows
    ]  # fmt: skip


def crossover_summary(result: RunResult, level: float) -> dict[str, Any]:
    """Per run: windows with a selected crossover, its τ₀ (± se) and the order of the regimes."""
    selected = [w for w in result.windows if selected_model(w, level) == "two regimes"]
    orders = [lag_order(w) for w in selected]
    taus = ", ".join(f"{w.crossover:.0f}±{w.crossover_stderr:.0f}" for w in selected) or "–"
    return {"model": result.spec.model, "lr": result.spec.lr, "windows": len(result.windows),
            "two regimes selected": len(selected), "median p": statistics.median(w.crossover_pvalue for w in result.windows),
            "τ₀ ± se (selected windows)": taus, "super → sub in τ": orders.count("super → sub"),
            "sub → super in τ": orders.count("sub → super"), "same side of 1": len(orders) - orders.count("super → sub") - orders.count("sub → super")}  # fmt: skip


# ----------------------------------------------------------------------------- per-layer tails
def layer_tail_summary(result: RunResult) -> list[dict[str, Any]]:
    """Per run and layer (and the two pooled samples): median α over the estimates, its early →
    late trend, and the share of estimates where the stable law wins or loses against a Gaussian and
    a Student t (log-likelihood ratio sign and two-sided Vuong p < 0.05)."""
    rows = []
    names = list(dict.fromkeys(name for _, est in result.layer_tests for name in est))
    for name in names:
        records = [est[name] for _, est in result.layer_tests if name in est]
        alphas = [r["alpha"] for r in records]
        rows.append({
            "model": result.spec.model, "lr": result.spec.lr, "sample": name, "estimates": len(records),
            "median α": statistics.median(alphas), "median se α": statistics.median(r["alpha_stderr"] for r in records),
            "α over training": trend(*early_late(alphas)),
            "stable > Gauss %": 100 * mean([r["llr_gauss"] > 0 and r["p_gauss"] < 0.05 for r in records]),
            "stable > t %": 100 * mean([r["llr_t"] > 0 and r["p_t"] < 0.05 for r in records]),
            "t > stable %": 100 * mean([r["llr_t"] < 0 and r["p_t"] < 0.05 for r in records]),
            "median llr vs t": statistics.median(r["llr_t"] for r in records),
            "median t df": statistics.median(r["t_df"] for r in records),
        })  # fmt: skip
    return rows


def pooling_summary(result: RunResult) -> dict[str, Any]:
    """Pooled α against the per-layer α's, per run (medians over the estimates)."""
    def median_alpha(name: str) -> float:
        values = [est[name]["alpha"] for _, est in result.layer_tests if name in est]
        return statistics.median(values) if values else math.nan

    layers = [n for n in dict.fromkeys(n for _, est in result.layer_tests for n in est) if n not in (POOLED, POOLED_SCALED)]
    per_layer = [median_alpha(n) for n in layers]
    return {"model": result.spec.model, "lr": result.spec.lr, "layers": len(layers), "pooled α": median_alpha(POOLED),
            "pooled α, per-layer scaled": median_alpha(POOLED_SCALED), "per-layer α min": min(per_layer, default=math.nan),
            "per-layer α median": statistics.median(per_layer) if per_layer else math.nan,
            "per-layer α max": max(per_layer, default=math.nan),
            "pooled below every layer": bool(per_layer) and median_alpha(POOLED) < min(per_layer)}  # fmt: skip


def layer_tail_csv_rows(result: RunResult) -> list[dict[str, Any]]:
    return [{"step": step, "sample": name, **record} for step, est in result.layer_tests for name, record in est.items()]


# ----------------------------------------------------------------------------- box counting of the runs
def box_rows(result: RunResult, seed: int) -> list[dict[str, Any]]:
    """Box-counting dimension of the run's sketched trajectory in two projections (PCA, random), and of
    Brownian controls with the same number of steps and dimensions (mean ± sd over ``CONTROL_SEEDS``)."""
    X = result.trajectory
    rows = []
    for method in ("pca", "random"):
        fit = box_counting_dimension(project_2d(X, method, seed), seed=seed)
        controls = [box_counting_dimension(project_2d(random_walk(X.shape[0], X.shape[1], seed + 1 + s), method, s), seed=s).dimension
                    for s in range(CONTROL_SEEDS)]  # fmt: skip
        rows.append({"model": result.spec.model, "lr": result.spec.lr, "projection": method, "steps": X.shape[0],
                     "D": fit.dimension, "se D": fit.stderr, "Brownian control D": statistics.fmean(controls),
                     "control sd": statistics.stdev(controls)})  # fmt: skip
    return rows


def box_figure(results: Sequence[RunResult], out: Path, seed: int) -> Path:
    """The 2-D projections of each run's trajectory (PCA and random), coloured by step."""
    fig, axes = plt.subplots(2, len(results), figsize=(3.2 * len(results), 6.4), dpi=100, squeeze=False)
    for column, r in enumerate(results):
        for row, method in enumerate(("pca", "random")):
            points = project_2d(r.trajectory, method, seed)
            ax = axes[row, column]
            ax.plot(points[:, 0], points[:, 1], lw=0.3, color="grey")
            ax.scatter(points[:, 0], points[:, 1], c=np.arange(points.shape[0]), s=1, cmap="viridis")
            ax.set_title(f"{r.spec.label}\n{method}", fontsize=8)
            ax.set_xticks([]), ax.set_yticks([])
    fig.tight_layout()
    path = out / "boxcount_projections.png"
    fig.savefig(path)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- loss moving variance
def loss_windows(losses: np.ndarray, window: int, variance_window: int) -> list[dict[str, float]]:
    """Per window of ``window`` steps: mean loss, mean moving variance (runs of ``variance_window``
    losses, ignoring the slow trend) with its block-jackknife standard error, and the same relative
    to the squared mean loss (the loss falls, so its absolute fluctuations may fall with it)."""
    rows = []
    for start in range(0, losses.size - window + 1, window):
        chunk = losses[start : start + window]
        value, stderr = loss_variance(chunk, variance_window)
        level = float(chunk.mean())
        rows.append({"t_w": start, "mean loss": level, "moving var": value, "se": stderr,
                     "relative var": value / level**2, "se rel": stderr / level**2})  # fmt: skip
    return rows


def variance_trend(rows: Sequence[dict[str, float]], key: str, se_key: str) -> tuple[float, float, str]:
    """First window against the mean of the last ``LATE_WINDOWS``: values and falls/rises/flat
    (difference beyond twice the combined standard error)."""
    first, late = rows[0], rows[-LATE_WINDOWS:]
    late_value = mean([r[key] for r in late])
    late_se = math.sqrt(sum(r[se_key] ** 2 for r in late)) / len(late)
    difference, noise = late_value - first[key], 2 * math.hypot(first[se_key], late_se)
    verdict = "rises" if difference > noise else "falls" if difference < -noise else "flat"
    return first[key], late_value, verdict


def loss_variance_summary(result: RunResult, rows: Sequence[dict[str, float]]) -> dict[str, Any]:
    first, late, verdict = variance_trend(rows, "moving var", "se")
    first_rel, late_rel, verdict_rel = variance_trend(rows, "relative var", "se rel")
    return {"model": result.spec.model, "lr": result.spec.lr, "moving var first": first, "moving var late": late,
            "late / first": late / first, "absolute": verdict, "relative first": first_rel, "relative late": late_rel,
            "relative": verdict_rel}  # fmt: skip


# ----------------------------------------------------------------------------- Hessian over training
HESSIAN_CHANGE = 0.2  # a relative change of the top eigenvalues beyond 20% counts as a rise or a decay


def hessian_trend(values: Sequence[float]) -> str:
    """Shape of a top eigenvalue's course: rise = peak / first, then late = mean of the last fifth
    against the peak. ``rises, then settles`` (progressive sharpening to a plateau) when the peak is
    over 1.2 × the first value and the late mean within 20% of the peak; ``rises, then decays`` when
    it falls further; ``decays`` when there is no such rise and the late mean is below 0.8 × the first
    value; ``flat`` otherwise. The estimates are certified (error ≤ 1e-3 λ_max), so the changes are
    those of the Hessian on the fixed probe; with a handful of estimates no finer test is made."""
    peak, late = max(values), mean(early_late(values)[1])
    if peak > (1 + HESSIAN_CHANGE) * values[0]:
        return "rises, then settles" if late > (1 - HESSIAN_CHANGE) * peak else "rises, then decays"
    return "decays" if late < (1 - HESSIAN_CHANGE) * values[0] else "flat"


def hessian_rows(result: RunResult, top_k: int) -> list[dict[str, Any]]:
    """Per top eigenvalue: first estimate, peak (and its step), mean of the last fifth, trend."""
    rows = []
    for i in range(1, top_k + 1):
        key = f"hessian/eig_{i}" if top_k > 1 else "hessian/lambda_max"
        steps, values = result.hessian_series(key)
        if not values:
            continue
        peak = int(np.argmax(values))
        late = early_late(values)[1]
        rows.append({"model": result.spec.model, "lr": result.spec.lr, "eigenvalue": f"λ_{i}", "estimates": len(values),
                     "first": values[0], "peak": values[peak], "peak step": steps[peak], "late mean": mean(late),
                     "late se": standard_error(late), "late / peak": mean(late) / values[peak],
                     "η·λ late": result.spec.lr * mean(late), "over training": hessian_trend(values)})  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- lr × batch sweep
def sweep_row(result: RunResult) -> dict[str, Any]:
    """Super → sub for one (lr, batch) cell: first window's α against the late windows' (± se)."""
    first, late = result.windows[0], result.windows[-LATE_WINDOWS:]
    late_alpha = mean([w.exponent for w in late])
    late_se = math.sqrt(sum(w.exponent_stderr**2 for w in late)) / len(late)
    significant = first.exponent - 2 * first.exponent_stderr > 1 and late_alpha + 2 * late_se < 1
    return {"lr": result.spec.lr, "batch": result.spec.batch_size, "test acc %": 100 * result.accuracy,
            "α first": first.exponent, "se first": first.exponent_stderr, "α late": late_alpha, "se late": late_se,
            "super → sub": "yes" if first.exponent > 1 > late_alpha else "no", "beyond 2 se": "yes" if significant else "no",
            "s": result.seconds}  # fmt: skip


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


def crossover_experiment(report: Report, results: Sequence[RunResult], level: float) -> list[Path]:
    report.text(f"## crossover: one power law or two regimes, per window (DiffusionTracker's test, level {level})\n\n"
                "p: Monte Carlo p-value of the drop in residual from one power law to a smoothly broken one (τ₀ "
                f"maximised over); two regimes are selected when p < {level}, and only then α_s, α_l, τ₀ (± se) exist. "
                "Order in τ: regime of α_s → regime of α_l (the paper's is super → sub).")  # fmt: skip
    for r in results:
        report.text(f"### {r.spec.label} ({r.spec.experiment})")
        report.table(crossover_rows(r.windows, level), "crossover", r.spec.context())
    report.text("### Crossover summary")
    report.table([crossover_summary(r, level) for r in results])
    return []


def layer_tails_experiment(report: Report, results: Sequence[RunResult]) -> list[Path]:
    report.text("## layer_tails: stable vs Gaussian and vs Student t, per layer and pooled\n\n"
                f"Samples: each layer's nonzero gradient entries; `{POOLED}`: entries drawn over all parameters; "
                f"`{POOLED_SCALED}`: the same entries divided by their layer's fitted stable scale. Shares of estimates "
                "where the log-likelihood ratio favours one law with two-sided Vuong p < 0.05; median t df: the "
                "Student t's fitted degrees of freedom (its tail exponent).")  # fmt: skip
    rows = [row for r in results for row in layer_tail_summary(r)]
    report.table(rows, "layer_tails_summary")
    report.text("### Pooled α against per-layer α (medians over the estimates)")
    report.table([pooling_summary(r) for r in results])
    for r in results:
        report.add_csv("layer_tails", layer_tail_csv_rows(r), r.spec.context())
    return []


def boxcount_experiment(report: Report, results: Sequence[RunResult], out: Path, seed: int) -> list[Path]:
    low, high = BOX_SIZES
    report.text("## boxcount: box-counting dimension of the 2-D projected weight trajectory\n\n"
                f"Trajectory: the sketched weights before every step; projections: the first two principal components "
                f"of the whole trajectory, or two random Gaussian directions. Boxes: {BOX_NUM_SIZES} sizes from "
                f"{low:g} to {high:g} of the projection's extent, {BOX_OFFSETS} random grid origins; D ± se: slope and "
                f"its fit uncertainty. Control: a Gaussian random walk with the same steps and dimensions through the "
                f"same projection and counting (mean and sd over {CONTROL_SEEDS} walks).")  # fmt: skip
    report.table([row for r in results for row in box_rows(r, seed)], "boxcount")
    return [box_figure(results, out, seed)]


def loss_variance_experiment(report: Report, results: Sequence[RunResult], variance_window: int, out: Path) -> list[Path]:
    report.text(f"## loss_variance: the minibatch loss's moving variance over training\n\n"
                f"Per diffusion window of the run: mean of the moving variance over runs of {variance_window} losses (a slow "
                f"trend removed) with its block-jackknife se; relative = / (mean loss)². First window vs the mean of the "
                f"last {LATE_WINDOWS}; falls/rises when the difference exceeds twice its se.")  # fmt: skip
    summaries, series = [], {}
    for r in results:
        rows = loss_windows(r.losses, r.spec.window, variance_window)
        report.add_csv("loss_variance", rows, r.spec.context())
        summaries.append(loss_variance_summary(r, rows))
        moving = moving_variance(r.losses, variance_window)
        series[r.spec.label] = (list(range(moving.size))[::variance_window], list(moving[::variance_window]))
    report.table(summaries)
    panel = Panel(f"moving variance of the loss ({variance_window} steps)", "step", "variance", series)
    path = save_panels(out / "loss_variance.png", [panel])
    return [path]


def hessian_experiment(report: Report, results: Sequence[RunResult], args: argparse.Namespace) -> list[Path]:
    report.text(f"## hessian: top-{args.hessian_top_k} Hessian eigenvalues over training\n\n"
                f"HessianSpectrumMonitor (Lanczos, certified to tol 1e-3 · λ_max) every {args.hessian_every} steps on a "
                f"fixed probe of {args.hessian_probe} training examples. Over training: first value, peak and mean of the "
                "last fifth of the estimates; a rise or decay is a change beyond 20% (`hessian_trend`).")  # fmt: skip
    report.table([row for r in results for row in hessian_rows(r, args.hessian_top_k)], "hessian_summary")
    for r in results:
        report.add_csv("hessian", [{"step": step, **m} for step, m in r.hessian], r.spec.context())
    key = "hessian/eig_1" if args.hessian_top_k > 1 else "hessian/lambda_max"
    panel = Panel("largest Hessian eigenvalue (fixed probe)", "step", "λ_max", {r.spec.label: r.hessian_series(key) for r in results})
    return [save_panels(args.out / "hessian.png", [panel])]


def sweep_experiment(report: Report, results: Sequence[RunResult], out: Path) -> list[Path]:
    spec = results[0].spec
    report.text(f"## sweep: super → sub against learning rate and batch size ({spec.model}, {spec.steps} steps, windows of "
                f"{spec.window})\n\n\"super → sub\": α of the first window > 1 > mean α of the last {LATE_WINDOWS}; "
                "\"beyond 2 se\": both sides of 1 by more than twice their standard errors.")  # fmt: skip
    report.table([sweep_row(r) for r in results], "sweep")
    series = {f"lr {r.spec.lr}, batch {r.spec.batch_size}": ([w.t_w for w in r.windows], [w.exponent for w in r.windows]) for r in results}
    return [save_panels(out / "sweep_alpha.png", [Panel("MSD exponent per window", "t_w (step)", "α", series, 1.0)])]


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_common_args(parser)
    parser.add_argument("--experiments", nargs="+", choices=EXPERIMENTS, default=list(DEFAULT_EXPERIMENTS),
                        help="default: all but hessian and sweep")  # fmt: skip
    parser.add_argument("--crossover-level", type=float, default=0.01, help="significance level of the crossover test")
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
    extra = parser.add_argument_group("loss_variance, hessian and sweep")
    extra.add_argument("--loss-window", type=int, default=20, help="steps per run of the loss's moving variance")
    extra.add_argument("--hessian-every", type=int, default=200, help="HessianSpectrumMonitor every_n_steps")
    extra.add_argument("--hessian-top-k", type=int, default=3)
    extra.add_argument("--hessian-probe", type=int, default=256, help="fixed probe set of the first N training examples")
    extra.add_argument("--hessian-max-hvps", type=int, default=150)
    extra.add_argument("--sweep-model", default="mlp")
    extra.add_argument("--sweep-lrs", nargs="+", type=float, default=[0.01, 0.05, 0.2])
    extra.add_argument("--sweep-batch-sizes", nargs="+", type=int, default=[16, 64, 256])
    extra.add_argument("--sweep-steps", type=int, default=2400)
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
    by_experiment = {name: [r for r in results if r.spec.experiment == name] for name in ("windows", "shortcuts", "sweep")}
    analysed = by_experiment["windows"] + by_experiment["shortcuts"]  # the runs the analyses cover
    selected = args.experiments
    report = Report()
    report.text("# Anomalous diffusion of SGD (Chen, Qu & Gong, arXiv 2009.10588), reduced reproduction\n\n" + setup_line(args))
    figures = []
    if "windows" in selected:
        figures += windows_experiment(report, by_experiment["windows"], args.out)
    if "tails" in selected:
        figures += tails_experiment(report, analysed, args.out)
    if "shortcuts" in selected:
        figures += shortcuts_experiment(report, by_experiment["shortcuts"], args.out)
    if "crossover" in selected:
        figures += crossover_experiment(report, analysed, args.crossover_level)
    if "layer_tails" in selected:
        figures += layer_tails_experiment(report, analysed)
    if "boxcount" in selected:
        figures += boxcount_experiment(report, analysed, args.out, args.seed)
    if "loss_variance" in selected:
        figures += loss_variance_experiment(report, analysed, args.loss_window, args.out)
    if "hessian" in selected:
        figures += hessian_experiment(report, by_experiment["windows"], args)
    if "sweep" in selected:
        figures += sweep_experiment(report, by_experiment["sweep"], args.out)
    report.text(f"Total: {time.perf_counter() - start:.0f} s wall time for {len(results)} runs.")
    for path in report.save(args.out) + figures:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
