"""Shared helpers of the benchmark scripts: MNIST tensors, the benchmark models, timing, state
snapshots (to detect whether a tool changed the model), HVP counters and Markdown tables.

Not part of the package; imported as ``benchmarks.common`` by the scripts in ``benchmarks/`` and,
for the generic helpers (data root, quiet Lightning, Markdown tables), by ``reproductions.common``.
Every script runs from the repository root as ``python -m benchmarks.<name>``.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

REPO = Path(__file__).resolve().parents[1]

DEFAULT_DATA_ROOT = Path(os.environ.get("CHAOS_DATA") or REPO / "data")  # as chaos_callbacks.recipes.data
RESULTS = REPO / "benchmarks" / "results"
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081


def quiet_lightning() -> None:
    """Silence Lightning's per-fit banners and its warnings about data-loader workers, an unused
    GPU and ``self.log`` outside a loop (the scripts print their own tables)."""
    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in (".*does not have many workers.*", ".*GPU available but not used.*", ".*LightningModule.log.*"):
        warnings.filterwarnings("ignore", message)


def add_common_args(parser: Any) -> None:
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT, help="folder holding MNIST/raw")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 gives the most stable ratios on a shared machine)",
    )


# ----------------------------------------------------------------------------- data
def mnist_tensors(root: Path, n: int, offset: int = 0, pool: int = 1) -> tuple[Tensor, Tensor]:
    """``n`` normalised MNIST training images ``[n, 1, 28/pool, 28/pool]`` (float32) and labels."""
    import torchvision

    ds = torchvision.datasets.MNIST(root=str(root), train=True, download=False)
    x = ds.data[offset : offset + n].float().div(255).sub(MNIST_MEAN).div(MNIST_STD).unsqueeze(1)
    if pool > 1:
        x = nn.functional.avg_pool2d(x, pool)
    return x.contiguous(), ds.targets[offset : offset + n].clone()


# ----------------------------------------------------------------------------- models
def tanh_mlp(in_features: int = 784, hidden: int = 64, classes: int = 10, seed: int = 0) -> nn.Sequential:
    """``Flatten → Linear → tanh → Linear`` (the 784-64-10 tanh network of arXiv 2506.08523)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, classes))


def bn_cnn(c1: int = 8, c2: int = 16, classes: int = 10, seed: int = 0) -> nn.Sequential:
    """Two stride-2 3×3 convolutions (with biases) each followed by train-mode BatchNorm and ReLU,
    global average pooling and a linear read-out (1,466 parameters for 8/16 channels)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, c1, 3, stride=2, padding=1),
        nn.BatchNorm2d(c1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, 3, stride=2, padding=1),
        nn.BatchNorm2d(c2),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(c2, classes),
    )


def ce_closure(model: nn.Module, x: Tensor, y: Tensor) -> Callable[[], Tensor]:
    return lambda: nn.functional.cross_entropy(model(x), y)


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- state checks
@dataclass
class ModelState:
    params: list[Tensor]
    buffers: list[Tensor]
    grads: list[Tensor | None]
    modes: list[bool]
    rng: Tensor


def snapshot(model: nn.Module) -> ModelState:
    return ModelState(
        params=[p.detach().clone() for p in model.parameters()],
        buffers=[b.detach().clone() for b in model.buffers()],
        grads=[None if p.grad is None else p.grad.detach().clone() for p in model.parameters()],
        modes=[m.training for m in model.modules()],
        rng=torch.get_rng_state().clone(),
    )


def state_changes(before: ModelState, model: nn.Module) -> list[str]:
    """Names of what differs between ``before`` and the model now: params, BN buffers, .grad, mode, RNG."""
    after = snapshot(model)
    out = []
    if len(before.params) != len(after.params) or any(not torch.equal(a, b) for a, b in zip(before.params, after.params)):
        out.append("params")
    if len(before.buffers) != len(after.buffers) or any(
        a.shape != b.shape or not torch.equal(a, b) for a, b in zip(before.buffers, after.buffers)
    ):
        out.append("BN buffers")
    if any((a is None) != (b is None) or (a is not None and not torch.equal(a, b)) for a, b in zip(before.grads, after.grads)):
        out.append(".grad")
    if before.modes != after.modes:
        out.append("train/eval mode")
    if not torch.equal(before.rng, after.rng):
        out.append("global RNG")
    return out


def restore(model: nn.Module, state: ModelState) -> None:
    """Put ``model`` (and the global torch RNG) back to ``state``; clears any ``.grad``."""
    with torch.no_grad():
        for p, s in zip(model.parameters(), state.params):
            p.copy_(s)
        for b, s in zip(model.buffers(), state.buffers):
            b.copy_(s)
    for p, g in zip(model.parameters(), state.grads):
        p.grad = None if g is None else g.clone()
    for m, mode in zip(model.modules(), state.modes):
        m.training = mode
    torch.set_rng_state(state.rng)


# ----------------------------------------------------------------------------- counting / timing
class Counter:
    """Counts Hessian-vector products made through wrapped callables."""

    def __init__(self) -> None:
        self.n = 0

    def wrap(self, fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
        def counted(v: Tensor) -> Tensor:
            self.n += 1 if v.ndim == 1 else v.shape[-1]
            return fn(v)

        return counted


def cpu_clock() -> float:
    """Process CPU time (all threads). On a machine shared with other jobs this measures what the
    benchmark itself computes, unlike wall-clock time, which also counts time spent waiting for a core."""
    return time.process_time()


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def deepcopy_model(model: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    m = copy.deepcopy(model)
    return m if dtype is None else m.to(dtype)


# ----------------------------------------------------------------------------- formatting
def fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        if math.isnan(x):
            return "–"
        if x == 0:
            return "0"
        if abs(x) >= 1e4 or abs(x) < 1e-3:
            return f"{x:.1e}"
        return f"{x:.{digits}g}"
    return str(x)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def emit(text: str, sink: list[str]) -> None:
    print(text, flush=True)
    sink.append(text)


def save_report(name: str, lines: list[str]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path
