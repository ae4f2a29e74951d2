"""GPU check of every callback on a GPT-2-small-shaped LM (issue 14, item 7): CUDA peak memory per
estimate, the attention kernel of the training step and of the estimate, float32 and bf16-mixed,
and the overhead ratios. One prepared script of a few minutes.

For each precision (``32-true``, ``bf16-mixed``):

1. **Attention kernels.** One short fit with ``HessianSpectrumMonitor(every_n_steps=2)`` under the
   torch profiler: the ``aten::*scaled_dot_product*`` ops of a plain training step (step 1) and of
   the estimate (step 2). The step may use flash / memory-efficient / cuDNN attention; the estimate
   must use the math kernel (those kernels have no double backward).
2. **Per callback** (the ``bench_scale.py`` set: monitor, whole-budget monitor, density, twin,
   curvature LR, diffusion, gradient tails), ``(estimates) × cadence + 1`` steps with the callback's
   hooks wrapped: time of one estimate in training steps (CUDA-synchronised wall time, median step
   without the hooks), CUDA peak memory of the estimate above the memory allocated when the hook
   started — ``torch.cuda.max_memory_allocated`` (and ``max_memory_reserved``), after
   ``reset_peak_memory_stats`` — in float32 parameter vectors (4·n bytes), HVPs, checkpoint bytes,
   the callback's headline value, and the overhead ratio at the callback's *default* cadence,
   ``1 + (median estimate in steps) / every_n_steps`` (per-step callbacks: ``1 + per-step cost``).

Without CUDA the script prints a message and exits 0. ``--device cpu --tiny`` runs the same logic
on the CPU on a 1e5-parameter GPT-shaped model (memory then from RSS as in ``bench_scale.py``), a
smoke test that takes about a minute:

    .venv/bin/python -m benchmarks.gpu_check                                    # on a GPU machine
    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.gpu_check --device cpu --tiny
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import bench_scale as bs

DEFAULT_CADENCE = {"monitor": 200, "monitor_budget": 200, "monitor_density": 200, "lr": 10, "tails": 50, "twin": 1, "diffusion": 1}


class CudaPeak:
    """Context manager: CUDA peak allocated (``Peak.resident``) and reserved (``Peak.virtual``) bytes
    above their values at entry."""

    def __enter__(self) -> CudaPeak:
        import torch

        torch.cuda.synchronize()
        self._allocated, self._reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc: Any) -> None:
        import torch

        torch.cuda.synchronize()
        self.peak = bs.Peak(resident=torch.cuda.max_memory_allocated() - self._allocated,
                            virtual=torch.cuda.max_memory_reserved() - self._reserved)


def cuda_clock() -> float:
    import torch

    torch.cuda.synchronize()
    return time.perf_counter()


def attention_ops(device: str, precision: str, size: int, batch_size: int) -> tuple[str, str]:
    """(SDPA ops of training step 1, SDPA ops of the monitor's estimate at step 2)."""
    import lightning.pytorch as pl
    from torch.profiler import ProfilerActivity, profile

    from chaos_callbacks.callbacks.hessian_spectrum import HessianSpectrumMonitor

    net, batch, _ = bs.build_model("gpt2", size)
    monitor = HessianSpectrumMonitor(every_n_steps=2)
    found: dict[str, set[str]] = {"step": set(), "estimate": set()}

    def sdpa(prof: Any) -> set[str]:
        return {e.key for e in prof.key_averages() if "scaled_dot_product" in e.key or "_flash_attention" in e.key
                or "_efficient_attention" in e.key or "cudnn_attention" in e.key}

    estimate = monitor.on_train_batch_start

    def profiled_estimate(trainer: Any, *args: Any, **kwargs: Any) -> Any:
        if trainer.global_step != 2:
            return estimate(trainer, *args, **kwargs)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            out = estimate(trainer, *args, **kwargs)
        found["estimate"] |= sdpa(prof)
        return out

    monitor.on_train_batch_start = profiled_estimate

    class StepProfiler(pl.Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if trainer.global_step == 1:
                self.prof = profile(activities=[ProfilerActivity.CPU])
                self.prof.__enter__()

        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            if hasattr(self, "prof") and not hasattr(self, "done"):
                self.prof.__exit__(None, None, None)
                found["step"] |= sdpa(self.prof)
                self.done = True

    trainer = pl.Trainer(accelerator=device, devices=1, precision=precision, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=[StepProfiler(), monitor])
    trainer.fit(bs.lightning_task(net), bs.random_loader(batch, batch_size, 3))
    lam = monitor.last_estimate.get("hessian/lambda_max", math.nan)
    return ", ".join(sorted(found["step"])) or "none", (", ".join(sorted(found["estimate"])) or "none") + f" (λ_max {lam:.4g})"


def overhead(name: str, row: bs.Row) -> float:
    """Run time with the callback at its default cadence over run time without, from the measured costs."""
    per_estimate = statistics.median(row.later) if row.later else row.first
    return 1 + per_estimate / DEFAULT_CADENCE[name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--tiny", action="store_true", help="a 1e5-parameter model, batch 2 (smoke test)")
    parser.add_argument("--size", type=float, default=1.24e8, help="parameters of the GPT-shaped model (≥ 3e7: GPT-2 small)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--callbacks", default=",".join(bs.CALLBACKS))
    parser.add_argument("--precisions", default="32-true,bf16-mixed")
    parser.add_argument("--estimates", type=int, default=2, help="estimates after the first")
    parser.add_argument("--cadence", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (the --device cpu clock needs 1)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    args = parser.parse_args()
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device here; nothing to check (use --device cpu --tiny for a CPU smoke run).")
            return
    else:
        bs.reexec_with_malloc_env(args.threads)
    import lightning.pytorch as pl
    import torch

    torch.set_num_threads(args.threads)
    size = int(1e5 if args.tiny else args.size)
    batch_size = 2 if args.tiny else args.batch_size
    cc = bs.import_chaos_callbacks()
    bs.quiet()
    cuda = args.device == "cuda"
    meter: Callable[[], Any] = CudaPeak if cuda else bs.PeakMemory
    clock = cuda_clock if cuda else bs.clock_for(args.threads)
    _, _, description = bs.build_model("gpt2", size)
    gpu = torch.cuda.get_device_name() if cuda else "CPU"
    report = [f"## gpu_check — chaos_callbacks from {Path(cc.__file__).parent.parent}; torch {torch.__version__}, "
              f"Lightning {pl.__version__}, {gpu}; {description}, batch {batch_size}; memory in float32 parameter vectors, "
              f"{'CUDA max_memory_allocated / max_memory_reserved' if cuda else 'RSS / VmSize'} above the hook's start\n"]
    print(report[0], flush=True)
    start = time.perf_counter()
    kernels = []
    for precision in args.precisions.split(","):
        kernels.append([precision, *attention_ops(args.device, precision, size, batch_size)])
        print(f"  attention {kernels[-1]}", flush=True)
    report += ["### Attention kernels (scaled-dot-product ops seen by the profiler)\n",
               bs.markdown(["precision", "training step", "Hessian estimate"], kernels), ""]
    rows = []
    for precision in args.precisions.split(","):
        for name in args.callbacks.split(","):
            row = bs.measure("gpt2", size, name, args, accelerator=args.device, precision=precision, meter=meter,
                             clock=clock, batch_size=batch_size)
            n = row.n
            hvps = f"{row.hvps_first} / " + "/".join(map(str, row.hvps_later)) if row.hvps_first else "–"
            rows.append([precision, bs.LABELS[name], f"{n:.3g}", row.step_ms, row.first,
                         statistics.median(row.later) if row.later else math.nan, overhead(name, row), hvps,
                         row.resident, row.virtual, row.ckpt / (4 * n), row.headline, row.notes.replace("|", "/")])
            print("  " + " | ".join(bs.fmt(c) for c in rows[-1]), flush=True)
    report += ["### Per estimate\n", bs.markdown(
        ["precision", "callback", "n", "step ms", "est. first (steps)", "est. median (steps)", "overhead at default cadence",
         "HVPs first / later", "peak allocated (vectors)" if cuda else "peak resident (vectors)",
         "peak reserved (vectors)" if cuda else "peak virtual (vectors)", "checkpoint (vectors)", "headline", "notes"], rows)]
    report.append(f"\nTotal {time.perf_counter() - start:.0f} s.")
    text = "\n".join(report) + "\n"
    print("\n" + text, flush=True)
    bs.write_report(text, args.out)


if __name__ == "__main__":
    main()
