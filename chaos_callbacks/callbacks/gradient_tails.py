"""``GradientTailFitter``: live symmetric alpha-stable fits of minibatch-gradient entries."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.dynamics.tails import MIN_SAMPLES, analyse_tails, fit_symmetric_stable

Target = Literal["gradient", "noise"]
Method = Literal["quantile", "mle"]
# A source of entries: the gradient of one parameter and, for target="noise", its EMA mean.
Source = tuple[Tensor, Tensor | None]


def layer_name(param_name: str) -> str:
    """The module path owning a parameter: ``net.0.weight`` → ``net.0``; ``w`` (top level) → ``w``."""
    return param_name.rpartition(".")[0] or param_name


def uniform_subset(total: int, k: int, generator: torch.Generator) -> Tensor:
    """``k`` distinct indices drawn uniformly from ``range(total)`` (a uniformly random k-subset).

    Dense case (``4k >= total``): the first ``k`` entries of a random permutation, O(total).
    Sparse case: the distinct values of i.i.d. uniform draws form, given their number m, a uniform
    m-subset (the draws are exchangeable under relabelling of ``range(total)``); a uniform k-subset
    of it is a uniform k-subset of ``range(total)``. About k + k²/total draws suffice (expected
    duplicates k²/(2 total) < k/8), so the cost is O(k log k) whatever ``total``. Only
    ``generator`` is consumed, never the global RNG.
    """
    if 4 * k >= total:
        return torch.randperm(total, generator=generator)[:k]
    drawn = torch.randint(total, (k + k * k // total + 64,), generator=generator)
    distinct = torch.unique(drawn)
    while distinct.numel() < k:
        distinct = torch.unique(torch.cat([distinct, torch.randint(total, (k,), generator=generator)]))
    return distinct[torch.randperm(distinct.numel(), generator=generator)[:k]]


def sample_entries(sources: Sequence[Source], k: int, generator: torch.Generator, grad_scale: float = 1.0) -> Tensor:
    """``min(k, n)`` entries drawn uniformly without replacement from the ``n`` entries of ``sources``.

    An entry is ``g[i] / grad_scale`` or, when the source carries a mean ``m``,
    ``g[i] / grad_scale - m[i]``; only the sampled entries are read (no O(n) copy). Returns a
    float64 CPU tensor; ``.grad`` is never written.
    """
    sizes = torch.tensor([g.numel() for g, _ in sources])
    ends = sizes.cumsum(0)
    total = int(ends[-1])
    index = uniform_subset(total, min(k, total), generator)
    owner = torch.searchsorted(ends, index, right=True)
    local = index - (ends - sizes)[owner]
    pieces = []
    for i in torch.bincount(owner, minlength=len(sources)).nonzero().flatten().tolist():
        grad, mean = sources[i]
        at = local[owner == i].to(grad.device)
        values = grad.reshape(-1)[at].double() / grad_scale
        if mean is not None:
            values = values - mean.reshape(-1)[at].double()
        pieces.append(values.cpu())
    return torch.cat(pieces)


class GradientTailFitter(Callback):
    """Fit symmetric alpha-stable laws to the entries of the gradient the optimizer is about to use.

    Chen, Gong et al., "Anomalous diffusion dynamics of learning in deep neural networks"
    (arXiv 2009.10588), fit S(alpha, 0, scale, 0) — characteristic function exp(-|scale t|^alpha),
    alpha = 2 Gaussian, alpha < 2 power-law tails P(|g| > x) ~ x^-alpha — to 5000 entries of the
    minibatch gradient and test it against a Gaussian by a likelihood ratio (Vuong 1989).
    Şimşekli, Sagun & Gürbüzbalaban, "A tail-index analysis of stochastic gradient noise in deep
    neural networks" (ICML 2019, arXiv 1901.06053), study the noise ``g_t - E[g]`` instead.

    Every ``every_n_steps`` optimizer steps, in ``on_before_optimizer_step`` (after the backward
    passes of all accumulated batches; under DDP after the gradient all-reduce, so every rank fits
    the same numbers without any collective; before gradient clipping), ``num_samples`` entries are
    drawn uniformly without replacement over all entries of all trainable parameters that have a
    (dense) ``.grad``, with a ``torch.Generator`` seeded by ``seed + global_step`` (same indices on
    every rank, never the global RNG). ``.grad`` is only read. The sample is analysed by
    ``chaos_callbacks.dynamics.tails.analyse_tails``: stable fit (McCulloch's quantile estimator or
    maximum likelihood), Hill tail index of |g| (top sqrt(n) order statistics by default), mean
    log-likelihood ratio stable vs the Gaussian MLE and the Vuong p-value. With ``per_layer=True``
    the same is done (alpha only) for each layer: a layer is the module that directly owns the
    parameters — ``net.0.weight`` and ``net.0.bias`` pool into ``net.0`` — and gets its own
    ``min(num_samples, layer size)`` entries. Layers with fewer than 50 entries are left out.

    ``target="noise"`` fits ``g_t - m_{t-1}`` where ``m`` is an exponential moving average of
    the gradients of the preceding steps, ``m_t = β m_{t-1} + (1 - β) g_t`` with ``m_0 = g_0``
    (updated at every optimizer step, non-finite gradients excluded; one extra float32 copy of the
    parameters, kept in the checkpoint). ``m`` stands in for the full-batch gradient of Şimşekli et
    al.: for i.i.d. symmetric alpha-stable gradients around a fixed mean, ``g_t - m_{t-1}`` is again
    alpha-stable with the same alpha (its weights sum to one, so the mean cancels exactly). Larger
    β averages more minibatches but lags a drifting mean by about β/(1-β) steps. The first
    fit needs at least one earlier gradient; until then scheduled fits are silently not made.

    Mixed precision (Lightning 2.6, ``lightning/pytorch/plugins/precision/amp.py``): under
    ``16-mixed`` the ``GradScaler`` unscales the gradients after the closure and *before*
    ``on_before_optimizer_step``, so the fitted gradient is the true one. Optimizers that unscale
    inside ``step`` (``_step_supports_amp_scaling``, e.g. ``fused=True``) still hold scaled
    gradients at this hook; their sampled entries are divided by ``scaler.get_scale()``. An
    overflow step (inf/NaN gradient, which the scaler skips) is skipped here too, with one warning.
    ``bf16-mixed`` has no scaler; parameters and gradients stay float32. alpha, Hill, the
    likelihood ratio and the Vuong test are scale invariant; only ``grad_tail/scale`` carries units.

    Logs at the step of the gradient (``trainer.global_step`` before the update):
    ``grad_tail/alpha`` (also to the progress bar), ``grad_tail/scale``, ``grad_tail/hill``,
    ``grad_tail/llr_gauss`` (mean per-entry log-likelihood ratio; > 0 favours the stable law),
    ``grad_tail/vuong_p`` (two-sided), ``grad_tail/alpha/<layer>``, ``grad_tail/skipped`` (skipped
    estimates so far: all-zero, constant, non-finite, or over half exactly zero as with dead ReLU
    units); to TensorBoard also a histogram ``grad_tail/samples`` and, every
    ``figure_every_n_estimates`` estimates, a figure ``grad_tail/density`` of the empirical density
    of |g - median| with both fitted densities on log-log axes.

    Args:
        every_n_steps: cadence in optimizer steps (a fit runs when ``global_step`` is a multiple).
        num_samples: entries per fit (5000 in Chen, Gong et al.), globally and per layer.
        method: ``"quantile"`` (McCulloch 1986, ~0.3 ms per fit of 5000 samples) or ``"mle"``
            (maximum likelihood started at the quantile fit, 50-200 ms per fit, also per layer;
            see ``benchmarks/bench_grad_tail_overhead.py``). The Vuong test adds 5-10 ms per
            estimate (a density table for the fitted alpha).
        target: ``"gradient"`` (the paper) or ``"noise"`` (gradient minus its running mean).
        ema_decay: β of the running mean for ``target="noise"``, in (0, 1).
        per_layer: also fit alpha per layer.
        layer_filter: regular expression; only layers whose name it matches (``re.search``) are
            fitted per layer.
        max_layers: at most this many layers (the first in ``named_parameters`` order) are
            fitted per layer.
        hill_k: order statistics of the Hill estimator (default ceil(sqrt(n))).
        figure_every_n_estimates: draw the density figure every this many estimates (0: never);
            only with a TensorBoard logger attached.
        seed: seed of the entry sampling (and of the ``mle`` subsample).
    """

    def __init__(
        self,
        every_n_steps: int = 50,
        num_samples: int = 5000,
        method: Method = "quantile",
        target: Target = "gradient",
        ema_decay: float = 0.9,
        per_layer: bool = True,
        layer_filter: str | None = None,
        max_layers: int = 32,
        hill_k: int | None = None,
        figure_every_n_estimates: int = 10,
        seed: int = 0,
    ) -> None:
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be a positive int, got {every_n_steps}")
        if num_samples < MIN_SAMPLES:
            raise ValueError(f"num_samples must be >= {MIN_SAMPLES}, got {num_samples}")
        if method not in ("quantile", "mle"):
            raise ValueError(f"method must be 'quantile' or 'mle', got {method!r}")
        if target not in ("gradient", "noise"):
            raise ValueError(f"target must be 'gradient' or 'noise', got {target!r}")
        if not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        if max_layers < 1:
            raise ValueError(f"max_layers must be >= 1, got {max_layers}")
        if hill_k is not None and not 1 <= hill_k < num_samples:
            raise ValueError(f"hill_k must be None or in [1, num_samples - 1], got {hill_k}")
        if figure_every_n_estimates < 0:
            raise ValueError(f"figure_every_n_estimates must be >= 0, got {figure_every_n_estimates}")
        try:
            self._layer_pattern = None if layer_filter is None else re.compile(layer_filter)
        except re.error as exc:
            raise ValueError(f"layer_filter is not a valid regular expression: {exc}") from exc
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.method = method
        self.target = target
        self.ema_decay = ema_decay
        self.per_layer = per_layer
        self.layer_filter = layer_filter
        self.max_layers = max_layers
        self.hill_k = hill_k
        self.figure_every_n_estimates = figure_every_n_estimates
        self.seed = seed
        self._warn = plumb.WarnOnce(type(self).__name__)
        self._warn_layer = plumb.WarnOnce(type(self).__name__)
        self._ema: dict[str, Tensor] = {}
        self._last_step = -1
        self._num_estimates = 0
        self.last_estimate: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, num_samples=self.num_samples, method=self.method, target=self.target
        )

    # ------------------------------------------------------------------ hook
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        step = trainer.global_step
        if step == self._last_step:  # a second optimizer stepping in the same global step
            return
        self._last_step = step
        due = step % self.every_n_steps == 0
        if not (due or self.target == "noise"):
            return
        grads = self._gradients(pl_module)
        if not grads:
            if due:
                self._skip(trainer, pl_module, step, "no-grad", "no trainable parameter has a gradient")
            return
        loss_scale = self._loss_scale(trainer, optimizer)
        # min and max propagate NaN and reach ±inf: one fast reduction per tensor, one sync
        finite = bool(torch.isfinite(torch.stack([torch.stack(torch.aminmax(g)) for g in grads.values()])).all())
        if due and not finite:
            msg = "non-finite (NaN/inf) gradient; under 16-mixed the GradScaler skips this step too"
            self._skip(trainer, pl_module, step, "non-finite", msg)
        elif due and (self.target == "gradient" or self._ema):
            self._estimate(trainer, pl_module, step, grads, loss_scale)
        if self.target == "noise" and finite:
            self._update_ema(grads, loss_scale)

    # ------------------------------------------------------------------ estimate
    @staticmethod
    def _gradients(pl_module: LightningModule) -> dict[str, Tensor]:
        """Dense gradients of the trainable parameters, by parameter name (read-only views)."""
        return {
            name: p.grad.detach()
            for name, p in pl_module.named_parameters()
            if p.requires_grad and p.grad is not None and p.grad.layout == torch.strided and p.numel()
        }

    @staticmethod
    def _loss_scale(trainer: Trainer, optimizer: Any) -> float:
        """The GradScaler's scale when ``optimizer`` unscales inside ``step`` (fused), else 1."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return 1.0
        return float(scaler.get_scale())

    def _sources(self, grads: dict[str, Tensor], names: list[str]) -> list[Source]:
        """(gradient, running mean or None) of the parameters in ``names`` that can be sampled."""
        if self.target == "gradient":
            return [(grads[n], None) for n in names]
        return [(grads[n], self._ema[n].to(grads[n].device)) for n in names if n in self._ema]

    def _layers(self, grads: dict[str, Tensor]) -> dict[str, list[str]]:
        """Parameter names grouped by layer: filtered, layers under 50 entries dropped, capped."""
        groups: dict[str, list[str]] = {}
        for name in grads:
            groups.setdefault(layer_name(name), []).append(name)
        groups = {
            layer: names
            for layer, names in groups.items()
            if sum(grads[n].numel() for n in names) >= MIN_SAMPLES
            and (self._layer_pattern is None or self._layer_pattern.search(layer))
        }
        if len(groups) > self.max_layers:
            self._warn_layer("cap", f"{len(groups)} layers, fitting the first max_layers={self.max_layers} only")
        return dict(list(groups.items())[: self.max_layers])

    def _estimate(self, trainer: Trainer, pl_module: LightningModule, step: int, grads: dict[str, Tensor], loss_scale: float) -> None:
        generator = torch.Generator().manual_seed(self.seed + step)
        sources = self._sources(grads, list(grads))
        if not sources:
            self._skip(trainer, pl_module, step, "no-mean", "no parameter with a gradient has a running mean yet")
            return
        samples = sample_entries(sources, self.num_samples, generator, loss_scale)
        try:
            tails = analyse_tails(samples.numpy(), self.method, self.hill_k, self.num_samples, self.seed + step)
        except ValueError as exc:
            self._skip(trainer, pl_module, step, "fit", f"tail fit failed ({exc})")
            return
        metrics = {
            "grad_tail/alpha": tails.alpha,
            "grad_tail/scale": tails.scale,
            "grad_tail/hill": tails.hill,
            "grad_tail/llr_gauss": tails.llr,
            "grad_tail/vuong_p": tails.p_value,
        }
        if not plumb.is_finite(*metrics.values()):
            self._skip(trainer, pl_module, step, "non-finite-fit", f"non-finite tail fit {metrics}")
            return
        if self.per_layer:
            metrics.update(self._layer_alphas(grads, step, generator, loss_scale))
        self._num_estimates += 1
        self.last_estimate = metrics
        plumb.log_scalars(trainer, pl_module, metrics, step, prog_bar=("grad_tail/alpha",))
        self._log_distribution(trainer, samples, tails.alpha, tails.scale, step)

    def _layer_alphas(self, grads: dict[str, Tensor], step: int, generator: torch.Generator, loss_scale: float) -> dict[str, float]:
        out = {}
        for layer, names in self._layers(grads).items():
            sources = self._sources(grads, names)
            if not sources:  # target="noise": no running mean yet for this layer
                continue
            values = sample_entries(sources, self.num_samples, generator, loss_scale).numpy()
            try:
                fit = fit_symmetric_stable(values, self.method, self.num_samples, self.seed + step)
            except ValueError as exc:
                self._warn_layer(f"layer:{layer}", f"tail fit of layer {layer!r} failed at step {step} ({exc})")
                continue
            out[f"grad_tail/alpha/{layer}"] = fit.alpha
        return out

    def _log_distribution(self, trainer: Trainer, samples: Tensor, alpha: float, scale: float, step: int) -> None:
        if not plumb.tensorboard_loggers(trainer):
            return
        plumb.log_histogram(trainer, "grad_tail/samples", samples, step)
        if self.figure_every_n_estimates and (self._num_estimates - 1) % self.figure_every_n_estimates == 0:
            from chaos_callbacks.plotting.tails import tail_density_figure

            target = "gradient" if self.target == "gradient" else "gradient noise"
            plumb.log_figure(trainer, "grad_tail/density", lambda: tail_density_figure(samples.numpy(), alpha, scale, target), step)

    def _skip(self, trainer: Trainer, pl_module: LightningModule, step: int, kind: str, message: str) -> None:
        self._warn(kind, f"gradient tail fit skipped at step {step}: {message}")
        plumb.log_scalars(trainer, pl_module, {"grad_tail/skipped": self._warn.count}, step)

    @torch.no_grad()
    def _update_ema(self, grads: dict[str, Tensor], loss_scale: float) -> None:
        """m ← β m + (1 - β) g per parameter (float32 or wider); m = g the first time."""
        for name, grad in grads.items():
            grad = grad.to(torch.promote_types(grad.dtype, torch.float32))
            if loss_scale != 1.0:
                grad = grad / loss_scale
            mean = self._ema.get(name)
            if mean is None:
                self._ema[name] = grad.clone()
                continue
            if mean.device != grad.device:  # restored from a checkpoint on the CPU
                mean = self._ema[name] = mean.to(grad.device)
            mean.lerp_(grad.to(mean.dtype), 1.0 - self.ema_decay)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "ema": {name: mean.cpu() for name, mean in self._ema.items()},
            "last_step": self._last_step,
            "num_estimates": self._num_estimates,
            "skipped": self._warn.count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._ema = dict(state_dict["ema"])
        self._last_step = state_dict["last_step"]
        self._num_estimates = state_dict["num_estimates"]
        self._warn.count = state_dict["skipped"]
