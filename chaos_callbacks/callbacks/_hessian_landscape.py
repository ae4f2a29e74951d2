"""The probe loss along the monitor's Ritz vectors, for ``HessianSpectrumMonitor(landscape=True)``.

The weights are perturbed in place and restored bit-exactly (each parameter is copied back from a
clone taken before the first perturbation, also when an evaluation fails), inside
:func:`~chaos_callbacks.callbacks._plumbing.no_harm` (buffers, metric states, modes and RNG restored)
after the step's curvature graph is freed. Every evaluation starts from the RNG state of the
estimate, so dropout draws the same masks at every point.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor

from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.curvature.hvp import unflatten
from chaos_callbacks.curvature.landscape import Landscape, LossAt, loss_landscape


@dataclass(frozen=True)
class Basis:
    """What the estimate hands to the landscape: ``L₀``, Ritz values and vectors ``[k, n]``, ``gᵀv_j``."""

    loss0: float
    eigenvalues: list[float]
    vectors: Tensor
    slopes: list[float]


@contextmanager
def perturbed_loss(trainer: Trainer, pl_module: LightningModule, params: Sequence[Tensor], batches: list[Any],
                   loss_fn: plumb.LossFn | None, batch_idx: int) -> Iterator[LossAt]:
    """``δ ↦ L(θ + δ)``, the probe loss (batches weighted by size, mean over DDP ranks); the weights
    are restored bit-exactly on exit. Call inside ``no_harm``."""
    saved = [p.detach().clone() for p in params]
    sizes = [plumb.batch_size_of(b) for b in batches]
    reduce = plumb.mean_reducer(trainer)
    include_cuda = torch.cuda.is_initialized()

    def loss_at(delta: Tensor) -> float:
        with torch.no_grad():
            for p, s, d in zip(params, saved, unflatten(delta.to(saved[0].dtype), saved)):
                p.copy_(s + d)
        total = torch.zeros((), dtype=torch.float64, device=saved[0].device)
        with isolate_rng(include_cuda=include_cuda):  # the same dropout masks at every point
            for batch, size in zip(batches, sizes):
                loss = plumb.compute_loss(pl_module, batch, loss_fn, batch_idx)
                total += size / sum(sizes) * loss.detach().double()
        return float(reduce(total))

    try:
        yield loss_at
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def probe_landscape(trainer: Trainer, pl_module: LightningModule, basis: Basis, batches: list[Any], loss_fn: plumb.LossFn | None,
                    train_mode: bool, points: int, radius: float, batch_idx: int = 0) -> Landscape:
    """The landscape of the probe loss along ``basis`` (:func:`~chaos_callbacks.curvature.landscape.loss_landscape`)."""
    params = plumb.trainable_parameters(pl_module)
    with plumb.no_harm(pl_module, train_mode=train_mode):
        with perturbed_loss(trainer, pl_module, params, batches, loss_fn, batch_idx) as loss_at:
            return loss_landscape(loss_at, basis.vectors, basis.eigenvalues, basis.loss0, basis.slopes, points, radius)
