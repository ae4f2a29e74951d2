"""CurvatureLRScheduler on real MNIST: time to 97 % test accuracy against a constant-learning-rate sweep.

For each model (MLP 784-256-10 ReLU; ``lenet``, the LeNet-5-style CNN of ``chaos_callbacks.recipes.models``),
``chaos_callbacks.recipes.module.ClassificationModule`` is trained by Lightning on the CPU with plain SGD (no
momentum, no weight decay), batch 128, on a fixed, seeded ``--subset`` of the MNIST training set
(``chaos_callbacks.recipes.data.MNISTDataModule``; the last partial batch of each epoch is dropped), for
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
    .venv/bin/python -m benchmarks.bench_curvature_lr_mnist [--models mlp lenet] [--epochs 3]
        [--subset 20000] [--lrs 0.01 0.03 0.1 0.3 1.0] [--eval-every 50] [--eval-size 10000]
        [--methods qn eos dal1 dal0.5] [--every 10] [--max-lr X] [--warmup-steps N] [--ema E]
"""

from __future__ import annotations

import argparse
import math
import statistics
from typing import Any

import torch

from benchmarks.common import emit, markdown_table, save_report
from benchmarks.sgd_runs import (
    CURVATURE_METHODS,
    MODEL_LABELS,
    RunResult,
    add_sgd_args,
    load_data,
    pick_reference,
    train_once,
)


def describe(r: RunResult) -> str:
    reached = r.reached
    tail = f"{reached[0]} steps / {reached[1]:.1f} s" if reached else "not reached"
    lr = statistics.median(r.used_lrs) if r.lrs else math.nan
    div = f", DIVERGED at step {r.diverged_at}" if r.diverged_at is not None else ""
    return f"  {r.method:>22}: median lr {lr:.4g}, {args_target_pct(r.target)}: {tail}, final acc {r.final_acc:.4f}{div}"


def args_target_pct(target: float) -> str:
    return f"{100 * target:g}%"


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
    add_sgd_args(parser, epochs=3, subset=20_000)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0], help="constant-lr sweep")
    parser.add_argument("--methods", nargs="+", default=["qn", "eos", "dal1", "dal0.5"], choices=sorted(CURVATURE_METHODS))
    parser.add_argument("--every", type=int, default=10, help="every_n_steps of CurvatureLRScheduler")
    parser.add_argument("--max-lr", type=float, default=None, help="max_lr of the curvature runs (default: none, the callback's default)")
    parser.add_argument("--warmup-steps", type=int, default=0, help="warmup_steps of the curvature runs (at --base-lr)")
    parser.add_argument("--ema", type=float, default=0.0, help="ema (curvature smoothing) of the curvature runs")
    parser.add_argument("--report", default="bench_curvature_lr_mnist", help="name of the Markdown copy in benchmarks/results/")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    dm, x_test, y_test = load_data(args)
    methods = CURVATURE_METHODS
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
