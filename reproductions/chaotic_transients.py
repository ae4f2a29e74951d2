"""Is full-batch gradient descent fastest at the onset of chaos? A reduced MNIST reproduction.

Jiménez-González, Soriano & Lacasa, "Leveraging chaotic transients in the training of artificial
neural networks" (arXiv 2506.08523): an MLP 784-64-10 with tanh units and N(0, 1) weights is
trained on MNIST by full-batch gradient descent in float64. A twin starts ε = 1e-8 away (L1,
perturbation on the weight matrices only) and is trained with the same steps; the local Lyapunov
exponent of an initialisation is the slope of ln d(t) over the exponential phase before d
saturates, and the network maximal Lyapunov exponent (MLE) is its mean over initialisations. As the
learning rate grows the MLE crosses 0 (onset of chaos), and the number of epochs needed to reach a
target test accuracy is smallest near that onset.

Here, on a ``--subset`` of the training set (the 10,000 official test images are the test set),
for every learning rate of ``--lrs`` and ``--seeds`` (alias ``--inits``) initialisations:

* gradient descent runs ``--steps`` full-batch steps (one step = one epoch);
* a twin is trained alongside for the first ``--lyap-steps`` of them and the local exponent is
  fitted to its ln d(t), t = 0 … lyap-steps, by ``chaos_callbacks.dynamics.lyapunov.local_exponent``
  (hinge "line then plateau" rule; the whole window when no plateau is found);
* test accuracy is measured every ``--eval-every`` steps; when a target accuracy is first met,
  the parameter snapshots kept since the previous evaluation are evaluated too, so "epochs to
  X %" is the exact first step at which the test accuracy is ≥ X — unless the accuracy rose above
  X and fell back below it between two evaluations (``--eval-every 1`` rules that out).

Two engines give the same numbers, bit for bit, at the same cost. ``--engine lightning`` (default)
drives the product: ``lightning.Trainer`` + ``ClassificationModule`` + ``MNISTDataModule(full_batch=True,
dtype="float64")`` + ``LyapunovTwinRun(epsilon=1e-8, perturb="weights", norm="l1",
renormalize_every=None)`` for the first ``--lyap-steps`` epochs, then a second ``fit`` without the
callback (plain SGD keeps no optimizer state, so the continuation is the same trajectory).
``--engine plain`` is a loop in plain torch around the recipe's ``ClassificationModule`` and the pure
core (``random_perturbation``, ``parameter_distance``, ``local_exponent``). Unless
``--crosscheck-steps 0``, one setting (``--crosscheck-lr``, ``--crosscheck-seed``) is run through
both engines first and compared bit for bit (ln d(t), test accuracy, final weights), with their
time per step.

Outputs (git-ignored, in ``--out``, default ``reproductions/results/chaotic_transients/``):
``chaotic_transients.png`` (MLE vs lr, epochs to target
vs lr, ln d(t), test accuracy), ``chaotic_transients_runs.csv`` (one row per run),
``chaotic_transients_summary.csv`` (one row per lr) and ``chaotic_transients_traces.csv`` (ln d(t)
and test accuracy of every run). Markdown tables go to stdout.

``--model`` asks whether the result carries over to other networks, with the same protocol (tanh,
N(0, 1) weights, zero biases, float64): ``mlp`` (default) is the paper's 784-64-10, ``deep_mlp`` a
784-64-64-64-10 MLP, ``cnn`` a small CNN (:func:`small_cnn`: two strided 5×5 convolutions, 4 and 8
channels, and a linear read-out; LeNet-5 costs ~8 s per float64 full-batch step on 10k images here).
Outputs of another model go to ``reproductions/results/chaotic_transients_<model>/``.
The runs reported in REPRODUCTION.md for them:
``--model deep_mlp --lrs 0.1 0.2 0.5 1 2 --inits 10 --crosscheck-steps 0`` and
``--model cnn --subset 1000 --lrs 0.01 0.03 0.1 0.3 --inits 10 --steps 60 --lyap-steps 30 --eval-every 20
--crosscheck-steps 0``.

Pixels are raw [0, 1] values as in the authors' code (``--normalize`` standardises them, which
multiplies the inputs' second moment by ~9 and moves the onset of chaos to smaller rates).

The paper's protocol is reduced to fit two shared CPU cores in about 10 minutes: 10k training
examples instead of 60k, a few hundred steps instead of thousands, 3 initialisations. Epochs to
90 % are therefore often "not reached"; the lower ``--extra-targets`` are reported alongside.

Run from the repository root: ``.venv/bin/python -m reproductions.chaotic_transients``
"""

from __future__ import annotations

import argparse
import copy
import csv
import math
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call

from chaos_callbacks import LyapunovTwinRun
from chaos_callbacks.dynamics.lyapunov import (
    LocalExponentFit,
    local_exponent,
    parameter_distance,
    random_perturbation,
)
from chaos_callbacks.recipes.data import MNISTDataModule  # noqa: E402
from chaos_callbacks.recipes.models import init_normal_
from chaos_callbacks.recipes.module import ClassificationModule  # noqa: E402

from reproductions.common import DEFAULT_DATA_ROOT, RESULTS, quiet_lightning

NORM = "l1"


# ----------------------------------------------------------------------------- test accuracy
class AccuracyTrace:
    """Test accuracy of the main run, and the first step at which it reaches each target.

    :meth:`observe` is called after every GD step ``t`` (``t = 0``: the initial weights). The
    accuracy is computed at every ``every``-th step and at the last one; in between, a copy of the
    parameters is kept (0.4 MB for this MLP) so that, when an evaluation finds a target met for the
    first time, the steps since the previous evaluation are evaluated to find the exact first one.
    """

    def __init__(self, module: torch.nn.Module, images: Tensor, labels: Tensor, every: int, targets: list[float]) -> None:
        self.module = module
        self.images = images
        self.labels = labels
        self.every = every
        self.acc: dict[int, float] = {}
        self.first: dict[float, int | None] = {t: None for t in targets}
        self._pending: list[tuple[int, dict[str, Tensor]]] = []

    def _accuracy(self, params: dict[str, Tensor] | None = None) -> float:
        with torch.no_grad():
            if params is None:
                logits = self.module(self.images)
            else:
                logits = functional_call(self.module, params, (self.images,))
            return float((logits.argmax(1) == self.labels).double().mean())

    def observe(self, step: int, last: bool = False) -> None:
        if step % self.every and not last:
            if any(s is None for s in self.first.values()):
                snapshot = {n: p.detach().clone() for n, p in self.module.named_parameters()}
                self._pending.append((step, snapshot))
            return
        acc = self._accuracy()
        self.acc[step] = acc
        newly = [t for t, s in self.first.items() if s is None and acc >= t]
        for s, params in self._pending:  # the first crossing lies in (previous evaluation, step]
            if not any(self.first[t] is None for t in newly):
                break
            self.acc[s] = a = self._accuracy(params)
            for t in newly:
                if self.first[t] is None and a >= t:
                    self.first[t] = s
        for t in newly:
            if self.first[t] is None:
                self.first[t] = step
        self._pending.clear()

    @property
    def final(self) -> float:
        return self.acc[max(self.acc)]


class AccuracyProbe(pl.Callback):
    """Feeds an :class:`AccuracyTrace` after every optimizer step of a Lightning fit."""

    def __init__(self, trace: AccuracyTrace, total_steps: int, offset: int = 0) -> None:
        self.trace = trace
        self.total_steps = total_steps
        self.offset = offset

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs, batch, batch_idx: int) -> None:
        step = self.offset + trainer.global_step
        self.trace.observe(step, last=step == self.total_steps)


# ----------------------------------------------------------------------------- one run
@dataclass
class Run:
    lr: float
    seed: int
    engine: str
    steps: int
    lyap_steps: list[int]  # GD steps of the ln d samples (0 = the perturbed initial condition)
    log_d: list[float]
    fit: LocalExponentFit | None
    acc: dict[int, float]
    first: dict[float, int | None]
    seconds: float
    final_params: list[Tensor] = field(repr=False, default_factory=list)
    note: str = ""

    @property
    def mle(self) -> float:
        return self.fit.slope if self.fit is not None else math.nan

    @property
    def growth(self) -> float:
        """max_t ln d(t) − ln d(0): how many e-folds the separation grew in the window."""
        return max(self.log_d) - self.log_d[0] if self.log_d else math.nan

    @property
    def final_acc(self) -> float:
        return self.acc[max(self.acc)]


#: ``--model``: the paper's MLP, a deeper MLP and a small CNN, all tanh, N(0, 1) weights, zero biases, float64.
MODELS: dict[str, str] = {
    "mlp": "MLP 784-64-10 tanh",
    "deep_mlp": "MLP 784-64-64-64-10 tanh",
    "cnn": "CNN conv5×5/2(4)-tanh-conv5×5/2(8)-tanh-fc 392-10",
}
MODEL = {"name": "mlp"}  # set from --model by main()


def small_cnn() -> torch.nn.Sequential:
    """The small CNN of ``--model cnn``: two 5×5 stride-2 convolutions (4 and 8 channels, padding 2,
    tanh), 28 → 14 → 7 pixels, then a linear read-out 392 → 10 (4,842 parameters). Strided
    convolutions instead of LeNet's pooling keep a float64 full-batch step affordable on a CPU
    (LeNet-5: ~8 s per step on 10k images, this network: ~0.3 s)."""
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 5, stride=2, padding=2), torch.nn.Tanh(),
        torch.nn.Conv2d(4, 8, 5, stride=2, padding=2), torch.nn.Tanh(),
        torch.nn.Flatten(), torch.nn.Linear(392, 10),
    )  # fmt: skip


def make_module(lr: float, seed: int, model: str | None = None) -> ClassificationModule:
    """The ``--model`` network through the recipe, weights N(0, 1), zero biases, float64 (the paper's
    initialisation for every model; ``mlp`` is the paper's 784-64-10 network)."""
    model = model or MODEL["name"]
    torch.manual_seed(seed)
    widths = [64, 64, 64] if model == "deep_mlp" else [64]
    module = ClassificationModule(
        10, (1, 28, 28), model="mlp", widths=widths, activation="tanh", init="normal", init_std=1.0, dtype="float64", lr=lr
    )
    if model == "cnn":  # the recipe's zoo has no small CNN: swap the network, initialised as the recipe does
        module.model = small_cnn()
        init_normal_(module.model, 1.0)
        module.to(torch.float64)
    return module


FIT_OPTIONS: dict[str, float | int] = {}  # --fit-start / --plateau-tol, passed to local_exponent


def fit_exponent(steps: list[int], log_d: list[float]) -> LocalExponentFit | None:
    if len(log_d) < 3:
        return None
    start = min(int(FIT_OPTIONS.get("start", 0)), len(log_d) - 3)
    return local_exponent(
        np.asarray(log_d), np.asarray(steps, dtype=np.float64), start=start,
        plateau_tol=float(FIT_OPTIONS.get("plateau_tol", math.log(10.0))),
    )


def gd_step(module: ClassificationModule, optimizer: torch.optim.Optimizer, x: Tensor, y: Tensor) -> float:
    """One full-batch step, as Lightning's automatic optimization does it; returns the loss before it."""
    optimizer.zero_grad(set_to_none=True)
    loss = module.loss_fn(module(x), y)
    loss.backward()
    optimizer.step()
    return float(loss.detach())


def run_plain(data: MNISTDataModule, lr: float, seed: int, steps: int, lyap_steps: int, args: argparse.Namespace) -> Run:
    """Plain torch loop: main run + twin (first ``lyap_steps`` steps) with the pure Lyapunov core."""
    start = time.perf_counter()
    module = make_module(lr, seed)
    x, y = data.train_set.images, data.train_set.targets
    params = list(module.parameters())
    trace = AccuracyTrace(module, data.test_set.images, data.test_set.targets, args.eval_every, args.targets)
    twin: ClassificationModule | None = copy.deepcopy(module)
    twin_params = list(twin.parameters())
    # as LyapunovTwinRun(perturb="weights", seed=seed): the weight matrices, in optimizer order, from its generator
    weights = [p for p in twin_params if p.ndim >= 2]
    delta = random_perturbation(weights, args.epsilon, NORM, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for p, dp in zip(weights, delta):
            p.copy_(p + dp)
    optimizer = torch.optim.SGD(params, lr=lr)
    twin_optimizer = torch.optim.SGD(twin_params, lr=lr)
    t_samples, log_d = [0], [math.log(float(parameter_distance(twin_params, params, NORM)))]
    trace.observe(0)
    loss, note = math.nan, ""
    for t in range(1, steps + 1):
        loss = gd_step(module, optimizer, x, y)
        if twin is not None:
            gd_step(twin, twin_optimizer, x, y)
            d = float(parameter_distance(twin_params, params, NORM))
            if math.isfinite(d) and d > 0:
                t_samples.append(t)
                log_d.append(math.log(d))
            else:
                note = f"twin separation {d} at step {t}; ln d(t) kept up to step {t - 1}"
                twin = None
            if t >= lyap_steps:
                twin = None
        trace.observe(t, last=t == steps)
        if not math.isfinite(loss):
            note = f"loss {loss} at step {t}: stopped"
            trace.observe(t, last=True)
            break
    return Run(
        lr, seed, "plain", steps, t_samples, log_d, fit_exponent(t_samples, log_d), trace.acc, trace.first,
        time.perf_counter() - start, [p.detach().clone() for p in params], note,
    )


def run_lightning(data: MNISTDataModule, lr: float, seed: int, steps: int, lyap_steps: int, args: argparse.Namespace) -> Run:
    """Through the product: Trainer + ClassificationModule + MNISTDataModule + LyapunovTwinRun."""
    start = time.perf_counter()
    module = make_module(lr, seed)
    trace = AccuracyTrace(module, data.test_set.images, data.test_set.targets, args.eval_every, args.targets)
    trace.observe(0)
    lyap = LyapunovTwinRun(
        mode="twin", epsilon=args.epsilon, perturb="weights", norm=NORM, renormalize_every=None,
        summary_every_n_steps=None, seed=seed,
    )
    probe = AccuracyProbe(trace, steps)

    def trainer(epochs: int, callbacks: list[pl.Callback]) -> pl.Trainer:
        return pl.Trainer(
            accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
            callbacks=callbacks,
        )

    first = min(lyap_steps, steps)
    trainer(first, [lyap, probe]).fit(module, datamodule=data)
    (t_samples, log_d), = lyap.log_distance_curves()
    note = ""
    if t_samples and t_samples[0] != 0:
        note = f"LyapunovTwinRun re-seeded the twin at step {t_samples[0]}"
    if steps > first:  # SGD without momentum is stateless: a new Trainer continues the same trajectory
        probe.offset = first
        trainer(steps - first, [probe]).fit(module, datamodule=data)
    return Run(
        lr, seed, "lightning", steps, list(t_samples), list(log_d), fit_exponent(t_samples, log_d), trace.acc,
        trace.first, time.perf_counter() - start, [p.detach().clone() for p in module.parameters()], note,
    )


# ----------------------------------------------------------------------------- summaries
def fmt_epochs(value: int | None) -> str:
    return "not reached" if value is None else str(value)


def median_epochs(values: list[int | None]) -> float:
    """Median over seeds, "not reached" counting as +inf."""
    return float(np.median([math.inf if v is None else v for v in values]))


def fmt_median(values: list[int | None]) -> str:
    reached = sum(v is not None for v in values)
    m = median_epochs(values)
    head = "not reached" if math.isinf(m) else f"{m:g}"
    return f"{head} ({reached}/{len(values)})"


def mean_std(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def zero_crossings(lrs: list[float], mles: list[float]) -> list[tuple[float, str]]:
    """lr where the mean MLE changes sign, interpolated linearly in log10(lr)."""
    out = []
    for (l0, m0), (l1, m1) in zip(zip(lrs, mles), zip(lrs[1:], mles[1:])):
        if not (math.isfinite(m0) and math.isfinite(m1)) or m0 == m1 or (m0 > 0) == (m1 > 0) and m1 != 0:
            continue
        u = m0 / (m0 - m1)
        out.append((10 ** (math.log10(l0) + u * (math.log10(l1) - math.log10(l0))), "up" if m1 > m0 else "down"))
    return out


def crosscheck(data: MNISTDataModule, args: argparse.Namespace) -> None:
    lr, seed, steps = args.crosscheck_lr, args.crosscheck_seed, args.crosscheck_steps
    lyap_steps = min(args.lyap_steps, steps)
    plain = run_plain(data, lr, seed, steps, lyap_steps, args)
    light = run_lightning(data, lr, seed, steps, lyap_steps, args)
    same_d = plain.lyap_steps == light.lyap_steps and plain.log_d == light.log_d
    n = min(len(plain.log_d), len(light.log_d))
    max_dd = max(abs(a - b) for a, b in zip(plain.log_d[:n], light.log_d[:n])) if n else math.nan
    common = sorted(set(plain.acc) & set(light.acc))
    max_da = max(abs(plain.acc[s] - light.acc[s]) for s in common)
    max_dw = max(float((a - b).abs().max()) for a, b in zip(plain.final_params, light.final_params))
    print(f"## Cross-check: plain torch loop vs Lightning + LyapunovTwinRun (lr {lr}, seed {seed}, {steps} steps, "
          f"twin for {lyap_steps})\n")
    print("| quantity | plain torch | Lightning + LyapunovTwinRun | agreement |")
    print("|---|---:|---:|---|")
    print(f"| ln d(t) samples | {len(plain.log_d)} | {len(light.log_d)} | "
          f"{'bit-identical' if same_d else f'max |Δ ln d| = {max_dd:.3g}'} |")
    print(f"| ln d at last twin step | {plain.log_d[-1]:.6f} | {light.log_d[-1]:.6f} | |")
    print(f"| local exponent (/step) | {plain.mle:.6f} | {light.mle:.6f} | Δ = {abs(plain.mle - light.mle):.3g} |")
    print(f"| test acc at step {steps} | {plain.final_acc:.4f} | {light.final_acc:.4f} | "
          f"max |Δ acc| over {len(common)} evaluations = {max_da:.3g} |")
    print(f"| final weights | | | max |Δθ| = {max_dw:.3g} |")
    cost_p = plain.seconds / (steps + lyap_steps)
    cost_l = light.seconds / (steps + lyap_steps)
    print(f"| wall time (s) | {plain.seconds:.1f} | {light.seconds:.1f} | Lightning / plain = {light.seconds / plain.seconds:.2f} |")
    print(f"| s per forward+backward | {cost_p:.3f} | {cost_l:.3f} | |")
    if plain.note or light.note:
        print(f"\nnotes: plain: {plain.note or '-'}; lightning: {light.note or '-'}")
    print()


def write_csvs(runs: list[Run], rows: list[dict], out: Path, targets: list[float]) -> None:
    with open(out / "chaotic_transients_runs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lr", "seed", "engine", "steps", "lyap_window", "mle", "fit_start", "fit_stop", "saturated",
                    "growth_efolds", *[f"epochs_to_{t:g}" for t in targets], "final_test_acc", "seconds", "note"])
        for r in runs:
            w.writerow([r.lr, r.seed, r.engine, r.steps, r.lyap_steps[-1] if r.lyap_steps else 0, r.mle,
                        r.fit.start if r.fit else "", r.fit.stop if r.fit else "", r.fit.saturated if r.fit else "",
                        r.growth, *["" if r.first[t] is None else r.first[t] for t in targets], r.final_acc,
                        round(r.seconds, 2), r.note])
    with open(out / "chaotic_transients_summary.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(out / "chaotic_transients_traces.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["lr", "seed", "quantity", "step", "value"])
        for r in runs:
            w.writerows([r.lr, r.seed, "log_d", s, v] for s, v in zip(r.lyap_steps, r.log_d))
            w.writerows([r.lr, r.seed, "test_acc", s, r.acc[s]] for s in sorted(r.acc))


def plot(
    runs: list[Run], lrs: list[float], rows: list[dict], onset: float | None, onset_resolved: bool, lr_e: float | None,
    args: argparse.Namespace, path: Path,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8), dpi=110)
    ax = axes[0, 0]
    for r in runs:
        ax.plot(r.lr, r.mle, "o", color="0.6", ms=3)
    means = [row["mle_mean"] for row in rows]
    stds = [row["mle_std"] for row in rows]
    ax.errorbar(lrs, means, yerr=stds, fmt="s-", color="C0", capsize=3, label="mean ± std over inits")
    ax.axhline(0, color="k", lw=0.8)
    if onset is not None:
        what = "" if onset_resolved else ", sign unresolved below"
        ax.axvline(onset, color="C3", ls="--", lw=1, label=f"mean MLE = 0 at lr ≈ {onset:.3g}{what}")
    if lr_e is not None:
        ax.axvline(lr_e, color="C4", ls="-.", lw=1, label=f"growth of d = 1 e-fold in window, lr ≈ {lr_e:.3g}")
    ax.set_xscale("log")
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("local exponent (ln d per step)")
    ax.set_title("network MLE vs learning rate", fontsize=10)
    ax.legend(fontsize=7)

    ax = axes[0, 1]
    for k, t in enumerate(args.targets):
        med = [median_epochs([r.first[t] for r in runs if r.lr == lr]) for lr in lrs]
        reached = [(lr, m) for lr, m in zip(lrs, med) if math.isfinite(m)]
        missed = [lr for lr, m in zip(lrs, med) if not math.isfinite(m)]
        if reached:
            ax.plot(*zip(*reached), "o-", color=f"C{k}", label=f"{100 * t:g} % test acc")
        ax.plot(missed, [args.steps * (1.04 + 0.05 * k)] * len(missed), "x", color=f"C{k}", ms=6)
    ax.axhline(args.steps, color="0.5", ls=":", lw=1)
    ax.text(lrs[0], args.steps * (1.06 + 0.05 * len(args.targets)), f"x: median not reached within {args.steps} epochs", fontsize=7)
    if onset is not None:
        ax.axvline(onset, color="C3", ls="--", lw=1)
    if lr_e is not None:
        ax.axvline(lr_e, color="C4", ls="-.", lw=1)
    ax.set_xscale("log")
    ax.set_ylim(0, args.steps * (1.15 + 0.05 * len(args.targets)))
    ax.set_xlabel("learning rate")
    ax.set_ylabel("epochs to target (median over inits)")
    ax.set_title("training time vs learning rate", fontsize=10)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)

    cmap = plt.get_cmap("viridis")
    seed0 = {r.lr: r for r in runs if r.seed == min(x.seed for x in runs)}
    for i, lr in enumerate(lrs):
        r = seed0[lr]
        color = cmap(i / max(1, len(lrs) - 1))
        axes[1, 0].plot(r.lyap_steps, r.log_d, color=color, lw=1, label=f"lr {lr:g}")
        if r.fit is not None:
            tt = np.asarray(r.lyap_steps[r.fit.start : r.fit.stop], dtype=float)
            axes[1, 0].plot(tt, r.fit.intercept + r.fit.slope * tt, "--", color=color, lw=1.5)
        s = sorted(r.acc)
        axes[1, 1].plot(s, [r.acc[k] for k in s], color=color, lw=1, label=f"lr {lr:g}")
    axes[1, 0].set_xlabel("GD step")
    axes[1, 0].set_ylabel("ln d(t)  (L1, twin from ε)")
    axes[1, 0].set_title(f"twin separation, seed {min(x.seed for x in runs)} (dashed: fit)", fontsize=10)
    axes[1, 0].legend(fontsize=6, ncol=2)
    for t in args.targets:
        axes[1, 1].axhline(t, color="0.5", ls=":", lw=0.8)
    axes[1, 1].set_xlabel("GD step (= epoch)")
    axes[1, 1].set_ylabel("test accuracy")
    axes[1, 1].set_ylim(0, 1)
    axes[1, 1].set_title(f"test accuracy, seed {min(x.seed for x in runs)}", fontsize=10)
    axes[1, 1].legend(fontsize=6, ncol=2)
    fig.suptitle(f"MNIST ({args.subset} train), {MODELS[args.model]} N(0,1), full-batch GD float64, "
                 f"{args.seeds} inits, {args.steps} steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="directory holding MNIST/raw/")
    parser.add_argument("--subset", type=int, default=10000, help="training examples (seeded subset of the 54k left after the validation split)")
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0])
    parser.add_argument("--model", choices=tuple(MODELS), default="mlp",
                        help="mlp: the paper's 784-64-10; deep_mlp: 784-64-64-64-10; cnn: a small strided CNN (see small_cnn)")
    parser.add_argument("--seeds", "--inits", dest="seeds", type=int, default=3,
                        help="initialisations (seeds 0 … N-1; seed i also draws twin i's perturbation)")
    parser.add_argument("--steps", type=int, default=120, help="full-batch GD steps (= epochs) per run")
    parser.add_argument("--lyap-steps", type=int, default=50, help="steps during which the twin is trained (window of ln d(t))")
    parser.add_argument("--fit-start", type=int, default=0, help="local_exponent(start=...): samples skipped (alignment transient)")
    parser.add_argument("--plateau-tol", type=float, default=math.log(10.0), help="local_exponent(plateau_tol=...): the fit ends this far (in ln d) below the plateau")
    parser.add_argument("--epsilon", type=float, default=1e-8, help="L1 size of the initial perturbation of the weights")
    parser.add_argument("--target", type=float, default=0.9, help="test accuracy whose epochs-to-reach is the headline")
    parser.add_argument("--extra-targets", type=float, nargs="*", default=[0.8, 0.85], help="further targets reported")
    parser.add_argument("--eval-every", type=int, default=5, help="test-accuracy cadence (crossings are refined to the exact step)")
    parser.add_argument("--engine", choices=("lightning", "plain"), default="lightning",
                        help="lightning: Trainer + LyapunovTwinRun; plain: torch loop + the pure core (same numbers)")
    parser.add_argument("--crosscheck-lr", type=float, default=5.0)
    parser.add_argument("--crosscheck-seed", type=int, default=0)
    parser.add_argument("--crosscheck-steps", type=int, default=25, help="0 skips the plain-vs-Lightning cross-check")
    parser.add_argument("--data-seed", type=int, default=0, help="seed of the training subset")
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=False,
                        help="standardise the pixels (default: off, raw [0, 1] pixels as in the authors' code)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default reproductions/results/chaotic_transients[_<model> unless mlp])")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.lyap_steps < 2 or args.eval_every < 1 or args.seeds < 1:
        parser.error("--steps >= 1, --lyap-steps >= 2, --eval-every >= 1 and --seeds >= 1 are required")
    args.targets = sorted({args.target, *args.extra_targets})
    MODEL["name"] = args.model
    if args.out is None:
        args.out = RESULTS / ("chaotic_transients" if args.model == "mlp" else f"chaotic_transients_{args.model}")
    FIT_OPTIONS.update(start=args.fit_start, plateau_tol=args.plateau_tol)
    lrs = sorted(args.lrs)
    torch.set_num_threads(args.threads)
    quiet_lightning()
    warnings.filterwarnings("ignore", module="lightning")
    args.out.mkdir(parents=True, exist_ok=True)

    wall = time.perf_counter()
    data = MNISTDataModule(
        root=str(args.data_root), subset=args.subset, full_batch=True, normalize=args.normalize, dtype="float64",
        seed=args.data_seed,
    )
    data.setup("fit")
    lyap_steps = min(args.lyap_steps, args.steps)
    print("# Chaotic transients in full-batch GD (arXiv 2506.08523), reduced\n")
    pixels = "standardised pixels" if args.normalize else "raw pixels in [0, 1]"
    print(f"MNIST: {len(data.train_set)} training examples (subset seed {args.data_seed}), {len(data.test_set)} test, {pixels}; "
          f"{MODELS[args.model]}, N(0,1) weights, zero biases, float64, cross-entropy; full-batch GD for {args.steps} steps; "
          f"twin from ε = {args.epsilon:g} (L1, weights only) for the first {lyap_steps} steps; "
          f"{args.seeds} initialisations per lr; engine: {args.engine}; torch {torch.__version__}, {args.threads} thread(s)\n")

    if args.crosscheck_steps > 0:
        crosscheck(data, args)

    engine = run_plain if args.engine == "plain" else run_lightning
    runs: list[Run] = []
    for lr in lrs:
        for seed in range(args.seeds):
            r = engine(data, lr, seed, args.steps, lyap_steps, args)
            runs.append(r)
            print(f"  [lr {lr:g} seed {seed}] exponent {r.mle:+.4f}/step, test acc {r.final_acc:.4f}, {r.seconds:.0f} s"
                  + (f" ({r.note})" if r.note else ""), flush=True)
    print()

    rows = []
    for lr in lrs:
        rs = [r for r in runs if r.lr == lr]
        m, s = mean_std([r.mle for r in rs])
        acc_m, acc_s = mean_std([r.final_acc for r in rs])
        row = {"lr": lr, "mle_mean": m, "mle_std": s, "frac_positive": sum(r.mle > 0 for r in rs) / len(rs),
               "growth_efolds_mean": statistics.fmean(r.growth for r in rs),
               "frac_saturated": sum(bool(r.fit and r.fit.saturated) for r in rs) / len(rs)}
        for t in args.targets:
            row[f"median_epochs_to_{t:g}"] = median_epochs([r.first[t] for r in rs])
            row[f"reached_{t:g}"] = sum(r.first[t] is not None for r in rs)
        row.update({"final_acc_mean": acc_m, "final_acc_std": acc_s})
        rows.append(row)

    extra = [t for t in args.targets if t != args.target]
    print(f"## Network MLE and training time vs learning rate ({args.seeds} inits each)\n")
    print("MLE: mean ± std over inits of the local exponent (slope of ln d(t), natural log per GD step, fitted by "
          "`local_exponent` on the first "
          f"{lyap_steps} steps); growth: mean max ln(d/d₀) in that window; plateau found: fraction of inits where "
          "the hinge rule of `local_exponent` cut the fit before a plateau (on a flat ln d it also fires); "
          "epochs: median over inits, (reached/inits); final acc at the last step.\n")
    head = f"| lr | MLE (mean ± std) | frac. positive | growth (e-folds) | plateau found | epochs to {100 * args.target:g} % (median) |"
    head += "".join(f" epochs to {100 * t:g} % |" for t in extra) + " final test acc |"
    print(head)
    print("|---:" * (6 + len(extra) + 1) + "|")
    for lr, row in zip(lrs, rows):
        rs = [r for r in runs if r.lr == lr]
        line = (f"| {lr:g} | {row['mle_mean']:+.4f} ± {row['mle_std']:.4f} | {row['frac_positive']:.2f} | "
                f"{row['growth_efolds_mean']:.2f} | {row['frac_saturated']:.2f} | {fmt_median([r.first[args.target] for r in rs])} |")
        line += "".join(f" {fmt_median([r.first[t] for r in rs])} |" for t in extra)
        line += f" {row['final_acc_mean']:.4f} ± {row['final_acc_std']:.4f} |"
        print(line)
    print()

    print("## Per run\n")
    print("| lr | seed | exponent | fit window (steps) | plateau | " + " | ".join(f"epochs to {100 * t:g} %" for t in args.targets)
          + " | final test acc | s |")
    print("|---:|---:|---:|---|---|" + "---:|" * len(args.targets) + "---:|---:|")
    for r in runs:
        window = f"{r.lyap_steps[r.fit.start]}–{r.lyap_steps[r.fit.stop - 1]}" if r.fit else "-"
        print(f"| {r.lr:g} | {r.seed} | {r.mle:+.4f} | {window} | {'yes' if r.fit and r.fit.saturated else 'no'} | "
              + " | ".join(fmt_epochs(r.first[t]) for t in args.targets) + f" | {r.final_acc:.4f} | {r.seconds:.0f} |")
    print()

    means = [row["mle_mean"] for row in rows]
    crossings = zero_crossings(lrs, means)
    ups = [c for c, kind in crossings if kind == "up"]
    onset = ups[0] if ups else None
    onset_resolved = True
    print("## Onset of chaos and verdict\n")
    # a sign is only meaningful if the separation changed by more than 1 % over the window and the inits agree
    neutral = [abs(m) * lyap_steps < 0.01 or abs(m) < row["mle_std"] for m, row in zip(means, rows)]
    if any(neutral):
        print("- sign of the mean MLE not resolved (|MLE|·window < 0.01 e-fold, or |mean| < std over inits) at lr "
              + ", ".join(f"{lr:g} ({m:+.1e}/step)" for lr, m, n in zip(lrs, means, neutral) if n))
    if onset is not None:
        below = max(i for i, lr in enumerate(lrs) if lr < onset)
        onset_resolved = not (neutral[below] or neutral[below + 1])
        flag = "" if onset_resolved else " — next to an unresolved sign, so not a resolved onset"
        print(f"- onset (mean MLE crosses 0 upwards, interpolated in log lr): lr ≈ {onset:.3g}{flag}"
              + (f"; all sign changes: {', '.join(f'{c:.3g} ({k})' for c, k in crossings)}" if len(crossings) > 1 else ""))
    elif all(m > 0 for m in means):
        print(f"- the mean MLE is > 0 at every lr (smallest {min(means):+.4f}/step at lr {lrs[int(np.argmin(means))]:g}): "
              f"no zero crossing in [{lrs[0]:g}, {lrs[-1]:g}]; the onset, if any, lies below lr {lrs[0]:g}")
    elif all(m < 0 for m in means):
        print(f"- the mean MLE is < 0 at every lr: no onset of chaos in [{lrs[0]:g}, {lrs[-1]:g}]")
    else:
        print(f"- sign changes of the mean MLE: {', '.join(f'{c:.3g} ({k})' for c, k in crossings) or 'none'}")
    growth = [row["growth_efolds_mean"] for row in rows]
    grown = [i for i, g in enumerate(growth) if g >= 1.0]
    lr_e = None
    if grown and grown[0] > 0:
        i = grown[0]
        u = (1.0 - growth[i - 1]) / (growth[i] - growth[i - 1])
        lr_e = 10 ** (math.log10(lrs[i - 1]) + u * (math.log10(lrs[i]) - math.log10(lrs[i - 1])))
        print(f"- operational onset (this script's criterion, not the paper's): mean growth of d reaches 1 e-fold within the "
              f"{lyap_steps}-step window at lr ≈ {lr_e:.3g} (between {lrs[i - 1]:g} and {lrs[i]:g})")
    jumps = [(means[i + 1] - means[i], lrs[i], lrs[i + 1]) for i in range(len(lrs) - 1)]
    if jumps:
        jump, a, b = max(jumps)
        print(f"- largest rise of the mean MLE between neighbouring lrs: {a:g} → {b:g} (+{jump:.4f}/step)")
    for t in args.targets:
        med = [median_epochs([r.first[t] for r in runs if r.lr == lr]) for lr in lrs]
        if all(math.isinf(m) for m in med):
            print(f"- {100 * t:g} % test accuracy: no lr reaches it (median over inits) within {args.steps} epochs")
            continue
        best = int(np.argmin(med))
        where = ""
        if onset is not None:
            where = f", {lrs[best] / onset:.2g}× the zero-crossing lr"
        if lr_e is not None:
            where += f", {lrs[best] / lr_e:.2g}× the operational onset"
        print(f"- {100 * t:g} % test accuracy: fastest at lr {lrs[best]:g} (median {med[best]:g} epochs; mean MLE there "
              f"{means[best]:+.4f}/step, positive for {rows[best]['frac_positive']:.0%} of inits{where})")
    print()

    write_csvs(runs, rows, args.out, args.targets)
    png = args.out / "chaotic_transients.png"
    plot(runs, lrs, rows, onset, onset_resolved, lr_e, args, png)
    print(f"saved {png}, {args.out / 'chaotic_transients_runs.csv'}, {args.out / 'chaotic_transients_summary.csv'}, "
          f"{args.out / 'chaotic_transients_traces.csv'}")
    print(f"total wall time {time.perf_counter() - wall:.0f} s")


if __name__ == "__main__":
    main()
