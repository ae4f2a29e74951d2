"""Tangent mode of ``LyapunovTwinRun`` (Sasdelli et al., OpenReview 37Fh1MiR5Ze): ε-free; unit tangent
vectors are pushed through the exact linearisation of each ``torch.optim.SGD`` step, v ← (I − ηH)v
(momentum, weight decay and Nesterov included), with H v by exact Hessian-vector products at the main
weights on the step's batch.

:class:`TangentMode` is a mixin of :class:`~chaos_callbacks.callbacks.lyapunov_twin.LyapunovTwinRun`: its
methods read and write the callback's state (annotated below) and call the callback's ``_epsilon``,
``_perturbation`` and ``_main_diverged``. The vectors' arithmetic is
:class:`~chaos_callbacks.dynamics.lyapunov.TangentAccumulator`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.optim import Optimizer

from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.callbacks._lyapunov_common import all_finite, summarise
from chaos_callbacks.callbacks._twin_mirror import Track, hyperparameters
from chaos_callbacks.curvature.hvp import HessianOperator, flatten, unflatten
from chaos_callbacks.dynamics.lyapunov import Norm, TangentAccumulator

SGD_KEYS = ("lr", "momentum", "weight_decay", "dampening", "nesterov")


class TangentMode:
    """The tangent-mode steps of ``LyapunovTwinRun``: SGD checks, start vectors, H v, the linearised step."""

    norm: Norm
    n_twins: int
    renormalize_every: int | None
    loss_fn: plumb.LossFn | None
    prefix: str
    per_twin: dict[str, list[float]]
    _params: list[Tensor]
    _tangents: list[TangentAccumulator]
    _hv: list[list[Tensor] | None]
    _tracks: list[Track]
    _skip_warn: plumb.WarnOnce
    _reseed_warn: plumb.WarnOnce

    def _validate_tangent(self, trainer: Trainer) -> None:
        """Fit-start checks of tangent mode: plain ``torch.optim.SGD``, one set of hyperparameters, no clipping."""
        name = type(self).__name__
        optimizer = trainer.optimizers[0]
        if type(optimizer) is not torch.optim.SGD:
            raise ValueError(
                f"{name}(mode='tangent') linearises torch.optim.SGD only, got {type(optimizer).__name__}; "
                "use mode='twin' for other optimizers"
            )
        if trainer.gradient_clip_val:
            raise ValueError(f"{name}(mode='tangent') does not linearise gradient clipping; use mode='twin'")
        self._sgd_hyperparameters(hyperparameters(optimizer), error=ValueError)

    def _sgd_hyperparameters(self, groups: Sequence[dict[str, Any]], error: type[Exception]) -> dict[str, Any]:
        """The SGD hyperparameters shared by every param group (tangent mode)."""
        values = [{k: g[k] for k in SGD_KEYS} for g in groups]
        if any(g.get("maximize") for g in groups):
            raise error(f"{type(self).__name__}(mode='tangent') does not support SGD(maximize=True)")
        if any(v != values[0] for v in values[1:]):
            raise error(
                f"{type(self).__name__}(mode='tangent') needs one set of SGD hyperparameters for every param group, "
                f"got {values}; use mode='twin'"
            )
        return {k: float(v) if k != "nesterov" else bool(v) for k, v in values[0].items()}

    def _tangent_start(self, optimizer: Optimizer) -> tuple[list[Tensor], list[Tensor] | None]:
        """A unit tangent vector, and a zero momentum tangent if the main run already has momentum buffers."""
        v = [x if x is not None else torch.zeros_like(p) for x, p in zip(self._perturbation(1.0), self._params)]
        buffers = [optimizer.state.get(p, {}).get("momentum_buffer") for p in self._params]
        has_momentum = all(b is not None for b in buffers)
        return v, [torch.zeros_like(p) for p in self._params] if has_momentum else None

    def _restart_tangent(self, i: int, optimizer: Optimizer, step: int) -> None:
        """(Re)start tangent vector ``i`` from the next draw of the generator."""
        v, momentum_v = self._tangent_start(optimizer)
        if i == len(self._tangents):
            self._tangents.append(TangentAccumulator(v, self.norm))
        else:
            self._tangents[i].v = v
        self._tangents[i].momentum_v = momentum_v
        self._tracks[i].restart(step, math.log(self._epsilon()))

    def _tangent_products(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """H v for every tangent vector, at the main weights on this micro-batch (the main step's dropout masks).

        Logs ``lyapunov/hvps`` at the step: the Hessian-vector products taken for it so far
        (``n_twins`` per micro-batch).
        """
        if not all(p.requires_grad for p in self._params):
            raise plumb.EstimateSkipped("a tracked parameter was frozen")
        scale = 1.0 / trainer.accumulate_grad_batches
        with plumb.no_harm(pl_module, train_mode=None, second_order=True):
            op = HessianOperator(
                self._params,
                [lambda: plumb.compute_loss(pl_module, batch, self.loss_fn, batch_idx)],
                [scale],
                reduce=plumb.mean_reducer(trainer),
            )
            for i, tangent in enumerate(self._tangents):
                hv = unflatten(op.matvec(flatten(tangent.v)), tangent.v)
                self._hv[i] = hv if self._hv[i] is None else [a + b for a, b in zip(self._hv[i], hv)]
            op.release()
        step, before = getattr(self, "_step_hvps", (None, 0))
        count = op.num_matvecs + (before if step == trainer.global_step else 0)
        self._step_hvps = (trainer.global_step, count)
        plumb.log_scalars(trainer, pl_module, {"lyapunov/hvps": float(count)}, trainer.global_step, prefix=self.prefix)

    def _tangent_step(self, trainer: Trainer, hyper: list[dict[str, Any]], step: int) -> dict[str, float]:
        """v ← (I − ηH)v (with SGD's momentum, weight decay, Nesterov) for every vector, from the step's summed
        H v; the log-growth extends ln d(t); ``ftle`` at the end of each interval. Returns the means over vectors."""
        try:
            sgd = self._sgd_hyperparameters(hyper, error=plumb.EstimateSkipped)
        except plumb.EstimateSkipped as exc:
            self._skip_warn("groups", f"tangent step {step} skipped: {exc}")
            self._hv = [None] * self.n_twins
            return {}
        values: dict[str, list[float]] = {"log_distance": [], "ftle": [], "mle": []}
        reseeded = False
        for i, (tangent, track) in enumerate(zip(self._tangents, self._tracks)):
            hv, self._hv[i] = self._hv[i], None
            if hv is None:  # every micro-batch of this step was skipped
                continue
            try:
                exponent = tangent.step(lambda v, hv=hv: hv, **sgd)
            except ValueError as exc:  # non-finite or zero growth
                if not all_finite(self._params):
                    return self._main_diverged(step)
                self._reseed_warn("reseed", f"tangent vector {i} failed at step {step} ({exc}); re-seeded")
                self._restart_tangent(i, trainer.optimizers[0], step)
                reseeded = True
                continue
            track.record(step, track.now + exponent)
            values["log_distance"].append(track.now)
            values["mle"].append(tangent.mle)
            if self.renormalize_every is not None and track.since == self.renormalize_every:
                track.ftle = (track.now - track.interval_start) / track.since
                track.start_interval(math.log(self._epsilon(seed=False)))  # as a twin is pulled back to ε
                values["ftle"].append(track.ftle)
        self.per_twin = {
            "log_distance": [t.last for t in self._tracks],
            "ftle": [t.ftle for t in self._tracks],
            "mle": [t.mle for t in self._tangents],
        }
        metrics = summarise(values, with_stderr=("ftle", "mle"))
        if reseeded:
            metrics["lyapunov/reseeds"] = float(self._reseed_warn.count)
        return metrics
