"""Soak test: resident memory and checkpoint size of every callback must stay flat over a long run
(issue 14, item 9).

A tiny tanh MLP (32-16-10, 698 parameters) trains with SGD (momentum 0.9) on random data for
``--steps`` optimizer steps with the callbacks at their defaults — all attached to one run
(default), or one run per callback (``--separate``, which attributes resident memory to a single
callback). Every ``--every`` steps the script prints the process RSS (``/proc/self/statm``), the
number of live Python objects (``gc.get_objects``) and, per callback, the bytes of
``torch.save(callback.state_dict())``. At the end it fits a line to each column over the second
half of the run and reports the growth per 10⁴ steps, and the maxima over the first and the second
half (robust to the saw-tooth of buffers that fill and empty, e.g. a diffusion window): a history
that grows with the number of steps shows up as a second-half maximum above the first-half one and
a positive slope of the checkpoint bytes (and, once large enough, of the RSS).

No logger is attached (a logger's own buffers are not the callbacks'); the script re-executes
itself with ``MALLOC_MMAP_THRESHOLD_=65536`` as ``bench_scale.py`` does, so RSS follows live memory.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_soak                                 # ~10 min
    ... --steps 100000 --every 5000                                                              # issue's 1e5
    ... --separate --callbacks diffusion,twin --steps 20000
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_scale import (
    checkpoint_bytes,
    fmt,
    import_chaos_callbacks,
    lightning_task,
    markdown,
    rss_bytes,
    start_process,
    write_report,
)

NAMES = ("monitor", "twin", "lr", "diffusion", "tails")
SHORT = {"monitor": "HessianSpectrumMonitor", "twin": "LyapunovTwinRun", "lr": "CurvatureLRScheduler",
         "diffusion": "DiffusionTracker", "tails": "GradientTailFitter"}


def default_callback(name: str, diffusion_window: int | None = None) -> Any:
    """The callback ``name`` with every argument at its default (DiffusionTracker's ``window``
    optionally shorter, so that a soak passes its bounded window history's cap many times)."""
    import_chaos_callbacks()
    from chaos_callbacks.callbacks.curvature_lr import CurvatureLRScheduler
    from chaos_callbacks.callbacks.diffusion_tracker import DiffusionTracker
    from chaos_callbacks.callbacks.gradient_tails import GradientTailFitter
    from chaos_callbacks.callbacks.hessian_spectrum import HessianSpectrumMonitor
    from chaos_callbacks.callbacks.lyapunov_twin import LyapunovTwinRun

    classes = {"monitor": HessianSpectrumMonitor, "twin": LyapunovTwinRun, "lr": CurvatureLRScheduler,
               "diffusion": DiffusionTracker, "tails": GradientTailFitter}
    if name not in classes:
        raise SystemExit(f"unknown callback {name!r} (choose from {', '.join(classes)})")
    if name == "diffusion" and diffusion_window is not None:
        return DiffusionTracker(window=diffusion_window)
    return classes[name]()


def slope_per_10k(steps: list[int], values: list[float]) -> float:
    """Least-squares slope of ``values`` over ``steps``, per 10⁴ steps (NaN with < 2 points)."""
    if len(steps) < 2:
        return math.nan
    ms, mv = sum(steps) / len(steps), sum(values) / len(values)
    var = sum((s - ms) ** 2 for s in steps)
    return 1e4 * sum((s - ms) * (v - mv) for s, v in zip(steps, values)) / var if var else math.nan


def soak(names: list[str], args: argparse.Namespace) -> list[str]:
    """One fit of ``args.steps`` steps with the callbacks ``names``; returns its report lines."""
    import lightning.pytorch as pl
    import torch
    from torch import nn
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16), nn.Tanh(), nn.Linear(16, 10))
    x, y = torch.randn(args.batch_size * 256, 32), torch.randint(10, (args.batch_size * 256,))
    loader = DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))
    callbacks = {name: default_callback(name, args.diffusion_window) for name in names}
    samples: list[list[float]] = []
    headers = ["step", "RSS MiB", "Python objects"] + [f"{SHORT[n]} ckpt bytes" for n in names] + ["s/1000 steps"]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    print(f"\n### {', '.join(SHORT[n] + '()' for n in names)}: {args.steps} steps, report every {args.every}\n", flush=True)
    print("\n".join(lines), flush=True)
    clock = [time.perf_counter()]

    class Reporter(pl.Callback):
        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            step = trainer.global_step
            if step % args.every and step != args.steps:
                return
            gc.collect()
            now = time.perf_counter()
            row = [step, rss_bytes() / 2**20, len(gc.get_objects())] + [checkpoint_bytes(callbacks[n]) for n in names]
            rate = 1000 * (now - clock[0]) / args.every
            clock[0] = now
            samples.append([float(v) for v in row])
            lines.append("| " + " | ".join(fmt(v) if not isinstance(v, float) else f"{v:.1f}" for v in row) + f" | {rate:.2f} |")
            print(lines[-1], flush=True)

    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=args.steps, max_epochs=-1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[*callbacks.values(), Reporter()],
    )
    trainer.fit(lightning_task(net), loader)
    early = [s for s in samples if s[0] <= args.steps / 2]
    late = [s for s in samples if s[0] > args.steps / 2]
    summary_headers = ["quantity", "first report", "max, 1st half", "max, 2nd half", "last report",
                       "growth per 10⁴ steps (2nd half)"]
    summary = []
    for j, label in enumerate(headers[1:-1], start=1):
        summary.append([label, samples[0][j], max((s[j] for s in early), default=math.nan),
                        max((s[j] for s in late), default=math.nan), samples[-1][j],
                        slope_per_10k([int(s[0]) for s in late], [s[j] for s in late])])
    lines += ["", markdown(summary_headers, summary)]
    print("\n" + lines[-1], flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20_000, help="optimizer steps per run (the issue asks for 1e5)")
    parser.add_argument("--every", type=int, default=2_000, help="report every this many steps")
    parser.add_argument("--callbacks", default=",".join(NAMES), help=f"from {', '.join(NAMES)}")
    parser.add_argument("--separate", action="store_true", help="one run per callback instead of all in one run")
    parser.add_argument("--diffusion-window", type=int, default=None,
                        help="DiffusionTracker(window=...) instead of its default 1000 (e.g. 100: its 100-window history cap is reached after 1e4 steps)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    args = parser.parse_args()
    pl, torch, cc = start_process(args.threads)
    import warnings

    warnings.filterwarnings("ignore", ".*(skipped|later occurrences).*")
    names = args.callbacks.split(",")
    start = time.perf_counter()
    report = [f"## bench_soak — chaos_callbacks from {Path(cc.__file__).parent.parent}; torch {torch.__version__}, "
              f"Lightning {pl.__version__}, CPU, {args.threads} thread(s); MLP 32-16-10 tanh, batch {args.batch_size}, "
              "callbacks at their defaults, no logger"]
    print(report[0], flush=True)
    for group in ([[n] for n in names] if args.separate else [names]):
        report += ["", f"### {', '.join(SHORT[n] + '()' for n in group)}", ""] + soak(group, args)
    report.append(f"\nTotal {time.perf_counter() - start:.0f} s.")
    print(report[-1], flush=True)
    write_report("\n".join(report) + "\n", args.out)


if __name__ == "__main__":
    main()
