"""``LyapunovTwinRun``: the maximal Lyapunov exponent of training, from a twin run or tangent vectors."""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.curvature.hvp import HessianOperator, flatten, unflatten
from chaos_callbacks.dynamics.lyapunov import (
    BenettinAccumulator,
    LocalExponentFit,
    Norm,
    TangentAccumulator,
    default_epsilon,
    local_exponent,
    parameter_distance,
    random_perturbation,
    renormalize_,
)

Mode = Literal["twin", "tangent"]
Perturb = Literal["weights", "all"]
OutputFn = Callable[[LightningModule, Any], Tensor]
_SGD_KEYS = ("lr", "momentum", "weight_decay", "dampening", "nesterov")


# --------------------------------------------------------------------------- torch helpers (no Lightning)
@contextmanager
def _swapped(targets: Sequence[Tensor], values: Sequence[Tensor]) -> Iterator[None]:
    """Point each target at the storage of the matching value (no copy); put the originals back on exit.

    The module's parameters keep their identity, so the user's own ``training_step`` evaluates the
    twin and ``torch.autograd.grad`` w.r.t. those parameters gives the twin's gradient; in-place
    buffer updates (batch-norm running statistics) land in the twin's buffers. The main values
    return bit for bit: their storage is only detached, never written.
    """
    saved = [t.data for t in targets]
    try:
        for t, v in zip(targets, values):
            t.data = v
        yield
    finally:
        for t, s in zip(targets, saved):
            t.data = s


def _hyperparameters(optimizer: Optimizer) -> list[dict[str, Any]]:
    """Every param group's hyperparameters (all keys but ``params``)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _structure(optimizer: Optimizer) -> tuple[int, ...]:
    return tuple(len(group["params"]) for group in optimizer.param_groups)


def _rebuild_optimizer(optimizer: Optimizer, params: Sequence[Tensor]) -> Optimizer:
    """``type(optimizer)`` over ``params``, with the same param groups and hyperparameters.

    Constructor defaults are passed only where the constructor accepts them (``AdamW.defaults``
    holds keys its ``__init__`` does not take); each group carries all its own values anyway.
    """
    signature = inspect.signature(type(optimizer).__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    defaults = {k: v for k, v in optimizer.defaults.items() if takes_any or k in signature}
    groups, offset = [], 0
    for values, size in zip(_hyperparameters(optimizer), _structure(optimizer)):
        groups.append({**values, "params": list(params[offset : offset + size])})
        offset += size
    return type(optimizer)(groups, **defaults)


class _Twin:
    """One twin trajectory: parameters, buffers and optimizer of its own, shaped like the main run's."""

    def __init__(self, optimizer: Optimizer, params: Sequence[Tensor], buffers: Sequence[Tensor]) -> None:
        self.params = [p.detach().clone() for p in params]
        self.buffers = [b.detach().clone() for b in buffers]
        self.optimizer = _rebuild_optimizer(optimizer, self.params)
        self.grads: list[Tensor | None] = [None] * len(self.params)
        self.loss: Tensor | None = None
        self.benettin = BenettinAccumulator()

    def reset(
        self, optimizer: Optimizer, params: Sequence[Tensor], buffers: Sequence[Tensor], delta: Sequence[Tensor | None]
    ) -> None:
        """Twin ← main + δ, with the main run's buffers and a copy of its optimizer state."""
        with torch.no_grad():
            for t, p, dp in zip(self.params, params, delta):
                t.copy_(p if dp is None else p + dp)
            for t, b in zip(self.buffers, buffers):
                t.copy_(b)
        self.optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        self.grads = [None] * len(self.params)
        self.loss = None

    def accumulate(self, grads: Sequence[Tensor | None], loss: Tensor) -> None:
        """Add one micro-batch's gradient and loss (both already divided by the accumulation count)."""
        stored: set[int] = set()
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self.grads[i] is not None:
                self.grads[i].add_(g)
                continue
            # autograd hands one buffer to several inputs (e.g. both terms of a + b); accumulation and
            # norm clipping work in place, so each parameter needs its own
            self.grads[i] = g.clone() if g.data_ptr() in stored else g
            stored.add(g.data_ptr())
        self.loss = loss if self.loss is None else self.loss + loss

    def step(self, hyperparameters: Sequence[dict[str, Any]], clip_val: float, clip_algorithm: str) -> None:
        """One optimizer step with the main run's current hyperparameters and gradient clipping."""
        for group, values in zip(self.optimizer.param_groups, hyperparameters):
            group.update(values)
        for t, g in zip(self.params, self.grads):
            t.grad = g
        with_grad = [t for t in self.params if t.grad is not None]
        if clip_val > 0 and with_grad:
            if clip_algorithm == "value":
                torch.nn.utils.clip_grad_value_(with_grad, clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(with_grad, clip_val)
        self.optimizer.step()
        for t in self.params:
            t.grad = None
        self.grads = [None] * len(self.params)
        self.loss = None

    def momentum_pairs(self, optimizer: Optimizer, params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(twin, main) optimizer-state tensors shaped like their parameter (momentum, Adam moments)."""
        twin_state, main_state = [], []
        for tp, mp in zip(self.params, params):
            main = optimizer.state.get(mp, {})
            for key, value in self.optimizer.state.get(tp, {}).items():
                other = main.get(key)
                if isinstance(value, Tensor) and value.is_floating_point() and value.shape == tp.shape:
                    if isinstance(other, Tensor) and other.shape == value.shape:
                        twin_state.append(value)
                        main_state.append(other)
        return twin_state, main_state

    @property
    def nbytes(self) -> int:
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
        return sum(t.numel() * t.element_size() for t in [*self.params, *self.buffers, *state])

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": [t.cpu().clone() for t in self.params],
            "buffers": [t.cpu().clone() for t in self.buffers],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "benettin": self.benettin.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for t, saved in zip([*self.params, *self.buffers], [*state["params"], *state["buffers"]]):
                t.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.benettin.load_state_dict(state["benettin"])


class _Track:
    """ln d(t) of one perturbed trajectory since its last (re)seed, and its current Benettin interval."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.log_d: list[float] = []  # as measured after each step, before any renormalisation
        self.now = math.nan  # ln d of the current state (after renormalisation)
        self.interval_start = math.nan  # ln d at the start of the current interval
        self.since = 0  # optimizer steps into the current interval
        self.ftle = math.nan

    def restart(self, step: int, log_d: float) -> None:
        self.steps, self.log_d = [step], [log_d]
        self.start_interval(log_d)

    def start_interval(self, log_d: float) -> None:
        self.interval_start, self.now, self.since = log_d, log_d, 0

    def record(self, step: int, log_d: float) -> None:
        self.steps.append(step)
        self.log_d.append(log_d)
        self.now = log_d
        self.since += 1

    def state_dict(self) -> dict[str, Any]:
        return {**vars(self), "steps": list(self.steps), "log_d": list(self.log_d)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        vars(self).update(state)


def _default_outputs(module: LightningModule, batch: Any) -> Tensor:
    return module(batch[0] if isinstance(batch, (tuple, list)) else batch)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


# --------------------------------------------------------------------------- the callback
class LyapunovTwinRun(Callback):
    """Maximal Lyapunov exponent of the training map θ_{t+1} = Φ_t(θ_t), measured live.

    ``mode="twin"`` (Jiménez-González, Soriano & Lacasa, arXiv 2506.08523): at fit start a twin
    θ'_0 = θ_0 + δ with ‖δ‖ = ε is made and trained alongside the main run with the *same* steps —
    same batches, same dropout masks (the twin's forward replays the random stream of the main step),
    an optimizer of the same class, param groups and state, the main run's current learning rates
    (schedulers are followed) and the same gradient clipping. The separation d(t) = ‖θ'_t − θ_t‖
    (``norm="l2"``, or ``"l1"`` as in the paper) then grows like e^{λt} while it is small.

    - ``renormalize_every=k`` (Benettin et al. 1980): every k steps the twin is pulled back to
      distance ε along the separation (momentum/Adam buffers rescaled by the same factor), giving
      the finite-time exponent ``ftle = ln(d/d_0)/k`` of the interval and the running maximal
      exponent ``mle = Σ ln(d_j/d_{0,j}) / Σ k_j``.
    - ``renormalize_every=None``: free evolution as in the paper; ln d(t) is logged and the local
      exponent — the slope of ln d(t) over the exponential phase before saturation
      (:func:`~chaos_callbacks.dynamics.lyapunov.local_exponent`) — every ``summary_every_n_steps``
      and at fit end.

    ``mode="tangent"`` (Sasdelli et al., OpenReview 37Fh1MiR5Ze): ε-free; a unit tangent vector is
    pushed through the exact linearisation of each ``torch.optim.SGD`` step, v ← (I − ηH)v with
    momentum, weight decay and Nesterov, H applied by exact Hessian-vector products at the main
    weights on the step's batch (before the step). For a quadratic loss both modes give
    max_i ln|1 − ηλ_i|.

    All exponents are natural logs per optimizer step. ``n_twins`` independent twins (the paper
    uses 5) are averaged; twin i is perturbed by the i-th draw of
    :func:`~chaos_callbacks.dynamics.lyapunov.random_perturbation` from
    ``torch.Generator().manual_seed(seed)`` (tangent vector i: the same direction at norm 1).

    Logged at the step they describe (``<area>/<quantity>``, means over twins):
    ``lyapunov/distance`` (twin mode), ``lyapunov/log_distance`` (mean ln d before the step's
    renormalisation; in tangent mode ln ε + the log-growth of the tangent vector since the interval
    start, i.e. the twin's ln d(t) in the linear regime), ``lyapunov/twin_loss`` (the twin's
    training loss on the step's batch), ``lyapunov/ftle`` and ``lyapunov/mle`` (at the end of each
    interval), ``lyapunov/function_distance`` (``function_space=True``),
    ``lyapunov/local_exponent`` and ``lyapunov/saturated`` (free evolution; fraction of twins whose
    ln d(t) reached a plateau), ``lyapunov/reseeds`` and ``lyapunov/skipped`` (counters); and a
    TensorBoard figure ``lyapunov/log_distance`` of ln d(t).

    The twin is evaluated by pointing the module's parameters and buffers at the twin's tensors
    (no copy) inside :func:`~chaos_callbacks.callbacks._plumbing.no_harm`, so the main run is bit
    for bit the run without the callback. Under DDP the twin's gradient is mean-reduced across
    ranks (one all-reduce per step), so twins are identical on every rank; twin weights, buffers,
    optimizer state, accumulators, ln d(t) history and the generator are checkpointed. A diverging
    twin (non-finite loss or distance) or one that collapsed onto the main run (d = 0) is
    re-seeded from the main weights with a warning. Cost per step: one extra forward and backward
    per twin (twin mode) or one forward, a double backward and one HVP per vector (tangent mode);
    memory: one copy of the parameters and optimizer state per twin (:attr:`memory_bytes`).

    Args:
        mode: ``"twin"`` or ``"tangent"`` (``torch.optim.SGD`` only).
        renormalize_every: Benettin interval in optimizer steps, or ``None`` for free evolution
            (twin mode). In tangent mode the interval of ``ftle`` (``None``: no ``ftle``).
        n_twins: number of twins (tangent vectors) averaged.
        epsilon: initial separation ε in ``norm``; default
            :func:`~chaos_callbacks.dynamics.lyapunov.default_epsilon` of the parameter dtype
            (1e-8 for float64, 1e-4 for float32).
        perturb: ``"weights"`` perturbs only weight matrices and kernels (parameters with ≥ 2
            dimensions), as the paper; ``"all"`` every trainable parameter. The distance is always
            over every parameter the optimizer holds.
        norm: ``"l2"`` or ``"l1"``.
        function_space: also log the distance between the main and twin outputs (eval mode) on a
            fixed probe batch, the first training batch seen (twin mode).
        output_fn: ``output_fn(module, batch) -> Tensor`` for ``function_space``; default
            ``module(batch[0])`` for tuple/list batches, else ``module(batch)``.
        loss_fn: ``loss_fn(module, batch) -> scalar``; default: the module's own ``training_step``
            (its logging muted, its metric states restored).
        summary_every_n_steps: cadence of the local-exponent fit and of the figure (also at fit
            end); ``None``: fit end only.
        seed: seed of the perturbation generator (never the global RNG; the same on every rank).

    Attributes:
        last_metrics: the values logged at the last optimizer step (and the last summary).
        per_twin: the latest ``distance``, ``log_distance``, ``ftle``, ``mle`` (and
            ``local_exponent``) of each twin, before averaging.
        local_fits: the last :class:`~chaos_callbacks.dynamics.lyapunov.LocalExponentFit` of each
            twin (free evolution; ``None`` with fewer than 3 samples).
    """

    def __init__(
        self,
        mode: Mode = "twin",
        renormalize_every: int | None = 10,
        n_twins: int = 1,
        epsilon: float | None = None,
        perturb: Perturb = "weights",
        norm: Norm = "l2",
        function_space: bool = False,
        output_fn: OutputFn | None = None,
        loss_fn: plumb.LossFn | None = None,
        summary_every_n_steps: int | None = 100,
        seed: int = 0,
    ) -> None:
        if mode not in ("twin", "tangent"):
            raise ValueError(f"mode must be 'twin' or 'tangent', got {mode!r}")
        if renormalize_every is not None and not _positive_int(renormalize_every):
            raise ValueError(f"renormalize_every must be a positive int or None (free evolution), got {renormalize_every!r}")
        if not _positive_int(n_twins):
            raise ValueError(f"n_twins must be a positive int, got {n_twins!r}")
        if epsilon is not None and not (isinstance(epsilon, (int, float)) and math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"epsilon must be a finite number > 0 or None (by dtype), got {epsilon!r}")
        if perturb not in ("weights", "all"):
            raise ValueError(f"perturb must be 'weights' or 'all', got {perturb!r}")
        if norm not in ("l2", "l1"):
            raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")
        if function_space and mode != "twin":
            raise ValueError("function_space=True needs mode='twin' (a tangent vector has no outputs)")
        if summary_every_n_steps is not None and not _positive_int(summary_every_n_steps):
            raise ValueError(f"summary_every_n_steps must be a positive int or None, got {summary_every_n_steps!r}")
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.mode = mode
        self.renormalize_every = renormalize_every
        self.n_twins = n_twins
        self.epsilon = epsilon
        self.perturb = perturb
        self.norm: Norm = norm
        self.function_space = function_space
        self.output_fn = output_fn or _default_outputs
        self.loss_fn = loss_fn
        self.summary_every_n_steps = summary_every_n_steps
        self.seed = seed
        self._skip_warn = plumb.WarnOnce(type(self).__name__)
        self._reseed_warn = plumb.WarnOnce(type(self).__name__)
        self._pending: dict[str, Any] | None = None
        self._hook: RemovableHandle | None = None
        self._clear()

    def _clear(self) -> None:
        self._params: list[Tensor] = []
        self._twins: list[_Twin] = []
        self._tangents: list[TangentAccumulator] = []
        self._hv: list[list[Tensor] | None] = []
        self._tracks: list[_Track] = []
        self._structure: tuple[int, ...] = ()
        self._perturbed: list[bool] = []
        self._generator = torch.Generator().manual_seed(self.seed)
        self._eps = math.nan
        self._probe: Any = None
        self._step_at_start = -1
        self._hyper: list[dict[str, Any]] | None = None
        self._last_summary = -1
        self._skips_logged = self._skip_warn.count
        self.last_metrics: dict[str, float] = {}
        self.per_twin: dict[str, list[float]] = {}
        self.local_fits: list[LocalExponentFit | None] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            mode=self.mode, renormalize_every=self.renormalize_every, n_twins=self.n_twins, seed=self.seed
        )

    @property
    def mle(self) -> float:
        """Mean over twins (tangent vectors) of the running maximal exponent; NaN before the first interval."""
        if self.mode == "tangent":
            return _mean([t.mle for t in self._tangents])
        return _mean([t.benettin.mle for t in self._twins])

    @property
    def memory_bytes(self) -> int:
        """Bytes held for the twins: parameters, buffers and optimizer state (tangent: the vectors)."""
        if self.mode == "twin":
            return sum(t.nbytes for t in self._twins)
        vectors = [x for t in self._tangents for x in [*t.v, *(t.momentum_v or [])]]
        return sum(x.numel() * x.element_size() for x in vectors)

    def log_distance_curves(self) -> list[tuple[list[int], list[float]]]:
        """(optimizer steps, ln d) of every twin since its last (re)seed."""
        return [(list(t.steps), list(t.log_d)) for t in self._tracks]

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plumb.check_loss_resolvable(pl_module, self.loss_fn, type(self).__name__)
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{type(self).__name__} mirrors Lightning's automatic optimization step by step; the module uses "
                "manual optimization, whose steps a callback cannot replay"
            )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validate(trainer, pl_module)
        pending, self._pending = self._pending, None
        self._build(trainer, pl_module, pending)
        self._hook = trainer.optimizers[0].register_step_post_hook(self._record_hyperparameters)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_start = trainer.global_step
        self._hyper = None
        if _structure(trainer.optimizers[0]) != self._structure:
            self._skip_warn("groups", "the optimizer's param groups changed; the twins were re-created")
            probe = self._probe
            self._build(trainer, pl_module, None)
            self._probe = probe
        if self.function_space and self._probe is None:
            self._probe = apply_to_collection(batch, Tensor, lambda t: t.detach().clone())
        try:
            if self.mode == "twin":
                self._twin_gradients(trainer, pl_module, batch, batch_idx)
            else:
                self._tangent_products(trainer, pl_module, batch, batch_idx)
        except plumb.EstimateSkipped as exc:
            self._skip_warn("batch", f"the {self.mode} step of batch {batch_idx} was skipped: {exc}")

    def _record_hyperparameters(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # a step post-hook: the values the update just used, whatever changed them before (a callback's
        # on_before_optimizer_step) or changes them after (a step-interval scheduler, before on_train_batch_end)
        self._hyper = _hyperparameters(optimizer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._step_at_start:  # accumulating: the main optimizer has not stepped
            return
        hyper = self._hyper or _hyperparameters(trainer.optimizers[0])
        metrics = self._twin_step(trainer, pl_module, hyper, step) if self.mode == "twin" else self._tangent_step(trainer, hyper, step)
        if self._skip_warn.count != self._skips_logged:
            self._skips_logged = self._skip_warn.count
            metrics["lyapunov/skipped"] = float(self._skip_warn.count)
        self.last_metrics = metrics
        plumb.log_scalars(trainer, pl_module, metrics, step, prog_bar=("lyapunov/mle",))
        if self.summary_every_n_steps and step % self.summary_every_n_steps == 0:
            self._summary(trainer, pl_module, step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._tracks and self._last_summary != trainer.global_step:
            self._summary(trainer, pl_module, trainer.global_step)

    # ------------------------------------------------------------------ setup
    def _validate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        name = type(self).__name__
        if len(trainer.optimizers) != 1:
            raise ValueError(f"{name} needs exactly one optimizer, got {len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(f"{name} cannot mirror LBFGS: its step re-evaluates the loss through a closure")
        if self.mode == "twin":
            if trainer.precision not in ("32-true", "64-true"):
                raise ValueError(
                    f"{name}(mode='twin') needs precision='32-true' or '64-true', got {trainer.precision!r}: the twin "
                    "runs in full precision, so a reduced-precision main step would separate them by rounding alone"
                )
            if is_overridden("configure_gradient_clipping", pl_module):
                raise ValueError(
                    f"{name}(mode='twin') mirrors the Trainer's gradient_clip_val/gradient_clip_algorithm only; the "
                    "module overrides configure_gradient_clipping, which the twin cannot replay"
                )
            return
        if type(optimizer) is not torch.optim.SGD:
            raise ValueError(
                f"{name}(mode='tangent') linearises torch.optim.SGD only, got {type(optimizer).__name__}; "
                "use mode='twin' for other optimizers"
            )
        if trainer.gradient_clip_val:
            raise ValueError(f"{name}(mode='tangent') does not linearise gradient clipping; use mode='twin'")
        self._sgd_hyperparameters(_hyperparameters(optimizer), error=ValueError)

    def _sgd_hyperparameters(self, groups: Sequence[dict[str, Any]], error: type[Exception]) -> dict[str, Any]:
        """The SGD hyperparameters shared by every param group (tangent mode)."""
        values = [{k: g[k] for k in _SGD_KEYS} for g in groups]
        if any(g.get("maximize") for g in groups):
            raise error(f"{type(self).__name__}(mode='tangent') does not support SGD(maximize=True)")
        if any(v != values[0] for v in values[1:]):
            raise error(
                f"{type(self).__name__}(mode='tangent') needs one set of SGD hyperparameters for every param group, "
                f"got {values}; use mode='twin'"
            )
        return {k: float(v) if k != "nesterov" else bool(v) for k, v in values[0].items()}

    def _build(self, trainer: Trainer, pl_module: LightningModule, pending: dict[str, Any] | None) -> None:
        """Create the twins (tangent vectors), or restore them from a checkpoint."""
        self._clear()
        optimizer = trainer.optimizers[0]
        self._structure = _structure(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._params = params if self.mode == "twin" else [p for p in params if p.requires_grad]
        if not self._params:
            raise ValueError(f"{type(self).__name__}: the optimizer holds no trainable parameters")
        self._eps = float(self.epsilon if self.epsilon is not None else default_epsilon(self._params[0].dtype))
        self._perturbed = [
            p.requires_grad and (self.perturb == "all" or p.ndim >= 2) for p in self._params
        ]
        if not any(self._perturbed):
            raise ValueError(
                f"{type(self).__name__}(perturb='weights') found no trainable weight matrix or kernel (ndim >= 2); "
                "use perturb='all'"
            )
        self._tracks = [_Track() for _ in range(self.n_twins)]
        if self.mode == "twin":
            buffers = list(pl_module.buffers())
            self._twins = [_Twin(optimizer, self._params, buffers) for _ in range(self.n_twins)]
        else:
            self._hv = [None] * self.n_twins
        if pending is not None:
            self._restore(trainer, pending)
            return
        for i in range(self.n_twins):
            if self.mode == "twin":
                self._seed_twin(i, optimizer, pl_module, trainer.global_step, fatal=True)
            else:
                v, momentum_v = self._tangent_start(optimizer)
                self._tangents.append(TangentAccumulator(v, self.norm))
                self._tangents[i].momentum_v = momentum_v
                self._tracks[i].restart(trainer.global_step, math.log(self._eps))

    def _perturbation(self, size: float) -> list[Tensor | None]:
        """A draw of size ``size`` on the perturbed parameters (None elsewhere), from the callback's generator."""
        chosen = [p for p, on in zip(self._params, self._perturbed) if on]
        draws = iter(random_perturbation(chosen, size, self.norm, self._generator))
        return [next(draws) if on else None for on in self._perturbed]

    def _seed_twin(self, i: int, optimizer: Optimizer, pl_module: LightningModule, step: int, fatal: bool = False) -> None:
        """(Re)start twin ``i`` at distance ε from the main run's current weights, buffers and optimizer state."""
        twin = self._twins[i]
        twin.reset(optimizer, self._params, list(pl_module.buffers()), self._perturbation(self._eps))
        d = float(parameter_distance(twin.params, self._params, self.norm))
        if not d > 0:
            message = f"epsilon={self._eps} is erased by rounding the {self._params[0].dtype} weights; pass a larger epsilon"
            if fatal:
                raise ValueError(f"{type(self).__name__}: {message}")
            self._skip_warn("erased", message)  # d stays 0: the next step re-seeds again
        self._tracks[i].restart(step, math.log(d) if d > 0 else math.log(self._eps))

    def _tangent_start(self, optimizer: Optimizer) -> tuple[list[Tensor], list[Tensor] | None]:
        """A unit tangent vector, and a zero momentum tangent if the main run already has momentum buffers."""
        v = [x if x is not None else torch.zeros_like(p) for x, p in zip(self._perturbation(1.0), self._params)]
        buffers = [optimizer.state.get(p, {}).get("momentum_buffer") for p in self._params]
        has_momentum = all(b is not None for b in buffers)
        return v, [torch.zeros_like(p) for p in self._params] if has_momentum else None

    def _restore(self, trainer: Trainer, state: dict[str, Any]) -> None:
        if len(state["tracks"]) != self.n_twins:
            raise ValueError(f"{type(self).__name__}: the checkpoint holds {len(state['tracks'])} twins, expected {self.n_twins}")
        self._eps = state["eps"]
        self._generator.set_state(state["generator"])
        for track, saved in zip(self._tracks, state["tracks"]):
            track.load_state_dict(saved)
        for twin, saved in zip(self._twins, state["twins"]):
            twin.load_state_dict(saved)
        for saved in state["tangents"]:
            saved = apply_to_collection(saved, Tensor, lambda t: t.to(self._params[0].device))
            tangent = TangentAccumulator(saved["v"], self.norm)
            tangent.load_state_dict(saved)
            self._tangents.append(tangent)
        self._probe = None if state["probe"] is None else plumb.to_device(trainer, state["probe"])
        self._last_summary = state["last_summary"]
        self._skip_warn.count, self._reseed_warn.count = state["skipped"], state["reseeds"]
        self._skips_logged = self._skip_warn.count

    # ------------------------------------------------------------------ twin mode
    def _twin_gradients(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """Each twin's gradient on this micro-batch, with the random stream the main step is about to use."""
        accumulate = trainer.accumulate_grad_batches
        targets = [*self._params, *pl_module.buffers()]
        with plumb.no_harm(pl_module, train_mode=None):
            for i, twin in enumerate(self._twins):
                # every twin starts from the RNG state the main forward will start from: no_harm restores
                # it on exit, each earlier twin restores it for the next (isolate_rng costs ~0.3-0.7 ms)
                replay = isolate_rng() if i < len(self._twins) - 1 else nullcontext()
                with replay, _swapped(targets, [*twin.params, *twin.buffers]):
                    loss = plumb.compute_loss(pl_module, batch, self.loss_fn, batch_idx) / accumulate
                    wrt = [p for p in self._params if p.requires_grad]
                    grads = iter(torch.autograd.grad(loss, wrt, allow_unused=True))
                twin.accumulate([next(grads) if p.requires_grad else None for p in self._params], loss.detach())

    def _reduce_gradients(self, trainer: Trainer) -> None:
        """Mean over ranks of every twin's gradient and loss: flatten, one all-reduce, split."""
        if trainer.world_size <= 1:
            return
        parts: list[Tensor] = []
        for twin in self._twins:
            parts += [g if g is not None else torch.zeros_like(p) for g, p in zip(twin.grads, twin.params)]
            parts.append(twin.loss if twin.loss is not None else twin.params[0].new_zeros(()))
        reduced = iter(unflatten(plumb.mean_reducer(trainer)(flatten(parts)), parts))
        for twin in self._twins:
            mean_grads = [next(reduced) for _ in twin.grads]
            twin.grads = [None if g is None else m for g, m in zip(twin.grads, mean_grads)]
            loss = next(reduced)
            twin.loss = None if twin.loss is None else loss

    def _twin_step(self, trainer: Trainer, pl_module: LightningModule, hyper: list[dict[str, Any]], step: int) -> dict[str, float]:
        optimizer = trainer.optimizers[0]
        self._reduce_gradients(trainer)
        clip_val = float(trainer.gradient_clip_val or 0.0)
        clip_algorithm = str(trainer.gradient_clip_algorithm or "norm")
        values: dict[str, list[float]] = {k: [] for k in ("distance", "log_distance", "twin_loss", "ftle", "mle")}
        reseeded = False
        for i, (twin, track) in enumerate(zip(self._twins, self._tracks)):
            loss = math.nan if twin.loss is None else float(twin.loss)
            twin.step(hyper, clip_val, clip_algorithm)
            d = float(parameter_distance(twin.params, self._params, self.norm))
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
                twin_state, main_state = twin.momentum_pairs(optimizer, self._params)
                renormalize_(twin.params, self._params, self._eps, self.norm, twin_state=twin_state, main_state=main_state)
                track.start_interval(math.log(float(parameter_distance(twin.params, self._params, self.norm))))
                values["ftle"].append(track.ftle)
                values["mle"].append(twin.benettin.mle)
        self.per_twin = {
            "distance": [math.exp(t.log_d[-1]) if t.log_d else math.nan for t in self._tracks],
            "log_distance": [t.log_d[-1] if t.log_d else math.nan for t in self._tracks],
            "ftle": [t.ftle for t in self._tracks],
            "mle": [twin.benettin.mle for twin in self._twins],
        }
        metrics = {f"lyapunov/{k}": _mean(v) for k, v in values.items() if v}
        if self.function_space:
            metrics["lyapunov/function_distance"] = self._function_distance(trainer, pl_module)
        if reseeded:
            metrics["lyapunov/reseeds"] = float(self._reseed_warn.count)
        return {k: v for k, v in metrics.items() if math.isfinite(v)}

    def _function_distance(self, trainer: Trainer, pl_module: LightningModule) -> float:
        """Mean over twins of ‖f_twin(X) − f_main(X)‖ on the probe batch X (eval mode; union of the ranks' shards)."""
        targets = [*self._params, *pl_module.buffers()]
        with plumb.no_harm(pl_module, train_mode=False), torch.no_grad():
            main = self.output_fn(plumb.user_module(pl_module), self._probe).to(torch.float64)
            sums = []
            for twin in self._twins:
                with _swapped(targets, [*twin.params, *twin.buffers]):
                    diff = (self.output_fn(plumb.user_module(pl_module), self._probe).to(torch.float64) - main).abs()
                sums.append(diff.sum() if self.norm == "l1" else diff.square().sum())
        total = plumb.mean_reducer(trainer)(torch.stack(sums)) * trainer.world_size
        distances = total if self.norm == "l1" else total.sqrt()
        return float(distances.mean())

    # ------------------------------------------------------------------ tangent mode
    def _tangent_products(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """H v for every tangent vector, at the main weights on this micro-batch (the main step's dropout masks)."""
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

    def _tangent_step(self, trainer: Trainer, hyper: list[dict[str, Any]], step: int) -> dict[str, float]:
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
                self._reseed_warn("reseed", f"tangent vector {i} failed at step {step} ({exc}); re-seeded")
                tangent.v, tangent.momentum_v = self._tangent_start(trainer.optimizers[0])
                self._tracks[i].restart(step, math.log(self._eps))
                reseeded = True
                continue
            track.record(step, track.now + exponent)
            values["log_distance"].append(track.now)
            values["mle"].append(tangent.mle)
            if self.renormalize_every is not None and track.since == self.renormalize_every:
                track.ftle = (track.now - track.interval_start) / track.since
                track.start_interval(math.log(self._eps))  # as a twin is pulled back to ε
                values["ftle"].append(track.ftle)
        self.per_twin = {
            "log_distance": [t.log_d[-1] for t in self._tracks],
            "ftle": [t.ftle for t in self._tracks],
            "mle": [t.mle for t in self._tangents],
        }
        metrics = {f"lyapunov/{k}": _mean(v) for k, v in values.items() if v}
        if reseeded:
            metrics["lyapunov/reseeds"] = float(self._reseed_warn.count)
        return {k: v for k, v in metrics.items() if math.isfinite(v)}

    # ------------------------------------------------------------------ summaries
    def _summary(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Local exponents of the free evolution (twin mode) and the ln d(t) figure."""
        self._last_summary = step
        if self.mode == "twin" and self.renormalize_every is None:
            self.local_fits = [_fit_or_none(t) for t in self._tracks]
            fits = [f for f in self.local_fits if f is not None]
            if fits:
                self.per_twin["local_exponent"] = [math.nan if f is None else f.slope for f in self.local_fits]
                metrics = {
                    "lyapunov/local_exponent": _mean([f.slope for f in fits]),
                    "lyapunov/saturated": sum(f.saturated for f in fits) / len(fits),
                }
                self.last_metrics = {**self.last_metrics, **metrics}
                plumb.log_scalars(trainer, pl_module, metrics, step)

        def figure() -> Any:
            from chaos_callbacks.plotting.lyapunov import log_distance_figure

            return log_distance_figure(self.log_distance_curves(), self.local_fits, mle=self.mle)

        plumb.log_figure(trainer, "lyapunov/log_distance", figure, step)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        if not self._tracks:
            return {}
        return {
            "eps": self._eps,
            "generator": self._generator.get_state(),
            "tracks": [t.state_dict() for t in self._tracks],
            "twins": [t.state_dict() for t in self._twins],
            "tangents": [apply_to_collection(t.state_dict(), Tensor, Tensor.cpu) for t in self._tangents],
            "probe": None if self._probe is None else apply_to_collection(self._probe, Tensor, Tensor.cpu),
            "last_summary": self._last_summary,
            "skipped": self._skip_warn.count,
            "reseeds": self._reseed_warn.count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied in on_train_start, once the optimizer exists and the module is on its device
        self._pending = state_dict or None


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _fit_or_none(track: _Track) -> LocalExponentFit | None:
    if len(track.log_d) < 3:
        return None
    try:
        return local_exponent(track.log_d, track.steps)
    except ValueError:  # non-finite samples
        return None
