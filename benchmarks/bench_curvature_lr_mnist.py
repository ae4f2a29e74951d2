"""CurvatureLRScheduler on real MNIST: time to 97 % test accuracy against a constant-learning-rate sweep.

For each model (MLP 784-256-10 ReLU; ``lenet``, the LeNet-5-style CNN of ``recipes.models``),
``recipes.module.ClassificationModule`` is trained by Lightning on the CPU with plain SGD (no
momentum, no weight decay), batch 128, on a fixed, seeded ``--subset`` of the MNIST training set
(``recipes.data.MNISTDataModule``; the last partial batch of each epoch is dropped), for
``--epochs`` epochs. Every run starts from the same initial weights and sees the same batches in
the same order. Compared:

* constant learning rates ``--lrs`` (the sweep; its best member is the reference: fewest steps to
  the target accuracy, ties and never-reached broken by the final accuracy);
* ``CurvatureLRScheduler`` in mode ``quasi_newton`` (lr = 1/λ_max), ``edge_of_stability``
  (fraction 0.9: lr = 0.9·2/λ_max for plain SGD) and ``dal`` with p = 1 and p = 0.5
  (lr = 2/v^p, v = ‖Hg‖/‖g‖), by default at the callback's defaults (estimate every 10 steps on
  the current batch, no smoothing, no warm-up, no lr bounds, Lanczos tol 1e-2 within 50 HVPs);
  ``--max-lr``, ``--warmup-steps`` and ``--ema`` set those guards for all curvature runs.

Every ``--eval-every`` optimizer steps (and after the last one) the test accuracy is measured on
the first ``--eval-size`` images of the official 10k test set (outside the timed training time).
Reported per run: the learning rate actually used (median over the steps, the last one, and for
the curvature runs its range), the first evaluated step at which the test accuracy reached
``--target`` (steps to target have a resolution of ``--eval-every``) and the training time until
then (wall clock and process CPU time, evaluation excluded), the final and best test accuracy, and
the overhead of the curvature estimates: within each run, its CPU time over its CPU time minus the
time spent in the callback's hook (immune to load drift on a shared machine), and across runs, the
wall time per step over that of the constant-lr runs just before and after it (runs alternate).
A second table gives the estimates' cost: number, HVPs per estimate, skipped ones, CPU ms per
estimate and per step. A run whose training loss turns non-finite is stopped and reported as
diverged. Single seed: differences of a few tenths of a percent in accuracy are within noise.

Run from the repository root:
    .venv/bin/python benchmarks/bench_curvature_lr_mnist.py [--models mlp lenet] [--epochs 3]
        [--subset 20000] [--lrs 0.01 0.03 0.1 0.3 1.0] [--eval-every 50] [--eval-size 10000]
        [--methods qn eos dal1 dal0.5] [--every 10] [--max-lr X] [--warmup-steps N] [--ema E]
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a plain script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lightning.pytorch as pl
import torch
from torch import Tensor
from torch.utils.data import DataLoader

import chaos_callbacks.callbacks.curvature_lr as curvature_lr_module
from benchmarks.common import emit, markdown_table, save_report
from chaos_callbacks.callbacks.curvature_lr import CurvatureLRScheduler
from recipes.data import MNISTDataModule
from recipes.module import ClassificationModule

DEFAULT_DATA_ROOT = Path(__file__).resolve().parents[1].parent / "shared" / "data"

warnings.filterwarnings("ignore", ".*does not have many workers.*")
warnings.filterwarnings("ignore", ".*LightningModule.log.*")
warnings.filterwarnings("ignore", category=FutureWarning)
for _name in ("lightning.pytorch", "lightning.fabric", "lightning"):
    logging.getLogger(_name).setLevel(logging.ERROR)

MODEL_KWARGS: dict[str, dict[str, Any]] = {
    "mlp": {"model": "mlp", "widths": [256], "activation": "relu"},
    "lenet": {"model": "lenet", "activation": "relu"},
}
MODEL_LABELS = {"mlp": "MLP 784-256-10 (ReLU)", "lenet": "LeNet-5 CNN (ReLU)"}


# ----------------------------------------------------------------------------- HVP counting
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
    """CurvatureLRScheduler that adds up the wall and CPU time spent in its per-step hook."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.hook_wall = 0.0
        self.hook_cpu = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        super().on_train_batch_start(*args)
        self.hook_wall += time.perf_counter() - wall
        self.hook_cpu += time.process_time() - cpu


# ----------------------------------------------------------------------------- recording
class Recorder(pl.Callback):
    """Training clock (evaluation excluded), the lr of every step, and the test accuracy every
    ``eval_every`` steps; stops the run when the training loss is non-finite."""

    def __init__(self, x_test: Tensor, y_test: Tensor, eval_every: int, total_steps: int, target: float) -> None:
        self.x_test, self.y_test = x_test, y_test
        self.eval_every, self.total_steps, self.target = eval_every, total_steps, target
        self.lrs: list[float] = []
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
        if loss is not None and not bool(torch.isfinite(loss.detach()).all()):
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
                logits = pl_module(self.x_test[i : i + 1000])
                correct += int((logits.argmax(1) == self.y_test[i : i + 1000]).sum())
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
        return self.evals[-1][1] if self.evals else math.nan

    @property
    def best_acc(self) -> float:
        return max((e[1] for e in self.evals), default=math.nan)


def train_once(
    model: str, dm: MNISTDataModule, x_test: Tensor, y_test: Tensor, args: argparse.Namespace,
    method: str, const_lr: float | None, cb_kwargs: dict[str, Any] | None,
) -> RunResult:  # fmt: skip
    total_steps = args.epochs * (len(dm.train_set) // args.batch_size)
    pl.seed_everything(args.seed, verbose=False)
    module = ClassificationModule(10, (1, 28, 28), optimizer="sgd", lr=const_lr or args.base_lr, **MODEL_KWARGS[model])
    recorder = Recorder(x_test, y_test, args.eval_every, total_steps, args.target)
    scheduler = TimedCurvatureLR(**cb_kwargs) if cb_kwargs is not None else None
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=args.epochs,
        logger=False,
        callbacks=([scheduler] if scheduler is not None else []) + [recorder],
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
                        generator=torch.Generator().manual_seed(args.seed))
    with LanczosCounter() as counter:
        trainer.fit(module, train_dataloaders=loader)
    steps = trainer.global_step
    wall, cpu = recorder.train_time()
    result = RunResult(method, const_lr, steps, wall, cpu, recorder.lrs, recorder.evals, recorder.diverged_at, args.target)
    if scheduler is not None:
        result.warmup = scheduler.warmup_steps
        result.hook_wall, result.hook_cpu = scheduler.hook_wall, scheduler.hook_cpu
        result.estimates = scheduler._num_estimates
        result.hvps = counter.calls if counter.calls else [1] * scheduler._num_estimates  # dal: one HVP per estimate
        result.skipped = scheduler._warn.count
        result.last_lambda = float(scheduler._curvature) if scheduler._curvature is not None else math.nan
    return result


def describe(r: RunResult) -> str:
    reached = r.reached
    tail = f"{reached[0]} steps / {reached[1]:.1f} s" if reached else "not reached"
    lr = statistics.median(r.used_lrs) if r.lrs else math.nan
    div = f", DIVERGED at step {r.diverged_at}" if r.diverged_at is not None else ""
    return f"  {r.method:>22}: median lr {lr:.4g}, {args_target_pct(r.target)}: {tail}, final acc {r.final_acc:.4f}{div}"


def args_target_pct(target: float) -> str:
    return f"{100 * target:g}%"


def pick_reference(consts: list[RunResult]) -> RunResult:
    """Fewest steps to target; among equals (or if none reached) the highest final accuracy."""

    def key(r: RunResult) -> tuple[float, float]:
        reached = r.reached
        return (reached[0] if reached else math.inf, -(r.final_acc if r.diverged_at is None else 0.0))

    return min(consts, key=key)


def adjacent_const_ratio(r: RunResult, runs: list[RunResult]) -> float:
    """Wall time per step of ``r`` / mean of the constant-lr runs just before and after it in run order."""
    consts = sorted((c for c in runs if c.const_lr is not None and c.steps > 0), key=lambda c: c.order)
    before = [c for c in consts if c.order < r.order][-1:]
    after = [c for c in consts if c.order > r.order][:1]
    neighbours = before + after
    if not neighbours or r.steps == 0:
        return math.nan
    return (r.wall / r.steps) / statistics.mean(c.wall / c.steps for c in neighbours)


def model_tables(runs: list[RunResult], reference: RunResult, target: float) -> tuple[str, str]:
    pct = args_target_pct(target)
    rows = []
    for r in runs:
        reached = r.reached
        curvature = r.const_lr is None
        lr_med = statistics.median(r.used_lrs) if r.lrs else math.nan
        lr_range = f"{min(r.used_lrs):.3g}–{max(r.used_lrs):.3g}" if r.lrs and curvature else "–"
        name = r.method + (" (ref)" if r is reference else "") + (f" DIVERGED@{r.diverged_at}" if r.diverged_at is not None else "")
        rows.append([
            name, lr_med, r.lrs[-1] if r.lrs else math.nan, lr_range,
            reached[0] if reached else "not reached", reached[1] if reached else math.nan,
            reached[2] if reached else math.nan, r.final_acc if r.diverged_at is None else "nan (diverged)",
            r.best_acc, 1e3 * r.wall / max(r.steps, 1),
            r.cpu / (r.cpu - r.hook_cpu) if curvature else 1.0,
            adjacent_const_ratio(r, runs) if curvature else math.nan,
        ])  # fmt: skip
    headers = [
        "method", "median lr", "final lr", "lr range", f"steps to {pct}", f"wall s to {pct}", f"CPU s to {pct}",
        "final test acc", "best test acc", "wall ms/step", "overhead (in-run, CPU)", "overhead (vs adjacent const, wall)",
    ]  # fmt: skip
    main = markdown_table(headers, rows)
    crow = []
    for r in runs:
        if r.const_lr is not None:
            continue
        n = max(r.estimates, 1)
        crow.append([
            r.method, r.estimates, statistics.mean(r.hvps) if r.hvps else math.nan, r.skipped,
            1e3 * r.hook_cpu / n, 1e3 * r.hook_cpu / max(r.steps, 1), 1e3 * (r.cpu - r.hook_cpu) / max(r.steps, 1),
            r.hook_cpu / r.cpu if r.cpu > 0 else math.nan, r.last_lambda,
        ])  # fmt: skip
    cheaders = [
        "method", "estimates", "HVPs/estimate", "skipped", "hook CPU ms/estimate", "hook CPU ms/step",
        "rest of step CPU ms/step", "hook share of CPU", "last curvature (λmax or v)",
    ]  # fmt: skip
    return main, markdown_table(cheaders, crow)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder holding MNIST/raw")
    parser.add_argument("--models", nargs="+", choices=sorted(MODEL_KWARGS), default=["mlp", "lenet"], help="e.g. --models lenet")
    parser.add_argument("--epochs", type=int, default=3, help="training budget in epochs of the subset")
    parser.add_argument("--subset", type=int, default=20_000, help="training examples (seeded subset)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0], help="constant-lr sweep")
    parser.add_argument("--methods", nargs="+", default=["qn", "eos", "dal1", "dal0.5"], choices=["qn", "eos", "dal1", "dal0.5"])
    parser.add_argument("--every", type=int, default=10, help="every_n_steps of CurvatureLRScheduler")
    parser.add_argument("--base-lr", type=float, default=0.1,
                        help="optimizer lr of the curvature runs (used only during --warmup-steps; with none, step 0 already takes the curvature rate)")
    parser.add_argument("--max-lr", type=float, default=None, help="max_lr of the curvature runs (default: none, the callback's default)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="warmup_steps of the curvature runs (at --base-lr)")
    parser.add_argument("--ema", type=float, default=0.0, help="ema (curvature smoothing) of the curvature runs")
    parser.add_argument("--target", type=float, default=0.97, help="target test accuracy")
    parser.add_argument("--eval-every", type=int, default=50, help="evaluate the test accuracy every N optimizer steps")
    parser.add_argument("--eval-size", type=int, default=10_000, help="first N images of the 10k test set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--report", default="bench_curvature_lr_mnist", help="name of the Markdown copy in benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dm = MNISTDataModule(root=str(args.data_root), subset=args.subset, batch_size=args.batch_size, seed=args.seed)
    dm.setup("fit")
    x_test, y_test = dm.test_set.images[: args.eval_size], dm.test_set.targets[: args.eval_size]
    methods = {
        "qn": ("quasi-Newton (1/λmax)", {"mode": "quasi_newton"}),
        "eos": ("EoS (0.9·2/λmax)", {"mode": "edge_of_stability", "fraction": 0.9}),
        "dal1": ("DAL p=1", {"mode": "dal", "power": 1.0}),
        "dal0.5": ("DAL p=0.5", {"mode": "dal", "power": 0.5}),
    }
    steps_per_epoch = len(dm.train_set) // args.batch_size
    out: list[str] = []
    emit(f"# CurvatureLRScheduler vs constant-lr SGD on MNIST (time to {args_target_pct(args.target)} test accuracy)\n", out)
    emit(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); train subset {len(dm.train_set)}, batch "
        f"{args.batch_size}, {args.epochs} epochs = {args.epochs * steps_per_epoch} steps; plain SGD; test accuracy on "
        f"{len(y_test)} test images every {args.eval_every} steps; curvature estimates every {args.every} steps "
        f"on the current batch (max_lr={args.max_lr}, warmup_steps={args.warmup_steps}, ema={args.ema}); "
        f"last partial batch dropped; seed {args.seed}.\n",
        out,
    )
    for model in args.models:
        print(f"{MODEL_LABELS[model]}:", flush=True)
        runs: list[RunResult] = []
        # interleave the constant-lr and curvature runs so that load drifts hit both alike
        queue: list[tuple[str, float | None, dict[str, Any] | None]] = [(f"const lr={lr:g}", lr, None) for lr in args.lrs]
        guard = {"max_lr": args.max_lr, "warmup_steps": args.warmup_steps, "ema": args.ema}
        curv = [(methods[m][0], None, {"every_n_steps": args.every, **guard, **methods[m][1]}) for m in args.methods]
        order = []
        for i in range(max(len(queue), len(curv))):
            order += queue[i : i + 1] + curv[i : i + 1]
        for index, (method, lr, kwargs) in enumerate(order):
            r = train_once(model, dm, x_test, y_test, args, method, lr, kwargs)
            r.order = index
            runs.append(r)
            print(describe(r), flush=True)
        runs.sort(key=lambda r: (r.const_lr is None, r.const_lr or 0.0))
        reference = pick_reference([r for r in runs if r.const_lr is not None])
        main_table, cost_table = model_tables(runs, reference, args.target)
        emit(f"\n## {MODEL_LABELS[model]}\n", out)
        emit(main_table, out)
        emit(f"\nCost of the curvature estimates ({MODEL_LABELS[model]}):\n", out)
        emit(cost_table, out)
        ref_lr = reference.const_lr
        notes = [f"\nReference (best constant lr): {ref_lr:g}."]
        for r in runs:
            if r.const_lr is None and r.lrs:
                med = statistics.median(r.used_lrs)
                notes.append(f"{r.method}: median lr {med:.3g} = {med / ref_lr:.2f}× the reference.")
        emit(" ".join(notes), out)
    emit(
        "\nSteps to target: first evaluation (every --eval-every steps) at or above the target. Times: training "
        "time from train start, evaluation excluded. median lr, lr range: median and min–max of the rate over the "
        "steps after any warm-up (the rates the method chose). Overhead (in-run, "
        "CPU): process CPU time of the run / (that time − CPU time inside the callback's hook), i.e. the cost per "
        "step relative to the same run without the estimates, measured within one run (immune to load drift). "
        "Overhead (vs adjacent const, wall): wall time per step / mean of the constant-lr runs run just before and "
        "after it (runs alternate constant/curvature; noisy on a shared machine). Hook CPU: time inside the "
        "callback's on_train_batch_start (HessianOperator build + Lanczos or one HVP + rate update), per estimate "
        "and per step. HVPs/estimate: Lanczos products (DAL: 1 by construction).",
        out,
    )
    path = save_report(args.report, out)
    print(f"\nsaved {path}")


if __name__ == "__main__":
    main()
