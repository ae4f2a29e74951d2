"""``HessianSpectrumMonitor``: live Hessian eigenvalues, trace and spectral density."""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from chaos_callbacks.callbacks import _engine
from chaos_callbacks.callbacks import _hessian_landscape as landscape_
from chaos_callbacks.callbacks import _hessian_preconditioned as precond
from chaos_callbacks.callbacks import _outputs
from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.callbacks import _validation as V
from chaos_callbacks.curvature import (
    HessianOperator,
    hutchinson_trace,
    lanczos,
    lyapunov_map_lambda_max,
    power_iteration,
    spectral_density,
)
from chaos_callbacks.curvature.lanczos import rounding_floor
from chaos_callbacks.curvature.lr_rules import is_adam

Method = Literal["lanczos", "power", "lyapunov"]
WarmFormat = Literal["full", "half", "none"]
Curvature = Literal["hessian", "ggn"]


class HessianSpectrumMonitor(Callback):
    """Estimate the Hessian spectrum of the training loss every ``every_n_steps`` optimizer steps.

    At each estimate (before the optimizer step ``t``, on the weights ``θ_t``) the Hessian of the
    probe loss is applied matrix-free by exact Hessian-vector products and

    - ``method="lanczos"`` (default): the top-``k`` eigenvalues (largest algebraic) with certified
      Ritz error bounds ≤ ``tol · λ_max``, warm-started from the previous estimate's Ritz vectors
      plus a random part, and (``lambda_min=True``) every ``lambda_min_every_n_steps`` the most
      negative one, bounded with probability ``≥ 1 − 10⁻³``;
    - ``method="power"``: power iteration — the largest-*magnitude* eigenvalue, logged as
      ``hessian/lambda_dominant`` (it may be negative, so it is never called "top");
    - ``method="lyapunov"``: the Lyapunov-map estimator of Sasdelli et al. (OpenReview
      37Fh1MiR5Ze), ``λ_max = (e^Λ − 1)/η_a`` from the growth of a renormalised perturbation under
      the gradient-ascent map ``θ ↦ θ + η_a∇L``;

    optionally the trace (Hutchinson, deflated by the Ritz pairs) and the spectral density
    (stochastic Lanczos quadrature, Ghorbani et al. 2019), and always the gradient-weighted
    curvature ``‖Hg‖/‖g‖`` (Rosca et al. 2023), the batch sharpness ``gᵀHg/‖g‖²`` (Andreyev &
    Beneventano, arXiv 2412.20553: what mini-batch SGD holds at ``2/η``; both from one product ``Hg``
    on the probe gradient ``g``) and ``lr · λ_max`` (2 is the edge of stability, Cohen et al. 2021).
    With Adam/AdamW it also estimates Adam's preconditioned sharpness (``preconditioned``);
    ``split="val"`` estimates everything on a validation probe; ``landscape=True`` draws the loss
    along the top eigenvectors.

    Args:
        every_n_steps: cadence in optimizer steps (an estimate runs when ``global_step`` is a
            multiple of it, including step 0). A warm default estimate (certified λ_max) costs 8–11
            HVPs on an MNIST MLP, a cold one 20–60; ``hessian/hvps`` logs each estimate's cost
            (``benchmarks/bench_monitor_overhead.py``, ``benchmarks/bench_scale.py``).
        top_k: number of largest eigenvalues (``method="lanczos"`` only for ``top_k > 1``).
        loss_fn: ``loss_fn(module, batch) -> scalar``; default: the module's own
            ``training_step`` (its logging muted, its metric states restored).
        probe: ``"batch"`` for the current training batch, or an int ``N`` for a fixed probe set
            of the first ``N`` training examples drawn at fit start (same examples every
            estimate, so curves are comparable over time).
        method: ``"lanczos"``, ``"power"`` or ``"lyapunov"``.
        lambda_min: also estimate the most negative eigenvalue (Lanczos only; off by default), once
            every ``lambda_min_every_n_steps``: ``hessian/lambda_min`` is an upper bound (a Rayleigh
            quotient) and ``hessian/lambda_min_error`` its distance to a lower bound that holds with
            probability ``≥ 1 − 10⁻³`` (Kuczyński–Woźniakowski: a basis-free run from a random start,
            ~70–90 HVPs at the default ``lambda_min_tol``, whatever the warm start;
            :mod:`chaos_callbacks.curvature.lanczos`). It replaces a residual-based certificate that
            failed on networks with a large near-null space (an MNIST ReLU MLP: ``λ_min ≈ 0`` reported
            for a true ``−0.13``).
        lambda_min_tol: ``hessian/lambda_min_error ≤ lambda_min_tol · max(λ_max, |λ_min|)``.
        lambda_min_every_n_steps: cadence of ``λ_min``, a multiple of ``every_n_steps``; it is estimated
            at the last estimate of every window of that many steps (steps ``L − every_n_steps``,
            ``2L − every_n_steps``, ...), so the first, cold estimate costs about what ``λ_max`` alone
            costs. Default ``10 × every_n_steps`` (steps 1800, 3800, ... at the defaults): ``λ_min`` then
            adds ~8–9 HVPs per estimate on average (MNIST MLPs) instead of dominating every one;
            ``every_n_steps`` gives ``λ_min`` at every estimate.
        trace: also estimate the trace; ``trace_samples`` Rademacher probes.
        density: also estimate the spectral density (``density_probes × density_steps`` HVPs)
            and log it as a TensorBoard figure.
        density_every_n_steps: cadence of the (expensive) density, a multiple of
            ``every_n_steps``; default: at every estimate.
        tol: relative tolerance of ``λ_max`` and the top-``k`` estimates (relative to ``λ_max``).
            Below ``64 u`` of the parameters' type (float32: ``7.6·10⁻⁶``) products cannot certify it:
            the monitor warns once, and Lanczos stops when its residuals stall at that floor.
        max_hvps: budget of Hessian-vector products of the top-``k`` solve per estimate (cold ``λ_max``
            at 10⁶ parameters on random data: 30–40 for an MLP/CNN, 60–110 for a GPT-shaped LM; warm
            refreshes in MNIST training 8–13).
        lambda_min_max_hvps: budget of the ``λ_min`` solve (at ``λ_min`` steps): it needs about
            ``(ln(1648 √n)/√lambda_min_tol + 1)/2`` HVPs — 70 at ``n = 2·10⁵``, 90 at ``n = 10⁹`` for the
            default tolerance.
        max_basis: parameter-sized vectors the Lanczos solver holds at most (default ``max(12,
            2 top_k + 8)``); with the operator's temporaries and the warm vectors a default estimate
            peaks at ≤ 24 vectors (``benchmarks/bench_scale.py``). Smaller saves memory and costs
            restarts.
        checkpoint_warm_vectors: what ``state_dict`` keeps of the ``top_k`` warm-start vectors:
            ``"full"`` (default: a resumed run continues exactly as an uninterrupted one), ``"half"``
            (float16 with a scale per vector: half the bytes, the next estimate starts from a slightly
            rounded vector and may take a different number of HVPs) or ``"none"`` (the first estimate
            after a resume is cold; still certified).
        hessian_mode: ``"train"`` (default: the Hessian the optimizer sees — dropout active with
            masks fixed across the products of one estimate, batch norm on batch statistics) or
            ``"eval"``.
        warm_start: start each Lanczos run from the previous Ritz vectors.
        seed: seed of the random start vectors and probes (same on every rank).
        preconditioned: when the (first) optimizer is Adam/AdamW, also estimate its preconditioned
            sharpness ``λ_max(P^{-1/2} H P^{-1/2})`` (Cohen et al., arXiv 2207.14484; ``P =
            (1 − β₁^{t+1}) diag(sqrt(v̂) + ε)``, the scheduler's preconditioner, groups with a lower rate
            scaled by ``η_i/η``) by its own warm-started Lanczos to ``tol`` within ``max_hvps``, logged as
            ``hessian/preconditioned_lambda_max`` (certified ``_error``) with
            ``hessian/preconditioned_sharpness_ratio = η λ / τ``, ``τ = (2 + 2β₁)/(1 − β₁)`` Adam's
            stability threshold (1 = at the edge of stability). Not logged before Adam's first step.
        split: ``"train"`` (default) or ``"val"``: the probe set (``probe=N``, required) is the first ``N``
            examples of the first validation loader, its loss resolved as for training probes
            (``loss_fn`` or ``training_step`` on the validation batch) in ``hessian_mode``, with the same
            state protection; tags become ``<prefix>val/hessian/<quantity>`` (e.g.
            ``val/hessian/lambda_max``), so a train and a val monitor sit side by side with one
            ``prefix``. A fit without a validation loader at train start is refused (``ValueError``).
        blocks: ``{name: regex}``: also estimate, for each name, the diagonal block ``H_SS`` of the
            Hessian over the trainable parameters ``S`` whose names (``named_parameters()``) the regex
            matches (``re.search``; the other parameters held fixed; a parameter may be in several
            blocks), with the same solver, tolerance, certificates and warm starts (its own warm
            vectors), on the same graph as the full estimate. Tags ``hessian/<name>/lambda_max``,
            ``.../eig_<i>``, ``.../lambda_min``, ``.../trace`` as enabled above, and
            ``hessian/<name>/hvps``; a block that is not certified skips only its own tags (warned once,
            counted in ``hessian/skipped``). ``hessian/hvps`` counts the products of all of them. A
            pattern that matches no trainable parameter is refused at fit start.
        curvature: ``"hessian"`` (default) or ``"ggn"``: the generalised Gauss–Newton matrix
            ``G = Jᵀ H_out J`` (Schraudolph 2002; Martens 2020), ``J`` the Jacobian of the outputs and
            ``H_out`` the Hessian of the loss with respect to them — positive semi-definite when the loss
            is convex in the outputs (then ``lambda_min`` is its smallest eigenvalue, ``≥ 0``). Every
            tag of the instance moves under ``ggn/`` (``ggn/lambda_max``, ``ggn/<name>/trace``,
            ``ggn/hvps``, ``ggn/skipped``, …), so a Hessian and a Gauss–Newton monitor can share a
            ``prefix``. The split is at the output of the LightningModule's ``forward``, captured while
            the loss is computed (it must run exactly once there, else the estimate is skipped), or
            where ``output_fn``/``output_loss_fn`` say.
        output_fn: ``output_fn(module, batch) -> outputs`` (a tensor); with ``output_loss_fn``, the
            split of the loss for ``curvature="ggn"`` (the pair goes together and replaces ``loss_fn``).
        output_loss_fn: ``output_loss_fn(outputs, batch) -> scalar loss``.
        landscape: also log a TensorBoard figure ``hessian/landscape``: the probe loss along ``±t·v₁``
            and (``top_k ≥ 2``, Lanczos) over the ``v₁–v₂`` plane of the estimate's Ritz vectors, with
            the quadratic model ``L₀ + t gᵀv + ½λt²`` overlaid (PyHessian's line; the plane as contours).
            ``t`` spans ``±landscape_radius · sqrt(2|L₀|/|λ|)``, where ``½λt²`` alone equals the loss
            (:mod:`chaos_callbacks.curvature.landscape`). It costs ``landscape_points`` (line) ``+
            landscape_points²`` (plane) forwards of the probe; the weights are perturbed in place and
            restored bit-exactly, the run's state as for every estimate. The last one is kept in
            ``last_landscape``.
        landscape_every_n_steps: its cadence, a multiple of ``every_n_steps`` (default: every estimate).
        landscape_points: points per axis (odd, ≥ 3, so that ``t = 0`` is one of them).
        landscape_radius: half-width of the range in units of ``sqrt(2|L₀|/|λ|)``.
        prefix: prepended to every tag this callback writes (``"probe_a/"`` → ``probe_a/hessian/...``),
            so that two instances can run side by side; two instances of one area with the same
            prefix are refused (identical ones by Lightning when the Trainer is built, others at fit start).
    """

    AREA = "hessian"  #: tags are ``<prefix>hessian/<quantity>`` (an instance with ``curvature="ggn"``: ``ggn``)

    def __init__(
        self,
        every_n_steps: int = 200,
        top_k: int = 1,
        loss_fn: plumb.LossFn | None = None,
        probe: Literal["batch"] | int = "batch",
        method: Method = "lanczos",
        lambda_min: bool = False,
        lambda_min_tol: float = 1e-2,
        trace: bool = False,
        trace_samples: int = 20,
        density: bool = False,
        density_probes: int = 3,
        density_steps: int = 90,
        density_every_n_steps: int | None = None,
        tol: float = 1e-3,
        max_hvps: int = 150,
        hessian_mode: Literal["train", "eval"] = "train",
        warm_start: bool = True,
        seed: int = 0,
        lambda_min_every_n_steps: int | None = None,
        lambda_min_max_hvps: int = 150,
        max_basis: int | None = None,
        checkpoint_warm_vectors: WarmFormat = "full",
        preconditioned: bool = True,
        split: Literal["train", "val"] = "train",
        blocks: dict[str, str] | None = None,
        curvature: Curvature = "hessian",
        output_fn: _outputs.OutputFn | None = None,
        output_loss_fn: _outputs.OutputLossFn | None = None,
        landscape: bool = False,
        landscape_every_n_steps: int | None = None,
        landscape_points: int = 15,
        landscape_radius: float = 2.0,
        prefix: str = "",
    ) -> None:
        name = type(self).__name__
        self.prefix = V.check_prefix(name, "prefix", prefix)
        self.every_n_steps = V.check_int(name, "every_n_steps", every_n_steps, minimum=1)
        self.top_k = V.check_int(name, "top_k", top_k, minimum=1)
        self.loss_fn = V.check_callable(name, "loss_fn", loss_fn)
        self.probe = V.check_probe(name, "probe", probe)
        self.method = V.check_choice(name, "method", method, ("lanczos", "power", "lyapunov"))
        if self.method != "lanczos" and self.top_k > 1:
            raise ValueError(f"{name}: top_k > 1 needs method='lanczos' ({method!r} estimates one eigenvalue), got top_k={top_k}")
        self.lambda_min = V.check_bool(name, "lambda_min", lambda_min) and self.method == "lanczos"
        self.lambda_min_tol = V.check_float(name, "lambda_min_tol", lambda_min_tol, 0, 1, low_open=True, high_open=True)
        self.trace = V.check_bool(name, "trace", trace)
        self.trace_samples = V.check_int(name, "trace_samples", trace_samples, minimum=2)
        self.density = V.check_bool(name, "density", density)
        self.density_probes = V.check_int(name, "density_probes", density_probes, minimum=1)
        self.density_steps = V.check_int(name, "density_steps", density_steps, minimum=2)
        density_every = V.check_int(name, "density_every_n_steps", density_every_n_steps, minimum=1, allow_none=True)
        if density_every is not None and density_every % self.every_n_steps:
            raise ValueError(
                f"{name}: density_every_n_steps must be a positive multiple of every_n_steps={every_n_steps}, "
                f"got {density_every_n_steps}"
            )
        self.density_every_n_steps = density_every or self.every_n_steps
        self.tol = V.check_float(name, "tol", tol, 0, 1, low_open=True, high_open=True)
        self.max_hvps = V.check_int(name, "max_hvps", max_hvps, minimum=self.top_k + 1)
        self.hessian_mode = V.check_choice(name, "hessian_mode", hessian_mode, ("train", "eval"))
        self.warm_start = V.check_bool(name, "warm_start", warm_start)
        self.seed = V.check_int(name, "seed", seed, minimum=0)
        min_every = V.check_int(name, "lambda_min_every_n_steps", lambda_min_every_n_steps, minimum=1, allow_none=True)
        if min_every is not None and min_every % self.every_n_steps:
            raise ValueError(
                f"{name}: lambda_min_every_n_steps must be a positive multiple of every_n_steps={every_n_steps}, "
                f"got {lambda_min_every_n_steps}"
            )
        self.lambda_min_every_n_steps = min_every or 10 * self.every_n_steps
        self.lambda_min_max_hvps = V.check_int(name, "lambda_min_max_hvps", lambda_min_max_hvps, minimum=1)
        self.max_basis = V.check_int(name, "max_basis", max_basis, minimum=2 * (self.top_k + 2), allow_none=True)
        self.checkpoint_warm_vectors = V.check_choice(name, "checkpoint_warm_vectors", checkpoint_warm_vectors, ("full", "half", "none"))
        self.preconditioned = V.check_bool(name, "preconditioned", preconditioned)
        self._precond_warm: torch.Tensor | None = None
        self.split = V.check_choice(name, "split", split, ("train", "val"))
        if self.split == "val" and self.probe == "batch":
            raise ValueError(f"{name}: split='val' needs a fixed probe of N validation examples (probe=N); "
                             "probe='batch' is the training batch of the step")
        self.tag_prefix = self.prefix + ("val/" if self.split == "val" else "")  #: what precedes ``hessian/`` in the tags
        self.blocks = _check_blocks(name, blocks)
        self.curvature = V.check_choice(name, "curvature", curvature, _engine.CURVATURES)
        self.AREA = self.curvature  #: this instance's area: ``hessian`` or ``ggn``
        self.output_split = _check_split(name, self.curvature, self.loss_fn, output_fn, output_loss_fn)
        self._blocks_warm: dict[str, tuple[torch.Tensor | None, torch.Tensor | None]] = {}
        self._block_skips: list[tuple[str, str]] = []
        self.landscape = V.check_bool(name, "landscape", landscape)
        landscape_every = V.check_int(name, "landscape_every_n_steps", landscape_every_n_steps, minimum=1, allow_none=True)
        if landscape_every is not None and landscape_every % self.every_n_steps:
            raise ValueError(f"{name}: landscape_every_n_steps must be a positive multiple of every_n_steps={every_n_steps}, "
                             f"got {landscape_every_n_steps}")
        self.landscape_every_n_steps = landscape_every or self.every_n_steps
        self.landscape_points = V.check_int(name, "landscape_points", landscape_points, minimum=3)
        if self.landscape_points % 2 == 0:
            raise ValueError(f"{name}: landscape_points must be odd (t = 0 is the middle point), got {landscape_points}")
        self.landscape_radius = V.check_float(name, "landscape_radius", landscape_radius, 0, low_open=True)
        self._landscape_basis: landscape_.Basis | None = None
        self.last_landscape: Any = None
        self._warn = plumb.WarnOnce(type(self).__name__)
        self._probe_batches: list[Any] | None = None
        self._warm_vectors: torch.Tensor | None = None
        self._top_values: torch.Tensor | None = None
        self._last_step = -1
        self._estimate_step = -1
        self._num_estimates = 0
        self.last_estimate: dict[str, float] = {}

    @functools.cached_property  # Lightning reads it at every hook call; the settings it names are fixed
    def state_key(self) -> str:
        curvature = {"curvature": self.curvature} if self.curvature != "hessian" else {}  # older checkpoints keep their keys
        split = {"split": self.split} if self.split != "train" else {}
        return self._generate_state_key(every_n_steps=self.every_n_steps, top_k=self.top_k, method=self.method, probe=self.probe,
                                        **curvature, **split, **plumb.prefix_key(self.prefix))

    # ------------------------------------------------------------------ hooks
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plumb.check_unique_tags(self, trainer)
        loss_fn = self.loss_fn if self.output_split is None else self.output_split.output_fn  # an explicit split needs no training_step
        plumb.check_loss_resolvable(pl_module, loss_fn, type(self).__name__)
        if self.method == "lanczos":
            dim = sum(p.numel() for p in plumb.trainable_parameters(pl_module))
            V.check_cold_start_budget(type(self).__name__, "max_hvps", self.max_hvps, dim, runs=2 if self.top_k >= 2 else 1)
        for block in self.blocks or {}:  # a pattern that matches nothing, or too few entries for top_k, fails here
            size = sum(p.numel() for p in self._block_params(pl_module, block))
            if size < self.top_k:
                raise ValueError(f"{type(self).__name__}: blocks[{block!r}] matches {size} parameter entries, fewer than top_k={self.top_k}")

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.split == "val" and trainer.val_dataloaders is None:
            raise ValueError(f"{type(self).__name__}: split='val' draws its probe from the validation loader, but the fit has "
                             "none at train start: pass val_dataloaders to fit (with a validation_step, limit_val_batches > 0 "
                             "and validation in the first epoch) or use split='train'")
        engine = _engine.engine_for(trainer)
        engine.register(self)
        if isinstance(self.probe, int):
            self._probe_batches = engine.probe_set(trainer, self.probe, self._probe_batches, split=self.split)

    @plumb.contain_failures(None)  # this instance's area: hessian or ggn
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if not self._curvature_due(trainer, step):
            return
        self._last_step = step
        outcome = _engine.engine_for(trainer).estimate(self, trainer, pl_module, batch, batch_idx)
        basis, self._landscape_basis = self._landscape_basis, None  # this estimate's directions, if it drew a landscape
        try:
            metrics, density = outcome.get()
        except Exception as exc:  # any failure inside a diagnostic: skip, warn once per kind, count, go on
            what = "Hessian" if self.curvature == "hessian" else "Gauss-Newton"
            self._warn(type(exc).__name__, f"{what} estimate skipped at step {step} ({type(exc).__name__}: {exc})")
            plumb.log_scalars(trainer, pl_module, {f"{self.AREA}/skipped": self._warn.count}, step, prefix=self.tag_prefix)
            return
        for block, why in self._block_skips:
            self._warn(f"block:{block}", f"block {block!r} skipped at step {step} ({why}); the other estimates are logged")
        if self._block_skips:
            metrics["hessian/skipped"] = self._warn.count
        lr = plumb.current_lr(trainer)
        if lr is not None and metrics.get("hessian/lambda_max") is not None:
            metrics["hessian/sharpness_lr"] = lr * metrics["hessian/lambda_max"]
        if density is not None:
            from chaos_callbacks.plotting.hessian import spectral_density_figure

            plumb.log_figure(trainer, f"{self.tag_prefix}{self.AREA}/spectral_density", lambda: spectral_density_figure(density), step)
        metrics = self._in_area(metrics)
        self.last_estimate = metrics
        plumb.log_scalars(trainer, pl_module, metrics, step, prog_bar=(f"{self.AREA}/lambda_max",), prefix=self.tag_prefix)
        if basis is not None:
            self._log_landscape(trainer, pl_module, batch, batch_idx, basis, step)

    # ------------------------------------------------------------------ estimate
    def _curvature_due(self, trainer: Trainer, step: int) -> bool:
        """An estimate runs at multiples of ``every_n_steps``, once per optimizer step."""
        return step % self.every_n_steps == 0 and step != self._last_step

    def _curvature_request(self, trainer: Trainer, pl_module: LightningModule) -> _engine.Request:
        """The Hessian of the probe loss over every trainable parameter; a Lanczos or Lyapunov-map
        ``λ_max`` is offered to consumers of the same operator (:mod:`~chaos_callbacks.callbacks._engine`)."""
        return _engine.Request(
            compute=lambda shared: self._estimate(trainer, shared),
            params=plumb.trainable_parameters(pl_module),
            loss_fn=self.loss_fn,
            probe=self._probe_batches,
            train_mode=self.hessian_mode == "train",
            produces_top=self.method in ("lanczos", "lyapunov"),
            curvature=self.curvature,
            output_split=self.output_split,
        )

    def _estimate(self, trainer: Trainer, shared: _engine.Shared) -> tuple[dict[str, float], Any]:
        """The estimate on the step's shared operator (inside ``no_harm``): metrics and the density (or ``None``).

        ``hessian/hvps`` is the products this estimate took: its eigen-solve — run at the strictest
        tolerance and largest budget of the consumers that reuse it, who then take none — the trace,
        the density and the product ``Hg`` of ``‖Hg‖/‖g‖`` and the batch sharpness (unless another
        consumer of the operator computed it first).
        """
        self._estimate_step = trainer.global_step  # the engine may run this before the monitor's own hook
        generator = torch.Generator().manual_seed(self.seed + self._num_estimates)
        self._num_estimates += 1
        op = shared.operator
        if not plumb.is_finite(op.loss) or not torch.isfinite(op.gradient).all():
            raise plumb.EstimateSkipped(f"non-finite probe loss or gradient (loss={op.loss})")
        kw = dict(generator=generator, dtype=op.dtype, device=op.device)
        metrics: dict[str, float] = {}
        # the solve serves the strictest consumer of the same operator (its tolerance and budget)
        need = shared.top_need()
        tol = self.tol if need is None else min(self.tol, need.tol)
        max_hvps = self.max_hvps if need is None else max(self.max_hvps, need.max_hvps)
        lam_max = self._eigen(op, metrics, kw, tol, max_hvps)
        if lam_max is not None:
            self._publish(shared, metrics)
        eigen = [v for k, v in metrics.items() if k in ("hessian/lambda_max", "hessian/lambda_dominant")]
        if not bool(op.gradient.any()) and all(v == 0.0 for v in eigen):
            raise plumb.EstimateSkipped("the probe loss is constant in the parameters (zero gradient and zero Hessian): "
                                        "is it detached from the model?")
        if self.trace:
            self._trace(op, metrics, kw)
        density = None
        if self.density and trainer.global_step % self.density_every_n_steps == 0:
            density = spectral_density(op, op.dim, num_probes=self.density_probes, steps=self.density_steps, **kw)
        metrics["hessian/grad_curvature"] = shared.grad_curvature()
        metrics["hessian/batch_sharpness"] = shared.batch_sharpness()
        if self.preconditioned and trainer.optimizers:
            self._preconditioned(trainer.optimizers[0], op, metrics, kw)
        if self.blocks:
            metrics.update(self._block_estimates(trainer, shared, kw))
        if self.landscape and trainer.global_step % self.landscape_every_n_steps == 0:
            self._landscape_basis = self._basis(op, metrics)
        metrics["hessian/hvps"] = float(shared.num_matvecs)
        if not plumb.is_finite(*[v for v in metrics.values() if v is not None]):
            raise plumb.EstimateSkipped(f"non-finite estimate {metrics}")
        return {k: v for k, v in metrics.items() if v is not None}, density

    def _trace(self, op: Any, metrics: dict[str, float], kw: dict[str, Any]) -> None:
        """Hutchinson trace of ``op`` (the full operator or a block's view), deflated by the Ritz pairs of
        its estimate (the monitor's warm vectors, or the block's inside :meth:`_warm_state_of`)."""
        deflate = {}
        if self.method == "lanczos" and self._warm_vectors is not None:
            deflate = dict(deflate_vectors=self._warm_vectors[: self.top_k], deflate_values=self._top_values)
        est = hutchinson_trace(op, op.dim, num_samples=self.trace_samples, **deflate, **kw)
        metrics["hessian/trace"], metrics["hessian/trace_stderr"] = est.trace, est.stderr

    def _publish(self, shared: _engine.Shared, metrics: dict[str, float]) -> None:
        """Offer the certified top of the spectrum (values, bounds, Ritz vectors) to the step's other consumers."""
        k = sum(1 for name in metrics if name.startswith("hessian/eig_") and not name.endswith("_error"))
        names = [f"hessian/eig_{i}" for i in range(1, k + 1)] if k else ["hessian/lambda_max"]
        if not all(name in metrics and f"{name}_error" in metrics for name in names):
            return  # nothing certified to offer
        values, errors = [metrics[name] for name in names], [metrics[f"{name}_error"] for name in names]
        vectors = self._warm_vectors[: len(values)] if isinstance(self._warm_vectors, torch.Tensor) else None
        shared.publish_top(_engine.TopSolve(values, errors, vectors))

    def _eigen(self, op: HessianOperator, metrics: dict[str, float], kw: dict[str, Any], tol: float, max_hvps: int) -> float | None:
        """Eigenvalue estimates to ``tol`` within ``max_hvps`` products, with their certified ``_error``
        bounds; returns ``λ_max`` (``None`` for power).

        Bounds are rigorous given the index assumption of :mod:`chaos_callbacks.curvature.lanczos`
        (the random part of every start vector makes it hold with high probability); ``λ_min``'s holds
        with probability ``≥ 1 − 10⁻³``. The previous warm vectors are handed over (not kept) while the
        solver runs, so they are freed once its start vector is built.
        """
        init, self._warm_vectors = (self._warm_vectors if self.warm_start else None), None
        if self.method == "power":
            res = power_iteration(op, op.dim, tol=tol, max_matvecs=max_hvps, init=init, **kw)
            if not res.converged:
                raise plumb.EstimateSkipped(f"power iteration did not converge in {max_hvps} HVPs")
            self._warm_vectors = res.eigenvector[None]
            metrics["hessian/lambda_dominant"] = res.eigenvalue
            metrics["hessian/lambda_dominant_error"] = res.error_bound
            return None
        if self.method == "lyapunov":
            res = lyapunov_map_lambda_max(op, op.dim, tol=tol, max_matvecs=max_hvps, init=init, **kw)
            if not res.converged:
                raise plumb.EstimateSkipped(f"the Lyapunov-map estimate did not converge in {max_hvps} HVPs")
            self._warm_vectors = res.vector[None]
            metrics["hessian/lambda_max"] = res.lambda_max
            metrics["hessian/lambda_max_error"] = res.error_bound
            return res.lambda_max
        if tol < rounding_floor(op.dtype) and "tol_floor" not in self._warn.seen:  # once, not counted as a skip
            self._warn.seen.add("tol_floor")
            rank_zero_warn(f"{type(self).__name__}: tol={tol} is below what {op.dtype} products can certify "
                           f"(~{rounding_floor(op.dtype):.1e}): Lanczos will stop at the rounding floor and skip the "
                           "estimate; raise tol or train in float64")
        want_min = self.lambda_min and self._lambda_min_due()
        res = lanczos(op, op.dim, k=self.top_k, want_min=want_min, tol=tol, min_tol=self.lambda_min_tol,
                      max_matvecs=max_hvps, min_max_matvecs=self.lambda_min_max_hvps, max_basis=self.max_basis,
                      init=init, **kw)
        if not res.converged:
            raise plumb.EstimateSkipped(f"Lanczos did not certify the top {self.top_k} to tol={tol} in max_hvps={max_hvps} "
                                        f"HVPs ({res.stop_reason})")
        self._warm_vectors = res.eigenvectors
        self._top_values = res.eigenvalues
        metrics["hessian/lambda_max"] = float(res.eigenvalues[0])
        metrics["hessian/lambda_max_error"] = float(res.error_bounds[0])
        for i, (value, bound) in enumerate(zip(res.eigenvalues.tolist(), res.error_bounds.tolist()), start=1):
            metrics[f"hessian/eig_{i}"] = value
            metrics[f"hessian/eig_{i}_error"] = bound
        if want_min and res.lambda_min_converged:
            metrics["hessian/lambda_min"] = res.lambda_min
            metrics["hessian/lambda_min_error"] = res.lambda_min_error
        elif want_min:
            self._warn("lambda_min", f"lambda_min not certified to lambda_min_tol={self.lambda_min_tol} in "
                       f"lambda_min_max_hvps={self.lambda_min_max_hvps} HVPs: not logged (the top eigenvalues are)")
        return float(res.eigenvalues[0])

    def _lambda_min_due(self) -> bool:
        """``λ_min`` runs at the last estimate of each window of ``lambda_min_every_n_steps`` steps."""
        period = self.lambda_min_every_n_steps
        return self._estimate_step % period == period - self.every_n_steps

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "warm_vectors": _pack_warm(self._warm_vectors, self.checkpoint_warm_vectors),
            "top_values": self._top_values,
            "probe_batches": self._probe_batches,
            "last_step": self._last_step,
            "num_estimates": self._num_estimates,
            "skipped": self._warn.count,
            "preconditioned_warm": _pack_warm(self._precond_warm, self.checkpoint_warm_vectors),
            "blocks_warm": {name: (_pack_warm(v, self.checkpoint_warm_vectors), values) for name, (v, values) in self._blocks_warm.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._warm_vectors = _unpack_warm(state_dict["warm_vectors"])
        self._top_values = state_dict["top_values"]
        self._probe_batches = state_dict["probe_batches"]
        self._last_step = state_dict["last_step"]
        self._num_estimates = state_dict["num_estimates"]
        self._warn.count = state_dict["skipped"]
        self._precond_warm = _unpack_warm(state_dict.get("preconditioned_warm"))
        self._blocks_warm = {name: (_unpack_warm(v), values) for name, (v, values) in state_dict.get("blocks_warm", {}).items()}

    # ------------------------------------------------------------------ Adam's preconditioned sharpness
    def _preconditioned(self, optimizer: Any, op: Any, metrics: dict[str, float], kw: dict[str, Any]) -> None:
        """Adam's preconditioned sharpness into ``metrics`` (nothing for other optimizers or before
        Adam's first step; an uncertified solve is warned and counted, the other quantities stay)."""
        if not is_adam(optimizer):
            return
        init, self._precond_warm = (self._precond_warm if self.warm_start else None), None
        try:
            top = precond.preconditioned_top(op, op.dim, op.params, optimizer, tol=self.tol, max_matvecs=self.max_hvps,
                                             init=init, **kw)
        except RuntimeError as exc:
            self._warn("preconditioned", f"{exc}: hessian/preconditioned_lambda_max not logged (the other quantities are)")
            return
        if top is None:
            return
        self._precond_warm = top.vectors
        metrics["hessian/preconditioned_lambda_max"] = top.value
        metrics["hessian/preconditioned_lambda_max_error"] = top.error
        if top.ratio is None:
            if "preconditioned_ratio" not in self._warn.seen:  # once, not counted as a skip
                self._warn.seen.add("preconditioned_ratio")
                rank_zero_warn(f"{type(self).__name__}: the parameter groups of Adam have different beta1, so there is no "
                               "single stability threshold: hessian/preconditioned_sharpness_ratio is not logged")
            return
        metrics["hessian/preconditioned_sharpness_ratio"] = top.ratio
        metrics["hessian/preconditioned_sharpness_ratio_error"] = top.ratio_error

    # ------------------------------------------------------------------ blocks and areas
    def _block_params(self, pl_module: LightningModule, block: str) -> list[torch.Tensor]:
        """The trainable parameters whose names ``blocks[block]`` matches (``re.search``), in module order."""
        pattern = self.blocks[block]
        params = [p for n, p in pl_module.named_parameters() if p.requires_grad and pattern.search(n)]
        if not params:
            raise ValueError(f"{type(self).__name__}: blocks[{block!r}] = {pattern.pattern!r} matches no trainable "
                             "parameter name of the module (see module.named_parameters())")
        return params

    def _block_estimates(self, trainer: Trainer, shared: _engine.Shared, kw: dict[str, Any]) -> dict[str, float]:
        """The estimates of every block ``S``: ``_eigen`` and the trace on the diagonal block ``H_SS`` (a view of
        the step's graph), each from its own warm vectors; tags ``hessian/<name>/<quantity>``. A block that
        fails is left out and recorded in ``_block_skips`` (its hook warns and counts it)."""
        self._block_skips = []
        out: dict[str, float] = {}
        for block in self.blocks:
            view = shared.view(self._block_params(trainer.lightning_module, block))
            metrics: dict[str, float] = {}
            with self._warm_state_of(block):
                try:
                    self._eigen(view, metrics, kw, self.tol, self.max_hvps)
                    if self.trace:
                        self._trace(view, metrics, kw)
                except Exception as exc:  # this block's failure; the others and the full estimate go on
                    self._block_skips.append((block, f"{type(exc).__name__}: {exc}"))
                    continue
            metrics["hessian/hvps"] = float(view.num_matvecs)
            if not plumb.is_finite(*metrics.values()):
                self._block_skips.append((block, f"non-finite estimate {metrics}"))
                continue
            out.update({f"hessian/{block}/{k.removeprefix('hessian/')}": v for k, v in metrics.items()})
        return out

    @contextlib.contextmanager
    def _warm_state_of(self, block: str) -> Iterator[None]:
        """Run the full estimate's code on a block: its warm vectors and top values in place of the monitor's."""
        saved = self._warm_vectors, self._top_values
        self._warm_vectors, self._top_values = self._blocks_warm.get(block, (None, None))
        try:
            yield
        finally:
            self._blocks_warm[block] = (self._warm_vectors, self._top_values)
            self._warm_vectors, self._top_values = saved

    def _in_area(self, metrics: dict[str, float]) -> dict[str, float]:
        """Tags under this instance's area: the estimate names its tags ``hessian/...``; a Gauss–Newton
        monitor logs them as ``ggn/...``."""
        if self.AREA == "hessian":
            return metrics
        return {f"{self.AREA}/{k.removeprefix('hessian/')}" if k.startswith("hessian/") else k: v for k, v in metrics.items()}

    # ------------------------------------------------------------------ landscape
    def _basis(self, op: Any, metrics: dict[str, float]) -> landscape_.Basis | None:
        """The estimate's directions for the landscape: the top two Ritz pairs (one without a second)."""
        if self._warm_vectors is None:
            return None
        values = [metrics[k] for k in ("hessian/eig_1", "hessian/eig_2") if k in metrics]
        values = values or [metrics.get("hessian/lambda_max", metrics.get("hessian/lambda_dominant"))]
        vectors = self._warm_vectors[: len(values)]
        slopes = (vectors.double() @ op.gradient.double()).tolist()
        return landscape_.Basis(op.loss, values, vectors, slopes)

    def _log_landscape(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int,
                       basis: landscape_.Basis, step: int) -> None:
        """Evaluate the landscape on the estimate's probe and log its figure (a failure is warned and counted)."""
        batches = [batch] if self._probe_batches is None else [plumb.to_device(trainer, b) for b in self._probe_batches]
        try:
            loss_fn = self.loss_fn if self.output_split is None else self.output_split.loss  # the loss the curvature is of
            self.last_landscape = landscape_.probe_landscape(trainer, pl_module, basis, batches, loss_fn, self.hessian_mode == "train",
                                                             self.landscape_points, self.landscape_radius, batch_idx)
        except Exception as exc:
            self._warn("landscape", f"loss landscape skipped at step {step} ({type(exc).__name__}: {exc})")
            return
        from chaos_callbacks.plotting.hessian import landscape_figure

        landscape = self.last_landscape
        plumb.log_figure(trainer, f"{self.tag_prefix}{self.AREA}/landscape", lambda: landscape_figure(landscape), step)


def _check_blocks(owner: str, blocks: Any) -> dict[str, re.Pattern[str]] | None:
    """``None`` or a non-empty ``{tag part: regex}`` (compiled)."""
    if blocks is None:
        return None
    if not isinstance(blocks, dict) or not blocks:
        raise ValueError(f"{owner}: blocks must be a non-empty dict {{name: regex of parameter names}} or None, got {blocks!r}")
    return {V.check_tag_part(owner, "a name in blocks", name): V.check_regex(owner, f"blocks[{name!r}]", pattern, allow_none=False)
            for name, pattern in blocks.items()}


def _check_split(owner: str, curvature: str, loss_fn: Any, output_fn: Any, output_loss_fn: Any) -> _outputs.OutputSplit | None:
    """The explicit Gauss–Newton split, or ``None`` (the captured ``forward`` output)."""
    output_fn = V.check_callable(owner, "output_fn", output_fn)
    output_loss_fn = V.check_callable(owner, "output_loss_fn", output_loss_fn)
    if output_fn is None and output_loss_fn is None:
        return None
    if curvature != "ggn":
        raise ValueError(f"{owner}: output_fn and output_loss_fn split the loss for curvature='ggn', got curvature={curvature!r}")
    if output_fn is None or output_loss_fn is None:
        raise ValueError(f"{owner}: output_fn and output_loss_fn go together (the outputs and the loss computed from them), "
                         f"got output_fn={output_fn!r}, output_loss_fn={output_loss_fn!r}")
    if loss_fn is not None:
        raise ValueError(f"{owner}: pass either loss_fn or output_fn/output_loss_fn (which define the loss), not both")
    return _outputs.OutputSplit(output_fn, output_loss_fn)


def _pack_warm(vectors: torch.Tensor | None, fmt: str) -> torch.Tensor | dict[str, Any] | None:
    """Warm vectors for a checkpoint: as they are (``"full"``), float16 rows scaled to a max-abs of 1
    with their scales (``"half"``: entries keep ~3 significant digits), or nothing (``"none"``)."""
    if vectors is None or fmt == "none":
        return None
    vectors = vectors.detach().cpu()
    if fmt == "full":
        return vectors
    scale = vectors.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(vectors.dtype).tiny)
    return {"half": (vectors / scale).to(torch.float16), "scale": scale.to(torch.float32), "dtype": str(vectors.dtype).removeprefix("torch.")}


def _unpack_warm(packed: torch.Tensor | dict[str, Any] | None) -> torch.Tensor | None:
    if not isinstance(packed, dict):
        return packed
    return (packed["half"].to(torch.float32) * packed["scale"]).to(getattr(torch, packed["dtype"]))
