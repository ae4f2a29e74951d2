"""Overhead of LyapunovTwinRun: training time with / without the callback, and the memory it adds.

Models: an MNIST MLP 784-256-10 (tanh) and a small CNN (two 3×3 conv layers, 16 and 32 channels),
batch 128, SGD with momentum 0.9, on the real MNIST training images. Each measurement times a fixed
number of optimizer steps after a warm-up, inside one ``Trainer.fit``, in process CPU time on one
thread by default; runs with and without the callback alternate so that drifts in machine load hit
both, and the best of the repeats is kept. The twin costs one extra forward and
backward per step, so 2.0 is the floor of the time ratio; the target is ≤ 2.1. Memory added is
the twin's parameters, buffers and optimizer state (``LyapunovTwinRun.memory_bytes``).

    .venv/bin/python -m benchmarks.bench_lyapunov_overhead [--data-root DIR] [--steps 200] [--repeats 3]
        [--threads 1] [--modes twin tangent]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import DEFAULT_DATA_ROOT
from chaos_callbacks.callbacks.lyapunov_twin import LyapunovTwinRun


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.Tanh(), nn.Linear(256, 10))


def cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10),
    )


class StepTimer(pl.Callback):
    """CPU time of this process over the optimizer steps after ``warmup`` (callbacks included).

    Process time rather than wall time: on a shared machine it does not count other processes' work.
    """

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds = warmup, 0.0, 0.0

    def on_train_batch_start(self, trainer, *args) -> None:
        if trainer.global_step == self.warmup:
            self.start = time.process_time()

    def on_train_end(self, trainer, *args) -> None:
        self.seconds = time.process_time() - self.start


def mnist(root: Path, n: int) -> TensorDataset:
    from torchvision.datasets import MNIST

    data = MNIST(root=str(root), train=True, download=False)
    x = (data.data[:n].float() / 255.0 - 0.1307) / 0.3081
    return TensorDataset(x.unsqueeze(1), data.targets[:n])


def run(make_net, data: TensorDataset, steps: int, warmup: int, callback: LyapunovTwinRun | None) -> float:
    pl.seed_everything(0, verbose=False)
    timer = StepTimer(warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=warmup + steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer] + ([callback] if callback else []),
    )
    trainer.fit(Classifier(make_net()), DataLoader(data, batch_size=128, shuffle=True))
    return timer.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder holding MNIST/raw")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--modes", nargs="+", default=["twin", "tangent"], choices=["twin", "tangent"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    data = mnist(args.data_root, 128 * (args.steps + args.warmup))
    rows = []
    for name, make_net in (("MLP 784-256-10", mlp), ("CNN 16-32", cnn)):
        for mode in args.modes:
            base, watched = [], []
            for _ in range(args.repeats):  # alternate: without, with
                base.append(run(make_net, data, args.steps, args.warmup, None))
                callback = LyapunovTwinRun(mode=mode, renormalize_every=10, summary_every_n_steps=None)
                watched.append(run(make_net, data, args.steps, args.warmup, callback))
            params = sum(p.numel() * p.element_size() for p in make_net().parameters())
            t0, t1 = min(base), min(watched)  # the least-disturbed run of each
            rows.append((name, mode, 1e3 * t0 / args.steps, 1e3 * t1 / args.steps, t1 / t0, params, callback.memory_bytes))
    print(f"{args.steps} steps after {args.warmup} warm-up, batch 128, best of {args.repeats} alternating runs, "
          f"CPU ms per step on {torch.get_num_threads()} thread(s)")
    print(f"{'model':<16} {'mode':<8} {'ms/step':>8} {'with':>8} {'ratio':>6} {'params':>10} {'added':>10}")
    for name, mode, t0, t1, ratio, params, added in rows:
        print(f"{name:<16} {mode:<8} {t0:8.2f} {t1:8.2f} {ratio:6.2f} {params / 2**20:8.2f}MB {added / 2**20:8.2f}MB")


if __name__ == "__main__":
    main()
