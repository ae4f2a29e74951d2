"""Overhead of ``DiffusionTracker`` relative to the training step, and its memory per window.

Two models trained by SGD in a real Lightning Trainer (``chaos_callbacks.recipes.module.ClassificationModule``):

* an MNIST MLP 784-64-10 on real MNIST (``--data-root``, read with
  ``torchvision.datasets.MNIST(root, download=False)``),
* a CIFAR ResNet-20 (He et al. 2016, the model family of Chen, Qu, Gong, arXiv 2009.10588) on
  random CIFAR-shaped data (the step time does not depend on the pixel values).

For each, the tracker's hooks are timed inside the run (window larger than the run, so only
recording happens): ``record`` is the per-step cost of projecting the weights and bookkeeping,
divided by the step time without it. The window analysis (``WindowAccumulator`` on a full
``window × dim`` window, what the tracker runs once per window) and the three TensorBoard
figures (drawn and rendered to PNG, as ``add_figure`` does) are timed separately and amortised
over ``window`` steps (the figures over ``window × figure_every_n_windows`` steps).

Run from the repository root: ``.venv/bin/python -m benchmarks.bench_diffusion_overhead``
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import DEFAULT_DATA_ROOT
from chaos_callbacks.callbacks.diffusion_tracker import DiffusionTracker
from chaos_callbacks.dynamics.diffusion import WindowAccumulator, log_spaced_lags
from chaos_callbacks.recipes.data import MNISTDataModule
from chaos_callbacks.recipes.module import ClassificationModule



class TimedTracker(DiffusionTracker):
    """A DiffusionTracker that records the wall time of its hooks per training batch."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_seconds: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        start = time.perf_counter()
        super().on_train_batch_start(*args)
        self.hook_seconds.append(time.perf_counter() - start)

    def on_train_batch_end(self, *args: Any) -> None:
        start = time.perf_counter()
        super().on_train_batch_end(*args)
        self.hook_seconds[-1] += time.perf_counter() - start


class StepClock(pl.Callback):
    """Wall time between consecutive batch starts: the whole training step."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args: Any) -> None:
        self.starts.append(time.perf_counter())


def time_recording(module: pl.LightningModule, loader: DataLoader, steps: int, dim: int, stride: int) -> dict[str, float]:
    """Median step time and tracker time per step over ``steps`` steps (after 4 warm-up steps).

    With ``stride`` > 1 the per-step tracker time is the median over recorded steps divided by
    ``stride`` plus the median over the other steps weighted by ``(stride − 1) / stride``.
    """
    tracker, clock = TimedTracker(window=steps + 10, dim=dim, every_n_steps=stride), StepClock()
    trainer = pl.Trainer(
        accelerator="cpu", max_steps=steps + 4, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[tracker, clock], limit_val_batches=0,
    )
    trainer.fit(module, loader)
    hooks = tracker.hook_seconds[4:]
    recorded = statistics.median(hooks[::stride])
    others = statistics.median([t for i, t in enumerate(hooks) if i % stride]) if stride > 1 else 0.0
    return {
        "params": sum(p.numel() for p in module.parameters()),
        "step": statistics.median(np.diff(clock.starts)[4:]),
        "record": (recorded + (stride - 1) * others) / stride,
    }


def time_analysis(window: int, dim: int, repeats: int, clock: Callable[[], float] = time.perf_counter) -> float:
    """Median seconds (by ``clock``) of the analysis the tracker runs when a window of Brownian samples fills."""
    rng = np.random.default_rng(0)
    X = np.cumsum(rng.standard_normal((window, dim)), axis=0)
    losses = rng.standard_normal(window)
    times = []
    for _ in range(repeats):
        acc = WindowAccumulator(window, dim, lags=log_spaced_lags(window, 24))
        for t in range(window - 1):
            acc.append(X[t], losses[t], t)
        start = clock()
        acc.append(X[-1], losses[-1], window - 1)
        times.append(clock() - start)
    return statistics.median(times)


def time_figures(window: int, dim: int, num_windows: int) -> float:
    """Seconds to draw the three figures of ``num_windows`` windows and render them to PNG."""
    import matplotlib.pyplot as plt

    from chaos_callbacks.dynamics.diffusion import analyse_window
    from chaos_callbacks.plotting.diffusion import msd_figure, msd_log_derivative_figure, msl_figure

    rng = np.random.default_rng(1)
    windows = [
        analyse_window(np.cumsum(rng.standard_normal((window, dim)), axis=0), rng.standard_normal(window), t_w=k * window)
        for k in range(num_windows)
    ]
    msd_figure(windows)  # warm up matplotlib
    plt.close("all")
    start = time.perf_counter()
    for make in (msd_figure, msd_log_derivative_figure, msl_figure):
        fig = make(windows)
        fig.savefig(io.BytesIO(), format="png")
        plt.close(fig)
    return time.perf_counter() - start


def mnist_mlp(args: argparse.Namespace) -> tuple[pl.LightningModule, DataLoader]:
    data = MNISTDataModule(root=args.data_root, batch_size=args.batch_size, val_split=0.0, seed=0)
    data.setup("fit")
    return ClassificationModule(10, (1, 28, 28), model="mlp", lr=0.1), data.train_dataloader()


def cifar_resnet20(args: argparse.Namespace) -> tuple[pl.LightningModule, DataLoader]:
    g = torch.Generator().manual_seed(0)
    n = args.batch_size * (args.resnet_steps + 4)
    dataset = TensorDataset(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g))
    return ClassificationModule(10, (3, 32, 32), model="resnet20", lr=0.1, momentum=0.9), DataLoader(dataset, batch_size=args.batch_size)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="directory holding MNIST/raw/")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--window", type=int, default=1000, help="DiffusionTracker window (samples)")
    parser.add_argument("--figure-every", type=int, default=10, help="figure_every_n_windows for the amortisation")
    parser.add_argument("--mlp-steps", type=int, default=400)
    parser.add_argument("--resnet-steps", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (2 threads on a busy 2-core machine thrash)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)

    configs = [  # (model, build, steps, dim, every_n_steps)
        ("MNIST MLP 784-64-10", mnist_mlp, args.mlp_steps, 1024, 1),
        ("MNIST MLP 784-64-10", mnist_mlp, args.mlp_steps, 256, 1),
        ("MNIST MLP 784-64-10", mnist_mlp, args.mlp_steps, 1024, 4),
        ("ResNet-20 CIFAR", cifar_resnet20, args.resnet_steps, 1024, 1),
    ]
    dims = sorted({c[3] for c in configs})
    analysis = {dim: time_analysis(args.window, dim, repeats=3) for dim in dims}
    figures = time_figures(args.window, 1024, num_windows=10)
    rows = []
    for name, build, steps, dim, stride in configs:
        module, loader = build(args)
        rows.append((name, dim, stride, time_recording(module, loader, steps, dim, stride)))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), CPU, batch {args.batch_size}, "
          f"window {args.window} samples, figures every {args.figure_every} windows")
    print("analysis of one full window: " + ", ".join(f"{args.window}×{d}: {analysis[d]:.3f} s" for d in dims)
          + f"; three figures of 10 windows: {figures:.2f} s")
    print()
    print("| model | params | dim | every_n_steps | step ms | record ms/step | record % | analysis % | figures % | total % | window MiB | hash MiB | exact window MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    mib = 2**20
    for name, dim, stride, r in rows:
        base = r["step"] - r["record"]  # the step without the tracker
        record = r["record"] / base
        per_window = analysis[dim] / (args.window * stride * base)
        per_figure = figures / (args.window * stride * args.figure_every * base)
        print(
            f"| {name} | {r['params']:,} | {dim} | {stride} | {base * 1e3:.2f} | {r['record'] * 1e3:.3f} | {100 * record:.2f} | "
            f"{100 * per_window:.2f} | {100 * per_figure:.2f} | {100 * (record + per_window + per_figure):.2f} | "
            f"{8 * args.window * dim / mib:.1f} | {8 * r['params'] / mib:.2f} | {8 * args.window * r['params'] / mib:.0f} |"
        )


if __name__ == "__main__":
    main()
