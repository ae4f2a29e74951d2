"""Principal flow and the drift-adjusted learning rate (DAL): 2-D thresholds and MNIST stability.

Rosca, Wu, Qin & Dherin, "On a continuous time model of gradient descent dynamics and instability
in deep learning" (arXiv 2302.01952):

1. **2-D quadratic.** On L(θ) = θᵀAθ, A = diag(1, 0.01), θ₀ = (−0.35, −0.2), gradient descent
   with rate h follows the *principal flow* θ' = Σᵢ ln(1 − hλᵢ)/(hλᵢ) (gᵀuᵢ) uᵢ: along the stiff
   direction (λ = 2) it is monotone for hλ ≤ 1, oscillates (complex coefficient) for 1 < hλ < 2
   and diverges (positive real part) for hλ > 2; gradient flow predicts none of this.
2. **DAL.** The rate η = min(2/v^p, 5) with v = ‖Hg‖/‖g‖ (the curvature along the gradient)
   adapts to the local drift (the cap 5 is the authors' code, google-deepmind/discretisation_drift);
   the paper reports stable training with competitive accuracy against constant rates. In our
   formula p = 0 is the constant rate 2 (the authors' code treats p = 0 as the base rate).

Part 1 sweeps h on the quadratic and compares the observed regime (sign flips, growth, steps to
a 10⁻⁶ loss reduction) with ``stability_regime`` and ``principal_flow_coefficients`` of the
package. Part 2 trains MNIST models (``chaos_callbacks.recipes.module.ClassificationModule``) by full-batch gradient
descent on a seeded ``--subset`` (the authors' DAL code accumulates full-batch gradients), at
constant rates and with ``CurvatureLRScheduler(mode="dal", power=p)`` for each ``--powers`` p (v on
the full batch every ``--every`` steps; ``--max-lr`` caps the rate, default 5 as in the authors'
code), with a ``HessianSpectrumMonitor`` recording η·λ_max of the training loss along training.
Stability is reported as: divergence, the fraction of estimates beyond the edge of stability
(η·λ_max > 2), and the largest loss spike (a loss over the median of the previous 20); accuracy
as the final and best test accuracy. The default model is the MLP (``--models mlp lenet`` adds
LeNet-5, about 1 s per full-batch step on one core). ``--batch-size 128 --subset 12000 --epochs 3 --every 10
--probe 512`` runs the mini-batch SGD variant.

Run from the repository root (defaults: about 10 minutes on 2 shared CPU cores, 1 thread):
    .venv/bin/python -m reproductions.principal_flow
Full size: ``--subset 54000 --batch-size 54000 --epochs 1000``. CIFAR-10 with a ResNet-20 on a GPU
(full-batch gradients of 5,000 images): ``--dataset cifar10 --data-root /path/holding/cifar-10-batches-py
--accelerator gpu --models resnet20 --subset 5000 --batch-size 5000 --epochs 1000 --target 0.5``.
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.sgd_runs import MODEL_LABELS, RecordingMonitor, RunResult, add_sgd_args, load_data, train_once
from chaos_callbacks.curvature import principal_flow_coefficients, stability_regime
from reproductions.common import RESULTS, finish_report, markdown_table, open_outputs, save_figure

A = np.array([1.0, 0.01])  # L(θ) = θᵀAθ: Hessian 2A, eigenvalues 2 and 0.02
THETA0 = np.array([-0.35, -0.2])
LAMBDA_MAX = 2.0


# ----------------------------------------------------------------------------- part 1: 2-D quadratic
@dataclass
class QuadraticRun:
    h: float
    path: np.ndarray  # [steps + 1, 2]

    @property
    def losses(self) -> np.ndarray:
        return (A * self.path**2).sum(axis=1)

    def observed_regime(self) -> str:
        stiff = self.path[:, 0]
        if abs(stiff[-1]) > abs(stiff[0]):
            return "divergent"
        flips = np.sign(stiff[1:]) * np.sign(stiff[:-1]) < 0
        return "oscillating" if flips[:10].any() else "monotone"

    def steps_to(self, reduction: float) -> int | None:
        below = np.nonzero(self.losses <= reduction * self.losses[0])[0]
        return int(below[0]) if below.size else None


def gradient_descent(h: float, steps: int) -> QuadraticRun:
    """θ_{t+1} = θ_t − h·2Aθ_t from θ₀ (exact gradient of θᵀAθ)."""
    path = [THETA0]
    for _ in range(steps):
        path.append(path[-1] - h * 2 * A * path[-1])
    return QuadraticRun(h, np.array(path))


def coefficient_text(h: float) -> str:
    """The principal-flow coefficient ln(1 − hλ)/(hλ) of the stiff direction, as text (−∞ at hλ = 1)."""
    if h * LAMBDA_MAX == 1:
        return "−∞"
    coefficient = principal_flow_coefficients(np.array([LAMBDA_MAX]), h)[0]
    return f"{coefficient.real:.3f}{coefficient.imag:+.3f}i"


def quadratic_table(runs: list[QuadraticRun]) -> str:
    rows = []
    for run in runs:
        predicted, observed = stability_regime(LAMBDA_MAX, run.h), run.observed_regime()
        steps = run.steps_to(1e-6)
        rows.append([
            run.h, run.h * LAMBDA_MAX, coefficient_text(run.h),
            predicted, observed, "yes" if predicted == observed else "NO",
            steps if steps is not None else "never", run.losses[-1],
        ])  # fmt: skip
    headers = [
        "h", "h·λ_max", "principal-flow coefficient ln(1−hλ)/(hλ)", "predicted regime", "observed regime",
        "agree", "steps to 1e-6·L₀", "final loss",
    ]  # fmt: skip
    return markdown_table(headers, rows)


# ----------------------------------------------------------------------------- part 2: DAL on MNIST
def largest_spike(losses: list[float], window: int = 20) -> float:
    """max_t L_t / median(L_{t−window..t−1}) over the mini-batch losses (1 = no spike)."""
    ratios = [
        losses[t] / statistics.median(losses[t - window : t])
        for t in range(window, len(losses))
        if math.isfinite(losses[t])
    ]  # fmt: skip
    return max(ratios, default=math.nan)


def dal_table(runs: list[tuple[RunResult, RecordingMonitor]]) -> str:
    rows = []
    for run, monitor in runs:
        sharpness = monitor.series("hessian/sharpness_lr")[1]
        used = run.used_lrs
        rows.append([
            run.method, statistics.median(used) if used else math.nan,
            f"{min(used):.3g}–{max(used):.3g}" if used and run.const_lr is None else "–",
            run.diverged_at if run.diverged_at is not None else "no",
            sum(v > 2 for v in sharpness) / len(sharpness) if sharpness else math.nan,
            statistics.median(sharpness) if sharpness else math.nan,
            largest_spike(run.losses), run.final_acc, run.best_acc,
        ])  # fmt: skip
    headers = [
        "method", "median lr", "lr range", "diverged at step", "fraction of estimates with ηλ_max > 2",
        "median ηλ_max", "largest loss spike", "final test acc", "best test acc",
    ]  # fmt: skip
    return markdown_table(headers, rows)


def write_csv(path: Path, dal: dict[str, list[tuple[RunResult, RecordingMonitor]]]) -> None:
    """One row per optimizer step of every run: its learning rate and (mini-)batch loss."""
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["model", "method", "step", "lr", "batch_loss"])
        for model, runs in dal.items():
            for run, _ in runs:
                for step, (lr, loss) in enumerate(zip(run.lrs, run.losses)):
                    writer.writerow([model, run.method, step, lr, loss])


# ----------------------------------------------------------------------------- plots
def plot(out: Path, quadratic: list[QuadraticRun], dal: dict[str, list[tuple[RunResult, RecordingMonitor]]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, (ax_path, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    for run in quadratic:
        if run.h in (0.4, 0.9, 1.05):
            shown = run.path[:30]
            ax_path.plot(shown[:, 0], shown[:, 1], ".-", label=f"h={run.h:g} ({run.observed_regime()})")
        ax_loss.plot(run.losses[:60], label=f"h={run.h:g}")
    ax_path.set(xlabel="θ₁ (stiff, λ=2)", ylabel="θ₂ (flat, λ=0.02)", xlim=(-1, 1), title="GD on θᵀdiag(1, 0.01)θ")
    ax_path.legend(fontsize=7)
    ax_loss.set(yscale="log", ylim=(1e-12, 1e3), xlabel="step", ylabel="loss")
    ax_loss.legend(fontsize=6, ncol=2)
    paths.append(save_figure(fig, out / "quadratic.png"))

    models = list(dal)
    fig, axes = plt.subplots(3, len(models), figsize=(6 * len(models), 9), squeeze=False, sharex="col")
    for col, model in enumerate(models):
        for run, monitor in dal[model]:
            style = "-" if run.const_lr is None else ":"
            axes[0][col].plot(range(len(run.lrs)), run.lrs, style, label=run.method)
            axes[1][col].plot(*monitor.series("hessian/sharpness_lr"), style, label=run.method)
            axes[2][col].plot([e[0] for e in run.evals], [e[1] for e in run.evals], style, label=run.method)
        axes[0][col].set(yscale="log", ylabel="learning rate", title=MODEL_LABELS[model])
        axes[1][col].axhline(2.0, color="k", ls="--", lw=0.8)
        axes[1][col].set(yscale="log", ylabel="η · λ_max (probe)")
        axes[2][col].set(ylim=(0.5, 1.0), xlabel="step", ylabel="test accuracy")
        axes[0][col].legend(fontsize=7)
    paths.append(save_figure(fig, out / "dal_mnist.png"))
    plt.close("all")
    return paths


# ----------------------------------------------------------------------------- main
def probe_arg(text: str) -> str | int:
    return text if text == "batch" else int(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_sgd_args(parser, epochs=300, subset=4096)
    parser.set_defaults(models=["mlp"], batch_size=4096, eval_every=10, target=0.9)  # full-batch GD, as in the paper
    parser.add_argument("--hs", type=float, nargs="+", default=[0.1, 0.25, 0.4, 0.5, 0.6, 0.75, 0.9, 0.99, 1.01, 1.05],
                        help="learning rates of the 2-D quadratic")  # fmt: skip
    parser.add_argument("--quadratic-steps", type=int, default=2000)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.03, 0.1, 0.3, 1.0], help="constant rates")
    parser.add_argument("--powers", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="DAL exponents p")
    parser.add_argument("--every", type=int, default=1, help="DAL re-estimates v every N steps")
    parser.add_argument("--max-lr", type=float, default=5.0,
                        help="upper bound on the DAL rate (default 5, the cap of the authors' code)")  # fmt: skip
    parser.add_argument("--monitor-every", type=int, default=10, help="η·λ_max estimate every N steps")
    parser.add_argument("--probe", type=probe_arg, default="batch",
                        help="the monitor's probe: 'batch' (the full batch by default) or a number of examples")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS / "principal_flow")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = open_outputs(args.out)
    quadratic = [gradient_descent(h, args.quadratic_steps) for h in args.hs]
    report = [
        "# Principal flow and DAL (Rosca et al., arXiv 2302.01952)\n",
        f"## 2-D quadratic θᵀdiag(1, 0.01)θ from θ₀ = (−0.35, −0.2), {args.quadratic_steps} GD steps\n",
        quadratic_table(quadratic),
    ]
    dm, x_test, y_test = load_data(args)
    steps = args.epochs * (len(dm.train_set) // args.batch_size)
    report.append(
        f"\n## DAL vs constant rates on {args.dataset}\n\ntorch {torch.__version__}, {torch.get_num_threads()} thread(s); train "
        f"subset {len(dm.train_set)}, batch {args.batch_size}, {args.epochs} epochs = {steps} steps of plain (S)GD; DAL "
        f"v = ‖Hg‖/‖g‖ on the current batch every {args.every} steps, max_lr={args.max_lr}; η·λ_max on probe {args.probe!r} "
        f"every {args.monitor_every} steps; test accuracy on {len(y_test)} images every "
        f"{args.eval_every} steps; seed {args.seed}."
    )
    dal: dict[str, list[tuple[RunResult, RecordingMonitor]]] = {}
    for model in args.models:
        print(MODEL_LABELS[model], flush=True)
        dal[model] = []
        settings = [(f"constant η={lr:g}", lr, None) for lr in args.lrs] + [
            (f"DAL p={p:g}", None, {"mode": "dal", "power": p, "every_n_steps": args.every, "max_lr": args.max_lr})
            for p in args.powers
        ]  # fmt: skip
        for label, lr, kwargs in settings:
            monitor = RecordingMonitor(every_n_steps=args.monitor_every, probe=args.probe, lambda_min=False, tol=1e-2, seed=args.seed)
            run = train_once(model, dm, x_test, y_test, args, label, lr, kwargs, [monitor])
            dal[model].append((run, monitor))
            print(f"  {label}: final acc {run.final_acc:.4f}, diverged at {run.diverged_at}", flush=True)
        report += [f"\n### {MODEL_LABELS[model]}\n", dal_table(dal[model])]
    report.append(
        "\nLargest loss spike: max over steps of the (mini-)batch loss over the median of the 20 before it. "
        "η·λ_max > 2: the step is beyond the edge of stability of the probe loss's top eigen-direction."
    )
    write_csv(args.out / "losses.csv", dal)
    finish_report(args.out, report, start, plot(args.out, quadratic, dal))


if __name__ == "__main__":
    main()
