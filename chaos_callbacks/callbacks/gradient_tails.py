"""``GradientTailFitter``: live symmetric alpha-stable fits of minibatch-gradient entries."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.callbacks._validation import check_bool, check_choice, check_float, check_int, check_prefix, check_regex
from chaos_callbacks.dynamics.tails import ALPHA_MIN, MIN_SAMPLES, TailSummary, analyse_tails, fit_symmetric_stable

Target = Literal["gradient", "noise"]
Method = Literal["quantile", "mle"]
# A source of entries: the gradient of one parameter and, for target="noise", its EMA mean.
Source = tuple[Tensor, Tensor | None]
_OWNER = "GradientTailFitter"


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


_PILOT_DRAWS = (5, 4, 64)  # first draw: k * 5/4 + 64 entries (enough when under ~15% are zero)
_REDRAW_MARGIN = 1.2  # second draw: 1.2 k / (nonzero rate of the first) entries
MAX_DRAWS_PER_SAMPLE = 20  # at most 20 k entries read: zero fractions up to ~95% still give k nonzero entries


@dataclass(frozen=True)
class NonzeroSample:
    """Nonzero entries drawn uniformly without replacement, and the zero count of the draw.

    ``values``: at most k nonzero entries (float64, CPU); ``draws``: entries read, a uniform
    ``draws``-subset of all ``total`` entries; ``zeros``: exact zeros among them.
    """

    values: Tensor
    draws: int
    zeros: int
    total: int

    @property
    def zero_fraction(self) -> float:
        """zeros / draws: unbiased for the fraction of exactly-zero entries (exact when draws = total)."""
        return self.zeros / self.draws

    @property
    def zero_fraction_stderr(self) -> float:
        """Standard error of ``zero_fraction``: sampling without replacement, Agresti-Coull adjusted,
        sqrt(p (1 - p) / (m + 4) (1 - m / total)) with p = (zeros + 2) / (m + 4), m = draws; 0 when
        every entry was read, never 0 otherwise (also when all or none of the draws are zero)."""
        p = (self.zeros + 2) / (self.draws + 4)
        return math.sqrt(p * (1 - p) / (self.draws + 4) * (1 - self.draws / self.total))


def _read_entries(sources: Sequence[Source], index: Tensor, grad_scale: float) -> Tensor:
    """Entries at the flat ``index`` of the concatenated sources, in ``index`` order (float64, CPU)."""
    sizes = torch.tensor([g.numel() for g, _ in sources])
    ends = sizes.cumsum(0)
    owner = torch.searchsorted(ends, index, right=True)
    local = index - (ends - sizes)[owner]
    out = torch.empty(index.numel(), dtype=torch.float64)
    for i in torch.bincount(owner, minlength=len(sources)).nonzero().flatten().tolist():
        grad, mean = sources[i]
        mine = owner == i
        at = local[mine].to(grad.device)
        values = grad.reshape(-1)[at].double() / grad_scale
        if mean is not None:
            values = values - mean.reshape(-1)[at].double()
        out[mine] = values.cpu()
    return out


def sample_nonzero_entries(
    sources: Sequence[Source], k: int, generator: torch.Generator, grad_scale: float = 1.0, max_draws: int | None = None
) -> NonzeroSample:
    """Up to ``k`` entries drawn uniformly without replacement among the entries of ``sources`` that are not 0.

    An entry is ``g[i] / grad_scale`` or, when the source carries a mean ``m``,
    ``g[i] / grad_scale - m[i]``. Rejection sampling, reading only the drawn entries (no O(n)
    pass): a uniform m-subset of all n entries (``uniform_subset``, in random order) is read; its
    nonzero members are a uniform subset of the nonzero entries given their number, and the first
    k of them in draw order a uniform k-subset. m = 5k/4 + 64 first; if that yields fewer than k
    nonzero entries, a fresh draw of m = 1.2 k / (nonzero rate of the first) + 64 replaces it
    (independent of the first given m, so ``zeros / draws`` stays unbiased). m never exceeds
    ``max_draws`` (default: all n); with fewer than k nonzero entries found, all are returned.
    ``.grad`` is never written.
    """
    total = sum(g.numel() for g, _ in sources)
    limit = total if max_draws is None else min(total, max_draws)
    numerator, denominator, extra = _PILOT_DRAWS
    draws = min(limit, k * numerator // denominator + extra)
    values = _read_entries(sources, uniform_subset(total, draws, generator), grad_scale)
    found = int(torch.count_nonzero(values))
    if found < k and draws < limit:
        draws = min(limit, math.ceil(_REDRAW_MARGIN * k * draws / max(found, 1)) + extra)
        values = _read_entries(sources, uniform_subset(total, draws, generator), grad_scale)
    nonzero = values[values != 0]
    return NonzeroSample(values=nonzero[:k], draws=draws, zeros=draws - nonzero.numel(), total=total)


def _logger_step(trainer: Trainer) -> int:
    """The step Lightning's loggers give the user's own metrics: one per batch that stepped,
    whatever the number of optimizers (``trainer.global_step`` counts every ``optimizer.step()``)."""
    return trainer.fit_loop.epoch_loop._batches_that_stepped


#: An α at the fit's lower end is censored (the sample is heavier than any law the fit covers), not estimated.
_FLOOR_MESSAGE = (f"the tails of {{where}} are heavier than α = {ALPHA_MIN}, the heaviest law the fit covers; α is at "
                  "that bound, not estimated, so it is not logged (nor the scale and likelihood ratios of that fit)")


class GradientTailFitter(Callback):
    """Fit symmetric alpha-stable laws to the entries of the gradient the optimizer is about to use.

    Chen, Gong et al., "Anomalous diffusion dynamics of learning in deep neural networks"
    (arXiv 2009.10588), fit S(alpha, 0, scale, 0) — characteristic function exp(-|scale t|^alpha),
    alpha = 2 Gaussian, alpha < 2 power-law tails P(|g| > x) ~ x^-alpha — to 5000 entries of the
    minibatch gradient and test it against a Gaussian by a likelihood ratio (Vuong 1989).
    Şimşekli, Sagun & Gürbüzbalaban, "A tail-index analysis of stochastic gradient noise in deep
    neural networks" (ICML 2019, arXiv 1901.06053), study the noise ``g_t - E[g]`` instead.

    Every ``every_n_steps`` steps of an optimizer, in ``on_before_optimizer_step`` (after the
    backward passes of all accumulated batches; under DDP after the gradient all-reduce, so every
    rank fits the same numbers without any collective; before gradient clipping), ``num_samples``
    entries are drawn uniformly without replacement among the entries that are not exactly zero,
    over all parameters of that optimizer that have a (dense) ``.grad``, with a ``torch.Generator``
    seeded by ``seed + global_step`` (same indices on every rank, never the global RNG). ``.grad``
    is only read, and only at the drawn entries. Exact zeros (dead ReLU units, feature maps of size
    1, embedding rows absent from the batch: 63% of a ResNet-18's gradient at 32×32 pixels) are an
    atom, not part of a tail: they are left out of every fit, so alpha describes the nonzero
    entries, and counted among the entries read (``sample_nonzero_entries``: rejection sampling
    over a uniform draw of at most 20 ``num_samples`` entries, no pass over all parameters), which
    gives ``grad_tail/zero_fraction``, an unbiased estimate, exact when every entry was read, with
    ``grad_tail/zero_fraction_stderr``. Above ~95% zeros fewer than ``num_samples`` nonzero entries
    may be found; fits of fewer than 50 are skipped. The sample is analysed by
    ``chaos_callbacks.dynamics.tails.analyse_tails``: stable fit (McCulloch's quantile estimator or
    maximum likelihood) with the standard error of alpha, and Vuong tests of the stable law against
    the Gaussian MLE (is the gradient heavy-tailed at all?) and against an ML Student t (is it
    alpha-stable with infinite variance, or a finite-variance heavy tail?). With ``per_layer=True``
    alpha is also fitted per layer, independently of the global fit (a skipped global fit does not
    stop them): a layer is the module that directly owns the parameters — ``net.0.weight`` and
    ``net.0.bias`` pool into ``net.0`` — and gets its own draw of nonzero entries. Layers with
    fewer than 50 entries are left out; a layer that cannot be fitted (e.g. an all-zero gradient)
    is skipped alone, with one warning per layer.

    Several optimizers (manual optimization, e.g. a GAN whose generator and discriminator each
    call ``opt.step()`` in ``training_step``): each optimizer's own parameters are fitted at its
    own due steps (``every_n_steps`` of its own step count, which the fitter keeps and
    checkpoints), and the global tags gain the part ``optimizer_<i>`` (index in
    ``configure_optimizers`` order): ``grad_tail/optimizer_0/alpha``, ``grad_tail/optimizer_1/vuong_p``.
    Per-layer tags need no such part (a layer belongs to one optimizer).

    ``target="noise"`` fits ``g_t - m_{t-1}`` where ``m`` is an exponential moving average of
    the gradients of the preceding steps, ``m_t = β m_{t-1} + (1 - β) g_t`` with ``m_0 = g_0``
    (updated at every optimizer step, non-finite gradients excluded; one extra float32 copy of the
    parameters, kept in the checkpoint). ``m`` stands in for the full-batch gradient of Şimşekli et
    al.: for i.i.d. symmetric alpha-stable gradients around a fixed mean, ``g_t - m_{t-1}`` is again
    alpha-stable with the same alpha (its weights sum to one, so the mean cancels exactly). Larger
    β averages more minibatches but lags a drifting mean by about β/(1-β) steps. The first
    fit needs at least one earlier gradient; until then scheduled fits are silently not made.
    Exact zeros are then the entries with ``g_t = m_{t-1}`` (units whose gradient is always 0).

    Mixed precision (Lightning 2.6, ``lightning/pytorch/plugins/precision/amp.py``): under
    ``16-mixed`` the ``GradScaler`` unscales the gradients after the closure and *before*
    ``on_before_optimizer_step``, so the fitted gradient is the true one. Optimizers that unscale
    inside ``step`` (``_step_supports_amp_scaling``, e.g. ``fused=True``) still hold scaled
    gradients at this hook; their sampled entries are divided by ``scaler.get_scale()``. An
    overflow step (inf/NaN gradient, which the scaler skips) is skipped here too, with one warning
    (per-layer fits of the layers whose gradient is finite are still made).
    ``bf16-mixed`` has no scaler; parameters and gradients stay float32. alpha, the likelihood
    ratios and the Vuong tests are scale invariant; only ``grad_tail/scale`` carries units.

    Logs at the step Lightning's loggers give the user's metrics of the same batch (the number of
    batches that stepped; ``trainer.global_step`` before the update when there is one optimizer):
    ``grad_tail/alpha`` (also to the progress bar) and ``grad_tail/alpha_stderr`` (its standard
    error as an estimate from the sampled entries: delta method for the quantile estimator,
    observed information for ``mle``), ``grad_tail/scale`` and ``grad_tail/scale_stderr``,
    ``grad_tail/llr_gauss`` (with ``_stderr``) and ``grad_tail/vuong_p`` (mean per-entry
    log-likelihood ratio stable − Gaussian, > 0 favours the stable law, and the two-sided Vuong
    p-value), ``grad_tail/llr_student_t`` (with ``_stderr``) and ``grad_tail/vuong_p_student_t``
    (the same against the Student t), ``grad_tail/zero_fraction``
    and ``grad_tail/zero_fraction_stderr``; per layer ``grad_tail/<layer>/alpha``,
    ``grad_tail/<layer>/alpha_stderr``, ``grad_tail/<layer>/zero_fraction`` and
    ``grad_tail/<layer>/zero_fraction_stderr``; ``grad_tail/skipped`` (skipped estimates so far: no
    gradient, non-finite, fewer than 50 nonzero entries, constant, or failed); to TensorBoard also a
    histogram ``grad_tail/log10_abs_samples`` (log10 of the sampled |g|: TensorBoard's equal-width bins
    become logarithmic bins of |g|, so heavy tails show) and, at estimates 1, 2, 4, 8, … and every
    ``figure_every_n_estimates``-th, a figure
    ``grad_tail/density`` of the empirical density of |g - median| with the fitted stable and
    Gaussian densities on log-log axes.

    Args:
        every_n_steps: cadence in steps of each optimizer (a fit runs when its step count — equal to
            ``global_step`` with one optimizer — is a multiple).
        num_samples: nonzero entries per fit (5000 in Chen, Gong et al.), globally and per layer.
        method: ``"quantile"`` (McCulloch 1986, ~0.3 ms per fit of 5000 samples) or ``"mle"``
            (maximum likelihood started at the quantile fit, 50-200 ms per fit, also per layer;
            see ``benchmarks/bench_grad_tail_overhead.py``). The two Vuong tests add 5-10 ms per
            estimate (a density table for the fitted alpha, the Student t fit).
        target: ``"gradient"`` (the paper) or ``"noise"`` (gradient minus its running mean).
        ema_decay: β of the running mean for ``target="noise"``, in (0, 1).
        per_layer: also fit alpha per layer.
        layer_filter: regular expression; only layers whose name it matches (``re.search``) are
            fitted per layer.
        max_layers: at most this many layers (the first in parameter order) are fitted per layer.
        figure_every_n_estimates: draw the density figure every this many estimates, and at estimates
            1, 2, 4, 8, … so that short runs show the trained network too (0: never);
            only with a TensorBoard logger attached.
        seed: seed (>= 0) of the entry sampling (and of the ``mle`` subsample).
        prefix: prepended to every tag this callback writes (``"probe_a/"`` → ``probe_a/grad_tail/...``),
            so that two instances can run side by side; two instances of one area with the same
            prefix are refused (identical ones by Lightning when the Trainer is built, others at fit start).
    """

    AREA = "grad_tail"  #: tags are ``<prefix>grad_tail/<quantity>``

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
        figure_every_n_estimates: int = 10,
        seed: int = 0,
        prefix: str = "",
    ) -> None:
        self.prefix = check_prefix(_OWNER, "prefix", prefix)
        self.every_n_steps = check_int(_OWNER, "every_n_steps", every_n_steps, minimum=1)
        self.num_samples = check_int(_OWNER, "num_samples", num_samples, minimum=MIN_SAMPLES)
        self.method = check_choice(_OWNER, "method", method, ("quantile", "mle"))
        self.target = check_choice(_OWNER, "target", target, ("gradient", "noise"))
        self.ema_decay = check_float(_OWNER, "ema_decay", ema_decay, 0.0, 1.0, low_open=True, high_open=True)
        self.per_layer = check_bool(_OWNER, "per_layer", per_layer)
        self._layer_pattern = check_regex(_OWNER, "layer_filter", layer_filter)
        self.layer_filter = layer_filter
        self.max_layers = check_int(_OWNER, "max_layers", max_layers, minimum=1)
        self.figure_every_n_estimates = check_int(_OWNER, "figure_every_n_estimates", figure_every_n_estimates, minimum=0)
        self.seed = check_int(_OWNER, "seed", seed, minimum=0)
        self._warn = plumb.WarnOnce(_OWNER)
        self._warn_layer = plumb.WarnOnce(_OWNER)
        self._ema: dict[str, Tensor] = {}
        self._optimizer_steps: dict[int, int] = {}
        self._num_estimates: dict[int, int] = {}
        self.last_estimate: dict[str, float] = {}

    @functools.cached_property  # Lightning reads it at every hook call; the settings it names are fixed
    def state_key(self) -> str:
        return self._generate_state_key(
            every_n_steps=self.every_n_steps, num_samples=self.num_samples, method=self.method, target=self.target,
            **plumb.prefix_key(self.prefix),
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plumb.check_unique_tags(self, trainer)

    # ------------------------------------------------------------------ hook
    @plumb.contain_failures("grad_tail")
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        index = self._optimizer_index(trainer, optimizer)
        due = self._count_step(trainer, index) % self.every_n_steps == 0
        if not (due or self.target == "noise"):
            return
        step = _logger_step(trainer)
        part = f"optimizer_{index}/" if len(trainer.optimizers) > 1 else ""
        grads = self._gradients(pl_module, optimizer)
        if not grads:
            if due:
                self._skip(trainer, pl_module, step, "no-grad", f"optimizer {index} has no parameter with a gradient")
            return
        loss_scale = self._loss_scale(trainer, optimizer)
        # min and max propagate NaN and reach ±inf: one fast reduction per tensor, one sync
        extremes = torch.stack([torch.stack(torch.aminmax(g)).float() for g in grads.values()])
        finite = dict(zip(grads, torch.isfinite(extremes).all(dim=1).tolist()))
        if due and (self.target == "gradient" or self._ema):
            self._estimate(trainer, pl_module, step, part, index, grads, finite, loss_scale)
        if self.target == "noise" and all(finite.values()):
            self._update_ema(grads, loss_scale)

    # ------------------------------------------------------------------ bookkeeping
    @staticmethod
    def _optimizer_index(trainer: Trainer, optimizer: Any) -> int:
        """Position of ``optimizer`` in ``trainer.optimizers`` (0 when it is the only one)."""
        optimizer = getattr(optimizer, "_optimizer", optimizer)  # a LightningOptimizer wrapper
        for i, candidate in enumerate(trainer.optimizers):
            if candidate is optimizer:
                return i
        if len(trainer.optimizers) <= 1:
            return 0
        raise RuntimeError("the stepping optimizer is not among trainer.optimizers")

    def _count_step(self, trainer: Trainer, index: int) -> int:
        """This optimizer's step number (0-based) and advance it.

        A fitter that first sees an optimizer mid-run (attached on resume without saved state)
        starts from ``global_step`` with one optimizer and from the number of batches otherwise.
        """
        count = self._optimizer_steps.get(index)
        if count is None:
            count = trainer.global_step if len(trainer.optimizers) <= 1 else _logger_step(trainer)
        self._optimizer_steps[index] = count + 1
        return count

    @staticmethod
    def _gradients(pl_module: LightningModule, optimizer: Any) -> dict[str, Tensor]:
        """Dense gradients of the optimizer's parameters, by parameter name (read-only views)."""
        names = {id(p): name for name, p in pl_module.named_parameters()}
        grads: dict[str, Tensor] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.layout == torch.strided and p.numel():
                    grads[names.get(id(p), f"param_{len(grads)}")] = p.grad.detach()
        return grads

    @staticmethod
    def _loss_scale(trainer: Trainer, optimizer: Any) -> float:
        """The GradScaler's scale when ``optimizer`` unscales inside ``step`` (fused), else 1."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is None or not getattr(optimizer, "_step_supports_amp_scaling", False):
            return 1.0
        return float(scaler.get_scale())

    def _sources(self, grads: dict[str, Tensor], names: list[str]) -> dict[str, Source]:
        """(gradient, running mean or None) of the parameters in ``names`` that can be sampled."""
        if self.target == "gradient":
            return {n: (grads[n], None) for n in names}
        return {n: (grads[n], self._ema[n].to(grads[n].device)) for n in names if n in self._ema}

    def _layers(self, names: list[str], grads: dict[str, Tensor]) -> dict[str, list[str]]:
        """Parameter names grouped by layer: filtered, layers under 50 entries dropped, capped."""
        groups: dict[str, list[str]] = {}
        for name in names:
            groups.setdefault(layer_name(name), []).append(name)
        groups = {
            layer: members
            for layer, members in groups.items()
            if sum(grads[n].numel() for n in members) >= MIN_SAMPLES
            and (self._layer_pattern is None or self._layer_pattern.search(layer))
        }
        if len(groups) > self.max_layers:
            self._warn_layer("cap", f"{len(groups)} layers, fitting the first max_layers={self.max_layers} only")
        return dict(list(groups.items())[: self.max_layers])

    # ------------------------------------------------------------------ estimate
    def _estimate(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        step: int,
        part: str,
        index: int,
        grads: dict[str, Tensor],
        finite: dict[str, bool],
        loss_scale: float,
    ) -> None:
        """Global fit and per-layer fits of one optimizer's gradient, each skipped on its own."""
        sources = self._sources(grads, list(grads))
        if not sources:
            self._skip(trainer, pl_module, step, "no-mean", "no parameter with a gradient has a running mean yet")
            return
        generator = torch.Generator().manual_seed(self.seed + trainer.global_step)
        metrics, samples, tails = self._global_fit(trainer, pl_module, step, part, sources, finite, generator, loss_scale)
        if self.per_layer:
            usable = {n: source for n, source in sources.items() if finite[n]}
            metrics.update(self._layer_fits(trainer, usable, generator, loss_scale))
        if not metrics:
            return
        self.last_estimate = metrics
        plumb.log_scalars(trainer, pl_module, metrics, step, prog_bar=(f"grad_tail/{part}alpha",), prefix=self.prefix)
        if tails is not None:
            self._num_estimates[index] = self._num_estimates.get(index, 0) + 1
            self._log_distribution(trainer, part, index, samples, tails.fit.alpha, tails.fit.scale, step)

    def _draw(self, sources: list[Source], generator: torch.Generator, loss_scale: float) -> NonzeroSample:
        return sample_nonzero_entries(sources, self.num_samples, generator, loss_scale, MAX_DRAWS_PER_SAMPLE * self.num_samples)

    def _global_fit(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        step: int,
        part: str,
        sources: dict[str, Source],
        finite: dict[str, bool],
        generator: torch.Generator,
        loss_scale: float,
    ) -> tuple[dict[str, float], Tensor, TailSummary | None]:
        """Tags of the fit of all of the optimizer's entries (only the zero fraction after a failed fit)."""
        if not all(finite[n] for n in sources):
            msg = "non-finite (NaN/inf) gradient; under 16-mixed the GradScaler skips this step too"
            self._skip(trainer, pl_module, step, "non-finite", msg)
            return {}, torch.empty(0), None
        tag = f"grad_tail/{part}"
        drawn = self._draw(list(sources.values()), generator, loss_scale)
        metrics = {f"{tag}zero_fraction": drawn.zero_fraction, f"{tag}zero_fraction_stderr": drawn.zero_fraction_stderr}
        try:
            tails = analyse_tails(drawn.values.numpy(), self.method, self.num_samples, self.seed + trainer.global_step)
        except ValueError as exc:
            msg = f"tail fit of the nonzero entries failed ({exc}; {drawn.draws} of {drawn.total} entries read)"
            self._skip(trainer, pl_module, step, "fit", msg)
            return metrics, drawn.values, None
        if tails.fit.censored:
            self._skip(trainer, pl_module, step, "alpha-floor", _FLOOR_MESSAGE.format(where="the entries"))
            return metrics, drawn.values, None
        fitted = {
            f"{tag}alpha": tails.fit.alpha,
            f"{tag}alpha_stderr": tails.fit.alpha_stderr,
            f"{tag}scale": tails.fit.scale,
            f"{tag}scale_stderr": tails.fit.scale_stderr,
            f"{tag}llr_gauss_stderr": tails.gaussian.llr_stderr,
            f"{tag}llr_student_t_stderr": tails.student_t.llr_stderr,
            f"{tag}llr_gauss": tails.gaussian.llr,
            f"{tag}vuong_p": tails.gaussian.p_value,
            f"{tag}llr_student_t": tails.student_t.llr,
            f"{tag}vuong_p_student_t": tails.student_t.p_value,
        }
        if not plumb.is_finite(*fitted.values()):
            self._skip(trainer, pl_module, step, "non-finite-fit", f"non-finite tail fit {fitted}")
            return metrics, drawn.values, None
        return metrics | fitted, drawn.values, tails

    def _layer_fits(self, trainer: Trainer, sources: dict[str, Source], generator: torch.Generator, loss_scale: float) -> dict[str, float]:
        """alpha, zero fraction and their standard errors for each layer whose gradient is finite."""
        grads = {n: g for n, (g, _) in sources.items()}
        out: dict[str, float] = {}
        for layer, names in self._layers(list(sources), grads).items():
            drawn = self._draw([sources[n] for n in names], generator, loss_scale)
            out[f"grad_tail/{layer}/zero_fraction"] = drawn.zero_fraction
            out[f"grad_tail/{layer}/zero_fraction_stderr"] = drawn.zero_fraction_stderr
            try:
                fit = fit_symmetric_stable(drawn.values.numpy(), self.method, self.num_samples, self.seed + trainer.global_step)
            except ValueError as exc:
                read = f"{drawn.draws} of {drawn.total} entries read"
                self._warn_layer(f"layer:{layer}", f"tail fit of layer {layer!r} failed at step {trainer.global_step} ({exc}; {read})")
                continue
            if not plumb.is_finite(fit.alpha, fit.alpha_stderr):
                self._warn_layer(f"layer:{layer}", f"non-finite tail fit of layer {layer!r} at step {trainer.global_step} ({fit})")
                continue
            if fit.censored:
                self._warn_layer(f"floor:{layer}", f"step {trainer.global_step}: " + _FLOOR_MESSAGE.format(where=f"layer {layer!r}"))
                continue
            out[f"grad_tail/{layer}/alpha"] = fit.alpha
            out[f"grad_tail/{layer}/alpha_stderr"] = fit.alpha_stderr
        return out

    def _log_distribution(self, trainer: Trainer, part: str, index: int, samples: Tensor, alpha: float, scale: float, step: int) -> None:
        if not plumb.tensorboard_loggers(trainer):
            return
        plumb.log_magnitude_histogram(trainer, f"{self.prefix}grad_tail/{part}log10_abs_samples", samples, step)
        n = self._num_estimates[index]  # figures at estimates 1, 2, 4, 8, ... and every figure_every_n_estimates-th
        if self.figure_every_n_estimates and (n & (n - 1) == 0 or n % self.figure_every_n_estimates == 0):
            from chaos_callbacks.plotting.tails import tail_density_figure

            what = "gradient" if self.target == "gradient" else "gradient noise"
            figure = functools.partial(tail_density_figure, samples.numpy(), alpha, scale, what)
            plumb.log_figure(trainer, f"{self.prefix}grad_tail/{part}density", figure, step)

    def _skip(self, trainer: Trainer, pl_module: LightningModule, step: int, kind: str, message: str) -> None:
        self._warn(kind, f"gradient tail fit skipped at step {trainer.global_step}: {message}")
        plumb.log_scalars(trainer, pl_module, {"grad_tail/skipped": self._warn.count}, step, prefix=self.prefix)

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
            "optimizer_steps": dict(self._optimizer_steps),
            "num_estimates": dict(self._num_estimates),
            "skipped": self._warn.count,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._ema = dict(state_dict["ema"])
        self._warn.count = state_dict["skipped"]
        if "optimizer_steps" in state_dict:
            self._optimizer_steps = dict(state_dict["optimizer_steps"])
            self._num_estimates = dict(state_dict["num_estimates"])
        else:  # a checkpoint of the single-optimizer version: the last global step fitted or EMA-updated
            last_step = state_dict["last_step"]
            self._optimizer_steps = {0: last_step + 1} if last_step >= 0 else {}
            self._num_estimates = {0: state_dict["num_estimates"]}
