"""What reusing the training step's own graph would save in a Hessian estimate (issue 12, item 3).

``HessianSpectrumMonitor`` re-runs the user's ``training_step`` on a shadow of the module (one extra
forward pass) to build the first-order graph its Hessian-vector products differentiate. Where the
step's own graph could serve (eager, no flash attention, ``probe="batch"``, no accumulation, one
process), the estimate could instead start from the loss Lightning hands to ``on_before_backward``.
This script measures both designs on the same weights and batch:

- **separate forward** (what the monitor does): shadow module + ``training_step`` + first-order
  graph with ``create_graph=True`` + Lanczos;
- **reused graph**: the first-order graph from the already computed loss + the same Lanczos.

The difference is one forward pass and the shadow copy; the table gives it as a share of one
estimate (λ_max to ``tol=1e-3``, warm-started products as in training) for MLPs of 1e5–1e7 parameters.

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_graph_reuse [--sizes 1e5,1e6,1e7] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import lightning.pytorch as pl
import torch
from torch import nn

from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.curvature import HessianOperator, lanczos


class MLP(pl.LightningModule):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(784, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
        self.outputs: list[torch.Tensor] = []

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x), y)
        self.outputs.append(loss.detach())
        return loss


def width_for(n: float) -> int:
    """Hidden width w with 784w + w² + 10w ≈ n."""
    return max(8, int((-(794) + (794**2 + 4 * n) ** 0.5) / 2))


def estimate(op: HessianOperator, generator_seed: int) -> int:
    result = lanczos(op, op.dim, k=1, want_min=False, tol=1e-3, max_matvecs=100, generator=torch.Generator().manual_seed(generator_seed), dtype=op.dtype)
    op.release()
    return result.num_matvecs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e5,1e6,1e7")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print("| parameters | separate forward: estimate ms (median) | reused graph: estimate ms (median) | HVPs | saved share of an estimate |")
    print("|---:|---:|---:|---:|---:|")
    for size in (float(s) for s in args.sizes.split(",")):
        torch.manual_seed(0)
        module = MLP(width_for(size))
        n = sum(p.numel() for p in module.parameters())
        batch = (torch.randn(args.batch_size, 784), torch.randint(0, 10, (args.batch_size,)))
        params = list(module.parameters())
        separate, reused, hvps = [], [], 0
        for r in range(args.repeats):
            start = time.process_time()
            with plumb.no_harm(module, second_order=True):
                op = HessianOperator(params, [lambda: plumb.compute_loss(module, batch, None)])
                hvps = estimate(op, r)
            separate.append(time.process_time() - start)
            step_loss = module.training_step(batch, 0)  # the step's own forward, already paid by training
            start = time.process_time()
            op = HessianOperator(params, [lambda: step_loss])
            estimate(op, r)
            reused.append(time.process_time() - start)
        a, b = statistics.median(separate), statistics.median(reused)
        print(f"| {n:.2e} | {1e3 * a:.1f} | {1e3 * b:.1f} | {hvps} | {(a - b) / a:.1%} |", flush=True)


if __name__ == "__main__":
    main()
