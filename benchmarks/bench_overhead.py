"""Per-step overhead of the instruments at their defaults, as CPU-time ratios with / without.

An MLP ``784 → h → h → 10`` (ReLU) with ``h`` chosen for ``--params`` parameters (1e5, 1e6, 1e7 by
default) is trained by Lightning on the CPU (SGD, momentum 0.9, batch 64, random inputs and labels:
the step's cost does not depend on the values), one intra-op thread. For each instrument and size,
``--repeats`` pairs of runs train ``--steps`` optimizer steps after ``--warmup`` steps, without and
with the callback, the order alternating between pairs; each run is timed in process CPU time from
the start of step ``warmup`` to the end of training (the machine is shared: CPU time does not count
waiting for a core). Reported: the min and median of the paired ratios with / without, the
CPU ms per step of each arm, and the CPU time spent inside the callback's per-step hooks per step
(median over the runs with it) as a share of the step without it — the direct cost, much less
noisy than the ratio on a busy machine (it leaves out indirect costs such as evicted caches).

Instruments, at their defaults:

* ``DiffusionTracker()`` (a CountSketch of the weights every step). Its window (1000 samples) is
  longer than the runs, so the runs time the recording only; the window analysis, run once per
  window, is timed separately (a full 1000 × 1024 window) and its amortised share is printed.
* ``GradientTailFitter()`` (every 50 steps; ``--steps`` should be a multiple of 50).
* ``LyapunovTwinRun()`` (one twin, renormalised every 10 steps); 2.0 is the floor (one extra
  forward and backward per step).
* ``HessianSpectrumMonitor()`` (every 200 steps): the CPU time inside its hook per estimate in one
  run of ``(--monitor-estimates − 1) · 200 + 1`` steps — the cold first estimate and the median of the
  warm refreshes after it, with their HVPs — and the ratio ``1 + warm / (200 · step)`` (the cold
  estimate is paid once per fit).

Run from the repository root::

    OMP_NUM_THREADS=1 python -m benchmarks.bench_overhead [--params 1e5 1e6 1e7] [--steps 200]
        [--repeats 3] [--only diffusion tails twin monitor]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.bench_diffusion_overhead import time_analysis
from benchmarks.common import markdown_table, quiet_lightning
from chaos_callbacks import DiffusionTracker, GradientTailFitter, HessianSpectrumMonitor, LyapunovTwinRun

BATCH = 64
INSTRUMENTS: dict[str, tuple[str, Callable[[], pl.Callback]]] = {
    "diffusion": ("DiffusionTracker", lambda: DiffusionTracker()),
    "tails": ("GradientTailFitter", lambda: GradientTailFitter()),
    "twin": ("LyapunovTwinRun", lambda: LyapunovTwinRun()),
    "monitor": ("HessianSpectrumMonitor", lambda: HessianSpectrumMonitor()),
}
CADENCE = {"diffusion": "every step", "tails": "every 50 steps", "twin": "every step (renormalise every 10)", "monitor": "every 200 steps"}


def hidden_for(params: float) -> int:
    """Width h of ``784 → h → h → 10`` with about ``params`` parameters: h² + 796 h + 10 = params."""
    return max(1, round((-796 + math.sqrt(796**2 + 4 * (params - 10))) / 2))


class Net(pl.LightningModule):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)


class Clock(pl.Callback):
    """Process CPU seconds from the start of step ``first`` to the end of training."""

    def __init__(self, first: int) -> None:
        self.first, self.start, self.seconds = first, math.nan, math.nan

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == self.first and math.isnan(self.start):
            self.start = time.process_time()

    def on_train_end(self, trainer: pl.Trainer, *args: Any) -> None:
        self.seconds = time.process_time() - self.start


def hook_timer(callback: pl.Callback) -> list[tuple[int, float]]:
    """Wrap the callback's per-step hooks; returns the list they append (global step, CPU seconds) to."""
    record: list[tuple[int, float]] = []
    for name in ("on_train_batch_start", "on_train_batch_end", "on_before_optimizer_step", "on_after_backward"):
        if getattr(type(callback), name) is getattr(pl.Callback, name):
            continue
        hook = getattr(callback, name)

        def timed(trainer: pl.Trainer, *args: Any, _hook: Any = hook) -> Any:
            start = time.process_time()
            out = _hook(trainer, *args)
            record.append((trainer.global_step, time.process_time() - start))
            return out

        setattr(callback, name, timed)
    return record


def run(hidden: int, data: TensorDataset, warmup: int, steps: int, callback: pl.Callback | None) -> float:
    """CPU seconds per step over ``steps`` steps after ``warmup``, with or without ``callback``."""
    clock = Clock(warmup)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=warmup + steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
        callbacks=[clock] + ([callback] if callback is not None else []),
    )
    trainer.fit(Net(hidden), DataLoader(data, batch_size=BATCH))
    return clock.seconds / steps


def compare(key: str, hidden: int, data: TensorDataset, warmup: int, steps: int, repeats: int) -> dict[str, Any]:
    """Paired runs without / with the instrument, the order alternating."""
    base, watched, ratios, hooks = [], [], [], []
    for r in range(repeats):
        times = {}
        for arm in (("without", "with") if r % 2 == 0 else ("with", "without")):
            callback = INSTRUMENTS[key][1]() if arm == "with" else None
            if callback is not None:
                hooks.append(hook_timer(callback))
            times[arm] = run(hidden, data, warmup, steps, callback)
        base.append(times["without"])
        watched.append(times["with"])
        ratios.append(times["with"] / times["without"])
        print(f"  [{key} h={hidden} pair {r}: {1e3 * times['without']:.2f} / {1e3 * times['with']:.2f} ms -> {ratios[-1]:.4f}]", file=sys.stderr, flush=True)
    return {"base": base, "with": watched, "ratios": ratios, "hooks": hooks}


def monitor_estimate(hidden: int, data: TensorDataset, estimates: int) -> dict[str, Any]:
    """CPU seconds inside the monitor's hook per estimate — the cold first one and the median of the
    ``estimates − 1`` warm refreshes after it, ``every_n_steps`` SGD steps apart — and their products."""
    callback = INSTRUMENTS["monitor"][1]()
    record = hook_timer(callback)
    hvps: list[float] = []

    class Products(pl.Callback):
        def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
            if callback._last_step == trainer.global_step - 1 and callback.last_estimate:
                hvps.append(callback.last_estimate.get("hessian/hvps", math.nan))
                callback.last_estimate = {}

    every = callback.every_n_steps
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=(estimates - 1) * every + 1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[callback, Products()],
    )
    trainer.fit(Net(hidden), DataLoader(data, batch_size=BATCH))
    seconds = [s for step, s in record if step % every == 0]
    return {"cold": seconds[0], "warm": statistics.median(seconds[1:]) if len(seconds) > 1 else math.nan,
            "hvps_cold": hvps[0] if hvps else math.nan, "hvps_warm": statistics.median(hvps[1:]) if len(hvps) > 1 else math.nan,
            "count": len(seconds), "every": every}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 400, 200], help="timed steps per run, one per size (or one for all)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--monitor-estimates", type=int, default=4, help="monitor: a cold estimate and this many minus one warm ones")
    parser.add_argument("--only", nargs="+", default=list(INSTRUMENTS), choices=list(INSTRUMENTS))
    args = parser.parse_args()
    torch.set_num_threads(1)
    quiet_lightning()
    steps_per_size = args.steps if len(args.steps) == len(args.params) else args.steps[:1] * len(args.params)
    rows = []
    analysis = time_analysis(1000, 1024, repeats=3, clock=time.process_time) if "diffusion" in args.only else math.nan
    for params, steps in zip(args.params, steps_per_size):
        hidden = hidden_for(params)
        n = sum(p.numel() for p in Net(hidden).parameters())
        g = torch.Generator().manual_seed(0)
        total = BATCH * (args.warmup + steps)
        data = TensorDataset(torch.randn(total, 784, generator=g), torch.randint(0, 10, (total,), generator=g))
        for key in args.only:
            name = INSTRUMENTS[key][0]
            if key == "monitor":
                base = statistics.median(run(hidden, data, args.warmup, min(steps, 200), None) for _ in range(2))
                est = monitor_estimate(hidden, data, args.monitor_estimates)
                ratio = 1 + est["warm"] / (est["every"] * base)
                rows.append([name, f"{n:,}", CADENCE[key], "–", f"{ratio:.3f} (warm estimates / {est['every']} steps)", 1e3 * base,
                             f"warm estimate {1e3 * est['warm']:.0f} ms, {est['hvps_warm']:g} HVPs (median of {est['count'] - 1}); "
                             f"cold {1e3 * est['cold']:.0f} ms, {est['hvps_cold']:g} HVPs"])
                continue
            out = compare(key, hidden, data, args.warmup, steps, args.repeats)
            base = statistics.median(out["base"])
            hook = statistics.median(sum(t for step, t in record if step >= args.warmup) / steps for record in out["hooks"])
            note = f"{1e3 * statistics.median(out['with']):.2f} ms with; CPU in its hooks {1e3 * hook:.2f} ms/step = {100 * hook / base:.1f} %"
            if key == "diffusion":
                note += f"; window analysis {1e3 * analysis:.0f} ms per 1000 steps = {100 * analysis / (1000 * base):.2f} % more"
            rows.append([name, f"{n:,}", CADENCE[key], f"{min(out['ratios']):.4f}", f"{statistics.median(out['ratios']):.4f}", 1e3 * base, note])
    print(f"\ntorch {torch.__version__}, 1 thread, batch {BATCH}, {args.repeats} alternating pairs, steps per run {dict(zip(args.params, steps_per_size))} after {args.warmup} warm-up; CPU time ratios with / without\n")
    print(markdown_table(["callback", "params", "default cadence", "min ratio", "median ratio", "CPU ms / step without", "notes"], rows))


if __name__ == "__main__":
    main()
