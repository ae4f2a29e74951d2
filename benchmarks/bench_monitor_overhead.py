"""Training-time overhead of ``HessianSpectrumMonitor`` at its defaults (every 200 steps, Lanczos top-1
+ λ_min, tol 1e-3, warm start, probe = current batch).

For each model, Lightning trains on MNIST on the CPU for a fixed number of optimizer steps, with and
without the monitor, alternating the order (ABBA) so that load drifts on a shared machine hit both
arms alike. Reported: the median ratio of training-loop time (``on_train_start`` → ``on_train_end``)
with/without, the time spent inside the monitor's hook, its estimates and HVPs, and whether the
trained weights are bit-identical (the no-harm contract).

Run:  .venv/bin/python -m benchmarks.bench_monitor_overhead  [--steps 300 --pairs 3 --models mlp,cnn]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import REPO, add_common_args, bn_cnn, cpu_clock, emit, markdown_table, median, mnist_tensors, save_report
from chaos_callbacks.callbacks import HessianSpectrumMonitor

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LightningModule.log.*")
warnings.filterwarnings("ignore", category=FutureWarning)
for _name in ("lightning.pytorch", "lightning.fabric", "lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)


class Classifier(pl.LightningModule):
    def __init__(self, net: nn.Module, lr: float) -> None:
        super().__init__()
        self.net = net
        self.lr = lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def make_net(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "mlp":
        return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    if name == "cnn":
        return bn_cnn(seed=0)
    raise SystemExit(f"unknown model {name!r} (choose mlp, cnn)")


class LoopTimer(pl.Callback):
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.t0, self.c0 = time.perf_counter(), cpu_clock()

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds, self.cpu = time.perf_counter() - self.t0, cpu_clock() - self.c0


class TimedMonitor(HessianSpectrumMonitor):
    """The monitor, with the wall time of its batch hook and its HVPs accumulated."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_seconds = 0.0
        self.estimates = 0
        self.hvps: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:  # type: ignore[override]
        t0 = cpu_clock()
        before = self.last_estimate
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.hook_seconds += cpu_clock() - t0
        if self.last_estimate is not before:
            self.estimates += 1
            self.hvps.append(self.last_estimate.get("hessian/hvps", float("nan")))


def run(model_name: str, dataset: TensorDataset, args: argparse.Namespace, monitor_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    pl.seed_everything(0, verbose=False)
    module = Classifier(make_net(model_name), lr=args.lr)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    timer = LoopTimer()
    callbacks: list[pl.Callback] = [timer]
    monitor = None if monitor_kwargs is None else TimedMonitor(**monitor_kwargs)
    if monitor is not None:
        callbacks.append(monitor)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=callbacks,
    )
    trainer.fit(module, loader)
    out = {"seconds": timer.seconds, "cpu": timer.cpu, "params": [p.detach().clone() for p in module.parameters()],
           "buffers": [b.detach().clone() for b in module.buffers()]}
    if monitor is not None:
        out.update(hook=monitor.hook_seconds, estimates=monitor.estimates, hvps=monitor.hvps, last=monitor.last_estimate)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--models", default="mlp,cnn")
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    parser.add_argument("--pairs", type=int, default=3, help="rounds; each runs every arm once, order alternating")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--configs", default="lambda_min=False",
                        help="extra monitor arms, ';'-separated, each 'key=value,...' (e.g. 'lambda_min=False;every_n_steps=200')")
    parser.add_argument("--train-n", type=int, default=60000, help="MNIST training images in the loader")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: list[str] = []
    emit(f"## bench_monitor_overhead (torch {torch.__version__}, Lightning {pl.__version__}, CPU, {args.threads} thread(s); "
         f"{args.steps} steps, batch {args.batch_size}, SGD momentum 0.9; HessianSpectrumMonitor() defaults)\n", out)
    x, y = mnist_tensors(args.data_root, args.train_n)
    dataset = TensorDataset(x, y)
    arms: list[tuple[str, dict[str, Any] | None]] = [("without", None), ("HessianSpectrumMonitor()", {})]
    for spec in filter(None, args.configs.split(";")):
        kwargs = {k: eval(v, {}) for k, v in (kv.split("=") for kv in spec.split(","))}  # e.g. lambda_min=False
        arms.append((f"HessianSpectrumMonitor({spec})", kwargs))
    rows = []
    for name in args.models.split(","):
        t0 = time.perf_counter()
        run(name, dataset, args, None)  # warm-up (imports, allocator, thread pool)
        results: dict[str, list[dict[str, Any]]] = {label: [] for label, _ in arms}
        for i in range(args.pairs):
            for label, kwargs in (arms if i % 2 == 0 else arms[::-1]):
                results[label].append(run(name, dataset, args, kwargs))
        without = results["without"]
        t_wo = median([r["cpu"] for r in without])
        step_s = t_wo / args.steps
        model_label = {"mlp": "MLP 784-256-10 (ReLU)", "cnn": "BN CNN conv8-BN-conv16-BN-GAP-fc"}[name]
        for label, kwargs in arms[1:]:
            with_ = results[label]
            ratios = [w["cpu"] / wo["cpu"] for w, wo in zip(with_, without)]
            wall = [w["seconds"] / wo["seconds"] for w, wo in zip(with_, without)]
            identical = all(
                all(torch.equal(a, b) for a, b in zip(w["params"] + w["buffers"], wo["params"] + wo["buffers"])) for w, wo in zip(with_, without)
            )
            hvps = [h for r in with_ for h in r["hvps"]]
            per_estimate = median([r["hook"] / max(r["estimates"], 1) for r in with_])
            cost_steps = per_estimate / step_s
            cadence = (kwargs or {}).get("every_n_steps", 50)
            rows.append([model_label, label, with_[0]["estimates"], f"{min(hvps):g}–{max(hvps):g} (median {median(hvps):g})", step_s * 1e3,
                         median(ratios), f"{min(ratios):.2f}–{max(ratios):.2f}", median(wall), cost_steps, 1 + cost_steps / cadence, cost_steps / 0.10, identical])
            print(f"[{name} {label}: per-round CPU ratios {[round(r, 3) for r in ratios]}, wall {[round(r, 3) for r in wall]}; last estimate {with_[-1]['last']}]", file=sys.stderr)
        print(f"[{name}: {time.perf_counter() - t0:.0f} s]", file=sys.stderr)
    emit(markdown_table(["model", "arm", "estimates / run", "HVPs per estimate", "CPU ms / step without", "CPU time with / without (median)",
                         "range over rounds", "wall time with / without (median)", "one estimate, in training steps", "predicted ratio (1 + cost / cadence)", "cadence for ≤ 1.10",
                         "weights bit-identical"], rows), out)
    emit(f"\nTarget: ratio ≤ 1.10. {args.pairs} rounds (arm order alternating) after one warm-up run; times are the training loop only "
         "(on_train_start → on_train_end), process CPU time unless marked wall (the machine is shared, so wall time also counts waiting for a core); "
         "'one estimate' = median CPU time in the monitor's hook per estimate / median CPU time per step without.", out)
    path = save_report("bench_monitor_overhead", out)
    print(f"\nwritten to {path.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
