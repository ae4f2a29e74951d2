"""Does SGD on MNIST diffuse anomalously — superdiffusive early, subdiffusive late?

Chen, Qu, Gong, "Anomalous diffusion dynamics of learning in deep neural networks" (arXiv
2009.10588) report, for ResNet-14 on CIFAR-10, a time-averaged weight MSD(τ) ∝ τ^α that is
superdiffusive early in training and subdiffusive later (α ≈ 1.21 → 0.78), with a crossover
near τ₀ ≈ 70 steps. This script trains an MLP 784-64-10 and a LeNet-5 (``recipes.models``, through
``recipes.module.ClassificationModule``) with plain SGD (``--momentum`` adds heavy-ball
momentum, which makes the first ~1/(1 − β) lags ballistic) at two learning rates on a subset of
real MNIST, records the weights with ``DiffusionTracker`` (CountSketch, ``--dim``) in windows of
``--window`` steps, and prints, per run and window, the single exponent α, the two-regime
exponents α_s (short lags) and α_l (long lags), the crossover τ₀, the Hurst exponent H of the
loss along the path and the fractal dimension d_f; then a summary of the first window against
the last three.

MNIST is read with ``torchvision.datasets.MNIST(root, download=False)`` from ``--data-root``
(default ``<repo>/../shared/data``). The defaults run in 2–6 minutes on 2 shared CPU cores.

Run from the repository root: ``.venv/bin/python -m benchmarks.reproduce_diffusion_mnist``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import torch

from chaos_callbacks.callbacks.diffusion_tracker import DiffusionTracker
from chaos_callbacks.dynamics.diffusion import WindowStats
from recipes.data import MNISTDataModule
from recipes.module import ClassificationModule

DEFAULT_DATA_ROOT = str(Path(__file__).resolve().parents[2] / "shared" / "data")


def run(model: str, lr: float, args: argparse.Namespace) -> tuple[list[WindowStats], float, float]:
    """Train one model; return its windows, its MNIST test accuracy and the wall time."""
    pl.seed_everything(args.seed, verbose=False)
    data = MNISTDataModule(root=args.data_root, batch_size=args.batch_size, subset=args.subset, val_split=0.0, seed=args.seed)
    module = ClassificationModule(10, (1, 28, 28), model=model, lr=lr, momentum=args.momentum)
    tracker = DiffusionTracker(window=args.window, dim=args.dim, seed=args.seed)
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=args.steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[tracker],
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    seconds = time.perf_counter() - start
    module.eval()
    with torch.no_grad():
        test = data.test_set
        accuracy = float((module(test.images).argmax(1) == test.targets).float().mean())
    return tracker.windows, accuracy, seconds


def fmt(value: float, digits: int = 2) -> str:
    return f"{value:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=DEFAULT_DATA_ROOT, help="directory holding MNIST/raw/")
    parser.add_argument("--models", nargs="+", default=["mlp", "lenet"])
    parser.add_argument("--lrs", nargs="+", type=float, default=[0.01, 0.05])
    parser.add_argument("--steps", type=int, default=2400)
    parser.add_argument("--window", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--subset", type=int, default=12000, help="training examples drawn from the 60,000")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    results = {(m, lr): run(m, lr, args) for m in args.models for lr in args.lrs}
    print(f"MNIST subset {args.subset}, batch {args.batch_size}, SGD momentum {args.momentum}, {args.steps} steps, "
          f"windows of {args.window} steps, CountSketch dim {args.dim}, torch {torch.__version__}, {args.threads} thread(s)\n")
    for (model, lr), (windows, accuracy, seconds) in results.items():
        print(f"### {model}, lr {lr} — test accuracy {100 * accuracy:.1f}%, {seconds:.0f} s\n")
        print("| t_w | α | α_s (short) | α_l (long) | τ₀ (steps) | H | d_f |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for w in windows:
            print(f"| {w.t_w} | {fmt(w.exponent)} | {fmt(w.exponent_short)} | {fmt(w.exponent_long)} | "
                  f"{w.crossover:.0f} | {fmt(w.hurst)} | {fmt(w.fractal_dim)} |")
        print()
    print("### Summary: first window vs mean of the last three\n")
    print("α over training: the single exponent of the first window → of the late windows.")
    print("late regimes in τ: short lags (α_s) → long lags (α_l), past the crossover τ₀.\n")
    print("| model | lr | α first | α late | α over training | α_s first | α_l first | α_s late | α_l late | τ₀ late | late regimes in τ |")
    print("|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for (model, lr), (windows, _, _) in results.items():
        first, late = windows[0], windows[-3:]

        def mean(name: str) -> float:
            return sum(getattr(w, name) for w in late) / len(late)

        def regime(alpha: float) -> str:
            return "super" if alpha > 1 else "sub"

        print(f"| {model} | {lr} | {fmt(first.exponent)} | {fmt(mean('exponent'))} | "
              f"{regime(first.exponent)} → {regime(mean('exponent'))} | {fmt(first.exponent_short)} | {fmt(first.exponent_long)} | "
              f"{fmt(mean('exponent_short'))} | {fmt(mean('exponent_long'))} | {mean('crossover'):.0f} | "
              f"{regime(mean('exponent_short'))} → {regime(mean('exponent_long'))} |")


if __name__ == "__main__":
    main()
