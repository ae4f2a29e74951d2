"""HVPs and wall time of the steps where HessianSpectrumMonitor and CurvatureLRScheduler both estimate.

Run from the repository root of the checkout to measure:
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_engine_share --width 256 --steps 8 --seeds 2
Prints one line per case: products (total, monitor, scheduler), forwards, and the median over the
estimate steps of the CPU time spent in the callbacks' on_train_batch_start hooks.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
from torch import nn

from chaos_callbacks import HessianSpectrumMonitor
from chaos_callbacks.callbacks.curvature_lr import CurvatureLRScheduler
from chaos_callbacks.curvature import HessianOperator

COUNT = {"hvp": 0, "fwd": 0}
_matvec = HessianOperator.matvec


def _counted(self, v):
    COUNT["hvp"] += 1
    return _matvec(self, v)


HessianOperator.matvec = _counted
HessianOperator.__call__ = _counted


class MLP(pl.LightningModule):
    def __init__(self, width: int, groups: bool) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
        self.groups = groups

    def forward(self, x):
        COUNT["fwd"] += 1
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self):
        if self.groups:
            return torch.optim.SGD([{"params": self.net[0].parameters(), "lr": 0.05},
                                    {"params": list(self.net[2].parameters()) + list(self.net[4].parameters()), "lr": 0.025}])
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Timer(pl.Callback):
    def __init__(self) -> None:
        self.rows: list[tuple[float, int, int, float, float]] = []
        self.t0 = 0.0
        self.c0 = (0, 0)

    def first(self):
        outer = self

        class First(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                outer.c0 = (COUNT["hvp"], COUNT["fwd"])
                outer.t0 = time.process_time()

        return First()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        dt = time.process_time() - self.t0
        cbs = trainer.callbacks
        mon = next(c for c in cbs if isinstance(c, HessianSpectrumMonitor)).last_estimate
        sch = next(c for c in cbs if isinstance(c, CurvatureLRScheduler)).last_estimate
        self.rows.append((dt, COUNT["hvp"] - self.c0[0], COUNT["fwd"] - self.c0[1],
                          mon.get("hessian/hvps", float("nan")), sch.get("curvature_lr/hvps", float("nan"))))


def run(width: int, groups: bool, steps: int, seed: int) -> list[tuple[float, int, int, float, float]]:
    pl.seed_everything(seed, verbose=False)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(128 * steps, 784, generator=g)
    y = torch.randint(0, 10, (128 * steps,), generator=g)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=128)
    timer = Timer()
    cbs = [timer.first(), HessianSpectrumMonitor(every_n_steps=1), CurvatureLRScheduler(every_n_steps=1), timer]
    t = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, max_steps=steps, callbacks=cbs)
    t.fit(MLP(width, groups), dl)
    return timer.rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--case", choices=("both", "one_rate", "groups"), default="both")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    n = 784 * args.width + args.width + args.width * args.width + args.width + args.width * 10 + 10
    print(f"MLP 784-{args.width}-{args.width}-10 tanh ({n} parameters), batch 128, monitor and scheduler at their "
          f"defaults, both every step; {args.steps} steps x {args.seeds} seeds (medians over steps 1.., step 0 is cold)")
    for groups in {"both": (False, True), "one_rate": (False,), "groups": (True,)}[args.case]:
        rows = [r for s in range(args.seeds) for r in run(args.width, groups, args.steps, s)[1:]]
        med = lambda i: statistics.median(r[i] for r in rows)  # noqa: E731
        scheduler = statistics.median(r[1] - r[3] for r in rows)  # total − monitor: the scheduler's products
        case = "2 param groups (R^1/2 H R^1/2)" if groups else "SGD one rate (same H)"
        print(f"{case:32s} HVPs total {med(1):5.1f} | monitor {med(3):5.1f} | scheduler {scheduler:5.1f} | "
              f"forwards {med(2):3.0f} | hook CPU time median {1e3 * med(0):7.1f} ms, min {1e3 * min(r[0] for r in rows):7.1f} ms")


if __name__ == "__main__":
    main()
