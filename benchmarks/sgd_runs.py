"""Shared machinery of the SGD benchmarks and reproductions: one seeded Lightning run of
``chaos_callbacks.recipes.module.ClassificationModule`` with plain SGD on MNIST (or CIFAR-10, ``--dataset``), a
test-accuracy recorder, the curvature learning-rate modes, and a ``HessianSpectrumMonitor`` that
keeps the history of its estimates.

Used by ``benchmarks.bench_curvature_lr_mnist``, ``reproductions.chaos_theory`` and
``reproductions.principal_flow``. Not part of the package.
"""

from __future__ import annotations

import argparse
import math
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

import chaos_callbacks.callbacks.curvature_lr as curvature_lr_module
from benchmarks.common import DEFAULT_DATA_ROOT, quiet_lightning
from chaos_callbacks.callbacks.curvature_lr import CurvatureLRScheduler
from chaos_callbacks.callbacks.hessian_spectrum import HessianSpectrumMonitor
from chaos_callbacks.recipes.data import CIFAR10DataModule, ImageClassificationDataModule, MNISTDataModule
from chaos_callbacks.recipes.module import ClassificationModule

quiet_lightning()
warnings.filterwarnings("ignore", category=FutureWarning)

MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "mlp": {"model": "mlp", "widths": [256], "activation": "relu"},
    "lenet": {"model": "lenet", "activation": "relu"},
    "resnet20": {"model": "resnet20"},
}
MODEL_LABELS = {"mlp": "MLP 784-256-10 (ReLU)", "lenet": "LeNet-5 CNN (ReLU)", "resnet20": "ResNet-20 (BatchNorm)"}
IN_SHAPES = {"mnist": (1, 28, 28), "cifar10": (3, 32, 32)}

#: ``CurvatureLRScheduler`` modes by short name: (label, keyword arguments).
CURVATURE_METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "qn": ("quasi-Newton (1/λmax)", {"mode": "quasi_newton"}),
    "eos": ("EoS (0.9·2/λmax)", {"mode": "edge_of_stability", "fraction": 0.9}),
    "dal1": ("DAL p=1", {"mode": "dal", "power": 1.0}),
    "dal0.5": ("DAL p=0.5", {"mode": "dal", "power": 0.5}),
    "dal0": ("DAL p=0", {"mode": "dal", "power": 0.0}),
}


def add_sgd_args(parser: argparse.ArgumentParser, epochs: int, subset: int) -> None:
    """The data, budget and evaluation flags every MNIST SGD script shares."""
    parser.add_argument("--dataset", choices=sorted(IN_SHAPES), default="mnist")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help="folder holding MNIST/raw or cifar-10-batches-py")  # fmt: skip
    parser.add_argument("--accelerator", default="cpu", help="Lightning accelerator, e.g. auto or gpu")
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_KWARGS), default=["mlp", "lenet"], help="e.g. --models lenet")
    parser.add_argument("--epochs", type=int, default=epochs, help="training budget in epochs of the subset")
    parser.add_argument("--subset", type=int, default=subset, help="training examples (seeded subset)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--target", type=float, default=0.97, help="target test accuracy")
    parser.add_argument("--eval-every", type=int, default=50, help="evaluate the test accuracy every N optimizer steps")
    parser.add_argument("--eval-size", type=int, default=10_000, help="first N images of the 10k test set")
    parser.add_argument("--base-lr", type=float, default=0.1,
                        help="optimizer lr of the curvature runs (used only during --warmup-steps)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")


def load_data(args: argparse.Namespace) -> tuple[ImageClassificationDataModule, Tensor, Tensor]:
    """The seeded training subset and the first ``--eval-size`` test images and labels."""
    module = MNISTDataModule if args.dataset == "mnist" else CIFAR10DataModule
    dm = module(root=str(args.data_root), subset=args.subset, batch_size=args.batch_size, seed=args.seed)
    dm.setup("fit")
    return dm, dm.test_set.images[: args.eval_size], dm.test_set.targets[: args.eval_size]


# ----------------------------------------------------------------------------- instrumentation
class LanczosCounter:
    """Wraps the ``lanczos`` used by the callback module to record the HVPs of each call."""

    def __init__(self) -> None:
        self.calls: list[int] = []
        self._original = curvature_lr_module.lanczos

    def __enter__(self) -> LanczosCounter:
        def counted(*args: Any, **kwargs: Any) -> Any:
            result = self._original(*args, **kwargs)
            self.calls.append(int(result.num_matvecs))
            return result

        curvature_lr_module.lanczos = counted
        return self

    def __exit__(self, *exc: Any) -> None:
        curvature_lr_module.lanczos = self._original


class TimedCurvatureLR(CurvatureLRScheduler):
    """CurvatureLRScheduler that adds up the wall and CPU time spent in its per-step hook, its estimates
    and their Hessian-vector products."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_wall = 0.0
        self.hook_cpu = 0.0
        self.products: list[int] = []  # Hessian-vector products of each estimate

    @property
    def estimates(self) -> int:
        return len(self.products)

    @property
    def hvps(self) -> int:
        return sum(self.products)

    def on_train_batch_start(self, *args: Any) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        previous = self.last_estimate
        super().on_train_batch_start(*args)
        self.hook_wall += time.perf_counter() - wall
        self.hook_cpu += time.process_time() - cpu
        if self.last_estimate is not previous and "curvature_lr/hvps" in self.last_estimate:
            self.products.append(int(self.last_estimate["curvature_lr/hvps"]))


class RecordingMonitor(HessianSpectrumMonitor):
    """``HessianSpectrumMonitor`` that keeps ``(step, metrics)`` of every estimate it logs."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history: list[tuple[int, dict[str, float]]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        previous = self.last_estimate
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        if self.last_estimate is not previous:
            self.history.append((trainer.global_step, dict(self.last_estimate)))

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """Steps and values of ``key`` over the recorded estimates."""
        pairs = [(step, m[key]) for step, m in self.history if key in m]
        return [p[0] for p in pairs], [p[1] for p in pairs]


class Recorder(pl.Callback):
    """Training clock (evaluation excluded), the lr and training loss of every step, and the test
    accuracy every ``eval_every`` steps; stops the run when the training loss is non-finite."""

    def __init__(self, x_test: Tensor, y_test: Tensor, eval_every: int, total_steps: int, target: float) -> None:
        self.x_test, self.y_test = x_test, y_test
        self.eval_every, self.total_steps, self.target = eval_every, total_steps, target
        self.lrs: list[float] = []
        self.losses: list[float] = []
        self.evals: list[tuple[int, float, float, float]] = []  # (step, acc, train wall s, train cpu s)
        self.diverged_at: int | None = None
        self._start = (0.0, 0.0)
        self._paused = [0.0, 0.0]

    def train_time(self) -> tuple[float, float]:
        return (
            time.perf_counter() - self._start[0] - self._paused[0],
            time.process_time() - self._start[1] - self._paused[1],
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = (time.perf_counter(), time.process_time())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: Any) -> None:
        self.lrs.append(float(optimizer.param_groups[0]["lr"]))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        if loss is not None:
            self.losses.append(float(loss.detach()))
            if not math.isfinite(self.losses[-1]):
                self.diverged_at = step
                trainer.should_stop = True
                return
        if step % self.eval_every == 0 or step >= self.total_steps:
            self.evaluate(step, pl_module)

    def evaluate(self, step: int, pl_module: pl.LightningModule) -> None:
        wall, cpu = self.train_time()
        t0, c0 = time.perf_counter(), time.process_time()
        was_training = pl_module.training
        pl_module.eval()
        correct = 0
        with torch.no_grad():
            for i in range(0, len(self.y_test), 1000):
                logits = pl_module(self.x_test[i : i + 1000].to(pl_module.device))
                correct += int((logits.argmax(1).cpu() == self.y_test[i : i + 1000]).sum())
        pl_module.train(was_training)
        self.evals.append((step, correct / len(self.y_test), wall, cpu))
        self._paused[0] += time.perf_counter() - t0
        self._paused[1] += time.process_time() - c0


@dataclass
class RunResult:
    method: str
    const_lr: float | None
    steps: int
    wall: float  # training time (evaluation excluded), seconds
    cpu: float
    lrs: list[float]
    evals: list[tuple[int, float, float, float]]
    diverged_at: int | None
    target: float
    losses: list[float] = field(default_factory=list)
    hook_wall: float = 0.0
    hook_cpu: float = 0.0
    estimates: int = 0
    hvps: list[int] = field(default_factory=list)
    skipped: int = 0
    last_lambda: float = math.nan
    order: int = 0
    warmup: int = 0  # steps at the optimizer's own rate before the callback sets it

    @property
    def used_lrs(self) -> list[float]:
        """The rates of the steps after the warm-up (the ones the method chose)."""
        return self.lrs[self.warmup :] or self.lrs

    @property
    def reached(self) -> tuple[int, float, float] | None:
        for step, acc, wall, cpu in self.evals:
            if acc >= self.target:
                return step, wall, cpu
        return None

    @property
    def final_acc(self) -> float:
        return self.evals[-1][1] if self.evals and self.diverged_at is None else math.nan

    @property
    def best_acc(self) -> float:
        return max((e[1] for e in self.evals), default=math.nan)


def train_once(
    model: str, dm: ImageClassificationDataModule, x_test: Tensor, y_test: Tensor, args: argparse.Namespace,
    method: str, const_lr: float | None, cb_kwargs: dict[str, Any] | None,
    extra_callbacks: Sequence[pl.Callback] = (),
) -> RunResult:  # fmt: skip
    """Train ``model`` for ``args.epochs`` epochs with plain SGD at ``const_lr``, or with a
    ``CurvatureLRScheduler(**cb_kwargs)`` setting the rate; ``extra_callbacks`` run before the
    recorder. Every run starts from the same seeded weights and sees the same batches."""
    total_steps = args.epochs * (len(dm.train_set) // args.batch_size)
    pl.seed_everything(args.seed, verbose=False)
    module = ClassificationModule(10, IN_SHAPES[args.dataset], optimizer="sgd", lr=const_lr or args.base_lr, **MODEL_KWARGS[model])
    recorder = Recorder(x_test, y_test, args.eval_every, total_steps, args.target)
    scheduler = TimedCurvatureLR(**cb_kwargs) if cb_kwargs is not None else None
    trainer = pl.Trainer(
        accelerator=args.accelerator,
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        callbacks=([scheduler] if scheduler is not None else []) + list(extra_callbacks) + [recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    # the datamodule's loader keeps the last partial batch (20000 = 156·128 + 32): a 32-example step at
    # the full rate is ~2× noisier and, being the very last step of the budget, it can knock the final
    # accuracy down by several points; drop it (same seeded order for every run)
    loader = DataLoader(dm.train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))  # fmt: skip
    with LanczosCounter() as counter:
        trainer.fit(module, train_dataloaders=loader)
    wall, cpu = recorder.train_time()
    result = RunResult(
        method, const_lr, trainer.global_step, wall, cpu, recorder.lrs, recorder.evals, recorder.diverged_at,
        args.target, losses=recorder.losses,
    )  # fmt: skip
    if scheduler is not None:
        result.warmup = scheduler.warmup_steps
        result.hook_wall, result.hook_cpu = scheduler.hook_wall, scheduler.hook_cpu
        rate = scheduler._rates[0]
        result.estimates = rate.num_estimates
        result.hvps = counter.calls if counter.calls else list(scheduler.products)  # dal: no Lanczos, its own products
        result.skipped = scheduler._warn.count
        result.last_lambda = float(rate.curvature) if rate.curvature is not None else math.nan
    return result


def pick_reference(consts: list[RunResult]) -> RunResult:
    """Fewest steps to target; among equals (or if none reached) the highest final accuracy."""

    def key(r: RunResult) -> tuple[float, float]:
        reached = r.reached
        final = r.final_acc
        return (reached[0] if reached else math.inf, -(0.0 if math.isnan(final) else final))

    return min(consts, key=key)
