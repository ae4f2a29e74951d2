"""``LyapunovTwinRun``: the maximal Lyapunov exponent of training, from a twin run or tangent vectors.

This module holds the callback: its arguments, hooks, the glue common to both modes (set-up, ε,
re-seeding, divergence, summaries, checkpoints). The mode-specific steps are mixins:
:mod:`~chaos_callbacks.callbacks._lyapunov_twin_mode` (twin runs) and
:mod:`~chaos_callbacks.callbacks._lyapunov_tangent_mode` (tangent vectors); the twins' tensors and
optimizer mirror are :mod:`~chaos_callbacks.callbacks._twin_mirror`.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.optim import Optimizer
from torch.utils.hooks import RemovableHandle

from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.callbacks import _validation as check
from chaos_callbacks.callbacks._lyapunov_common import all_finite, finite_mean, summarise
from chaos_callbacks.callbacks._lyapunov_tangent_mode import TangentMode
from chaos_callbacks.callbacks._lyapunov_twin_mode import OutputFn, TwinMode
from chaos_callbacks.callbacks._twin_mirror import Track, Twin, hyperparameters, structure, weight_norm
from chaos_callbacks.dynamics.lyapunov import (
    LocalExponentFit,
    Norm,
    TangentAccumulator,
    default_epsilon,
    local_exponent,
    parameter_norm,
    random_perturbation,
    rounding_floor,
)

Mode = Literal["twin", "tangent"]
Perturb = Literal["weights", "all"]
_RESOLVED = 0.01  # an explicit ε is warned about when rounding can move it by more than this fraction


# --------------------------------------------------------------------------- helpers (no hooks)
def _default_outputs(module: LightningModule, batch: Any) -> Tensor:
    """The default ``output_fn``: ``module(batch[0])`` for tuple/list batches, else ``module(batch)``."""
    return module(batch[0] if isinstance(batch, (tuple, list)) else batch)


def _fit_or_none(track: Track) -> LocalExponentFit | None:
    """The local-exponent fit of a twin's ln d(t) since its last seed; ``None`` below 3 finite samples."""
    steps, log_d = track.curve.points()
    if len(log_d) < 3:
        return None
    try:
        return local_exponent(log_d, steps)
    except ValueError:  # non-finite samples
        return None


# --------------------------------------------------------------------------- the callback
class LyapunovTwinRun(TwinMode, TangentMode, Callback):
    """Maximal Lyapunov exponent of the training map θ_{t+1} = Φ_t(θ_t), measured live.

    ``mode="twin"`` (Jiménez-González, Soriano & Lacasa, arXiv 2506.08523): at fit start a twin
    θ'_0 = θ_0 + δ with ‖δ‖ = ε is made and trained alongside the main run with the *same* steps —
    same batches, same dropout masks (the twin's forward replays the random stream of the main step),
    the same precision context (bf16 autocast under ``bf16-mixed``), an optimizer of the same class,
    param groups and state, the main run's current learning rates (schedulers are followed) and the
    same gradient clipping (by norm or by value). The separation d(t) = ‖θ'_t − θ_t‖ (``norm="l2"``,
    or ``"l1"`` as in the paper) then grows like e^{λt} while it is small.

    - ``renormalize_every=k`` (Benettin et al. 1980): every k steps the twin is pulled back to
      distance ε along the separation (momentum/Adam buffers rescaled by the same factor), giving
      the finite-time exponent ``ftle = ln(d/d_0)/k`` of the interval and the running maximal
      exponent ``mle = Σ ln(d_j/d_{0,j}) / Σ k_j`` (d_{0,j}: the separation measured after the
      renormalisation, so a re-sized ε changes nothing in the sum).
    - ``renormalize_every=None``: free evolution as in the paper; ln d(t) is logged and the local
      exponent — the slope of ln d(t) over the exponential phase before saturation
      (:func:`~chaos_callbacks.dynamics.lyapunov.local_exponent`) — every ``summary_every_n_steps``
      and at fit end.

    ``mode="tangent"`` (Sasdelli et al., OpenReview 37Fh1MiR5Ze): ε-free; a unit tangent vector is
    pushed through the exact linearisation of each ``torch.optim.SGD`` step, v ← (I − ηH)v with
    momentum, weight decay and Nesterov, H applied by exact Hessian-vector products at the main
    weights on the step's batch (before the step), in float32/float64 with autocast off (under
    ``bf16-mixed`` it linearises the full-precision map). For a quadratic loss both modes give
    max_i ln|1 − ηλ_i|.

    **ε.** By default (``epsilon=None``) ε is relative to the weights:
    ε = :func:`~chaos_callbacks.dynamics.lyapunov.default_epsilon` (c·max(‖θ‖, 1) in ``norm``,
    c = 1e-8 in float64, 1e-4 in float32, 0.1 for bf16 compute), sized at every (re)seed and
    re-sized at every renormalisation, so rounding the weights moves the separation by at most a
    relative √u whatever their size (an absolute 1e-8 is erased by weights of 1e8 in float64).
    Under ``bf16-mixed`` both runs round weights and activations to bfloat16 in every forward pass;
    ε = 0.1·‖θ‖ sits above that rounding (u = 2⁻⁸), and the exponent is the growth rate of
    separations of that size, measured above the rounding noise floor — a finite-size exponent that
    a contracting direction cannot push below the floor, not the tangent exponent of the float32
    map. An explicit ``epsilon`` keeps its absolute meaning (the paper's protocol: L1, ε = 1e-8,
    float64) and is warned about once when rounding at the current weight scale, u·‖θ‖, exceeds 1 %
    of it.

    **Manual optimization** needs ``loss_fn``: the twin (tangent vector) follows the *first*
    optimizer — its gradient is that of ``loss_fn`` w.r.t. the first optimizer's parameters at the
    start of each batch (summed over batches until that optimizer steps), and it steps once after
    each batch in which ``optimizers[0].step()`` ran, with the hyperparameters that step used.
    Other optimizers' parameters keep their main values in the twin's forward; clipping done inside
    ``training_step`` and a second step of the first optimizer in one batch are not mirrored (the
    latter is skipped and the twins re-seeded). Dropout masks match when ``loss_fn`` draws its
    random numbers in the order the training step does.

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
    TensorBoard figure ``lyapunov/log_distance`` of ln d(t). With ``n_twins ≥ 2``,
    ``lyapunov/mle_stderr``, ``lyapunov/ftle_stderr`` and ``lyapunov/local_exponent_stderr`` are
    the standard errors s/√n of those means (s the sample standard deviation over the n twins
    that reported): the spread due to the random perturbation directions within this run, not
    over seeds or data orders.

    The twin is evaluated by pointing the module's parameters and buffers at the twin's tensors
    (no copy) inside :func:`~chaos_callbacks.callbacks._plumbing.no_harm`, so the main run is bit
    for bit the run without the callback. Under DDP the twin's gradient is mean-reduced across
    ranks (one all-reduce per step), so twins are identical on every rank; twin weights, buffers,
    optimizer state, accumulators, ln d(t) history (at most 2048 samples per twin, evenly thinned)
    and the generator are checkpointed. A diverging twin (non-finite loss or distance) or one that
    collapsed onto the main run (d = 0) is re-seeded from the main weights with a warning; a twin
    that missed a main step (its gradient failed) is re-seeded too. When the *main* weights turn
    non-finite the callback warns once ("the main run diverged"), counts every step in
    ``lyapunov/skipped`` and stays idle until they are finite again, then re-seeds. Cost per step:
    one extra forward and backward per twin (twin mode) or one forward, a double backward and one
    HVP per vector (tangent mode); memory: one copy of the parameters and optimizer state per twin
    (:attr:`memory_bytes`).

    Args:
        mode: ``"twin"`` or ``"tangent"`` (``torch.optim.SGD`` only).
        renormalize_every: Benettin interval in optimizer steps, or ``None`` for free evolution
            (twin mode). In tangent mode the interval of ``ftle`` (``None``: no ``ftle``).
        n_twins: number of twins (tangent vectors) averaged.
        epsilon: separation ε in ``norm`` (absolute), or ``None`` (default): relative to the
            weights, see above.
        perturb: ``"weights"`` perturbs only weight matrices and kernels (parameters with ≥ 2
            dimensions), as the paper; ``"all"`` every trainable parameter. The distance is always
            over every parameter the optimizer holds.
        norm: ``"l2"`` or ``"l1"``.
        function_space: also log the distance between the main and twin outputs (eval mode) on a
            fixed probe batch, the first training batch seen (twin mode).
        output_fn: ``output_fn(module, batch) -> Tensor`` for ``function_space``; default
            ``module(batch[0])`` for tuple/list batches, else ``module(batch)``.
        loss_fn: ``loss_fn(module, batch) -> scalar``; default: the module's own ``training_step``
            (its logging muted, its metric states restored). Required under manual optimization.
        summary_every_n_steps: cadence of the local-exponent fit and of the figure (also at fit
            end); ``None``: fit end only.
        seed: seed of the perturbation generator (never the global RNG; the same on every rank).
        prefix: prepended to every tag this callback writes (``"probe_a/"`` → ``probe_a/lyapunov/...``),
            so that two instances can run side by side; two instances of one area with the same
            prefix are refused (identical ones by Lightning when the Trainer is built, others at fit start).

    Attributes:
        last_metrics: the values logged at the last optimizer step (and the last summary).
        per_twin: the latest ``distance``, ``log_distance``, ``ftle``, ``mle`` (and
            ``local_exponent``) of each twin, before averaging.
        local_fits: the last :class:`~chaos_callbacks.dynamics.lyapunov.LocalExponentFit` of each
            twin (free evolution; ``None`` with fewer than 3 samples).
    """

    AREA = "lyapunov"  #: tags are ``<prefix>lyapunov/<quantity>``

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
        prefix: str = "",
    ) -> None:
        owner = type(self).__name__
        self.prefix = check.check_prefix(owner, "prefix", prefix)
        self.mode: Mode = check.check_choice(owner, "mode", mode, ("twin", "tangent"))
        self.renormalize_every = check.check_int(owner, "renormalize_every", renormalize_every, minimum=1, allow_none=True)
        self.n_twins: int = check.check_int(owner, "n_twins", n_twins, minimum=1)  # type: ignore[assignment]
        self.epsilon = check.check_float(owner, "epsilon", epsilon, 0.0, low_open=True, allow_none=True)
        self.perturb: Perturb = check.check_choice(owner, "perturb", perturb, ("weights", "all"))
        self.norm: Norm = check.check_choice(owner, "norm", norm, ("l2", "l1"))
        self.function_space = check.check_bool(owner, "function_space", function_space)
        if self.function_space and self.mode != "twin":
            raise ValueError(f"{owner}: function_space=True needs mode='twin' (a tangent vector has no outputs)")
        self.output_fn: OutputFn = check.check_callable(owner, "output_fn", output_fn) or _default_outputs
        self.loss_fn: plumb.LossFn | None = check.check_callable(owner, "loss_fn", loss_fn)
        self.summary_every_n_steps = check.check_int(owner, "summary_every_n_steps", summary_every_n_steps, minimum=1, allow_none=True)
        self.seed: int = check.check_int(owner, "seed", seed, minimum=0)  # type: ignore[assignment]
        self._skip_warn = plumb.WarnOnce(owner)
        self._reseed_warn = plumb.WarnOnce(owner)
        self._epsilon_warned = False
        self._pending: dict[str, Any] | None = None
        self._hook: RemovableHandle | None = None
        self._watched: Optimizer | None = None
        self._clear()

    def _clear(self) -> None:
        self._params: list[Tensor] = []
        self._twins: list[Twin] = []
        self._tangents: list[TangentAccumulator] = []
        self._hv: list[list[Tensor] | None] = []
        self._tracks: list[Track] = []
        self._structure: tuple[int, ...] = ()
        self._perturbed: list[bool] = []
        self._generator = torch.Generator().manual_seed(self.seed)
        self._compute_dtype = torch.float32
        self._probe: Any = None
        self._hyper: list[dict[str, Any]] | None = None
        self._steps_in_batch = 0  # steps of optimizers[0] during the current batch (its post-hook)
        self._micro_seen = self._micro_done = 0  # micro-batches since the last step / with their gradient in
        self._diverged = False
        self._last_summary = -1
        self._skips_logged = self._skip_warn.count
        self.last_metrics: dict[str, float] = {}
        self.per_twin: dict[str, list[float]] = {}
        self.local_fits: list[LocalExponentFit | None] = []

    @functools.cached_property  # Lightning reads it at every hook call; the settings it names are fixed
    def state_key(self) -> str:
        return self._generate_state_key(
            mode=self.mode, renormalize_every=self.renormalize_every, n_twins=self.n_twins, seed=self.seed,
            **plumb.prefix_key(self.prefix),
        )

    @property
    def mle(self) -> float:
        """Mean over twins (tangent vectors) of the running maximal exponent; NaN before the first interval."""
        if self.mode == "tangent":
            return finite_mean([t.mle for t in self._tangents])
        return finite_mean([t.benettin.mle for t in self._twins])

    @property
    def memory_bytes(self) -> int:
        """Bytes held for the twins: parameters, buffers and optimizer state (tangent: the vectors)."""
        if self.mode == "twin":
            return sum(t.nbytes for t in self._twins)
        vectors = [x for t in self._tangents for x in [*t.v, *(t.momentum_v or [])]]
        return sum(x.numel() * x.element_size() for x in vectors)

    def log_distance_curves(self) -> list[tuple[list[int], list[float]]]:
        """(optimizer steps, ln d) of every twin since its last (re)seed (evenly thinned past 2048 samples)."""
        return [track.curve.points() for track in self._tracks]  # type: ignore[misc]

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plumb.check_unique_tags(self, trainer)
        plumb.check_loss_resolvable(pl_module, self.loss_fn, type(self).__name__)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._validate(trainer, pl_module)
        pending, self._pending = self._pending, None
        self._build(trainer, pl_module, pending)
        self._watch(trainer.optimizers[0])

    def _watch(self, optimizer: Optimizer) -> None:
        """Count the steps of ``optimizer`` and record the hyperparameters each one used (a step post-hook)."""
        if self._hook is not None:
            self._hook.remove()
        self._hook = optimizer.register_step_post_hook(self._record_step)
        self._watched = optimizer

    def _record_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        # the values the update just used, whatever changed them before (a callback's on_before_optimizer_step)
        # or changes them after (a step-interval scheduler, before on_train_batch_end)
        self._hyper = hyperparameters(optimizer)
        self._steps_in_batch += 1

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        self._watched = None

    @plumb.contain_failures("lyapunov", warn="_skip_warn")
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._hyper, self._steps_in_batch = None, 0
        optimizer = trainer.optimizers[0]
        if optimizer is not self._watched or structure(optimizer) != self._structure:
            self._skip_warn("groups", "the optimizer or its param groups changed; the twins were re-created")
            probe = self._probe
            self._build(trainer, pl_module, None)
            self._watch(optimizer)
            self._probe = probe
        self._micro_seen += 1
        if self._diverged:
            if not all_finite(self._params):
                return
            self._diverged = False
            self._reseed_all(trainer, pl_module, trainer.global_step)
        if self.function_space and self._probe is None:
            self._probe = apply_to_collection(batch, Tensor, lambda t: t.detach().clone())
        try:
            if self.mode == "twin":
                self._twin_gradients(trainer, pl_module, batch, batch_idx)
            else:
                self._tangent_products(trainer, pl_module, batch, batch_idx)
        except plumb.EstimateSkipped as exc:
            self._skip_warn("batch", f"the {self.mode} step of batch {batch_idx} was skipped: {exc}")
            return
        self._micro_done += 1

    @plumb.contain_failures("lyapunov", warn="_skip_warn")
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        steps = self._steps_in_batch
        if not steps:  # accumulating, or (manual optimization) the first optimizer did not step
            return
        step, hyper = trainer.global_step, self._hyper
        complete = self._micro_done == self._micro_seen and steps == 1
        self._micro_seen = self._micro_done = self._steps_in_batch = 0
        if self._diverged:
            self._skip_warn("diverged", f"the main run diverged: non-finite weights at step {step}")
            metrics: dict[str, float] = {}
        elif self.mode == "twin":
            complete = self._reduce_gradients(trainer, complete)
            metrics = self._twin_step(trainer, pl_module, hyper, step) if complete else self._missed_step(trainer, pl_module, step, steps)
        else:
            metrics = self._tangent_step(trainer, hyper, step) if complete else self._missed_step(trainer, pl_module, step, steps)
        if self._skip_warn.count != self._skips_logged:
            self._skips_logged = self._skip_warn.count
            metrics["lyapunov/skipped"] = float(self._skip_warn.count)
        self.last_metrics = metrics
        plumb.log_scalars(trainer, pl_module, metrics, step, prog_bar=("lyapunov/mle",), prefix=self.prefix)
        if self.summary_every_n_steps and step % self.summary_every_n_steps == 0:
            self._summary(trainer, pl_module, step)

    @plumb.contain_failures("lyapunov", warn="_skip_warn")
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._tracks and self._last_summary != trainer.global_step:
            self._summary(trainer, pl_module, trainer.global_step)

    def _missed_step(self, trainer: Trainer, pl_module: LightningModule, step: int, steps: int) -> dict[str, float]:
        """The main run stepped without a complete twin gradient (a failed micro-batch, or two steps in one batch)."""
        why = "a micro-batch's gradient failed" if steps == 1 else f"the first optimizer stepped {steps} times in one batch"
        if self.mode == "tangent":  # the vector stays a valid direction; this step's Jacobian is left out
            self._hv = [None] * self.n_twins
            self._skip_warn("missed", f"tangent step {step} skipped: {why}")
            return {}
        self._skip_warn("missed", f"the twins missed the main step {step} ({why}); re-seeded from the main weights")
        self._reseed_all(trainer, pl_module, step)
        return {}

    def _main_diverged(self, step: int) -> dict[str, float]:
        """Non-finite main weights: warn once, count the step, wait for finite weights (checked at each batch start)."""
        self._diverged = True
        for twin in self._twins:
            twin.discard_gradients()
        self._hv = [None] * self.n_twins
        self._skip_warn(
            "diverged",
            f"the main run diverged: non-finite weights at step {step}; the twins wait until the main weights are finite again",
        )
        return {}

    # ------------------------------------------------------------------ setup
    def _validate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        name = type(self).__name__
        automatic = pl_module.automatic_optimization
        if not trainer.optimizers:
            raise ValueError(f"{name} needs an optimizer, the module configured none")
        if automatic and len(trainer.optimizers) != 1:
            raise ValueError(f"{name} needs exactly one optimizer, got {len(trainer.optimizers)}")
        optimizer = trainer.optimizers[0]
        if isinstance(optimizer, torch.optim.LBFGS):
            raise ValueError(f"{name} cannot mirror LBFGS: its step re-evaluates the loss through a closure")
        if self.mode == "twin":
            self._validate_twin(trainer, pl_module)
        else:
            self._validate_tangent(trainer)

    def _build(self, trainer: Trainer, pl_module: LightningModule, pending: dict[str, Any] | None) -> None:
        """Create the twins (tangent vectors), or restore them from a checkpoint."""
        self._clear()
        optimizer = trainer.optimizers[0]
        self._structure = structure(optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        self._params = params if self.mode == "twin" else [p for p in params if p.requires_grad]
        if not self._params:
            raise ValueError(f"{type(self).__name__}: the optimizer holds no trainable parameters")
        bf16 = self.mode == "twin" and trainer.precision == "bf16-mixed"
        self._compute_dtype = torch.bfloat16 if bf16 else self._params[0].dtype
        self._perturbed = [p.requires_grad and (self.perturb == "all" or p.ndim >= 2) for p in self._params]
        if not any(self._perturbed):
            raise ValueError(
                f"{type(self).__name__}(perturb='weights') found no trainable weight matrix or kernel (ndim >= 2); "
                "use perturb='all'"
            )
        self._tracks = [Track() for _ in range(self.n_twins)]
        if self.mode == "twin":
            buffers = list(pl_module.buffers())
            self._twins = [Twin(optimizer, self._params, buffers) for _ in range(self.n_twins)]
        else:
            self._hv = [None] * self.n_twins
        if pending is not None:
            self._restore(trainer, pending)
            return
        for i in range(self.n_twins):
            if self.mode == "twin":
                self._seed_twin(i, optimizer, pl_module, trainer.global_step, fatal=True)
            else:
                self._restart_tangent(i, optimizer, trainer.global_step)

    def _epsilon(self, seed: bool = True) -> float:
        """ε for a (re)seed or renormalisation now: ``epsilon``, or ``default_epsilon`` at the current weight norm
        (:func:`~chaos_callbacks.dynamics.lyapunov.parameter_norm` at a seed; at a renormalisation, every
        ``renormalize_every`` steps, the same norm without its float64 copy of the weights, equal to ~1e-6)."""
        if self.epsilon is None:
            size = parameter_norm(self._params, self.norm) if seed else weight_norm(self._params, self.norm)
            return default_epsilon(self._compute_dtype, size)
        if self.mode == "twin" and not self._epsilon_warned:
            floor = rounding_floor(self._params, self.norm, self._compute_dtype)
            if floor > _RESOLVED * self.epsilon:
                self._epsilon_warned = True
                rank_zero_warn(
                    f"{type(self).__name__}: epsilon={self.epsilon:g} is within {1 / _RESOLVED:g}x of the rounding of the "
                    f"{self._compute_dtype} weights (u·‖θ‖ = {floor:.3g}): rounding blurs or erases the separation and "
                    "the exponent is unreliable. Pass a larger epsilon, or epsilon=None to size it to the weights."
                )
        return self.epsilon

    def _perturbation(self, size: float) -> list[Tensor | None]:
        """A draw of size ``size`` on the perturbed parameters (None elsewhere), from the callback's generator."""
        chosen = [p for p, on in zip(self._params, self._perturbed) if on]
        draws = iter(random_perturbation(chosen, size, self.norm, self._generator))
        return [next(draws) if on else None for on in self._perturbed]

    def _reseed_all(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Every twin (tangent vector) afresh from the main run's current state."""
        optimizer = trainer.optimizers[0]
        for i in range(self.n_twins):
            if self.mode == "twin":
                self._twins[i].discard_gradients()
                self._seed_twin(i, optimizer, pl_module, step)
            else:
                self._hv[i] = None
                self._restart_tangent(i, optimizer, step)

    def _restore(self, trainer: Trainer, state: dict[str, Any]) -> None:
        if len(state["tracks"]) != self.n_twins:
            raise ValueError(f"{type(self).__name__}: the checkpoint holds {len(state['tracks'])} twins, expected {self.n_twins}")
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
        self._diverged = state["diverged"]
        self._skip_warn.count, self._reseed_warn.count = state["skipped"], state["reseeds"]
        self._skips_logged = self._skip_warn.count

    # ------------------------------------------------------------------ summaries
    def _summary(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Local exponents of the free evolution (twin mode) and the ln d(t) figure."""
        self._last_summary = step
        if self.mode == "twin" and self.renormalize_every is None:
            self.local_fits = [_fit_or_none(t) for t in self._tracks]
            fits = [f for f in self.local_fits if f is not None]
            if fits:
                self.per_twin["local_exponent"] = [math.nan if f is None else f.slope for f in self.local_fits]
                metrics = summarise({"local_exponent": [f.slope for f in fits]}, with_stderr=("local_exponent",))
                metrics["lyapunov/saturated"] = sum(f.saturated for f in fits) / len(fits)
                self.last_metrics = {**self.last_metrics, **metrics}
                plumb.log_scalars(trainer, pl_module, metrics, step, prefix=self.prefix)

        def figure() -> Any:
            from chaos_callbacks.plotting.lyapunov import log_distance_figure

            return log_distance_figure(self.log_distance_curves(), self.local_fits, mle=self.mle)

        plumb.log_figure(trainer, f"{self.prefix}lyapunov/log_distance", figure, step)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        if not self._tracks:
            return {}
        return {
            "generator": self._generator.get_state(),
            "tracks": [t.state_dict() for t in self._tracks],
            "twins": [t.state_dict() for t in self._twins],
            "tangents": [apply_to_collection(t.state_dict(), Tensor, Tensor.cpu) for t in self._tangents],
            "probe": None if self._probe is None else apply_to_collection(self._probe, Tensor, Tensor.cpu),
            "last_summary": self._last_summary,
            "diverged": self._diverged,
            "skipped": self._skip_warn.count,
            "reseeds": self._reseed_warn.count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # applied in on_train_start, once the optimizer exists and the module is on its device
        self._pending = state_dict or None
