"""``GradientNoiseScale``: the simple noise scale B_simple = tr Σ / |G|² of McCandlish et al., live."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.callbacks._validation import check_callable, check_choice, check_float, check_int, check_prefix
from chaos_callbacks.curvature import flatten
from chaos_callbacks.dynamics.noise_scale import NoiseEstimate, NoiseScaleSmoother, two_batch_estimate

Source = Literal["auto", "ddp", "accumulation", "halves", "per_example", "micro_batches"]
SOURCES: tuple[str, ...] = ("auto", "ddp", "accumulation", "halves", "per_example", "micro_batches")
#: The extra pass ``source="auto"`` runs without DDP or accumulation. benchmarks/bench_gradient_noise.py
#: (one CPU thread, batches of 32 and 128, training step = 1): ``"halves"`` costs 0.9-1.2 steps on a
#: 784-256-10 MLP and 0.5-0.6 on a small CNN, per-example 24-30 and 1.6-1.8, 8 micro-batches 5.7-7.5 and
#: 1.3-2.1. One estimate from two halves is the noisiest (relative sd of tr Σ 0.03-0.04 on the MLP,
#: 0.4 on the CNN, against 0.01-0.02 per example), which the moving averages pool over ~19 estimates
#: at the default smoothing; so ``"auto"`` takes ``"halves"`` (bounded cost, ≈ 5 % at every 20 steps)
#: under automatic optimization, and per-example gradients under manual optimization (no step
#: gradient to read), falling back to ``"micro_batches"`` when torch.func cannot run the loss.
AUTO_EXTRA_PASS = "per_example"
_OWNER = "GradientNoiseScale"


@dataclass
class Pieces:
    """One rank's gradients of one estimate: small batches k (sizes b_k) and their combination G_big.

    ``big`` is a flat vector; ``big_inv_size`` is 1/B of G_big as a batch (Σ_k w_k²/b_k). Squared norms
    are summed in the gradients' dtype (float32: relative error ~10⁻⁷·√n, far below the estimates'
    statistical error).
    """

    small_sq_sum: float
    count: int
    inv_size_sum: float
    big: Tensor
    big_inv_size: float
    examples: int
    big_sq: float | None = None  # |G_big|², when already known (single process)


@dataclass
class _Accumulation:
    """Running state of the accumulation source over the micro-batches of one optimizer step."""

    step: int
    sizes: list[int] = field(default_factory=list)
    pending_size: int | None = None
    small_sq_sum: float = 0.0
    previous: list[Tensor] | None = None


def _sq_norm(tensors: Iterable[Tensor]) -> float:
    """Σ |t|² over ``tensors`` (a generator keeps one temporary at a time), summed in float64."""
    sums = [t.pow(2).sum() for t in tensors]
    return float(torch.stack(sums).double().sum()) if sums else 0.0


class _LossOf(nn.Module):
    """``forward(batch)`` = the user's loss of ``module`` on ``batch`` (for ``torch.func.functional_call``)."""

    def __init__(self, module: LightningModule, loss_fn: plumb.LossFn | None, batch_idx: int) -> None:
        super().__init__()
        self.module = module
        self.loss_fn = loss_fn
        self.batch_idx = batch_idx

    def forward(self, batch: Any) -> Tensor:
        return plumb.compute_loss(self.module, batch, self.loss_fn, self.batch_idx)


class GradientNoiseScale(Callback):
    """Log the gradient noise scale B_simple = tr Σ / |G|² (McCandlish, Kaplan, Amodei et al., "An
    empirical model of large-batch training", arXiv 1812.06162) while training.

    G is the true gradient of the loss, Σ the covariance of per-example gradients; a batch of B
    examples has E |G_B|² = |G|² + tr Σ / B, so B_simple is the batch size where gradient noise
    equals signal, close to the critical batch size beyond which larger batches stop paying. Every
    ``every_n_steps`` optimizer steps, gradients at two batch sizes give unbiased estimates of |G|²
    and tr Σ (:func:`~chaos_callbacks.dynamics.noise_scale.two_batch_estimate`, App. A.1 of the
    paper), smoothed by exponential moving averages whose ratio is B_simple
    (:class:`~chaos_callbacks.dynamics.noise_scale.NoiseScaleSmoother`).

    Where the two batch sizes come from (``source``):

    - ``"ddp"`` (``"auto"`` under DDP): each rank's local batch against all ranks' (B_small = the
      per-rank batch, B_big = the global batch, the paper's data-parallel recipe). DDP all-reduces
      the gradients inside ``backward``, so a rank's own gradient is never in ``.grad``: each rank
      runs one extra forward/backward on its batch, and the callback all-reduces the ranks'
      gradients itself (one parameter-sized all-reduce and one of four numbers per estimate).
    - ``"accumulation"`` (``"auto"`` with ``accumulate_grad_batches`` = K > 1, single process):
      the K micro-batches against the accumulated gradient, free of extra passes. Lightning divides
      each micro-batch loss by K, so micro-batch k's gradient is K times the change of ``.grad``
      over its backward (read in ``on_after_backward``, divided by the AMP loss scale; one copy of
      ``.grad`` kept between backwards), and the accumulated gradient is their equal-weight mean.
      Under DDP, non-final micro-batches are not all-reduced but the last is: refused there.
    - ``"halves"`` (``"auto"`` otherwise, under automatic optimization): the step's own gradient
      (``.grad`` at ``on_before_optimizer_step``, before clipping and unscaled) against the gradient
      of the first half of its batch, from one extra forward/backward on that half; the second
      half's gradient is ``(B G_B − B₁ G₁)/B₂``. About half a training step per estimate.
    - ``"per_example"`` (``"auto"`` under manual optimization): an extra pass computing the per-example gradients
      of the step's batch with ``torch.func`` (``functional_call`` + ``vmap(grad)``, dropout masks
      drawn per example), ``chunk_size`` examples at a time (B_small = 1: the unbiased sample
      covariance). If torch.func cannot run the loss (data-dependent Python control flow, a
      torchmetrics update or a batch norm in ``training_step``, non-tensor batch entries), ``"auto"``
      falls back to ``"micro_batches"`` for the rest of the run, with one warning.
    - ``"micro_batches"``: an extra pass over ``num_micro_batches`` contiguous slices of the batch
      (sizes differing by at most one), one forward/backward each.

    Cost: ``"halves"`` about half a training step per estimate (≈ 3 % at the default cadence of 20
    steps); the other extra passes one forward/backward per micro-batch or a ``vmap`` over the batch,
    about 2-30 training steps per estimate on the CPU (``benchmarks/bench_gradient_noise.py``); the
    ``"accumulation"`` source costs two copies of ``.grad`` per micro-batch and no pass. Per estimate,
    two halves give a noisier tr Σ than B examples; the moving averages pool many estimates.

    Extra passes re-run the user's loss (``loss_fn`` or ``training_step``) on a shadow of the module
    inside ``no_harm`` (RNG, buffers, metric states and train/eval flags restored, autocast off,
    ``torch.autograd.grad`` only), at ``on_train_batch_start`` of the first micro-batch of a due
    step, on that batch, in the module's current train/eval mode: training is bit-for-bit unchanged.
    Under DDP with accumulation the pass covers the first micro-batch (B_big = ranks × its size).

    Assumptions: the loss is the *mean* of per-example losses (Lightning's convention; a summed loss
    scales G_B by B), and examples are independent (batch norm couples them: the noise scale is then
    not defined by this model and the numbers describe the coupled estimator). Batches drawn without
    replacement from N examples estimate N/(N − 1) tr Σ (negligible for B ≪ N).

    Logs, from the fifth estimate on (a standard error from fewer is unreliable), at ``trainer.global_step`` of
    the step whose weights were measured: ``gradient_noise/b_simple`` (also on the progress bar) with
    ``gradient_noise/b_simple_stderr``; ``gradient_noise/trace_cov`` (tr Σ) and
    ``gradient_noise/grad_norm_sq`` (|G|²), smoothed, with ``_stderr``; and
    ``gradient_noise/b_simple_over_batch`` (B_simple divided by the global batch size, examples per
    optimizer step over all ranks and micro-batches, the largest seen: an epoch's short last batch
    does not count) with ``_stderr``. The standard errors come from
    the spread of the per-step estimates (effective count n_eff = (Σw)²/Σw² ≈ (1+β)/(1−β)); drift
    of the true values inside the window makes them conservative. While the smoothed |G|² is not
    positive (noise dominates), B_simple is not logged and the estimate counts as skipped.
    ``gradient_noise/skipped`` counts skipped estimates (batch too small, non-finite gradients,
    errors of the extra pass).

    Args:
        every_n_steps: an estimate every this many optimizer steps (``global_step`` multiples).
        source: ``"auto"``, ``"ddp"``, ``"accumulation"``, ``"halves"``, ``"per_example"`` or
            ``"micro_batches"`` (above). Checked against the Trainer at fit start.
        num_micro_batches: slices of the batch for ``"micro_batches"`` (at most the batch size).
        chunk_size: examples per ``vmap`` call for ``"per_example"``; memory: this many
            parameter-sized vectors.
        smoothing: β in (0, 1) of the moving averages (weight β^t for the estimate t estimates back).
        loss_fn: ``loss_fn(module, batch) -> scalar`` (the batch mean), instead of ``training_step``.
        prefix: prepended to every tag this callback writes (``"probe_a/"`` →
            ``probe_a/gradient_noise/...``); two instances with one prefix are refused at fit start.
    """

    AREA = "gradient_noise"  #: tags are ``<prefix>gradient_noise/<quantity>``

    def __init__(
        self,
        every_n_steps: int = 20,
        source: Source = "auto",
        num_micro_batches: int = 8,
        chunk_size: int = 32,
        smoothing: float = 0.9,
        loss_fn: plumb.LossFn | None = None,
        prefix: str = "",
    ) -> None:
        self.every_n_steps = check_int(_OWNER, "every_n_steps", every_n_steps, minimum=1)
        self.source = check_choice(_OWNER, "source", source, SOURCES)
        self.num_micro_batches = check_int(_OWNER, "num_micro_batches", num_micro_batches, minimum=2)
        self.chunk_size = check_int(_OWNER, "chunk_size", chunk_size, minimum=1)
        self.smoothing = check_float(_OWNER, "smoothing", smoothing, 0.0, 1.0, low_open=True, high_open=True)
        self.loss_fn = check_callable(_OWNER, "loss_fn", loss_fn)
        self.prefix = check_prefix(_OWNER, "prefix", prefix)
        self._warn = plumb.WarnOnce(_OWNER)
        self._smoother = NoiseScaleSmoother(self.smoothing)
        self.source_in_use: str | None = None
        self.last_raw: NoiseEstimate | None = None  #: the last step's unsmoothed estimate
        self.last_estimate: dict[str, float] = {}  #: the last logged values
        self._accumulation: _Accumulation | None = None
        self._batch = 0  # the largest number of examples per optimizer step seen (the full batch)
        self._half: tuple[int, Tensor, int, int] | None = None  # (step, G₁, B₁, B) between the two hooks of "halves"
        self._done_step: int | None = None

    @functools.cached_property  # Lightning reads it at every hook call; the settings it names are fixed
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, source=self.source, **plumb.prefix_key(self.prefix))

    # ------------------------------------------------------------------ setup
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        plumb.check_unique_tags(self, trainer)
        self.source_in_use = self._resolve_source(trainer)
        if self.source_in_use != "accumulation":
            plumb.check_loss_resolvable(pl_module, self.loss_fn, _OWNER)
        self._accumulation = None
        self._done_step = None

    def _resolve_source(self, trainer: Trainer) -> str:
        """The source for this Trainer (``ValueError`` when the chosen one cannot work here)."""
        ddp, accumulate = trainer.world_size > 1, trainer.accumulate_grad_batches
        if self.source == "ddp" and not ddp:
            raise ValueError(f"{_OWNER}: source='ddp' needs several processes (world_size={trainer.world_size}); "
                             "use source='auto', 'per_example' or 'micro_batches'")
        if self.source == "accumulation":
            if ddp:
                raise ValueError(f"{_OWNER}: source='accumulation' does not work under DDP (the last micro-batch's "
                                 "gradient is all-reduced, the others are not); use source='ddp' or 'auto'")
            if accumulate < 2:
                raise ValueError(f"{_OWNER}: source='accumulation' needs Trainer(accumulate_grad_batches >= 2), got {accumulate}")
        automatic = trainer.lightning_module.automatic_optimization
        if self.source == "halves" and (ddp or accumulate > 1 or not automatic):
            raise ValueError(f"{_OWNER}: source='halves' reads the step's own gradient, so it needs one process, no gradient "
                             f"accumulation and automatic optimization (world_size={trainer.world_size}, accumulate_grad_batches="
                             f"{accumulate}, automatic_optimization={automatic}); use source='auto'")
        if self.source != "auto":
            return self.source
        if ddp:
            return "ddp"
        if accumulate > 1:
            return "accumulation"
        return "halves" if automatic else AUTO_EXTRA_PASS

    def _due(self, trainer: Trainer) -> bool:
        return trainer.global_step % self.every_n_steps == 0

    # ------------------------------------------------------------------ hooks
    @plumb.contain_failures("gradient_noise")
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self._due(trainer):
            return
        step = trainer.global_step
        if self.source_in_use == "accumulation":
            if self._accumulation is None or self._accumulation.step != step:
                self._accumulation = _Accumulation(step=step)
            self._accumulation.pending_size = plumb.batch_size_of(batch)
            return
        if self._done_step == step:  # a later micro-batch of the same step
            return
        self._done_step = step
        if self.source_in_use == "halves":
            self._half = self._first_half(pl_module, batch, batch_idx, step)
            return
        try:
            pieces = self._extra_pass(trainer, pl_module, batch, batch_idx)
            examples = pieces.examples * trainer.accumulate_grad_batches
            self._record(trainer, pl_module, pieces, examples)
        except plumb.EstimateSkipped as exc:
            self._skip(trainer, pl_module, "estimate", str(exc))

    @plumb.contain_failures("gradient_noise")
    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        acc = self._accumulation
        if self.source_in_use != "accumulation" or acc is None or acc.step != trainer.global_step or acc.pending_size is None:
            return
        params = plumb.trainable_parameters(pl_module)
        scale = self._loss_scale(trainer)
        current = [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]
        factor = trainer.accumulate_grad_batches / scale
        # one parameter's difference at a time: memory stays at the two copies of .grad
        changes = current if acc.previous is None else (c - p for c, p in zip(current, acc.previous))
        acc.small_sq_sum += _sq_norm(changes) * factor**2
        acc.previous = current
        acc.sizes.append(acc.pending_size)
        acc.pending_size = None

    @plumb.contain_failures("gradient_noise")
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self.source_in_use == "halves":
            half, self._half = self._half, None
            if half is not None and half[0] == trainer.global_step:
                self._record(trainer, pl_module, self._halves(pl_module, half, self._loss_scale(trainer)), half[3])
            return
        acc = self._accumulation
        if self.source_in_use != "accumulation" or acc is None or acc.step != trainer.global_step:
            return
        self._accumulation = None
        try:
            if len(acc.sizes) < 2 or acc.previous is None:
                raise plumb.EstimateSkipped(f"only {len(acc.sizes)} micro-batch(es) had a backward pass at this step")
            count = len(acc.sizes)
            # .grad = (1/K) Σ_k g_k over the K' = count micro-batches seen: their mean is K/K' .grad
            big = flatten(acc.previous) * (trainer.accumulate_grad_batches / count / self._loss_scale(trainer))
            inv_sizes = sum(1.0 / b for b in acc.sizes)
            pieces = Pieces(acc.small_sq_sum, count, inv_sizes, big, inv_sizes / count**2, sum(acc.sizes))
            self._record(trainer, pl_module, pieces, sum(acc.sizes))
        except plumb.EstimateSkipped as exc:
            self._skip(trainer, pl_module, "estimate", str(exc))

    @staticmethod
    def _loss_scale(trainer: Trainer) -> float:
        """The AMP GradScaler's scale (``.grad`` is scaled until the optimizer step), else 1."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        return 1.0 if scaler is None else float(scaler.get_scale())

    # ------------------------------------------------------------------ halves
    def _first_half(self, pl_module: LightningModule, batch: Any, batch_idx: int, step: int) -> tuple[int, Tensor, int, int]:
        """The gradient G₁ of the batch's first half (one forward/backward on it, inside ``no_harm``)."""
        size = plumb.batch_size_of(batch)
        if size < 2:
            raise plumb.EstimateSkipped(f"a batch of {size} example cannot be split")
        params = plumb.trainable_parameters(pl_module)
        half = size // 2
        with plumb.no_harm(pl_module, train_mode=None):
            grads = plumb.slice_gradient(pl_module, params, batch, 0, half, self.loss_fn, batch_idx)
        return step, flatten(grads), half, size

    @staticmethod
    def _halves(pl_module: LightningModule, half: tuple[int, Tensor, int, int], loss_scale: float) -> Pieces:
        """The two halves against the step's gradient G_B: G₂ = (B G_B − B₁ G₁)/B₂ (a mean loss), whose
        squared norm is expanded in the dot products of G_B and G₁, so that no third vector is formed."""
        _, first, b1, size = half
        params = plumb.trainable_parameters(pl_module)
        big = flatten([torch.zeros_like(p) if p.grad is None else p.grad.detach() for p in params]).div_(loss_scale)
        b2 = size - b1
        ff, fb = float(torch.dot(first, first)), float(torch.dot(first, big))
        bb = float(torch.dot(big, big))
        second_sq = (size**2 * bb - 2 * size * b1 * fb + b1**2 * ff) / b2**2
        return Pieces(ff + second_sq, 2, 1.0 / b1 + 1.0 / b2, big, 1.0 / size, size, big_sq=bb)

    # ------------------------------------------------------------------ extra pass
    def _extra_pass(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> Pieces:
        """This rank's small-batch gradients of ``batch`` by the source in use, inside ``no_harm``."""
        size = plumb.batch_size_of(batch)
        if self.source_in_use != "ddp" and size < 2:
            raise plumb.EstimateSkipped(f"a batch of {size} example cannot be split")
        try:
            with plumb.no_harm(pl_module, train_mode=None):
                if self.source_in_use == "per_example":
                    return self._per_example(pl_module, batch, batch_idx, size)
                parts = 1 if self.source_in_use == "ddp" else min(self.num_micro_batches, size)
                return self._micro_batches(pl_module, batch, batch_idx, size, parts)
        except plumb.EstimateSkipped:
            raise
        except Exception as exc:
            if self.source_in_use != "per_example" or self.source != "auto":
                raise
            rank_zero_warn(f"{_OWNER}: per-example gradients with torch.func failed ({type(exc).__name__}: {exc}); "
                           "source='auto' uses 'micro_batches' from now on")
            self.source_in_use = "micro_batches"
            return self._extra_pass(trainer, pl_module, batch, batch_idx)

    def _micro_batches(self, pl_module: LightningModule, batch: Any, batch_idx: int, size: int, parts: int) -> Pieces:
        """Gradients of ``parts`` contiguous slices; G_big = their example-weighted mean (the batch's gradient)."""
        params = plumb.trainable_parameters(pl_module)
        if not params:
            raise plumb.EstimateSkipped("the module has no trainable parameters")
        big = [torch.zeros_like(p) for p in params]
        small_sq, inv_sizes = 0.0, 0.0
        for chunk in torch.arange(size).tensor_split(parts):
            start, stop = int(chunk[0]), int(chunk[-1]) + 1
            grads = plumb.slice_gradient(pl_module, params, batch, start, stop, self.loss_fn, batch_idx)
            small_sq += _sq_norm(grads)
            inv_sizes += 1.0 / (stop - start)
            for total, g in zip(big, grads):
                total.add_(g, alpha=(stop - start) / size)
        return Pieces(small_sq, parts, inv_sizes, flatten(big), 1.0 / size, size)

    def _per_example(self, pl_module: LightningModule, batch: Any, batch_idx: int, size: int) -> Pieces:
        """Per-example gradients with ``torch.func``, ``chunk_size`` at a time; G_big = their mean."""
        from torch.func import functional_call, grad, vmap

        loss_of = _LossOf(plumb.user_module(pl_module), self.loss_fn, batch_idx)
        named = {name: p.detach() for name, p in loss_of.named_parameters() if p.requires_grad}
        if not named:
            raise plumb.EstimateSkipped("the module has no trainable parameters")

        def example_loss(params: dict[str, Tensor], example: Any) -> Tensor:
            one = apply_to_collection(example, Tensor, lambda t: t.unsqueeze(0))
            return functional_call(loss_of, params, (one,))

        per_example = vmap(grad(example_loss), in_dims=(None, 0), randomness="different")
        big = {name: torch.zeros_like(p) for name, p in named.items()}
        small_sq = 0.0
        for start in range(0, size, self.chunk_size):
            grads = per_example(named, plumb.slice_batch(batch, start, min(start + self.chunk_size, size)))
            small_sq += float(torch.stack([g.flatten(1).pow(2).sum(1).double() for g in grads.values()]).sum())
            for name, g in grads.items():
                big[name].add_(g.sum(0), alpha=1.0 / size)
        return Pieces(small_sq, size, float(size), flatten(list(big.values())), 1.0 / size, size)

    # ------------------------------------------------------------------ estimate and log
    def _combine(self, trainer: Trainer, pieces: Pieces) -> NoiseEstimate:
        """The two-batch estimate over all ranks: small batches pooled, G_big = the mean of the ranks' G_big."""
        ranks = trainer.world_size
        scalars = torch.tensor([pieces.small_sq_sum, pieces.count, pieces.inv_size_sum, pieces.big_inv_size],
                               dtype=torch.float64, device=pieces.big.device)
        big = pieces.big
        if ranks > 1:
            scalars = trainer.strategy.reduce(scalars, reduce_op="sum")
            big = trainer.strategy.reduce(big.clone(), reduce_op="mean")
        small_sq_sum, count, inv_size_sum, big_inv_size = scalars.tolist()
        big_sq = pieces.big_sq if ranks == 1 and pieces.big_sq is not None else float(torch.dot(big, big))
        # G_big = (1/R) Σ_r G_r: 1/B_big = Σ_r (1/R²) / B_r
        big_size = ranks**2 / big_inv_size
        small_size = count / inv_size_sum
        if not big_size > small_size:
            raise plumb.EstimateSkipped(f"the big batch ({big_size:g}) is not larger than the small ones ({small_size:g})")
        estimate = two_batch_estimate(small_sq_sum / count, small_size, big_sq, big_size)
        if not plumb.is_finite(estimate.grad_norm_sq, estimate.trace_cov):
            raise plumb.EstimateSkipped(f"non-finite gradients ({estimate})")
        return estimate

    def _record(self, trainer: Trainer, pl_module: LightningModule, pieces: Pieces, examples: int) -> None:
        """Combine over ranks, smooth, and log once two estimates exist."""
        estimate = self._combine(trainer, pieces)
        # examples per optimizer step over all ranks: the full batch (an epoch's short last batch would
        # inflate B_simple / batch for that one step)
        self._batch = max(self._batch, examples * trainer.world_size)
        self.last_raw = estimate
        self._smoother.update(estimate)
        result = self._smoother.result()
        if result is None:
            return
        metrics = {
            "gradient_noise/trace_cov": result.trace_cov,
            "gradient_noise/trace_cov_stderr": result.trace_cov_stderr,
            "gradient_noise/grad_norm_sq": result.grad_norm_sq,
            "gradient_noise/grad_norm_sq_stderr": result.grad_norm_sq_stderr,
        }
        if result.b_simple is not None:
            metrics.update({
                "gradient_noise/b_simple": result.b_simple,
                "gradient_noise/b_simple_stderr": result.b_simple_stderr,
                "gradient_noise/b_simple_over_batch": result.b_simple / self._batch,
                "gradient_noise/b_simple_over_batch_stderr": result.b_simple_stderr / self._batch,
            })
        self.last_estimate = metrics
        plumb.log_scalars(trainer, pl_module, metrics, trainer.global_step, prog_bar=("gradient_noise/b_simple",), prefix=self.prefix)
        if result.b_simple is None:
            self._skip(trainer, pl_module, "non-positive", f"the smoothed |G|² estimate is {result.grad_norm_sq:.3g} "
                       f"± {result.grad_norm_sq_stderr:.2g}, not positive: the noise dominates, B_simple is undefined")

    def _skip(self, trainer: Trainer, pl_module: LightningModule, kind: str, message: str) -> None:
        self._warn(kind, f"gradient noise estimate skipped at step {trainer.global_step}: {message}")
        plumb.log_scalars(trainer, pl_module, {"gradient_noise/skipped": self._warn.count}, trainer.global_step, prefix=self.prefix)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"smoother": self._smoother.state_dict(), "skipped": self._warn.count, "batch": self._batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._smoother.load_state_dict(state_dict["smoother"])
        self._warn.count = state_dict["skipped"]
        self._batch = state_dict.get("batch", 0)
