"""Cost of GradientTailFitter: tail-fit time and alpha error at 5000 samples, and per-step overhead.

1. Fits. For each alpha, ``--seeds`` samples of 5000 S(alpha, 0, 1e-3, 0) entries (scipy's
   sampler; alpha = 2 is the Gaussian): median time of our McCulloch quantile fit and of the
   maximum-likelihood fit (cold density-table cache, as in the callback, whose alpha changes every
   estimate), each alone and inside ``analyse_tails`` (fit + Student t fit + Vuong tests: one estimate's
   statistics), and the median |alpha_hat - alpha| over the seeds. scipy's
   ``levy_stable.fit`` is not re-run here: ``python -m benchmarks.bench_tail_fit`` times it
   (20-50 s per 200 points).
2. Overhead. MLP 784-256-10 (ReLU) on real MNIST, batch 128, SGD with momentum, Lightning on
   the CPU; runs without and with the fitter at its default cadence (every 50 steps) alternate,
   and the time per step is measured over ``--steps`` steps (a multiple of 50, so each timed
   window holds the same number of estimates) after ``--warmup`` steps. Reports the median wall
   ms per step, the medians of the paired ratios with/without of wall-clock and of process CPU
   time, and the CPU time spent inside the fitter's hook per step and per estimate. On a shared
   machine the CPU-time figures are the stable ones (wall clock includes waiting for a core).

Run from the repository root:
    .venv/bin/python -m benchmarks.bench_grad_tail_overhead [--steps 500] [--pairs 5] [--data-root DIR]
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.bench_tail_fit import median_seconds
from benchmarks.common import add_common_args, markdown_table, mnist_tensors
from chaos_callbacks.callbacks.gradient_tails import GradientTailFitter
from chaos_callbacks.dynamics import tails

NUM_SAMPLES = 5000


# ----------------------------------------------------------------------------- fits
def fit_rows(alphas: list[float], seeds: int, repeats: int) -> list[list[Any]]:
    clear_tables = tails._log_density_table.cache_clear
    rows = []
    for alpha in alphas:
        errors: dict[str, list[float]] = {"quantile": [], "mle": []}
        times: dict[str, list[float]] = {"quantile": [], "quantile+test": [], "mle": [], "mle+test": []}
        for seed in range(seeds):
            if alpha == 2.0:
                x = np.random.default_rng(seed).normal(0.0, np.sqrt(2.0) * 1e-3, NUM_SAMPLES)
            else:
                x = stats.levy_stable.rvs(alpha, 0.0, scale=1e-3, size=NUM_SAMPLES, random_state=seed)
            for method in ("quantile", "mle"):
                errors[method].append(abs(tails.fit_symmetric_stable(x, method=method).alpha - alpha))
                n = repeats if method == "quantile" else max(1, repeats // 4)
                times[method].append(median_seconds(lambda: tails.fit_symmetric_stable(x, method=method), n, clear_tables))
                times[f"{method}+test"].append(median_seconds(lambda: tails.analyse_tails(x, method=method), n, clear_tables))
        ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
        rows.append([
            alpha,
            ms["quantile"], statistics.median(errors["quantile"]), ms["quantile+test"],
            ms["mle"], statistics.median(errors["mle"]), ms["mle+test"],
        ])  # fmt: skip
    return rows


# ----------------------------------------------------------------------------- overhead
class MnistMLP(pl.LightningModule):
    """784-256-10 ReLU MLP, cross-entropy, SGD(lr 0.05, momentum 0.9); logs nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


class StepClock(pl.Callback):
    """Wall and CPU seconds per step between the starts of steps ``first`` and ``first + count``."""

    def __init__(self, first: int, count: int) -> None:
        self.first, self.count = first, count
        self.start = (0.0, 0.0)
        self.wall = self.cpu = float("nan")

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.first:
            self.start = (time.perf_counter(), time.process_time())
        elif trainer.global_step == self.first + self.count:
            self.wall = (time.perf_counter() - self.start[0]) / self.count
            self.cpu = (time.process_time() - self.start[1]) / self.count


class TimedFitter(GradientTailFitter):
    """GradientTailFitter that adds up the CPU time spent in its hook (all steps of the run)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_cpu = 0.0

    def on_before_optimizer_step(self, *args: Any) -> None:
        start = time.process_time()
        super().on_before_optimizer_step(*args)
        self.hook_cpu += time.process_time() - start


def time_run(data: TensorDataset, fitter: GradientTailFitter | None, tensorboard: bool, warmup: int, steps: int) -> StepClock:
    """Time per training step (same seed, same batches, with or without ``fitter``)."""
    pl.seed_everything(0, verbose=False)
    clock = StepClock(warmup, steps)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=warmup + steps + 1,
            logger=TensorBoardLogger(tmp, name="bench") if tensorboard else False,
            callbacks=[clock] + ([fitter] if fitter is not None else []),
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(MnistMLP(), DataLoader(data, batch_size=128, shuffle=True))
    return clock


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(parser)
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.1, 1.3, 1.5, 1.7, 1.9, 2.0])
    parser.add_argument("--seeds", type=int, default=5, help="samples per alpha (errors: median over them)")
    parser.add_argument("--repeats", type=int, default=21, help="timing repeats of the quantile fit (mle: / 4)")
    parser.add_argument("--steps", type=int, default=500, help="timed steps per run (multiple of 50)")
    parser.add_argument("--warmup", type=int, default=25, help="untimed steps before the window")
    parser.add_argument("--pairs", type=int, default=5, help="alternating without/with runs per variant")
    parser.add_argument("--skip-fits", action="store_true", help="only the overhead table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if not args.skip_fits:
        print(f"## Tail fits of {NUM_SAMPLES} samples (ms: median; |err|: median over {args.seeds} seeds)\n")
        headers = ["alpha", "quantile ms", "quantile abs err", "+tests ms", "mle ms", "mle abs err", "+tests ms"]
        print(markdown_table(headers, fit_rows(args.alphas, args.seeds, args.repeats)), flush=True)
        print("\nscipy.stats.levy_stable.fit: see `python -m benchmarks.bench_tail_fit` (not re-run here).\n")

    x, y = mnist_tensors(args.data_root, 60_000)
    data = TensorDataset(x, y)
    variants = [
        ("default: gradient, quantile, per layer", {}, False),
        ("method='mle'", {"method": "mle"}, False),
        ("target='noise' (EMA every step)", {"target": "noise"}, False),
        ("per_layer=False", {"per_layer": False}, False),
        ("default + TensorBoard (histogram; figure every 10th estimate)", {}, True),
    ]
    estimates = args.steps // 50
    print(f"## Per-step overhead, MLP 784-256-10 on MNIST, batch 128, every_n_steps=50 ({estimates} estimates per {args.steps} steps)")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), {args.pairs} alternating pairs per variant\n")
    rows = []
    for name, kwargs, tensorboard in variants:
        base: list[StepClock] = []
        watched: list[StepClock] = []
        fitters: list[TimedFitter] = []
        for _ in range(args.pairs):
            base.append(time_run(data, None, tensorboard, args.warmup, args.steps))
            fitters.append(TimedFitter(**kwargs))
            watched.append(time_run(data, fitters[-1], tensorboard, args.warmup, args.steps))
        wall_ratio = statistics.median(w.wall / b.wall for w, b in zip(watched, base))
        cpu_ratio = statistics.median(w.cpu / b.cpu for w, b in zip(watched, base))
        run_steps = args.warmup + args.steps + 1
        hook_ms = 1e3 * statistics.median(f.hook_cpu for f in fitters)
        per_estimate = hook_ms / math.ceil(run_steps / 50)
        rows.append([
            name, 1e3 * statistics.median(b.wall for b in base), 1e3 * statistics.median(w.wall for w in watched),
            wall_ratio, cpu_ratio, 1 + hook_ms / run_steps / (1e3 * statistics.median(b.cpu for b in base)),
            hook_ms / run_steps, per_estimate,
            fitters[-1].last_estimate.get("grad_tail/alpha", float("nan")),
        ])  # fmt: skip
        print(f"  {name}: wall ratio {wall_ratio:.4f}, CPU ratio {cpu_ratio:.4f}", flush=True)
    headers = [
        "variant", "without ms/step", "with ms/step", "wall ratio", "CPU ratio", "1 + hook/step", "hook CPU ms/step",
        "hook CPU ms/estimate", "last alpha",
    ]  # fmt: skip
    print("\n" + markdown_table(headers, rows))
    print(
        "\nwall ratio / CPU ratio: median over the pairs of (with / without) of the wall-clock and the "
        "process CPU time per step; hook CPU: time inside the fitter's hook over the whole run, per "
        "step and per estimate (EMA updates of target='noise' included); 1 + hook/step: the ratio "
        "implied by the hook's CPU time and the CPU time of a step without the fitter (least noisy)."
    )


if __name__ == "__main__":
    main()
