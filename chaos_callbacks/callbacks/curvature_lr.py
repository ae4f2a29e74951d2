"""``CurvatureLRScheduler``: a learning-rate scheduler driven by live curvature estimates."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch import Tensor
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import LRScheduler

from chaos_callbacks.callbacks import _engine
from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.callbacks import _validation as V
from chaos_callbacks.curvature import NoTrainableParametersError, gradient_weighted_curvature, lanczos, split_gradient_curvature
from chaos_callbacks.curvature.lr_rules import (
    adam_started,
    adam_threshold,
    clamp_lr,
    curvature_problem,
    drift_adjusted_lr,
    edge_of_stability_lr,
    ema,
    momentum_factor,
    quasi_newton_lr,
    is_adam,
    scaled_operator,
    sgd_threshold,
    step_scaling,
)

Mode = Literal["quasi_newton", "edge_of_stability", "dal"]
MAX_RATE = float(torch.finfo(torch.float32).max)  #: beyond it ``torch.optim`` cannot apply the rate (it raises)
DEFAULT_BATCH_FRACTION = 0.5  #: share of the step's batch the ``λ_max`` modes estimate on by default
FIRST_EARLY_STEP = 4  #: early estimates run at the powers of two from this step up to ``every_n_steps``


class HeldLR(LRScheduler):
    """A scheduler whose rates are set from outside (:meth:`hold`) and held between settings.

    ``get_lr`` returns the held rates, so the ``scheduler.step()`` Lightning runs after every
    optimizer step leaves them unchanged. Registered in ``trainer.strategy.lr_scheduler_configs``
    it is checkpointed with the trainer's schedulers and reported by ``LearningRateMonitor``.

    **Composed with the user's schedulers** (``composed=True``): it is stepped first after every
    optimizer step and puts back the rates the user's schedulers last wrote (kept by :meth:`hold`),
    so that they step on their own rates, not on the curvature's.
    """

    def __init__(self, optimizer: Optimizer, composed: bool = False) -> None:
        self.held = [float(g["lr"]) for g in optimizer.param_groups]
        self.composed = composed
        self.users: list[float] | None = None  # the user's rates under the held ones (composed)
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        if not self.composed:
            return list(self.held)
        users, self.users = self.users, None
        return list(users) if users is not None else [float(g["lr"]) for g in self.optimizer.param_groups]

    def hold(self, lrs: list[float]) -> None:
        """Set the optimizer's rates now (the next optimizer step uses them) and keep them; composed,
        remember the user's rates they replace, to be put back after the step."""
        if self.composed and self.users is None:
            self.users = [float(g["lr"]) for g in self.optimizer.param_groups]
        self.held = list(lrs)
        for group, lr in zip(self.optimizer.param_groups, self.held):
            group["lr"] = lr
        self._last_lr = list(self.held)


class CurvatureLRScheduler(Callback):
    """Set the learning rate from the curvature of the loss, estimated live during training.

    Every ``every_n_steps`` optimizer steps (and, with ``early_estimates``, at steps 4, 8, 16, …
    below it), before the step and on the weights it uses, the curvature ``c`` of the probe loss (by
    default the first half of the step's batch: ``batch_fraction``) is estimated by exact
    Hessian-vector products, smoothed (``c̄ ← ema · c̄ + (1 − ema) · c``) and
    turned into the learning rate ``η`` of that step:

    - ``mode="quasi_newton"`` (default): ``η = scale · m / λ_max`` (Sasdelli et al., OpenReview
      37Fh1MiR5Ze), ``λ_max`` by warm-started Lanczos, ``m = (1 − β)/(1 − d)`` for SGD with momentum
      ``β`` and dampening ``d`` (``1 − β`` with Nesterov, ``1`` without momentum and for Adam): heavy
      ball takes steps ``η/m`` times the gradient once its buffer has settled, so ``m`` makes the
      *effective* rate ``scale / λ_max`` whatever the momentum (Goh, Distill 2017);
    - ``mode="edge_of_stability"``: ``η = fraction · τ / λ_max`` with ``τ`` the optimizer's
      stability threshold: ``2`` for SGD, ``(2 + 2β)/(1 − d)`` with heavy-ball momentum ``β`` and
      dampening ``d``, ``(2 + 2β)/(1 + 2β)`` with Nesterov momentum; for Adam/AdamW
      ``τ = (2 + 2β₁)/(1 − β₁)`` and ``λ_max`` is the *preconditioned* sharpness
      ``λ_max(P⁻¹H)`` with ``P = (1 − β₁^{t+1}) diag(sqrt(v̂) + ε)``, computed as the top
      eigenvalue of the symmetric ``P^{-1/2} H P^{-1/2}`` (Cohen et al. 2022, arXiv 2207.14484);
    - ``mode="dal"``: the drift-adjusted rate ``η = min(2 / v^power, max_lr)`` with
      ``v = ‖Hg‖/‖g‖`` (Rosca et al., arXiv 2302.01952). On the step's mini-batch (``probe="batch"``,
      ``dal_estimate="auto"``) ``g`` is mostly batch noise, and ``‖Hg‖/‖g‖`` measures the noise's
      curvature as much as the expected gradient's (the loss spikes of REPRODUCTION.md); so ``v`` is
      taken from the gradients ``g₁, g₂`` of the two halves of the batch, ``v² = (Hg₁)·(Hg₂) / (g₁·g₂)``,
      whose numerator and denominator lose the noise terms ``tr(HΣH)/B`` and ``tr Σ/B`` in expectation
      (:func:`~chaos_callbacks.curvature.drift.split_gradient_curvature`; McCandlish et al., arXiv
      1812.06162). A cross product ``≤ 0`` (noise outweighs the signal) is skipped. Cost per estimate:
      one more first-order pass over the batch (the halves, forwarded apart: BatchNorm in train mode
      normalises each half by its own statistics) and two HVPs instead of one. ``H`` is the whole
      batch's Hessian, correlated with the halves: a bias of order ``1/B`` remains (upwards on an MNIST
      MLP: a slightly smaller rate). No estimate of ``v`` makes DAL stable by itself: ``v ≤ λ_max``, so
      ``2/v ≥ 2/λ_max`` is at or beyond the edge of stability, and only full-batch gradient descent
      aligns ``g`` with the top eigenvector (``v → λ_max``); bound the rate with ``max_lr``.

    ``η`` is then clipped to ``[min_lr, max_lr]``. A curvature that cannot give a rate
    (``λ_max ≤ 0``, NaN/inf, ``‖g‖ → 0``, Lanczos not converged) is skipped: the previous rate is
    held, the skip counted (``curvature_lr/skipped``) and warned once per kind, so the rate is
    always finite, positive and within the bounds. For the first ``warmup_steps`` steps the
    optimizer keeps its own rate, unclipped (estimates still run and prime the smoothing); the
    first step after them takes the rate of the latest smoothed curvature.

    **Scheduler.** At fit start a :class:`HeldLR` scheduler on the optimizer is registered in
    ``trainer.strategy.lr_scheduler_configs`` (``interval="step"``): ``LearningRateMonitor``
    reports its rate (this callback moves itself ahead of any ``LearningRateMonitor`` so the
    monitor logs the rate the step uses), and its state is checkpointed and restored with the
    trainer's schedulers. **A scheduler of the user's** (``configure_optimizers``: cosine, StepLR,
    LambdaLR, ReduceLROnPlateau, …) on the same optimizer is composed with, not refused: the
    curvature sets the scale and the user's schedule its shape. The user's scheduler runs on its
    own rates ``u_t`` exactly as without this callback (``HeldLR`` steps first after each optimizer
    step and puts them back before it steps), and each step uses ``η · u_t / b`` — its current
    factor ``u_t / b`` (``b`` its base rate, ``initial_lr``) times the curvature rate. After warm-up
    the rate is set at every step, since the factor changes between estimates.

    **Parameter groups.** Group ``i`` with base rate ``b_i`` (at fit start) gets ``η · b_i/max b``;
    ``η`` is the rate of the group(s) with the largest base rate. The update is then
    ``θ ← θ − η R g`` with ``R = diag(b_i/max b)``, whose stability is governed by
    ``R^{1/2} H R^{1/2}`` — the curvature used (the Hessian itself when all groups share one rate;
    for Adam ``R`` multiplies ``P⁻¹``). Parameters outside the optimizer are not part of it.

    **Optimizers.** ``torch.optim.SGD`` and Adam/AdamW in every mode; for Adam every mode takes the
    preconditioned curvature (quasi-Newton ``scale / λ_max(P^{-1/2} H P^{-1/2})``, DAL
    ``v = ‖SHS(Sg)‖/‖Sg‖`` with ``S = P^{-1/2}``), the step Adam actually takes being ``η P⁻¹``
    times its (momentum) gradient; any other optimizer is refused at fit start (no rule is defined
    for it). Weight decay is not part of the curvature. **Several optimizers** (manual optimization,
    e.g. a GAN) get one rate each, from the curvature of *their* loss in *their* parameters (the
    diagonal block of its Hessian, in the optimizer's coordinates): ``loss_fn=[loss_0, loss_1, …]``
    gives one loss per optimizer in ``configure_optimizers``' order (a GAN: the generator's and the
    discriminator's losses); a single ``loss_fn`` means every optimizer minimises that loss. Losses
    that are equal share one forward pass. Adam has no
    preconditioner before its first step, so the estimate due at step 0 is left out and the
    optimizer's own rate holds until the next one.

    **Shared estimates.** The curvature is computed by the Trainer's curvature engine
    (:mod:`~chaos_callbacks.callbacks._engine`) together with the other estimating callbacks due at
    the same step: on the same probe, loss and mode they share one forward and first-order graph. When
    the curvature is ``λ_max`` of the Hessian itself (SGD with one learning rate) and a
    :class:`~chaos_callbacks.callbacks.hessian_spectrum.HessianSpectrumMonitor` (Lanczos or Lyapunov
    map) estimates at the same step on the same probe, its solve runs at the stricter of the two
    tolerances and budgets and this callback takes its ``λ_max`` — with no product of its own — when
    the certified bound meets ``tol``; ``share=False`` always solves on its own, so that the rates do
    not depend on which monitors are attached (the forward is still shared). The shared ``λ_max``
    differs from the one this callback would find alone by at most the two certified bounds. The
    monitor's ``probe="batch"`` is the step's whole batch: this callback shares it with
    ``batch_fraction=1`` (or a fixed probe set of the same size), not at the default half batch.

    **The defaults** (``scale=3``, ``ema=0.9``, ``early_estimates=True``, ``every_n_steps=50``,
    ``tol=0.1``, half the batch) were chosen on
    ``benchmarks/bench_lr_sweep.py`` (MNIST MLP with SGD, LeNet with SGD momentum 0.9, a BatchNorm
    ResNet with AdamW, each from a poor initial rate; table in the README): within about half a
    point of the best rate of a 6-point constant sweep on all three. ``1/λ_max`` itself (the paper's
    rule, ``scale=1``) is stable but 2–5× too small for SGD, which settles where ``λ_max ≈ 1.2–2/η``
    (REPRODUCTION.md); ``scale=3`` on a smoothed *mini-batch* ``λ_max`` (larger than the full-batch
    one) lands there. Smoothing holds the rate through single-batch spikes of ``λ_max``. Early in
    training ``λ_max`` grows 10–100× within tens of steps (progressive sharpening, Cohen et al.
    ICLR 2021): a rate set at step 0 and held for ``every_n_steps`` steps overshoots and can kill a
    ReLU network (LeNet: 1 run in 3 at chance); estimating at steps 4, 8, 16, … follows the
    sharpening as it happens, at ``log₂(every_n_steps) − 2`` extra estimates per fit (on LeNet ``λ_max``
    rose from ~1 to 35–150 between steps 4 and 8; estimates at steps 1 and 2 found it unchanged and
    were dropped: same accuracy, 2 estimates fewer). A rate needs ``λ_max`` to ~10 %, not to 1 %
    (``tol=0.1``: ~4 products per warm estimate instead of ~8); estimates every 50 steps did as well as
    every 25 on the MLP and LeNet (one seed: 93.75 vs 93.80 %, 95.85 vs 95.30 %). A Hessian-vector
    product costs 1.7 training steps on LeNet's whole batch and 0.9 on half of it (the BatchNorm
    ResNet: 3.2 and 1.5); the half batch's ``λ_max``, a little larger (noisier) than the whole batch's,
    gives a slightly smaller rate (MNIST MLP: median 0.31 against 0.36) at the same accuracy, so the
    default estimates on half the batch.

    **A limitation of the defaults: plain SGD on a ReLU CNN.** Without momentum the first rate is
    ``3/λ_max`` of the initialisation, an unstable step (``ηλ_max = 3 > 2``) that an MLP survives (its
    best constant rate sits there) but that catapulted LeNet to ``λ_max`` 45–50 000 within four steps
    and killed its ReLUs in every seed (best constant rate: 95.1 %). No guard tried (a capped growth of
    the rate, a stability cap on the latest estimate, restarting the smoothing on a rise) kept the
    benchmark tasks and saved it (``docs/curvature_lr.md``). There, bound the rate (``max_lr=0.3``:
    95.5–96.4 %) or use ``mode="edge_of_stability"``.

    Logs ``curvature_lr/lr`` (``η``), ``curvature_lr/lambda`` (the smoothed curvature in use) and
    ``curvature_lr/skipped`` at every estimate step and when warm-up ends, and ``curvature_lr/hvps``
    at every estimate step: the Hessian-vector products this callback took (0 when it reused another
    callback's solve). With several optimizers, optimizer ``k`` (``configure_optimizers``' order)
    logs ``curvature_lr/optimizer_<k>/lr``, ``…/lambda`` and ``…/hvps`` instead.

    Args:
        every_n_steps: cadence in optimizer steps (estimates run when ``global_step`` is a
            multiple of it, including step 0); the rate is held in between.
        mode: ``"quasi_newton"``, ``"edge_of_stability"`` or ``"dal"``.
        scale: ``c`` of the quasi-Newton rate ``c · m / λ_max`` (> 0).
        fraction: fraction of the stability threshold in ``edge_of_stability`` mode (> 0).
        power: ``p ∈ [0, 1]`` of the drift-adjusted rate.
        dal_estimate: ``v`` of ``mode="dal"``: ``"halves"`` (the noise-free split estimate above),
            ``"plain"`` (``‖Hg‖/‖g‖`` of the probe gradient, one HVP) or ``"auto"``: halves on
            ``probe="batch"``, plain on a fixed probe set, whose loss is one fixed function (the paper's
            full-batch setting when it holds the training set): its ``‖Hg‖/‖g‖`` is exact for that
            loss, its noise a fixed bias of order ``1/N`` set by ``N``, while a fixed split into halves
            would keep one noise draw for the whole run (a negative cross product would skip every
            estimate until the weights move it).
        ema: smoothing of the curvature, in ``[0, 1)`` (0: none).
        early_estimates: also estimate at steps 4, 8, 16, … below ``every_n_steps``, to follow the
            early growth of the curvature (SGD only: Adam's preconditioner ``P`` averages the first
            steps' few squared gradients, so its preconditioned sharpness there measures ``P`` more
            than the landscape, and it rises to ``τ/η`` at any rate ``η`` — Cohen et al. 2022 — so
            that following it early shrinks the rate step after step: on the ResNet task of
            ``bench_lr_sweep`` 29.8 % test accuracy with them, 94.1 % without, best sweep point 93.2 %).
        warmup_steps: steps at the optimizer's own rate before the curvature rate takes over.
        min_lr, max_lr: bounds of ``η`` (``max_lr=None``: no upper bound).
        loss_fn: ``loss_fn(module, batch) -> scalar``, or a sequence of them, one per optimizer;
            default: the module's own ``training_step`` (automatic optimization only).
        probe: ``"batch"`` (the current training batch) or an int ``N`` (a fixed probe set of the
            first ``N`` training examples drawn at fit start).
        batch_fraction: with ``probe="batch"``, the share ``f ∈ (0, 1]`` of the step's batch ``B`` the
            curvature is estimated on: its first ``⌈f · B⌉`` examples, sliced along dimension 0 of every
            tensor (the whole batch if its tensors disagree on dimension 0). ``None``: ½ in the
            ``λ_max`` modes (each product then costs about half), the whole batch in DAL mode (whose
            ``v`` already splits it into two halves). A fixed probe set is used whole.
        tol: relative tolerance of the Lanczos ``λ_max``.
        max_hvps: budget of Hessian-vector products per Lanczos estimate.
        warm_start: start each Lanczos run from the previous top Ritz vector (or the shared one).
        share: reuse another callback's certified ``λ_max`` (or ``‖Hg‖/‖g‖``) of the same operator at
            the same step (see above).
        seed: seed of the random Lanczos start vectors (same on every rank).
        prefix: prepended to every tag this callback writes (``"probe_a/"`` → ``probe_a/curvature_lr/...``),
            so that two instances can run side by side; two instances of one area with the same
            prefix are refused (identical ones by Lightning when the Trainer is built, others at fit start).
    """

    AREA = "curvature_lr"  #: tags are ``<prefix>curvature_lr/<quantity>``

    def __init__(
        self,
        every_n_steps: int = 50,
        mode: Mode = "quasi_newton",
        scale: float = 3.0,
        fraction: float = 0.9,
        power: float = 1.0,
        dal_estimate: Literal["auto", "halves", "plain"] = "auto",
        ema: float = 0.9,
        early_estimates: bool = True,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        max_lr: float | None = None,
        loss_fn: plumb.LossFn | Sequence[plumb.LossFn] | None = None,
        probe: Literal["batch"] | int = "batch",
        batch_fraction: float | None = None,
        tol: float = 0.1,
        max_hvps: int = 50,
        warm_start: bool = True,
        share: bool = True,
        seed: int = 0,
        prefix: str = "",
    ) -> None:
        name = type(self).__name__
        self.prefix = V.check_prefix(name, "prefix", prefix)
        self.every_n_steps = V.check_int(name, "every_n_steps", every_n_steps, minimum=1)
        self.mode = V.check_choice(name, "mode", mode, ("quasi_newton", "edge_of_stability", "dal"))
        self.scale = V.check_float(name, "scale", scale, 0, low_open=True)
        self.fraction = V.check_float(name, "fraction", fraction, 0, low_open=True)
        self.power = V.check_float(name, "power", power, 0, 1)
        self.dal_estimate = V.check_choice(name, "dal_estimate", dal_estimate, ("auto", "halves", "plain"))
        self.ema = V.check_float(name, "ema", ema, 0, 1, high_open=True)
        self.early_estimates = V.check_bool(name, "early_estimates", early_estimates)
        self.warmup_steps = V.check_int(name, "warmup_steps", warmup_steps, minimum=0)
        self.min_lr = V.check_float(name, "min_lr", min_lr, 0)
        self.max_lr = V.check_float(name, "max_lr", max_lr, self.min_lr, low_open=self.min_lr == 0, allow_none=True)
        self.loss_fn = _check_losses(name, loss_fn)
        self.probe = V.check_probe(name, "probe", probe)
        self.batch_fraction = V.check_float(name, "batch_fraction", batch_fraction, 0, 1, low_open=True, allow_none=True)
        if batch_fraction is not None and self.probe != "batch":
            raise ValueError(f"{name}: batch_fraction takes a share of the step's batch (probe='batch'); a fixed probe set "
                             f"(probe={probe}) is used whole, its size is the share. Leave batch_fraction=None")
        self.tol = V.check_float(name, "tol", tol, 0, 1, low_open=True, high_open=True)
        self.max_hvps = V.check_int(name, "max_hvps", max_hvps, minimum=2)
        self.warm_start = V.check_bool(name, "warm_start", warm_start)
        self.share = V.check_bool(name, "share", share)
        self.seed = V.check_int(name, "seed", seed, minimum=0)
        self._warn = plumb.WarnOnce(type(self).__name__)
        self._rates: list[_OptimizerRate] = []
        self._restored: list[dict[str, Any]] = []
        self._probe_batches: list[Any] | None = None
        self._last_step = -1
        self.last_estimate: dict[str, float] = {}

    @functools.cached_property  # Lightning reads it at every hook call; the settings it names are fixed
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, mode=self.mode, probe=self.probe, **plumb.prefix_key(self.prefix))

    @property
    def scheduler(self) -> HeldLR | None:
        """The :class:`HeldLR` of the (first) optimizer, once fitting has started."""
        return self._rates[0].scheduler if self._rates else None

    # ------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        monitors = [i for i, cb in enumerate(trainer.callbacks) if isinstance(cb, LearningRateMonitor)]
        if monitors and monitors[0] < trainer.callbacks.index(self):
            # both act in on_train_batch_start: run first so the monitor logs the rate the step uses
            callbacks = [cb for cb in trainer.callbacks if cb is not self]
            callbacks.insert(monitors[0], self)
            trainer.callbacks = callbacks

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        name = type(self).__name__
        if any(isinstance(cb, CurvatureLRScheduler) and cb is not self for cb in trainer.callbacks):
            raise ValueError(f"{name}: Trainer(callbacks=...) holds two {name}s; both would set the learning rate of the "
                             "same optimizers. Keep one (a HessianSpectrumMonitor can watch another curvature alongside it)")
        optimizers = trainer.optimizers
        losses = self._losses_for(len(optimizers))
        for loss_fn in set(losses):
            plumb.check_loss_resolvable(pl_module, loss_fn, name)
        restored = self._restored if len(self._restored) == len(optimizers) else [{}] * len(optimizers)
        self._rates = [self._rate_for_optimizer(trainer, pl_module, k, opt, loss_fn, state)
                       for k, (opt, loss_fn, state) in enumerate(zip(optimizers, losses, restored))]

    def _losses_for(self, count: int) -> list[plumb.LossFn | None]:
        """One loss per optimizer: the ``loss_fn`` sequence, or the one loss for every optimizer."""
        if not isinstance(self.loss_fn, tuple):
            return [self.loss_fn] * count
        if len(self.loss_fn) != count:
            raise ValueError(f"{type(self).__name__}: loss_fn holds {len(self.loss_fn)} losses for the module's {count} "
                             "optimizers; give one per optimizer, in configure_optimizers' order")
        return list(self.loss_fn)

    def _rate_for_optimizer(self, trainer: Trainer, pl_module: LightningModule, index: int, optimizer: Optimizer,
                            loss_fn: plumb.LossFn | None, state: dict[str, Any]) -> _OptimizerRate:
        """Check ``optimizer`` can be driven, register its :class:`HeldLR`, restore its state."""
        name = type(self).__name__
        composed = any(c.scheduler.optimizer is optimizer for c in trainer.lr_scheduler_configs)
        if composed and not pl_module.automatic_optimization:
            raise ValueError(f"{name}: under manual optimization the module steps its own learning-rate schedulers, so "
                             "their shape cannot be composed with the curvature rate; remove the scheduler of "
                             f"optimizer {index} or step the rate yourself")
        threshold, momentum = self._optimizer_rule(optimizer)
        if self.mode != "dal":
            dim = sum(p.numel() for g in optimizer.param_groups for p in g["params"] if p.requires_grad)
            V.check_cold_start_budget(name, "max_hvps", self.max_hvps, dim)
        # the base rates: the user's schedulers' (initial_lr), else the groups' rates at fit start
        base = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
        if not max(base) > 0:
            raise ValueError(f"{name} needs a positive learning rate in some parameter group of optimizer {index}, got {base}")
        scheduler = HeldLR(optimizer, composed=composed)
        config = LRSchedulerConfig(scheduler, interval="step")
        if composed:  # stepped before the user's schedulers, to put their own rates back first
            trainer.strategy.lr_scheduler_configs.insert(0, config)
        else:
            trainer.strategy.lr_scheduler_configs.append(config)
        rate = _OptimizerRate(self, index, optimizer, loss_fn, scheduler, base, threshold, momentum, eta=max(base))
        rate.load_state_dict(state)
        return rate

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        engine = _engine.engine_for(trainer)
        for rate in self._rates:
            engine.register(rate)
        if isinstance(self.probe, int):
            self._probe_batches = engine.probe_set(trainer, self.probe, self._probe_batches)

    @plumb.contain_failures("curvature_lr")
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._last_step:  # later micro-batches of an accumulated step
            return
        self._last_step = step
        metrics: dict[str, float] = {}
        for rate in self._rates:
            metrics.update(self._step_rate(rate, trainer, pl_module, batch, batch_idx, step))
        if metrics:
            self.last_estimate = metrics
            rates = tuple(tag for tag in metrics if tag.endswith("/lr"))  # each optimizer's rate on the progress bar
            plumb.log_scalars(trainer, pl_module, metrics, step, prog_bar=rates, prefix=self.prefix)

    def _step_rate(self, rate: _OptimizerRate, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                   step: int) -> dict[str, float]:
        """Estimate (when due) and set one optimizer's rate for this step; its metrics to log."""
        estimate = rate._curvature_due(trainer, step)
        hvps = self._update_curvature(rate, trainer, pl_module, batch, batch_idx, step) if estimate else None
        rate.last_step = step
        switch = step >= self.warmup_steps and (estimate or step == self.warmup_steps)
        if switch or (rate.scheduler.composed and step > self.warmup_steps):
            if switch:
                rate.eta = self._next_lr(rate)
            rate.scheduler.hold(self._group_rates(rate))
        if not (estimate or switch):
            return {}
        area = "curvature_lr/" if len(self._rates) == 1 else f"curvature_lr/optimizer_{rate.index}/"
        metrics = {
            area + "lr": max(float(g["lr"]) for g in rate.optimizer.param_groups),
            area + "lambda": rate.curvature,
            "curvature_lr/skipped": float(self._warn.count),
            area + "hvps": None if hvps is None else float(hvps),
        }
        return {k: v for k, v in metrics.items() if v is not None}

    # ------------------------------------------------------------------ rate
    def _group_rates(self, rate: _OptimizerRate) -> list[float]:
        """Each group's rate: ``η · b_i / max b`` times, composed with the user's schedulers, their current
        factor ``u_i / b_i`` (``u_i`` the rate they wrote for this step): ``η · u_i / max b``."""
        if not rate.scheduler.composed:
            return [rate.eta * r for r in rate.ratios]
        return [rate.eta * float(g["lr"]) / max(rate.base) for g in rate.optimizer.param_groups]

    def _optimizer_rule(self, optimizer: Optimizer) -> tuple[float, float]:
        """``τ`` of edge-of-stability mode and the momentum factor of quasi-Newton mode
        (:func:`~chaos_callbacks.curvature.lr_rules.momentum_factor`); refuses optimizers no mode can drive."""
        name, kind, groups = type(self).__name__, type(optimizer).__name__, optimizer.param_groups
        if is_adam(optimizer):  # Adam's first moment is an average: its step is η P⁻¹ times a gradient, no factor
            if self.mode != "edge_of_stability":
                return 2.0, 1.0
            beta1 = {g["betas"][0] for g in groups}
            if len(beta1) > 1:
                raise ValueError(f"{name}: the parameter groups of {kind} have different beta1 {sorted(beta1)}")
            return adam_threshold(beta1.pop()), 1.0
        if not isinstance(optimizer, SGD):
            raise ValueError(f"{name} drives torch.optim.SGD and Adam/AdamW, got {kind}")
        if self.mode == "dal":
            return 2.0, 1.0
        rules = {(g["momentum"], g["dampening"], g["nesterov"]) for g in groups}
        if len(rules) > 1:
            raise ValueError(f"{name}: the parameter groups of SGD have different momentum settings {sorted(rules)}")
        rule = rules.pop()
        if self.mode == "edge_of_stability":
            return sgd_threshold(*rule), 1.0
        return 2.0, momentum_factor(*rule)

    def _next_lr(self, rate: _OptimizerRate) -> float:
        """The rate from the smoothed curvature, clipped; the previous rate when there is none."""
        held = clamp_lr(rate.eta, self.min_lr, self.max_lr)
        if rate.curvature is None:
            return held
        lr = self._rate_for(rate, rate.curvature)
        return lr if math.isfinite(lr) and lr > 0 else held

    def _rate_for(self, rate: _OptimizerRate, c: float) -> float:
        """The mode's rate for the curvature ``c``, clipped to ``[min_lr, max_lr]``."""
        if self.mode == "quasi_newton":
            lr = quasi_newton_lr(c, self.scale) * rate.momentum
        elif self.mode == "edge_of_stability":
            lr = edge_of_stability_lr(c, self.fraction, rate.threshold)
        else:
            lr = drift_adjusted_lr(c, self.power, self.max_lr if self.max_lr is not None else math.inf)
        return clamp_lr(lr, self.min_lr, self.max_lr)

    # ------------------------------------------------------------------ estimate
    def _update_curvature(self, rate: _OptimizerRate, trainer: Trainer, pl_module: LightningModule, batch: Any,
                          batch_idx: int, step: int) -> int:
        """Take this step's estimate from the engine into the smoothed curvature; returns the products it took."""
        outcome = _engine.engine_for(trainer).estimate(rate, trainer, pl_module, batch, batch_idx)
        which = "" if len(self._rates) == 1 else f" of optimizer {rate.index}"
        try:
            value = outcome.get()
        except Exception as exc:  # any failure of a diagnostic estimate holds the rate; training goes on
            self._warn(type(exc).__name__, f"curvature estimate{which} skipped at step {step}, learning rate held ({type(exc).__name__}: {exc})")
            return outcome.hvps
        problem = curvature_problem(value)
        if problem is not None:
            self._warn(problem, f"{problem} ({value}){which} at step {step}, learning rate held")
            return outcome.hvps
        smoothed = ema(rate.curvature, value, self.ema)
        lr = self._rate_for(rate, smoothed)
        if not (math.isfinite(lr) and lr <= MAX_RATE):  # an optimizer step would overflow: never crash the run
            self._warn("rate overflow", f"the curvature {value:.3g}{which} at step {step} gives a learning rate {lr:.3g} that no "
                       "float32 step can take (a dead or flat network?); learning rate held. Set max_lr to bound it")
            return outcome.hvps
        rate.curvature = smoothed
        return outcome.hvps

    def _estimate_due(self, rate: _OptimizerRate, step: int) -> bool:
        """Estimates run at multiples of ``every_n_steps`` (and, ``early_estimates``, at the powers of two
        below it), once per optimizer step; Adam's preconditioner exists only after its first step, so
        until then there is nothing to estimate."""
        adam = is_adam(rate.optimizer)
        adam_unstarted = adam and not adam_started(rate.optimizer)
        early = self.early_estimates and not adam and FIRST_EARLY_STEP <= step < self.every_n_steps and step & (step - 1) == 0
        return step != rate.last_step and (step % self.every_n_steps == 0 or early) and not adam_unstarted

    def _request(self, rate: _OptimizerRate) -> _engine.Request:
        """The Hessian of the optimizer's loss in its coordinates; its ``λ_max`` may come from a shared
        solve when the step's scaling is the identity (``share``)."""
        params, scale = step_scaling(rate.optimizer, rate.ratios)
        if not params:
            raise NoTrainableParametersError("the optimizer has no parameters with requires_grad=True")
        plain = self.share and scale is None and self.mode != "dal"
        return _engine.Request(
            compute=lambda shared: self._estimate(rate, shared, scale),
            params=params,
            loss_fn=rate.loss_fn,
            probe=self._probe_batches,
            batch_fraction=self._batch_share,
            train_mode=True,
            top=_engine.TopNeed(self.tol, self.max_hvps) if plain else None,
        )

    def _estimate(self, rate: _OptimizerRate, shared: _engine.Shared, scale: Tensor | None) -> float | None:
        """The curvature on the step's shared operator (inside ``no_harm``), in the coordinates ``θ = S θ'``."""
        generator = torch.Generator().manual_seed(self.seed + rate.num_estimates + (rate.index << 32))
        rate.num_estimates += 1
        op = shared.operator
        if not plumb.is_finite(op.loss) or not torch.isfinite(op.gradient).all():
            raise plumb.EstimateSkipped(f"non-finite probe loss or gradient (loss={op.loss})")
        if self.mode == "dal":
            if self._dal_halves:
                return self._split_curvature(shared, scale)
            if scale is None:
                return shared.grad_curvature() if self.share else gradient_weighted_curvature(op, op.gradient)
            return gradient_weighted_curvature(scaled_operator(op, scale), scale * op.gradient)
        if scale is None and self.share:
            top = shared.top()
            if top is not None and top.meets(_engine.TopNeed(self.tol, self.max_hvps)):
                if top.vectors is not None:
                    rate.warm_vectors = top.vectors[:1].detach().clone()
                return top.values[0]
        matvec = op if scale is None else scaled_operator(op, scale)
        init = rate.warm_vectors if self.warm_start else None
        res = lanczos(matvec, op.dim, k=1, want_min=False, tol=self.tol, max_matvecs=self.max_hvps,
                      init=init, generator=generator, dtype=op.dtype, device=op.device)
        if not res.converged:
            raise plumb.EstimateSkipped(f"Lanczos did not reach tol={self.tol} in max_hvps={self.max_hvps} HVPs")
        rate.warm_vectors = res.eigenvectors.detach()
        return float(res.eigenvalues[0])

    @property
    def _batch_share(self) -> float:
        """The share of the step's batch estimated on (``batch_fraction``; ``None``: ½ in the ``λ_max`` modes,
        the whole batch in DAL mode and for a fixed probe set)."""
        if self.batch_fraction is not None:
            return self.batch_fraction
        return 1.0 if self.mode == "dal" or self.probe != "batch" else DEFAULT_BATCH_FRACTION

    @property
    def _dal_halves(self) -> bool:
        """DAL's ``v`` from the two halves of the probe (``dal_estimate``; ``"auto"``: on the step's batch)."""
        return self.dal_estimate == "halves" or (self.dal_estimate == "auto" and self.probe == "batch")

    @staticmethod
    def _split_curvature(shared: _engine.Shared, scale: Tensor | None) -> float | None:
        """``v = sqrt((Hg₁)·(Hg₂) / (g₁·g₂))`` from the probe's two halves, in the coordinates ``θ = S θ'``
        (``S g_i`` and ``S H S``); ``None`` at a zero gradient; a cross product ``≤ 0`` is skipped."""
        g1, g2 = shared.half_gradients()
        matvec = shared.operator
        if scale is not None:
            g1, g2, matvec = scale * g1, scale * g2, scaled_operator(shared.operator, scale)
        split = split_gradient_curvature(matvec, g1, g2)
        if split.plain is None:
            return None
        if split.problem is not None:
            raise plumb.EstimateSkipped(f"{split.problem}: g₁·g₂ = {split.denominator:.3g}, (Hg₁)·(Hg₂) = {split.numerator:.3g}")
        return split.value

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "rates": [rate.state_dict() for rate in self._rates] or self._restored,
            "probe_batches": self._probe_batches,
            "last_step": self._last_step,
            "skipped": self._warn.count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # checkpoints of 0.1 hold the one optimizer's state at the top level
        self._restored = state_dict["rates"] if "rates" in state_dict else [state_dict]
        for rate, state in zip(self._rates, self._restored):
            rate.load_state_dict(state)
        self._probe_batches = state_dict["probe_batches"]
        self._last_step = state_dict["last_step"]
        self._warn.count = state_dict["skipped"]


@dataclass(eq=False)
class _OptimizerRate:
    """One optimizer under :class:`CurvatureLRScheduler`: its base rates, rule constants, current rate
    ``eta``, smoothed curvature and warm vector — and the curvature engine's consumer for its loss and
    parameters (``_curvature_due``, ``_curvature_request``)."""

    owner: CurvatureLRScheduler
    index: int
    optimizer: Optimizer
    loss_fn: plumb.LossFn | None
    scheduler: HeldLR
    base: list[float]
    threshold: float
    momentum: float
    eta: float
    curvature: float | None = None
    warm_vectors: Tensor | None = None
    num_estimates: int = 0
    last_step: int = -1

    @property
    def ratios(self) -> list[float]:
        """Each group's base rate over the largest: ``b_i / max b``."""
        return [b / max(self.base) for b in self.base]

    def _curvature_due(self, trainer: Trainer, step: int) -> bool:
        return self.owner._estimate_due(self, step)

    def _curvature_request(self, trainer: Trainer, pl_module: LightningModule) -> _engine.Request:
        return self.owner._request(self)

    def state_dict(self) -> dict[str, Any]:
        return {"eta": self.eta, "curvature": self.curvature, "num_estimates": self.num_estimates, "last_step": self.last_step,
                "warm_vectors": None if self.warm_vectors is None else self.warm_vectors.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.eta, self.curvature, self.num_estimates = state["eta"], state["curvature"], state["num_estimates"]
        self.warm_vectors = state["warm_vectors"]
        self.last_step = state.get("last_step", -1)


def _check_losses(owner: str, loss_fn: Any) -> plumb.LossFn | tuple[plumb.LossFn, ...] | None:
    """``None``, one loss for every optimizer, or a non-empty sequence of losses (one per optimizer)."""
    if isinstance(loss_fn, (list, tuple)):
        if not loss_fn:
            raise ValueError(f"{owner}: loss_fn must be a callable, a non-empty sequence of callables or None, got []")
        return tuple(V.check_callable(owner, "loss_fn", f, allow_none=False) for f in loss_fn)
    return V.check_callable(owner, "loss_fn", loss_fn)
