"""Overhead of the cost tiers (``chaos_callbacks.preset``) as ratios to the bare run, per model and cadence.

For each model (an MLP, a BatchNorm CNN, a GPT-shaped transformer; random data, SGD with momentum) the
bare run and each tier × cadence train the same steps in one process, one intra-op thread; the table
gives the CPU-time ratio to the bare run, the minimum and median over ``--repeats`` interleaved pairs
(small ratios, so pairs are interleaved to share the machine's state). Loggers are off, so what is
timed is the instruments, not TensorBoard's writer.

Cockpit's published figure to beat (Schneider et al., NeurIPS 2021, Fig. 6; GPU, CIFAR-10 3C3D,
every 16 steps): economy 1.04×, business 1.08×, full 2.26× — quoted, not rerun.

    python -m benchmarks.bench_presets                       # 3 models × 3 tiers × every 16, 64 steps
    python -m benchmarks.bench_presets --models mlp --cadences 16 --steps 128 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

from benchmarks.bench_scale import build_model, lightning_task, random_loader
from benchmarks.common import fmt, markdown_table, quiet_lightning, save_report

MODELS = ("mlp", "cnn", "gpt2")
SIZE = {"mlp": 1e6, "cnn": 1e6, "gpt2": 1e6}
BATCH_SIZE = {"mlp": 128, "cnn": 64, "gpt2": 8}


def train(kind: str, steps: int, callbacks: list) -> float:
    """CPU seconds of ``steps`` training steps of ``kind`` with ``callbacks`` (same data and init each time)."""
    import lightning.pytorch as pl

    net, batch, _ = build_model(kind, int(SIZE[kind]))
    loader = random_loader(batch, BATCH_SIZE[kind], steps)
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=callbacks, default_root_dir=tempfile.mkdtemp())
    start = time.process_time()
    trainer.fit(lightning_task(net), loader)
    return time.process_time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated: mlp, cnn, gpt2")
    parser.add_argument("--tiers", default="economy,business,full")
    parser.add_argument("--cadences", default="16,64", help="comma-separated every_n_steps values")
    parser.add_argument("--steps", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    import torch

    import chaos_callbacks

    torch.set_num_threads(1)
    quiet_lightning()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    rows = []
    for kind in args.models.split(","):
        net, _, label = build_model(kind, int(SIZE[kind]))
        n = sum(p.numel() for p in net.parameters())
        for cadence in (int(c) for c in args.cadences.split(",")):
            for tier in args.tiers.split(","):
                ratios = []
                for _ in range(args.repeats):
                    bare = train(kind, args.steps, [])
                    ratios.append(train(kind, args.steps, chaos_callbacks.preset(tier, every_n_steps=cadence)) / bare)
                ratios.sort()
                rows.append([label, f"{n:.1e}", cadence, tier, fmt(ratios[0]), fmt(ratios[len(ratios) // 2])])
                print(" | ".join(str(x) for x in rows[-1]), flush=True)
    lines = [f"steps {args.steps}, repeats {args.repeats}, one thread, CPU time", "",
             markdown_table(["model", "params", "every", "tier", "ratio min", "ratio median"], rows)]
    print("\n".join(lines))
    save_report("bench_presets", lines)


if __name__ == "__main__":
    main()
