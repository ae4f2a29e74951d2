"""``DiffusionTracker``: anomalous diffusion of the weights during training, window by window."""

from __future__ import annotations

import functools
import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.callbacks._validation import check_bool, check_float, check_int, check_prefix
from chaos_callbacks.dynamics.diffusion import (
    MIN_WINDOW,
    WindowAccumulator,
    WindowStats,
    log_spaced_lags,
    sgd_temperature,
)
from chaos_callbacks.dynamics.sketch import (
    CountSketch,
    ExactProjection,
    StridedSignSketch,
    largest_prime_at_most,
    projector_from_state_dict,
)

ParamFilter = Callable[[str], bool] | Sequence[str] | None


@dataclasses.dataclass
class _Step:
    """One optimizer step being recorded: the weights before it and its micro-batches."""

    step: int
    vector: Tensor | None
    lr: float | None
    losses: list[float] = dataclasses.field(default_factory=list)
    batch_size: int | None = 0


def _check_params(owner: str, params: Any) -> ParamFilter:
    """``None``, a callable, or name prefixes (one string or a non-empty sequence of strings)."""
    if isinstance(params, str):
        return (params,)
    if params is None or callable(params):
        return params
    if isinstance(params, Sequence) and params and all(isinstance(p, str) for p in params):
        return tuple(params)
    raise ValueError(f"{owner}: params must be None, a callable name -> bool, or a non-empty list of name prefixes, got {params!r}")


def _stats_state(stats: WindowStats) -> dict[str, Any]:
    """A window's statistics as tensors and numbers (safe for ``weights_only`` loading)."""
    state = {}
    for field in dataclasses.fields(stats):
        value = getattr(stats, field.name)
        state[field.name] = torch.from_numpy(value.copy()) if isinstance(value, np.ndarray) else value
    return state


def _stats_from_state(state: dict[str, Any]) -> WindowStats:
    return WindowStats(**{k: v.numpy() if isinstance(v, Tensor) else v for k, v in state.items()})


class DiffusionTracker(Callback):
    """Anomalous diffusion of the weights, window by window (Chen, Qu, Gong, arXiv 2009.10588).

    Once per optimizer step ``t`` (every ``every_n_steps``-th step; with gradient accumulation,
    once per step, not per micro-batch) the trainable parameters are projected to a vector
    ``x_t ∈ R^p`` — a :class:`~chaos_callbacks.dynamics.sketch.StridedSignSketch` (coordinate
    i to bucket i mod p with a random sign, p the largest prime ≤ ``dim``; squared distances kept
    to a relative error of about ``sqrt(2/p)``) or, with ``exact=True``, the weights
    themselves. Windows of ``window`` samples starting at waiting time ``t_w`` are analysed
    by :func:`chaos_callbacks.dynamics.diffusion.analyse_window`:

    - time-averaged ``MSD(τ) = ⟨‖x_{t+τ} − x_t‖²⟩_t ∝ τ^α``: ``diffusion/exponent`` (α > 1
      superdiffusive, α < 1 subdiffusive) with ``diffusion/exponent_stderr``, from a noise
      model of the MSD (:func:`~chaos_callbacks.dynamics.diffusion.fit_msd`: correlated lags,
      the window's effective dimension, the too-noisy longest lags left out);
    - a crossover between two regimes, ``diffusion/exponent_short``, ``diffusion/exponent_long``
      and ``diffusion/crossover`` (τ₀ in steps, where the two power laws intersect), each with
      its ``_stderr``, logged **only** when a broken power law fits significantly better than
      one power law (``diffusion/crossover_pvalue`` < ``crossover_level``, always logged);
    - ``MSL(Δr) = ⟨(L_i − L_j)²⟩ ∝ Δr^{2H}``: ``diffusion/hurst`` (H of the loss along the path)
      with ``diffusion/hurst_stderr`` (block jackknife);
    - contour length ``∝ R^{d_f}``: ``diffusion/fractal_dim`` (2/α for a steady walk), fitted on
      the exponent's lags, with ``diffusion/fractal_dim_stderr`` (delta method, MSD noise model);
    - ``diffusion/loss_variance`` (variance of the window's losses) with
      ``diffusion/loss_variance_stderr`` (delete-a-block jackknife, 8 blocks), and
      ``diffusion/temperature``, the window mean of the SGD temperature ``η/(2B)`` (Chaudhari &
      Soatto 2018) with ``η`` the first param group's learning rate at the step and ``B`` the
      global batch size of the step (micro-batches × world size); omitted for an optimizer
      without an ``lr``.

    Scalars are written at the window's last recorded step; figures of the windows kept (MSD,
    its log-derivative, MSL vs distance, coloured by ``t_w``, and the fitted exponents with
    their error bars against ``t_w``) go to TensorBoard, at that step every
    ``figure_every_n_windows`` windows and at the end of training. :attr:`windows` (also in the
    checkpoint) keeps the last ``max_windows // 2`` windows and an older record thinned by
    half whenever there are more than ``max_windows``, the first window always kept.

    **Loss alignment.** Lightning's ``outputs["loss"]`` of step ``t`` is the loss of the weights
    *before* the optimizer step ``t``. The weights are therefore recorded in
    ``on_train_batch_start`` of the step's first micro-batch, and paired with the mean loss of
    that step's micro-batches (``outputs["loss"]`` times ``accumulate_grad_batches``, undoing
    Lightning's division, or ``trainer.callback_metrics[loss_key]``). No extra forward pass is
    ever run. Without a loss (a manual-optimization ``training_step`` that returns nothing and
    no ``loss_key``) the weights are still recorded: everything but ``hurst`` and
    ``loss_variance`` is logged, with one warning.

    **DDP.** The parameters are identical on all ranks, so every rank records and analyses the
    same trajectory without any communication and holds the same MSD statistics; the loss is
    the rank's own minibatch loss, so ``hurst`` and ``loss_variance`` are per-rank. Only rank
    zero writes to loggers. Sharded strategies (FSDP, DeepSpeed ZeRO-3) are not supported.

    **Robustness.** A window with a non-finite weight or loss, or a failed fit (weights that did
    not move), is dropped with one warning per kind, counted in ``diffusion/skipped``; so is an
    exception in a hook. Training never stops.

    Args:
        window: samples per window (>= 4); a window spans ``window · every_n_steps`` steps.
        dim: sketch dimension bound (>= 2): the sketch has the largest prime ``p ≤ dim``
            buckets (1024 → 1021; a prime avoids aligning a weight matrix's columns with the
            buckets, see :class:`~chaos_callbacks.dynamics.sketch.StridedSignSketch`); ignored
            with ``exact=True``. A run resumed from a checkpoint keeps the sketch it was written
            with (older checkpoints: a ``CountSketch`` of dimension ``dim``).
        exact: record the exact weights; refused at fit start above ``max_exact_bytes``.
        lags: number of log-spaced MSD lags in ``[1, window − 1]`` (>= 3; the crossover test
            needs 6 fitted lags).
        params: which trainable parameters to record: ``None`` (all), a callable
            ``name -> bool``, or name prefixes (a string or a sequence of strings).
        every_n_steps: record every ``every_n_steps``-th optimizer step.
        figure_every_n_windows: log the figures after every n-th window and at the end of
            training (0: never). The figures take a second or two of CPU, so the default
            keeps them rare.
        loss_key: take the loss from ``trainer.callback_metrics[loss_key]`` (e.g. a value the
            module logs in ``training_step``) instead of ``outputs["loss"]``.
        max_exact_bytes: memory cap of one exact window, ``8 · window · num_params`` bytes.
        seed: seed of the sketch's signs and of the MSL pair subsampling.
        crossover_level: significance level of the crossover test, in (0, 1).
        max_windows: most windows kept in :attr:`windows` (>= 2).
        prefix: prepended to every tag this callback writes (``"probe_a/"`` → ``probe_a/diffusion/...``),
            so that two instances can run side by side; two instances of one area with the same
            prefix are refused (identical ones by Lightning when the Trainer is built, others at fit start).
    """

    AREA = "diffusion"  #: tags are ``<prefix>diffusion/<quantity>``

    def __init__(
        self,
        window: int = 1000,
        dim: int = 1024,
        exact: bool = False,
        lags: int = 24,
        params: ParamFilter = None,
        every_n_steps: int = 1,
        figure_every_n_windows: int = 10,
        loss_key: str | None = None,
        max_exact_bytes: int = 256 * 2**20,
        seed: int = 0,
        crossover_level: float = 0.01,
        max_windows: int = 100,
        prefix: str = "",
    ) -> None:
        owner = type(self).__name__
        self.prefix = check_prefix(owner, "prefix", prefix)
        self.window = check_int(owner, "window", window, minimum=MIN_WINDOW)
        self.dim = check_int(owner, "dim", dim, minimum=2)
        self.exact = check_bool(owner, "exact", exact)
        self.num_lags = check_int(owner, "lags", lags, minimum=3)
        self.params = _check_params(owner, params)
        self.every_n_steps = check_int(owner, "every_n_steps", every_n_steps, minimum=1)
        self.figure_every_n_windows = check_int(owner, "figure_every_n_windows", figure_every_n_windows, minimum=0)
        if loss_key is not None and not isinstance(loss_key, str):
            raise ValueError(f"{owner}: loss_key must be None or a metric name (str), got {loss_key!r}")
        self.loss_key = loss_key
        self.max_exact_bytes = check_int(owner, "max_exact_bytes", max_exact_bytes, minimum=1)
        self.seed = check_int(owner, "seed", seed, minimum=0)
        self.crossover_level = check_float(owner, "crossover_level", crossover_level, 0.0, 1.0, low_open=True, high_open=True)
        self.max_windows = check_int(owner, "max_windows", max_windows, minimum=2)
        self._lags = log_spaced_lags(self.window, self.num_lags)
        self.windows: list[WindowStats] = []
        self._warn = plumb.WarnOnce(owner)
        self._noticed: set[str] = set()  # kinds of omissions warned about (not skips)
        self._params: list[Tensor] = []
        self._projector: StridedSignSketch | CountSketch | ExactProjection | None = None
        self._accumulator: WindowAccumulator | None = None
        self._pending: _Step | None = None
        self._fill = 0  # samples of the current window seen, usable or not
        self._window_start = 0
        self._problem: tuple[str, str] | None = None  # (kind, message) dropping the current window
        self._temperatures: list[float] = []
        self._num_windows = 0  # windows analysed, including those thinned out of :attr:`windows`

    @functools.cached_property  # Lightning reads it at every hook call; the settings it names are fixed
    def state_key(self) -> str:
        return self._generate_state_key(
            window=self.window, dim=self.dim, exact=self.exact, every_n_steps=self.every_n_steps, seed=self.seed,
            **plumb.prefix_key(self.prefix),
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plumb.check_unique_tags(self, trainer)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._params = self._select(pl_module)
        num_params = sum(p.numel() for p in self._params)
        self._pending = None
        if self._projector is not None and self._projector.num_params == num_params:
            return  # restored from a checkpoint, or a further fit
        if self._projector is not None:
            self._warn("params", f"the recorded parameters changed from {self._projector.num_params} to {num_params} elements; starting a new window")
        self._projector = self._new_projector(num_params)
        self._accumulator = self._new_accumulator()
        self._fill, self._problem, self._temperatures = 0, None, []

    @plumb.contain_failures("diffusion")
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._pending is not None or step % self.every_n_steps:
            return  # a later micro-batch of the step, or a step that is not recorded
        vector = None if self._problem is not None else self._projector.project(self._params)
        self._pending = _Step(step, vector, plumb.current_lr(trainer))

    @plumb.contain_failures("diffusion")
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        pending = self._pending
        if pending is None:
            return
        loss = self._micro_batch_loss(trainer, pl_module, outputs)
        if loss is not None:
            pending.losses.append(loss)
        try:
            size = plumb.batch_size_of(batch)
        except ValueError:  # no tensor with a batch dimension: no temperature for this step
            size = None
        pending.batch_size = None if size is None or pending.batch_size is None else pending.batch_size + size
        if trainer.global_step == pending.step:
            return  # accumulating gradients: the optimizer has not stepped yet
        self._pending = None
        self._record(trainer, pl_module, pending)

    @plumb.contain_failures("diffusion")
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.windows and self.figure_every_n_windows and self._num_windows % self.figure_every_n_windows:
            self._log_figures(trainer, self.windows[-1].t_w + (self.window - 1) * self.every_n_steps)

    # ------------------------------------------------------------------ recording
    def _select(self, pl_module: LightningModule) -> list[Tensor]:
        named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        if callable(self.params):
            named = [(name, p) for name, p in named if self.params(name)]
        elif self.params is not None:
            named = [(name, p) for name, p in named if name.startswith(tuple(self.params))]
        if not named:
            raise ValueError(f"{type(self).__name__}: params={self.params!r} selects no trainable parameter of {type(pl_module).__name__}")
        return [p for _, p in named]

    def _new_projector(self, num_params: int) -> StridedSignSketch | ExactProjection:
        if not self.exact:
            return StridedSignSketch(num_params, largest_prime_at_most(self.dim), self.seed)
        needed = 8 * self.window * num_params
        if needed > self.max_exact_bytes:
            raise ValueError(
                f"{type(self).__name__}: exact=True stores 8 · window · num_params = {needed / 2**20:.1f} MiB per window "
                f"(num_params={num_params}), above max_exact_bytes={self.max_exact_bytes}; raise it or use exact=False"
            )
        return ExactProjection(num_params, max_params=num_params)

    def _notice(self, kind: str, message: str) -> None:
        """Warn once per kind about a statistic that is omitted (nothing is skipped)."""
        if kind not in self._noticed:
            self._noticed.add(kind)
            rank_zero_warn(f"{type(self).__name__}: {message}")

    def _new_accumulator(self) -> WindowAccumulator:
        return WindowAccumulator(self.window, self._projector.dim, lags=self._lags, seed=self.seed, crossover_level=self.crossover_level)

    def _micro_batch_loss(self, trainer: Trainer, pl_module: LightningModule, outputs: Any) -> float | None:
        """The micro-batch's own training loss (before Lightning's division for accumulation)."""
        if self.loss_key is not None:
            value = trainer.callback_metrics.get(self.loss_key)
            scale = 1
        else:
            value = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
            scale = trainer.accumulate_grad_batches if pl_module.automatic_optimization else 1
        if not isinstance(value, (Tensor, float, int)) or (isinstance(value, Tensor) and value.numel() != 1):
            return None
        return float(value) * scale

    def _temperature(self, trainer: Trainer, pending: _Step) -> float | None:
        if pending.lr is None or not pending.batch_size:
            return None
        try:
            return sgd_temperature(pending.lr, pending.batch_size * trainer.world_size)
        except ValueError:  # lr = 0 or not finite
            return None

    def _append(self, trainer: Trainer, pending: _Step) -> WindowStats | None:
        """Add one step to the window; set :attr:`_problem` when the window must be dropped."""
        loss = sum(pending.losses) / len(pending.losses) if pending.losses else None
        if loss is None:
            source = f"callback_metrics[{self.loss_key!r}]" if self.loss_key else 'outputs["loss"] (training_step returned none)'
            self._notice("no_loss", f"no training loss at step {pending.step} in {source}: diffusion/hurst and diffusion/loss_variance are omitted; pass loss_key=<a logged loss> to get them")
        vector = pending.vector.to(device="cpu", dtype=torch.float64).numpy()
        if not ((loss is None or math.isfinite(loss)) and np.isfinite(vector).all()):
            self._problem = ("non_finite", f"non-finite weights or loss (loss={loss}) at step {pending.step}")
            return None
        temperature = self._temperature(trainer, pending)
        if temperature is not None:
            self._temperatures.append(temperature)
        try:
            return self._accumulator.append(vector, loss, pending.step)
        except ValueError as exc:  # the fit failed, e.g. weights that did not move
            self._problem = ("fit", f"fit failed: {exc}")
            return None

    def _record(self, trainer: Trainer, pl_module: LightningModule, pending: _Step) -> None:
        if self._fill == 0:
            self._window_start = pending.step
        stats = self._append(trainer, pending) if self._problem is None else None
        self._fill += 1
        if self._fill < self.window:
            return
        temperatures, problem = self._temperatures, self._problem
        self._fill, self._problem, self._temperatures = 0, None, []
        if problem is not None:
            self._accumulator.reset()
            kind, message = problem
            self._warn(kind, f"diffusion window t_w={self._window_start} dropped: {message}")
            plumb.log_scalars(trainer, pl_module, {"diffusion/skipped": self._warn.count}, pending.step, prefix=self.prefix)
            return
        if self.every_n_steps > 1:  # lags were counted in samples
            k = self.every_n_steps
            stats = dataclasses.replace(
                stats, lags=stats.lags * k, crossover=stats.crossover * k, crossover_stderr=stats.crossover_stderr * k, fit_max_lag=stats.fit_max_lag * k
            )
        self._keep(stats)
        metrics = {f"diffusion/{name}": value for name, value in stats.scalars().items() if math.isfinite(value)}
        if temperatures:
            metrics["diffusion/temperature"] = sum(temperatures) / len(temperatures)
        plumb.log_scalars(trainer, pl_module, metrics, pending.step, prog_bar=("diffusion/exponent",), prefix=self.prefix)
        if self.figure_every_n_windows and self._num_windows % self.figure_every_n_windows == 0:
            self._log_figures(trainer, pending.step)

    def _keep(self, stats: WindowStats) -> None:
        """Append a window; beyond ``max_windows``, thin all but the last ``max_windows // 2`` by half."""
        self._num_windows += 1
        self.windows.append(stats)
        if len(self.windows) > self.max_windows:
            recent = self.max_windows // 2
            self.windows = self.windows[:-recent][::2] + self.windows[-recent:]

    def _log_figures(self, trainer: Trainer, step: int) -> None:
        from chaos_callbacks.plotting.diffusion import exponents_figure, msd_figure, msd_log_derivative_figure, msl_figure

        windows = list(self.windows)
        plumb.log_figure(trainer, f"{self.prefix}diffusion/exponents", lambda: exponents_figure(windows), step)
        plumb.log_figure(trainer, f"{self.prefix}diffusion/msd", lambda: msd_figure(windows), step)
        plumb.log_figure(trainer, f"{self.prefix}diffusion/msd_log_derivative", lambda: msd_log_derivative_figure(windows), step)
        plumb.log_figure(trainer, f"{self.prefix}diffusion/msl", lambda: msl_figure(windows), step)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "projector": None if self._projector is None else self._projector.state_dict(),
            "accumulator": None if self._accumulator is None else self._accumulator.state_dict(),
            "windows": [_stats_state(w) for w in self.windows],
            "num_windows": self._num_windows,
            "fill": self._fill,
            "window_start": self._window_start,
            "problem": self._problem,
            "temperatures": list(self._temperatures),
            "skipped": self._warn.count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict["projector"] is not None:
            self._projector = projector_from_state_dict(state_dict["projector"])
            self._accumulator = self._new_accumulator()
            self._accumulator.load_state_dict(state_dict["accumulator"])
        self.windows = [_stats_from_state(w) for w in state_dict["windows"]]
        self._num_windows = state_dict.get("num_windows", len(self.windows))
        self._fill = state_dict["fill"]
        self._window_start = state_dict["window_start"]
        self._problem = None if state_dict["problem"] is None else tuple(state_dict["problem"])
        self._temperatures = list(state_dict["temperatures"])
        self._warn.count = state_dict["skipped"]
