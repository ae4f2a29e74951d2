"""Per-step cost of recording the weight trajectory, relative to one SGD training step.

For an MLP 784-256-10 (MNIST-sized batch) and a CIFAR ResNet-20 (He et al. 2016, the model
family of Chen, Qu, Gong, arXiv 2009.10588), times one call of

* ``CountSketch.project`` on the live parameter list, for several sketch dimensions,
* a plain ``torch.cat([p.flatten() for p in params])`` copy (what exact recording costs),
* one SGD training step (zero_grad, forward, cross-entropy, backward, step),

and prints the median times and the ratios to the training step.

Run from the repository root: ``.venv/bin/python -m benchmarks.bench_sketch [--batch-size 128]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import nn

from chaos_callbacks.dynamics.sketch import CountSketch


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU-conv-BN with an identity or 1x1-projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


def resnet20(num_classes: int = 10) -> nn.Module:
    """CIFAR ResNet-20: 3 stages x 3 blocks, 16/32/64 channels (~0.27M parameters)."""
    layers: list[nn.Module] = [nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()]
    cin = 16
    for cout, stride in ((16, 1), (32, 2), (64, 2)):
        for block in range(3):
            layers.append(BasicBlock(cin, cout, stride if block == 0 else 1))
            cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)]
    return nn.Sequential(*layers)


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_model(
    name: str, model: nn.Module, inputs: torch.Tensor, dims: list[int], repeats: int
) -> list[tuple]:
    params = [p for p in model.parameters()]
    num_params = sum(p.numel() for p in params)
    targets = torch.randint(0, 10, (inputs.shape[0],))
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(inputs), targets).backward()
        opt.step()

    train = median_seconds(train_step, repeats)
    with torch.no_grad():
        cat = median_seconds(lambda: torch.cat([p.flatten() for p in params]), repeats * 10)
    rows = []
    for dim in dims:
        sketch = CountSketch(num_params, dim, seed=0)
        proj = median_seconds(lambda: sketch.project(params), repeats * 10)
        rows.append((name, num_params, dim, train, cat, proj))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dims", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 10))
    rows = bench_model(
        "MLP 784-256-10", mlp, torch.randn(args.batch_size, 784), args.dims, args.repeats
    )
    rows += bench_model(
        "ResNet-20", resnet20(), torch.randn(args.batch_size, 3, 32, 32), args.dims, args.repeats
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    header = (
        f"{'model':<16}{'params':>9}{'dim':>6}{'train ms':>10}{'cat ms':>9}{'sketch ms':>11}"
        f"{'sketch/train':>14}{'cat/train':>11}"
    )
    print(header)
    print("-" * len(header))
    for name, n, dim, train, cat, proj in rows:
        print(
            f"{name:<16}{n:>9}{dim:>6}{train * 1e3:>10.2f}{cat * 1e3:>9.3f}{proj * 1e3:>11.3f}"
            f"{proj / train:>14.4f}{cat / train:>11.4f}"
        )


if __name__ == "__main__":
    main()
