"""Cost of GradientNoiseScale's extra pass: halves, per-example gradients (torch.func), micro-batches.

Without DDP or gradient accumulation the callback needs an extra pass over the step's batch to get
gradients at two batch sizes: one forward/backward on the batch's first half, set against the step's
own gradient (``"halves"``); per-example gradients with ``torch.func`` (``vmap(grad)``,
``chunk_size`` examples per call; B_small = 1); or ``num_micro_batches`` slices of the batch, one
forward/backward each. For each model and batch size (random MNIST-shaped data, cross entropy,
float32, one thread) the table gives the median wall time of one training step (forward, backward,
SGD update), of one estimate by each path (the callback's own code, inside ``no_harm``) and their
ratio to the step, and the relative standard deviation of the per-step tr Σ estimate over
``--batches`` random batches at fixed weights (the statistical precision one estimate buys). The
last columns are the cost of equal precision, (time × variance) over per-example's: above 1
per-example is cheaper for the same error bars. ``source="auto"`` takes ``"halves"`` (the cheapest
per estimate; the moving averages pool estimates) under automatic optimization, per-example otherwise.

Run from the repository root:
    .venv/bin/python -m benchmarks.bench_gradient_noise [--batch-sizes 32 128] [--repeats 7] [--batches 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from benchmarks.common import markdown_table, quiet_lightning
from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.callbacks.gradient_noise import GradientNoiseScale, Pieces
from chaos_callbacks.dynamics.noise_scale import two_batch_estimate


class Classifier(pl.LightningModule):
    """``net`` with a cross-entropy ``training_step`` (mean over the batch)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": mlp, "cnn": cnn}
NAMES = {"mlp": "MLP 784-256-10 (ReLU)", "cnn": "CNN conv5-16, conv5-32, linear"}


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def estimate(pieces: Pieces) -> float:
    """tr Σ of one single-process estimate."""
    big_sq = float(pieces.big.double().pow(2).sum())
    return two_batch_estimate(pieces.small_sq_sum / pieces.count, pieces.count / pieces.inv_size_sum, big_sq, 1.0 / pieces.big_inv_size).trace_cov


def row(name: str, batch: int, repeats: int, batches: int, micro: int, chunk: int) -> list[Any]:
    torch.manual_seed(0)
    module = Classifier(MODELS[name]())
    optimizer = torch.optim.SGD(module.parameters(), lr=0.0)
    callback = GradientNoiseScale(num_micro_batches=micro, chunk_size=chunk)
    data = [(torch.randn(batch, 1, 28, 28), torch.randint(0, 10, (batch,))) for _ in range(batches)]

    def step() -> None:
        optimizer.zero_grad()
        module.training_step(data[0], 0).backward()
        optimizer.step()

    def pass_of(kind: str, b: Any) -> Any:
        if kind == "halves":
            return callback._first_half(module, b, 0, 0)
        with plumb.no_harm(module, train_mode=None):
            if kind == "per_example":
                return callback._per_example(module, b, 0, batch)
            return callback._micro_batches(module, b, 0, batch, min(micro, batch))

    def pieces_of(kind: str, b: Any) -> Pieces:
        if kind != "halves":
            return pass_of(kind, b)
        first = pass_of(kind, b)
        optimizer.zero_grad()
        module.training_step(b, 0).backward()  # the step's own gradient (not timed: the step takes it anyway)
        return callback._halves(module, first, 1.0)

    out: list[Any] = [NAMES[name], sum(p.numel() for p in module.parameters()), batch]
    step_ms = median_ms(step, repeats)
    out.append(step_ms)
    cost = {}
    for kind in KINDS:
        ms = median_ms(lambda: pass_of(kind, data[0]), repeats)
        traces = torch.tensor([estimate(pieces_of(kind, b)) for b in data])
        rel_sd = float(traces.std() / traces.mean())
        cost[kind] = ms * rel_sd**2
        out += [ms, ms / step_ms, rel_sd]
    out += [cost["halves"] / cost["per_example"], cost["micro_batches"] / cost["per_example"]]
    return out


KINDS = ("halves", "per_example", "micro_batches")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 128])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS), help="mlp: 784-256-10; cnn: LeNet-like")
    parser.add_argument("--repeats", type=int, default=7, help="timed repetitions (median)")
    parser.add_argument("--batches", type=int, default=30, help="random batches for the spread of tr Σ")
    parser.add_argument("--micro-batches", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    quiet_lightning()
    rows = [row(m, b, args.repeats, args.batches, args.micro_batches, args.chunk_size) for m in args.models for b in args.batch_sizes]
    headers = ["model", "params", "batch", "step ms", "halves ms", "× step", "rel. sd tr Σ", "per-example ms", "× step",
               "rel. sd tr Σ", f"{args.micro_batches} micro-batches ms", "× step", "rel. sd tr Σ",
               "equal-precision cost halves / per-example", "micro / per-example"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
