"""CurvatureLRScheduler against a learning-rate sweep (issue 17): does a curvature rate from a poor start
match the best constant rate a sweep would have found?

Three tasks on MNIST, each ``chaos_callbacks.recipes.module.ClassificationModule`` trained by Lightning on
the CPU, batch ``--batch-size``, on a seeded ``--subset`` of the training set for ``--epochs`` epochs (last
partial batch dropped; every run of one seed starts from the same weights and sees the same batches):

* ``mlp``: MLP 784-256-10 (ReLU) with plain SGD;
* ``lenet``: the LeNet-5-style CNN of ``chaos_callbacks.recipes.models`` (ReLU) with SGD momentum 0.9;
* ``resnet``: a CIFAR ResNet with BatchNorm (``CifarResNet``, depth ``--resnet-depth``, default 8 = one
  block per stage, 75k parameters) on MNIST padded 28→32 with the background value, with AdamW
  (weight decay 0.01, torch's default).

``ClassificationModule`` has neither AdamW, nor padding, nor a scheduler: ``SweepModule`` below (a subclass)
adds them. Rows per task:

* ``const lr=…``: the constant-rate sweep ``--lrs`` (default: 6 points geometric 0.003 … 1.0, the issue's
  grid, for every task; ``--adamw-lrs`` gives the AdamW task its own grid);
* ``cosine``: ``CosineAnnealingLR`` over the whole run from the best sweep rate (by mean final accuracy);
* ``ours``: ``CurvatureLRScheduler(**variant)`` (default: no arguments, the callback's defaults) with the
  optimizer built at the task's poor initial rate (``--poor-lr``; defaults 1e-3 for SGD, 1e-4 for AdamW);
* ``ours + cosine``: the same with the user's ``CosineAnnealingLR`` in ``configure_optimizers`` (composed:
  the curvature sets the scale, the cosine its shape).

``--variant 'mode="edge_of_stability",fraction=0.5,ema=0.9'`` (repeatable) replaces the default variant by
the listed ``CurvatureLRScheduler`` arguments (Python literals); ``--methods`` selects row kinds (e.g.
``--methods ours`` to try variants without re-running the sweep).

Columns: the final test accuracy on the first ``--eval-size`` test images (mean over ``--seeds``, ± the
standard deviation when there are several), the rate used (constant, or median over the steps of a
curvature run with its min–max), the gap to the best sweep point in points of accuracy (positive = below
it), the cost ratio (training wall and CPU time, evaluation excluded, over the median of the task's
non-diverged constant runs of the same seed; then averaged over seeds), the cost in run (CPU time of the
run over its CPU time outside the scheduler's per-step hook: the overhead as a ratio within one run, free of
the 5–10 % run-to-run spread of the training steps' own CPU time), and divergence: a run whose training
loss turns non-finite is stopped and evaluated as it is (≈ chance accuracy), marked ``DIVERGED k/n``; one
that ends below 20 % accuracy with a finite loss is marked ``at chance k/n``; one ended by an exception
(e.g. a rate beyond float32, which ``torch.optim.SGD`` refuses) is evaluated as it is and marked ``CRASHED k/n``.
``skipped``: curvature estimates the callback held the rate over (Lanczos not converged, etc.).

Run from the repository root (default: one seed, 10k images, 2 epochs, 2k test images; ``--full``: seeds
0 1 2, 3 epochs, the 10k test images — the issue's comparison):
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_lr_sweep [--tasks mlp lenet resnet] [--full]
        [--seeds 0 1 2] [--subset 10000] [--epochs 2] [--variant 'mode="edge_of_stability"'] [--methods ours]
"""

from __future__ import annotations

import argparse
import ast
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

from benchmarks.common import DEFAULT_DATA_ROOT, MNIST_MEAN, MNIST_STD, emit, markdown_table, save_report
from benchmarks.sgd_runs import MODEL_KWARGS, Recorder, TimedCurvatureLR, load_data
from chaos_callbacks.recipes.models import CifarResNet
from chaos_callbacks.recipes.module import ClassificationModule

ISSUE_GRID = [0.003 * (1.0 / 0.003) ** (i / 5) for i in range(6)]  # 0.003 … 1.0, geometric
BACKGROUND = -MNIST_MEAN / MNIST_STD  # a black pixel after normalisation: the padding value
CHANCE = 0.2  # a final accuracy below it (10 classes) marks a run that collapsed without a non-finite loss


@dataclass(frozen=True)
class Task:
    label: str
    model: str
    optimizer: str  # "sgd" or "adamw"
    momentum: float
    pad: int  # pixels added on each side
    poor_lr: float


TASKS: dict[str, Task] = {
    "mlp": Task("MLP 784-256-10 (ReLU), SGD", "mlp", "sgd", 0.0, 0, 1e-3),
    "lenet": Task("LeNet-5 CNN (ReLU), SGD momentum 0.9", "lenet", "sgd", 0.9, 0, 1e-3),
    "resnet": Task("ResNet (BatchNorm) on MNIST padded to 32×32, AdamW", "resnet", "adamw", 0.0, 2, 1e-4),
}


class SweepModule(ClassificationModule):
    """``ClassificationModule`` with what the sweep needs and it lacks: AdamW, zero-background padding of the
    inputs (28→32 for the ResNet) and an optional per-step ``CosineAnnealingLR`` over ``cosine_steps``."""

    def __init__(self, task: Task, lr: float, cosine_steps: int | None, resnet_depth: int) -> None:
        side = 28 + 2 * task.pad
        if task.model == "resnet":
            super().__init__(10, (1, side, side), model="linear", lr=lr)
            self.model = CifarResNet(1, 10, resnet_depth, residual=True, activation="relu", batch_norm=True, bias=True)
        else:
            super().__init__(10, (1, side, side), lr=lr, momentum=task.momentum, **MODEL_KWARGS[task.model])
        self.task, self.cosine_steps = task, cosine_steps

    def forward(self, x: Tensor) -> Tensor:
        if self.task.pad:
            x = F.pad(x, (self.task.pad,) * 4, value=BACKGROUND)
        return super().forward(x)

    def configure_optimizers(self) -> Any:
        if self.task.optimizer == "adamw":
            optimizer: torch.optim.Optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr)
        else:
            optimizer = torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.task.momentum)
        if self.cosine_steps is None:
            return optimizer
        cosine = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=self.cosine_steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": cosine, "interval": "step"}}


@dataclass
class Run:
    method: str
    seed: int
    acc: float
    wall: float
    cpu: float
    lrs: list[float]
    diverged_at: int | None
    const_lr: float | None = None
    skipped: int = 0
    estimates: int = 0
    hvps: int = 0  # Hessian-vector products of all estimates
    hook_cpu: float = 0.0  # CPU seconds inside the scheduler's per-step hook (its estimates and rate setting)
    crashed: str | None = None  # the exception that ended the run (e.g. a rate that overflows float32)


@dataclass
class Row:
    """One method of one task over the seeds."""

    method: str
    runs: list[Run] = field(default_factory=list)

    @property
    def accs(self) -> list[float]:
        return [r.acc for r in self.runs]

    @property
    def mean_acc(self) -> float:
        return statistics.mean(self.accs)

    @property
    def diverged(self) -> int:
        return sum(r.diverged_at is not None for r in self.runs)

    def failures(self) -> str:
        """``CRASHED k/n`` (an exception ended the run), ``DIVERGED k/n`` (non-finite loss), ``at chance k/n``
        (finite loss, final accuracy < 20 %), or ``no``."""
        n = len(self.runs)
        crashed = sum(r.crashed is not None for r in self.runs)
        chance = sum(r.crashed is None and r.diverged_at is None and r.acc < CHANCE for r in self.runs)
        marks = [f"CRASHED {crashed}/{n}"] * bool(crashed) + [f"DIVERGED {self.diverged}/{n}"] * bool(self.diverged)
        marks += [f"at chance {chance}/{n}"] * bool(chance)
        return ", ".join(marks) or "no"


def train(task: Task, dm: Any, x_test: Tensor, y_test: Tensor, args: argparse.Namespace, seed: int,
          method: str, lr: float, cosine: bool, cb_kwargs: dict[str, Any] | None) -> Run:  # fmt: skip
    """One seeded run of ``task`` at optimizer rate ``lr``, optionally with the cosine schedule and/or a
    ``CurvatureLRScheduler(**cb_kwargs)``; evaluated once, after the last step (or when it diverged)."""
    steps = args.epochs * (len(dm.train_set) // args.batch_size)
    pl.seed_everything(seed, verbose=False)
    module = SweepModule(task, lr, steps if cosine else None, args.resnet_depth)
    recorder = Recorder(x_test, y_test, eval_every=steps, total_steps=steps, target=1.0)
    scheduler = TimedCurvatureLR(**cb_kwargs) if cb_kwargs is not None else None
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False,
        callbacks=([scheduler] if scheduler is not None else []) + [recorder],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        num_sanity_val_steps=0, limit_val_batches=0,
    )  # fmt: skip
    loader = DataLoader(dm.train_set, batch_size=args.batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))  # fmt: skip
    crashed = None
    try:
        trainer.fit(module, train_dataloaders=loader)
    except RuntimeError as exc:  # reported as a failure of the method, the benchmark goes on
        crashed = f"{type(exc).__name__} at step {trainer.global_step}: {exc}"
        print(f"  CRASHED: {crashed}", flush=True)
    wall, cpu = recorder.train_time()
    if not recorder.evals:  # stopped early (diverged or crashed): what the user would be left with
        recorder.evaluate(trainer.global_step, module)
    run = Run(method, seed, recorder.evals[-1][1], wall, cpu, recorder.lrs, recorder.diverged_at,
              const_lr=None if cb_kwargs is not None or cosine else lr, crashed=crashed)  # fmt: skip
    if scheduler is not None:
        run.skipped, run.estimates, run.hvps = scheduler._warn.count, scheduler.estimates, scheduler.hvps
        run.hook_cpu = scheduler.hook_cpu
    return run


def parse_variant(text: str) -> dict[str, Any]:
    """``'mode="edge_of_stability",fraction=0.5'`` → keyword arguments (values are Python literals)."""
    call = ast.parse(f"f({text})", mode="eval").body
    assert isinstance(call, ast.Call)
    return {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords if kw.arg is not None}


def variant_name(kwargs: dict[str, Any]) -> str:
    return "ours(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()) + ")" if kwargs else "ours (defaults)"


def cost_ratios(row: Row, consts: list[Row]) -> tuple[float, float]:
    """Mean over seeds of (wall, CPU) of ``row``'s run over the median of the same seed's constant runs."""
    walls, cpus = [], []
    for run in row.runs:
        base = [r for c in consts for r in c.runs if r.seed == run.seed and r.diverged_at is None]
        if base:
            walls.append(run.wall / statistics.median(r.wall for r in base))
            cpus.append(run.cpu / statistics.median(r.cpu for r in base))
    return (statistics.mean(walls), statistics.mean(cpus)) if walls else (math.nan, math.nan)


def in_run_cost(row: Row) -> float:
    """Mean over seeds of the run's CPU time over the same run's CPU time outside the scheduler's hook: the
    overhead as a ratio within one run, free of the run-to-run spread of the training steps' own time."""
    ratios = [r.cpu / (r.cpu - r.hook_cpu) for r in row.runs if r.hook_cpu > 0]
    return statistics.mean(ratios) if ratios else math.nan


def lr_cells(row: Row) -> tuple[Any, str]:
    """The rate used: the constant, else the median over all steps of all seeds, and its min–max."""
    lrs = [lr for r in row.runs for lr in r.lrs]
    if not lrs:
        return math.nan, "–"
    if row.runs[0].const_lr is not None:
        return row.runs[0].const_lr, "–"
    return statistics.median(lrs), f"{min(lrs):.3g}–{max(lrs):.3g}"


def task_table(rows: list[Row], consts: list[Row], best: Row | None) -> str:
    best_acc = best.mean_acc if best is not None else math.nan
    table = []
    for row in rows:
        accs = row.accs
        acc = f"{100 * row.mean_acc:.2f}" + (f" ± {100 * statistics.stdev(accs):.2f}" if len(accs) > 1 else "")
        lr_med, lr_range = lr_cells(row)
        wall, cpu = cost_ratios(row, consts) if row not in consts else (math.nan, math.nan)
        curv = row.runs[0].estimates > 0 or row.method.startswith("ours")
        table.append([
            row.method + (" (best)" if row is best else ""), lr_med, lr_range, acc, 100 * best_acc,
            100 * (best_acc - row.mean_acc), wall, cpu, in_run_cost(row) if curv else "–",
            row.failures(),
            sum(r.skipped for r in row.runs) if curv else "–",
            f"{statistics.mean(r.estimates for r in row.runs):.3g} ({statistics.mean(r.hvps for r in row.runs):.3g})" if curv else "–",
        ])  # fmt: skip
    headers = ["method", "lr (median used)", "lr range", "final test acc %", "best sweep acc %",
               "gap to best (points)", "cost ratio (wall)", "cost ratio (CPU)", "cost in run (CPU)", "diverged", "skipped estimates",
               "estimates (products) per run"]  # fmt: skip
    return markdown_table(headers, table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data-root", default=str(DEFAULT_DATA_ROOT), help="folder holding MNIST/raw")
    parser.add_argument("--tasks", nargs="+", choices=sorted(TASKS), default=list(TASKS))
    parser.add_argument("--full", action="store_true", help="the issue's comparison: seeds 0 1 2, 3 epochs, 10k test images")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 (--full: 0 1 2)")
    parser.add_argument("--subset", type=int, default=10_000, help="training images (seeded subset)")
    parser.add_argument("--epochs", type=int, default=None, help="default: 2 (--full: 3)")
    parser.add_argument("--eval-size", type=int, default=None, help="first N test images; default 2000 (--full: 10000)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lrs", type=float, nargs="+", default=ISSUE_GRID, help="constant-rate sweep (default: geometric 0.003 … 1.0, 6 points)")
    parser.add_argument("--adamw-lrs", type=float, nargs="+", default=None, help="sweep of the AdamW task (default: --lrs)")
    parser.add_argument("--poor-lr", type=float, default=None, help="initial optimizer rate of the 'ours' runs (default: 1e-3 SGD, 1e-4 AdamW)")
    parser.add_argument("--variant", action="append", default=None, metavar="ARGS",
                        help="CurvatureLRScheduler keyword arguments, e.g. 'mode=\"edge_of_stability\",ema=0.9' (repeatable; default: none = defaults)")  # fmt: skip
    parser.add_argument("--methods", nargs="+", choices=["sweep", "cosine", "ours", "ours_cosine"],
                        default=["sweep", "cosine", "ours", "ours_cosine"])  # fmt: skip
    parser.add_argument("--resnet-depth", type=int, default=8, help="6n+2 layers of the ResNet task")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--report", default="bench_lr_sweep", help="name of the Markdown copy in benchmarks/results/")
    args = parser.parse_args()
    args.seeds = args.seeds or ([0, 1, 2] if args.full else [0])
    args.epochs = args.epochs or (3 if args.full else 2)
    args.eval_size = args.eval_size or (10_000 if args.full else 2_000)
    args.dataset = "mnist"
    variants = [parse_variant(v) for v in args.variant] if args.variant else [{}]
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    out: list[str] = []
    steps = args.epochs * (args.subset // args.batch_size)
    emit("# CurvatureLRScheduler vs a constant learning-rate sweep on MNIST (issue 17)\n", out)
    emit(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); train subset {args.subset}, batch "
         f"{args.batch_size}, {args.epochs} epochs = {steps} steps; test accuracy on the first {args.eval_size} "
         f"test images after the last step; seeds {args.seeds}; sweep {[float(f'{lr:.3g}') for lr in args.lrs]}"
         + (f" (AdamW: {args.adamw_lrs})" if args.adamw_lrs else "") + ".\n", out)  # fmt: skip
    summary = []
    data: dict[int, tuple[Any, Tensor, Tensor]] = {}
    for name in args.tasks:
        task = TASKS[name]
        poor = args.poor_lr or task.poor_lr
        grid = args.adamw_lrs if task.optimizer == "adamw" and args.adamw_lrs else args.lrs
        label = task.label.replace("ResNet", f"ResNet-{args.resnet_depth}")
        print(f"\n{label}:", flush=True)
        consts = [Row(f"const lr={lr:.3g}") for lr in grid] if "sweep" in args.methods else []
        for seed in args.seeds:
            if seed not in data:
                args.seed = seed
                data[seed] = load_data(args)
            for lr, row in zip(grid, consts):
                row.runs.append(train(task, *data[seed], args, seed, row.method, lr, False, None))
                print(f"  {row.method:>14} seed {seed}: acc {row.runs[-1].acc:.4f}", flush=True)
        best = max(consts, key=lambda r: r.mean_acc) if consts else None
        rows = list(consts)
        plan: list[tuple[str, float, bool, dict[str, Any] | None]] = []
        if "cosine" in args.methods and best is not None:
            plan.append((f"cosine from lr={best.runs[0].const_lr:.3g}", best.runs[0].const_lr, True, None))
        for kwargs in variants:
            if "ours" in args.methods:
                plan.append((variant_name(kwargs), poor, False, kwargs))
            if "ours_cosine" in args.methods:
                plan.append((variant_name(kwargs) + " + cosine", poor, True, kwargs))
        for method, lr, cosine, kwargs in plan:
            row = Row(method)
            for seed in args.seeds:
                row.runs.append(train(task, *data[seed], args, seed, method, lr, cosine, kwargs))
                print(f"  {method} seed {seed}: acc {row.runs[-1].acc:.4f}", flush=True)
            rows.append(row)
        emit(f"\n## {label} (poor initial rate of the 'ours' rows: {poor:g})\n", out)
        emit(task_table(rows, consts, best), out)
        for row in rows[len(consts):]:
            if row.method.startswith("ours"):
                wall, cpu = cost_ratios(row, consts)
                gap = 100 * (best.mean_acc - row.mean_acc) if best is not None else math.nan
                summary.append([name, row.method, f"{100 * row.mean_acc:.2f}",
                                f"{100 * best.mean_acc:.2f} (lr {best.runs[0].const_lr:.3g})" if best else "–",
                                gap, "yes" if gap <= 0.5 and row.failures() == "no" else "no", cpu,
                                in_run_cost(row), row.failures()])  # fmt: skip
    emit("\n## Summary: the goal is within 0.5 points of the best sweep point at ≤ 1.3× the cost\n", out)
    emit(markdown_table(["task", "method", "final acc %", "best sweep acc %", "gap (points)", "within 0.5",
                         "cost ratio (CPU)", "cost in run (CPU)", "diverged"], summary), out)  # fmt: skip
    emit(f"\nTotal run time: {time.perf_counter() - start:.0f} s wall.", out)
    print(f"saved {save_report(args.report, out)}")


if __name__ == "__main__":
    main()
