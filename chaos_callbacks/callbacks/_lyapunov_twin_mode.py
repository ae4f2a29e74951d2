"""Twin mode of ``LyapunovTwinRun`` (Jiménez-González, Soriano & Lacasa, arXiv 2506.08523): each twin
θ' = θ + δ, ‖δ‖ = ε, repeats the main run's optimizer steps on the same batches, and d(t) = ‖θ'_t − θ_t‖
gives the exponent (Benettin renormalisation every ``renormalize_every`` steps, or free evolution).

:class:`TwinMode` is a mixin of :class:`~chaos_callbacks.callbacks.lyapunov_twin.LyapunovTwinRun`: its
methods read and write the callback's state (annotated below) and call the callback's ``_epsilon``,
``_perturbation`` and ``_main_diverged``. The twins' tensors and optimizer live in
:mod:`~chaos_callbacks.callbacks._twin_mirror`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities.enums import GradClipAlgorithmType
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.optim import Optimizer

from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.callbacks._lyapunov_common import all_finite, summarise
from chaos_callbacks.callbacks._twin_mirror import Track, Twin, distance, rescale_, swapped
from chaos_callbacks.curvature.hvp import flatten, unflatten
from chaos_callbacks.dynamics.lyapunov import Norm

OutputFn = Callable[[LightningModule, Any], Tensor]
TWIN_PRECISIONS = ("32-true", "64-true", "bf16-mixed")


@contextmanager
def main_step_precision(trainer: Trainer) -> Iterator[None]:
    """The precision context of the main training step (bf16 autocast under ``bf16-mixed``, float64
    default dtype under ``64-true``). Autocast's weight cache is emptied on entry and exit: it is keyed
    by the parameter objects, whose storage :func:`swapped` changes between twins (Lightning's own
    plugin disables the cache; a custom plugin may not)."""
    torch.clear_autocast_cache()
    try:
        with trainer.precision_plugin.train_step_context():
            yield
    finally:
        torch.clear_autocast_cache()


class TwinMode:
    """The twin-mode steps of ``LyapunovTwinRun``: seed, gradients, optimizer step, renormalisation."""

    norm: Norm
    renormalize_every: int | None
    function_space: bool
    output_fn: OutputFn
    loss_fn: plumb.LossFn | None
    per_twin: dict[str, list[float]]
    _params: list[Tensor]
    _twins: list[Twin]
    _tracks: list[Track]
    _probe: Any
    _skip_warn: plumb.WarnOnce
    _reseed_warn: plumb.WarnOnce

    def _validate_twin(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Fit-start checks of twin mode: a precision whose weights can hold ε, clipping the twin can replay."""
        name = type(self).__name__
        if trainer.precision not in TWIN_PRECISIONS:
            raise ValueError(
                f"{name}(mode='twin') supports precision '32-true', '64-true' and 'bf16-mixed', got "
                f"{trainer.precision!r}: half-precision weights cannot hold a small separation, and a "
                "'16-mixed' gradient scaler skips steps with scaled gradients the twin cannot replay"
            )
        if pl_module.automatic_optimization and is_overridden("configure_gradient_clipping", pl_module):
            raise ValueError(
                f"{name}(mode='twin') mirrors the Trainer's gradient_clip_val/gradient_clip_algorithm only; the "
                "module overrides configure_gradient_clipping, which the twin cannot replay"
            )

    def _seed_twin(self, i: int, optimizer: Optimizer, pl_module: LightningModule, step: int, fatal: bool = False) -> None:
        """(Re)start twin ``i`` at distance ε from the main run's current weights, buffers and optimizer state."""
        twin, eps = self._twins[i], self._epsilon()
        twin.reset(optimizer, self._params, list(pl_module.buffers()), self._perturbation(eps))
        d = float(distance(twin.params, self._params, self.norm))
        if d > 0 and math.isfinite(d):
            self._tracks[i].restart(step, math.log(d))
            return
        message = f"epsilon={eps:g} is erased by rounding the {self._params[0].dtype} weights; pass a larger epsilon"
        if fatal:
            raise ValueError(f"{type(self).__name__}: {message}")
        self._skip_warn("erased", f"{message} (the twin is re-seeded at the next step)")
        self._tracks[i].restart(step, math.nan)

    def _twin_gradients(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Each twin's gradient on this micro-batch, with the random stream and precision of the main step."""
        accumulate = trainer.accumulate_grad_batches
        targets = [*self._params, *pl_module.buffers()]
        wrt = [p for p in self._params if p.requires_grad]
        with plumb.no_harm(pl_module, train_mode=None):
            for i, twin in enumerate(self._twins):
                # every twin starts from the RNG state the main forward will start from: no_harm restores
                # it on exit, each earlier twin restores it for the next (isolate_rng costs ~0.3-0.7 ms)
                replay = isolate_rng() if i < len(self._twins) - 1 else nullcontext()
                with replay, swapped(targets, [*twin.params, *twin.buffers]):
                    with main_step_precision(trainer):
                        loss = plumb.compute_loss(pl_module, batch, self.loss_fn, batch_idx) / accumulate
                    grads = iter(torch.autograd.grad(loss, wrt, allow_unused=True))
                twin.accumulate([next(grads) if p.requires_grad else None for p in self._params], loss.detach())

    def _reduce_gradients(self, trainer: Trainer, complete: bool) -> bool:
        """Mean over ranks of every twin's gradient and loss (flatten, one all-reduce, split); returns
        whether every rank's gradient is complete (a rank that missed a micro-batch makes all re-seed)."""
        if trainer.world_size <= 1:
            return complete
        parts: list[Tensor] = []
        for twin in self._twins:
            parts += [g if g is not None else torch.zeros_like(p) for g, p in zip(twin.grads, twin.params)]
            parts.append(twin.loss if twin.loss is not None else twin.params[0].new_zeros(()))
        parts.append(self._params[0].new_tensor(1.0 if complete else 0.0))
        reduced = iter(unflatten(plumb.mean_reducer(trainer)(flatten(parts)), parts))
        for twin in self._twins:
            mean_grads = [next(reduced) for _ in twin.grads]
            twin.grads = [None if g is None else m for g, m in zip(twin.grads, mean_grads)]
            loss = next(reduced)
            twin.loss = None if twin.loss is None else loss
        return bool(next(reduced) == 1)

    def _twin_step(self, trainer: Trainer, pl_module: LightningModule, hyper: list[dict[str, Any]], step: int) -> dict[str, float]:
        """Step every twin with the main step's hyperparameters and clipping, measure d, renormalise at the end of
        an interval; re-seed a twin that diverged or collapsed. Returns the step's means over twins."""
        optimizer = trainer.optimizers[0]
        # Lightning stores the algorithm as a GradClipAlgorithmType and clips only under automatic optimization
        clip_val = float(trainer.gradient_clip_val or 0.0) if pl_module.automatic_optimization else 0.0
        clip_by_value = trainer.gradient_clip_algorithm == GradClipAlgorithmType.VALUE
        values: dict[str, list[float]] = {k: [] for k in ("distance", "log_distance", "twin_loss", "ftle", "mle")}
        eps: float | None = None  # sized once per step, at the first renormalisation
        reseeded = False
        for i, (twin, track) in enumerate(zip(self._twins, self._tracks)):
            if track.idle:  # its ε was erased at the last seed: try again from the current main weights
                self._seed_twin(i, optimizer, pl_module, step)
                continue
            loss = math.nan if twin.loss is None else float(twin.loss)
            twin.step(hyper, clip_val, clip_by_value)
            d = float(distance(twin.params, self._params, self.norm))
            if not math.isfinite(d) and not all_finite(self._params):
                return self._main_diverged(step)
            if not (math.isfinite(d) and d > 0 and (twin.loss is None or math.isfinite(loss))):
                what = "collapsed onto the main run (d = 0)" if d == 0 else f"diverged (loss={loss}, d={d})"
                self._reseed_warn("reseed", f"twin {i} {what} at step {step}; re-seeded from the main weights")
                self._seed_twin(i, optimizer, pl_module, step)
                reseeded = True
                continue
            track.record(step, math.log(d))
            values["distance"].append(d)
            values["log_distance"].append(math.log(d))
            values["twin_loss"].append(loss)
            if self.renormalize_every is not None and track.since == self.renormalize_every:
                track.ftle = twin.benettin.update(d, math.exp(track.interval_start), track.since)
                values["ftle"].append(track.ftle)
                values["mle"].append(twin.benettin.mle)
                eps = self._epsilon(seed=False) if eps is None else eps
                self._renormalize(i, optimizer, eps, d, step)
        self.per_twin = {
            "distance": [math.exp(t.last) for t in self._tracks],
            "log_distance": [t.last for t in self._tracks],
            "ftle": [t.ftle for t in self._tracks],
            "mle": [twin.benettin.mle for twin in self._twins],
        }
        metrics = summarise(values, with_stderr=("ftle", "mle"))
        if self.function_space:
            metrics["lyapunov/function_distance"] = self._function_distance(trainer, pl_module)
        if reseeded:
            metrics["lyapunov/reseeds"] = float(self._reseed_warn.count)
        return metrics

    def _renormalize(self, i: int, optimizer: Optimizer, eps: float, d: float, step: int) -> None:
        """Pull twin ``i`` from distance ``d`` back to ε (with its optimizer state, as
        :func:`~chaos_callbacks.dynamics.lyapunov.renormalize_` does) and start a new interval there."""
        twin, track = self._twins[i], self._tracks[i]
        twin_state, main_state = twin.momentum_pairs(optimizer, self._params)
        rescale_([*twin.params, *twin_state], [*self._params, *main_state], eps / d)
        d0 = float(distance(twin.params, self._params, self.norm))
        if d0 > 0 and math.isfinite(d0):
            track.start_interval(math.log(d0))
            return
        self._skip_warn("erased", f"epsilon={eps:g} was erased by rounding the weights at step {step}; twin {i} is re-seeded at the next step")
        track.restart(step, math.nan)

    def _function_distance(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """Mean over twins of ‖f_twin(X) − f_main(X)‖ on the probe batch X (eval mode; union of the ranks' shards)."""
        targets = [*self._params, *pl_module.buffers()]

        def outputs() -> Tensor:
            with main_step_precision(trainer):
                return self.output_fn(plumb.user_module(pl_module), self._probe).to(torch.float64)

        with plumb.no_harm(pl_module, train_mode=False), torch.no_grad():
            main = outputs()
            sums = []
            for twin in self._twins:
                with swapped(targets, [*twin.params, *twin.buffers]):
                    diff = (outputs() - main).abs()
                sums.append(diff.sum() if self.norm == "l1" else diff.square().sum())
        total = plumb.mean_reducer(trainer)(torch.stack(sums)) * trainer.world_size
        distances = total if self.norm == "l1" else total.sqrt()
        return float(distances.mean())
