"""Per-step cost of ``DiffusionTracker``'s weight sketch: CountSketch (before) vs StridedSignSketch.

For MLPs 256-h-h-10 of about 1e5, 1e6 and 1e7 parameters (``bench_scale``'s MLP family), times
one ``project`` call on the live parameter list with each projector at the tracker's default
``dim=1024`` (CountSketch: 1024 buckets, random bucket and sign per coordinate in one int64
code; StridedSignSketch: 1021 buckets, the largest prime ≤ 1024, bucket i mod 1021 and one
float32 sign per coordinate), and one SGD training step (zero_grad, forward, cross-entropy,
backward, step) of the same MLP for scale. Prints a markdown table of median milliseconds per
call and the bytes per parameter each projector keeps.

Single-threaded by default (``--threads``), as in the per-step overhead measurements.

Run from the repository root: ``.venv/bin/python -m benchmarks.bench_sketch``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from benchmarks.bench_scale import mlp_hidden
from benchmarks.common import markdown_table
from chaos_callbacks.dynamics.sketch import CountSketch, StridedSignSketch, largest_prime_at_most


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    """Median wall time of ``fn`` in milliseconds over ``repeats`` calls after ``warmup``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def bench(n: int, dim: int, batch_size: int, repeats: int) -> list[object]:
    """One table row: parameters, train-step ms, both projectors' ms and bytes per parameter."""
    torch.manual_seed(0)
    h = mlp_hidden(n)
    model = nn.Sequential(nn.Linear(256, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))
    params = [p for p in model.parameters()]
    num_params = sum(p.numel() for p in params)
    x, y = torch.randn(batch_size, 256), torch.randint(10, (batch_size,))
    opt = torch.optim.SGD(params, lr=0.01)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    train = median_ms(train_step, repeats)
    old = CountSketch(num_params, dim, seed=0)
    new = StridedSignSketch(num_params, largest_prime_at_most(dim), seed=0)
    old_ms = median_ms(lambda: old.project(params), repeats)
    new_ms = median_ms(lambda: new.project(params), repeats)
    old_bytes = old._codes.element_size()
    new_bytes = new._signs.element_size()
    return [num_params, train, old_ms, new_ms, old_ms / new_ms, old_bytes, new_bytes]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e5, 1e6, 1e7])
    parser.add_argument("--dim", type=int, default=1024, help="DiffusionTracker's dim")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = [bench(int(n), args.dim, args.batch_size, args.repeats) for n in args.sizes]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), MLP 256-h-h-10, "
        f"batch {args.batch_size}, dim {args.dim} (strided: {largest_prime_at_most(args.dim)})\n"
    )
    headers = [
        "params", "train step ms", "CountSketch ms", "StridedSign ms", "speed-up",
        "CountSketch B/param", "StridedSign B/param",
    ]  # fmt: skip
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
