"""Plumbing shared by the Lightning adapters: loss resolution, probe batches, the no-harm
context, DDP reduction, logging and warn-once bookkeeping.

Nothing here computes a diagnostic; it only moves tensors between Lightning and the pure cores.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn, TrainerStatus
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torchmetrics import Metric

from chaos_callbacks.callbacks._shadow import shadow

LossFn = Callable[[LightningModule, Any], Tensor]


class EstimateSkipped(RuntimeError):
    """A diagnostic could not be computed this time (non-finite values, no trainable parameters, …)."""


def trainable_parameters(module: nn.Module) -> list[Tensor]:
    """Parameters with ``requires_grad=True``, in ``module.parameters()`` order."""
    return [p for p in module.parameters() if p.requires_grad]


def _metric_states(module: nn.Module) -> list[tuple[Metric, dict[str, Any]]]:
    saved = []
    for m in module.modules():
        if isinstance(m, Metric):
            state = {name: _clone(getattr(m, name)) for name in m._defaults}
            state["_update_count"] = m._update_count
            state["_computed"] = m._computed
            saved.append((m, state))
    return saved


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, list):
        return [_clone(v) for v in value]
    return value


@contextmanager
def second_order_kernels() -> Iterator[None]:
    """Kernels that have a double backward: eager code instead of compiled graphs (aot_autograd has
    none) and the math scaled-dot-product attention (the flash and memory-efficient kernels have
    none, on CPU and GPU)."""
    with ExitStack() as stack:
        if hasattr(torch.compiler, "set_stance"):
            stack.enter_context(torch.compiler.set_stance("force_eager"))
        stack.enter_context(sdpa_kernel([SDPBackend.MATH]))
        yield


@contextmanager
def no_harm(pl_module: LightningModule, train_mode: bool | None = True, second_order: bool = False) -> Iterator[None]:
    """Run extra forward/backward passes without changing what training sees.

    On exit the global RNG streams (torch, CUDA, numpy, python), every module buffer (batch-norm
    running statistics), every torchmetrics state and every module's train/eval flag are restored;
    inside, autocast is off and gradients are enabled. The user's code itself runs on a shadow of
    the module (:func:`compute_loss`), so its Python state is never written. Buffers are restored
    only on exit, after all autograd calls (batch norm saves its statistics for backward).
    ``train_mode=None`` keeps every module's current train/eval flag (to replay the step exactly as
    the optimizer sees it, e.g. with a frozen submodule kept in eval mode). ``second_order=True``
    selects kernels with a double backward (:func:`second_order_kernels`) for Hessian products.
    """
    error: BaseException | None = None
    # CUDA's RNG can only have been used once CUDA is initialised; probing it otherwise costs ~0.4 ms
    # per call on a machine with a CUDA build of torch and no GPU
    with isolate_rng(include_cuda=torch.cuda.is_initialized()):
        modes = [(m, m.training) for m in pl_module.modules()]
        buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]
        metrics = _metric_states(pl_module)
        device_type = pl_module.device.type if pl_module.device.type in ("cuda", "cpu", "xpu") else "cpu"
        if train_mode is not None:
            pl_module.train(train_mode)
        try:
            with ExitStack() as stack:
                stack.enter_context(torch.enable_grad())
                stack.enter_context(torch.autocast(device_type=device_type, enabled=False))
                if second_order:
                    stack.enter_context(second_order_kernels())
                yield
        except BaseException as exc:  # re-raised after the RNG is restored
            error = exc
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            for m, state in metrics:
                for name, value in state.items():
                    setattr(m, name, value)
            for m, mode in modes:
                m.training = mode
    if error is not None:
        raise error


def user_module(pl_module: LightningModule) -> LightningModule:
    """A shadow of ``pl_module`` to run the user's code on (:mod:`~chaos_callbacks.callbacks._shadow`),
    with ``self.log``/``self.log_dict`` muted."""
    module = shadow(pl_module)
    module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
    module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    return module


def check_loss_resolvable(pl_module: LightningModule, loss_fn: LossFn | None, owner: str) -> None:
    """Raise ``ValueError`` at fit start when no loss, or no gradient of it, can be derived for ``pl_module``.

    Sharded parameters (FSDP2's ``DTensor`` shards) are refused: the forward pass computes with
    all-gathered copies, so ``torch.autograd.grad`` w.r.t. the shards finds them unused
    (``docs/fsdp.md``).
    """
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in pl_module.parameters()):
        raise ValueError(
            f"{owner}: the module's parameters are sharded (DTensor, e.g. FSDP); its estimates differentiate "
            "w.r.t. the parameters with torch.autograd.grad, which sharded parameters do not support yet "
            "(see docs/fsdp.md). Use DDP or a single device for this callback."
        )
    if loss_fn is None and not pl_module.automatic_optimization:
        raise ValueError(
            f"{owner}: the module uses manual optimization, so its training_step steps the optimizer and "
            "cannot be re-run to get a loss. Pass loss_fn=lambda module, batch: <scalar loss>."
        )


def compute_loss(pl_module: LightningModule, batch: Any, loss_fn: LossFn | None, batch_idx: int = 0,
                 module: LightningModule | None = None) -> Tensor:
    """The scalar training loss of ``batch``: ``loss_fn(module, batch)`` or the module's own ``training_step``.

    Both run on a shadow of the module (:func:`user_module`; ``module``: one the caller made, e.g. to
    hook its ``forward``): parameters and buffers are the module's own, its other Python state is a
    copy, ``self.log`` is muted. Call inside :func:`no_harm` (which restores buffers, metric states and RNG).
    """
    module = user_module(pl_module) if module is None else module
    if loss_fn is not None:
        loss = loss_fn(module, batch)
    else:
        out = module.training_step(batch, batch_idx)
        loss = out.get("loss") if isinstance(out, dict) else out
    if not isinstance(loss, Tensor) or loss.ndim != 0:
        raise EstimateSkipped(
            "the loss must be a scalar tensor; training_step returned "
            f"{type(loss).__name__}. Pass loss_fn=lambda module, batch: <scalar loss>."
        )
    if not loss.requires_grad:
        raise EstimateSkipped("the loss does not depend on any parameter that requires grad")
    return loss


def batch_size_of(batch: Any) -> int:
    """Leading dimension of the first tensor in ``batch``."""
    sizes: list[int] = []
    apply_to_collection(batch, Tensor, lambda t: sizes.append(t.shape[0]) if t.ndim else None)
    if not sizes:
        raise ValueError("cannot find a tensor with a batch dimension in the batch")
    return sizes[0]


def slice_batch(batch: Any, start: int, stop: int) -> Any:
    """Examples ``start:stop`` of every tensor with a batch dimension."""
    return apply_to_collection(batch, Tensor, lambda t: t[start:stop] if t.ndim else t)


def batch_head(batch: Any, fraction: float) -> Any:
    """The first ``⌈fraction · B⌉`` examples (at least one) of a batch of ``B``, sliced along dimension 0
    of every tensor in it (Lightning's batch-first convention): ``batch`` itself when ``fraction`` is 1, when
    it holds no tensor with a batch dimension or when its tensors disagree on dimension 0 (its examples
    then cannot be told apart, and the whole batch is used)."""
    if fraction >= 1:
        return batch
    sizes: set[int] = set()
    apply_to_collection(batch, Tensor, lambda t: sizes.add(t.shape[0]) if t.ndim else None)
    if len(sizes) != 1:
        return batch
    size = sizes.pop()
    head = max(1, math.ceil(fraction * size))
    return slice_batch(batch, 0, head) if head < size else batch


def slice_gradient(pl_module: LightningModule, params: Sequence[Tensor], batch: Any, start: int, stop: int,
                   loss_fn: LossFn | None, batch_idx: int) -> list[Tensor]:
    """The gradient of the user's loss on examples ``start:stop`` of ``batch`` (zeros for unused
    parameters), by ``torch.autograd.grad``. Call inside :func:`no_harm`."""
    loss = compute_loss(pl_module, slice_batch(batch, start, stop), loss_fn, batch_idx)
    grads = torch.autograd.grad(loss, list(params), allow_unused=True)
    return [torch.zeros_like(p) if g is None else g.detach() for g, p in zip(grads, params)]


def draw_probe_batches(trainer: Trainer, num_examples: int, split: str = "train") -> list[Any]:
    """The first ``num_examples`` examples of the training (``split="train"``) or the first validation
    (``split="val"``) loader, as the loader batches them, on the CPU.

    Drawn from a fresh iterator of ``trainer.train_dataloader`` (``trainer.val_dataloaders``) under an
    isolated RNG, so the training run's shuffling and augmentation streams are untouched. Under DDP
    each rank draws from its own shard.
    """
    loader = trainer.train_dataloader if split == "train" else trainer.val_dataloaders
    if loader is None:
        raise ValueError(f"the trainer has no {'train' if split == 'train' else 'validation'} dataloader to draw a probe set from")
    if isinstance(loader, dict):
        loader = list(loader.values())
    loaders = loader if isinstance(loader, (list, tuple)) else [loader]
    batches: list[Any] = []
    remaining = num_examples
    with isolate_rng(), _isolate_loader_generators(loaders[0]):
        for batch in loaders[0]:
            size = batch_size_of(batch)
            batches.append(slice_batch(batch, 0, remaining) if size > remaining else batch)
            remaining -= min(size, remaining)
            if remaining == 0:
                break
    return batches


@contextmanager
def _isolate_loader_generators(loader: Any) -> Iterator[None]:
    """Restore, on exit, the ``torch.Generator``s a loader draws from: its own (a new iterator draws the
    workers' base seed from it) and its samplers' (shuffling), so a probe drawn from the training loader
    leaves the training run's batch order as it was. ``isolate_rng`` covers only the global RNGs."""
    holders = [loader, getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None)]
    holders.append(getattr(holders[2], "sampler", None))
    generators = list({id(g): g for h in holders if isinstance(g := getattr(h, "generator", None), torch.Generator)}.values())
    states = [g.get_state() for g in generators]
    try:
        yield
    finally:
        for generator, state in zip(generators, states):
            generator.set_state(state)


def to_device(trainer: Trainer, batch: Any) -> Any:
    """Move a probe batch to the module's device with the module's own transfer hooks."""
    with isolate_rng():
        return trainer.strategy.batch_to_device(batch)


def mean_reducer(trainer: Trainer) -> Callable[[Tensor], Tensor]:
    """``t ↦ mean over ranks of t`` under DDP (every rank must call it), identity otherwise."""
    if trainer.world_size <= 1:
        return lambda t: t
    return lambda t: trainer.strategy.reduce(t, reduce_op="mean")


def current_lr(trainer: Trainer) -> float | None:
    """Learning rate of the first param group of the first optimizer (``None`` if it has no ``lr``)."""
    if not trainer.optimizers:
        return None
    lr = trainer.optimizers[0].param_groups[0].get("lr")
    try:
        return None if lr is None else float(lr)
    except (TypeError, ValueError):  # e.g. a tensor lr on another device, or a custom object
        return None


def log_scalars(
    trainer: Trainer,
    pl_module: LightningModule,
    metrics: dict[str, float],
    step: int,
    prog_bar: Sequence[str] = (),
    prefix: str = "",
) -> None:
    """Write ``metrics`` to every logger at ``step`` and to ``callback_metrics``/progress bar, each
    name preceded by the callback's ``prefix`` (``prog_bar`` names are given without it).

    During ``fit`` the values of one step, from every callback and hook, are gathered by a
    :class:`LogGather` and reach each logger in one ``log_metrics`` call per step, steps in
    increasing order (a ``CSVLogger`` gets one row per step); outside ``fit`` they are written at
    once. Loggers are written directly, so sparse estimates are never dropped by
    ``log_every_n_steps``; the values also go straight into ``trainer.callback_metrics`` (and
    ``trainer.progress_bar_metrics`` for ``prog_bar`` names). ``pl_module.log`` is never called: from a
    callback hook that runs inside the user's ``training_step`` (``on_before_optimizer_step`` under
    manual optimization), it switches Lightning's current hook, and on the first batch Lightning then
    resets what ``training_step`` had logged so far (a GAN's ``g_loss`` vanished from the loggers).
    """
    finite = {prefix + k: float(v) for k, v in metrics.items() if v is not None}
    gather = log_gather(trainer)
    gather.record(finite, step)
    if trainer.is_global_zero:
        gather.write(trainer, finite, step)
    shown = {prefix + name for name in prog_bar}
    for name, value in finite.items():
        tensor = torch.tensor(value, dtype=torch.float32)
        trainer.callback_metrics[name] = tensor
        if name in shown:
            trainer.progress_bar_metrics[name] = tensor


@dataclass
class Logged:
    """The last value of a tag, the step it was logged at, and the step its value last changed."""

    value: float
    step: int
    changed: int


class LogGather(Callback):
    """Gathers the scalars every callback logs at one step into one ``log_metrics`` call per logger.

    Callbacks log one step's values from different hooks: ``on_train_batch_start`` (Hessian,
    curvature learning rate), ``on_before_optimizer_step`` (gradient tails), ``on_train_batch_end``
    (diffusion windows; the twin logs the weights *after* the update, at the next step). Written one
    call each, a ``CSVLogger`` got up to six rows per step, out of order. Here values wait in a
    buffer keyed by step; at the end of every batch whose optimizer stepped, all steps before
    ``trainer.global_step`` are written (in increasing order, each once per logger); the rest at
    ``on_train_end``, ``on_exception`` and ``on_fit_end``. A value logged for a step already written
    (none of this package's callbacks does so) is written in a later row: values are never dropped
    or reordered within a step. A tag logged twice at one step keeps its last value, as
    ``callback_metrics`` does. Only global rank zero buffers and writes.

    It also keeps the last value and step of every tag (:attr:`ledger`, one entry per tag) for
    :class:`~chaos_callbacks.ChaosSummary`. One instance per Trainer, appended to
    ``trainer.callbacks`` by the first :func:`log_scalars` call (so it runs after every callback).
    """

    def __init__(self) -> None:
        self.pending: dict[int, dict[str, float]] = {}
        self.ledger: dict[str, Logged] = {}
        self._step_at_start: int | None = None

    def record(self, metrics: dict[str, float], step: int) -> None:
        """Remember the last value and step of each tag (every rank)."""
        for tag, value in metrics.items():
            last = self.ledger.get(tag)
            same = last is not None and (last.value == value or (math.isnan(last.value) and math.isnan(value)))
            self.ledger[tag] = Logged(value, step, last.changed if same else step)

    def write(self, trainer: Trainer, metrics: dict[str, float], step: int) -> None:
        """Buffer ``metrics`` at ``step`` while fitting, otherwise write them at once."""
        if not metrics:
            return
        self.pending.setdefault(step, {}).update(metrics)
        if not _fitting(trainer):
            self.flush(trainer)

    def flush(self, trainer: Trainer, before: int | None = None) -> None:
        """Write the buffered steps (those ``< before``, or all) in increasing order."""
        for step in sorted(self.pending):
            if before is not None and step >= before:
                break
            values = self.pending.pop(step)
            for logger in trainer.loggers:  # only rank zero has anything pending (log_scalars)
                logger.log_metrics(values, step=step)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_at_start = trainer.global_step

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step != self._step_at_start:  # the optimizer stepped: earlier steps are complete
            self.flush(trainer, before=trainer.global_step)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.flush(trainer)

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self.flush(trainer)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.flush(trainer)


def _fitting(trainer: Trainer) -> bool:
    return trainer.state.fn == TrainerFn.FITTING and trainer.state.status == TrainerStatus.RUNNING


def _attached_gather(trainer: Trainer) -> LogGather | None:
    return next((callback for callback in trainer.callbacks if isinstance(callback, LogGather)), None)


def log_gather(trainer: Trainer) -> LogGather:
    """The Trainer's :class:`LogGather`, appended to ``trainer.callbacks`` on first use."""
    gather = _attached_gather(trainer)
    if gather is None:
        gather = LogGather()
        trainer.callbacks.append(gather)
    return gather


def logged_values(trainer: Trainer) -> dict[str, Logged]:
    """Last value, step and step of last change of every tag :func:`log_scalars` wrote (empty if none)."""
    gather = _attached_gather(trainer)
    return {} if gather is None else dict(gather.ledger)


def tensorboard_loggers(trainer: Trainer) -> list[TensorBoardLogger]:
    """The attached TensorBoard loggers (empty off rank zero)."""
    if not trainer.is_global_zero:
        return []
    return [lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)]


def log_figure(trainer: Trainer, tag: str, make_figure: Callable[[], Any], step: int) -> None:
    """Build a matplotlib figure (only when a TensorBoard logger is attached) and log it."""
    tbs = tensorboard_loggers(trainer)
    if not tbs:
        return
    import matplotlib.pyplot as plt

    fig = make_figure()
    for tb in tbs:
        tb.experiment.add_figure(tag, fig, global_step=step, close=False)
    plt.close(fig)


def log_histogram(trainer: Trainer, tag: str, values: Tensor, step: int) -> None:
    """Histogram of ``values`` on every TensorBoard logger."""
    for tb in tensorboard_loggers(trainer):
        tb.experiment.add_histogram(tag, values.detach().cpu(), global_step=step)


def log_magnitude_histogram(trainer: Trainer, tag: str, values: Tensor, step: int) -> None:
    """Histogram of log10 |x| over the nonzero finite ``values`` on every TensorBoard logger.

    TensorBoard draws a histogram in equal-width bins of its values: for heavy-tailed entries all
    mass falls in the bin around zero and the tails are invisible. In log10 |x| the equal-width
    bins are logarithmic bins of |x|, and a power-law tail P(|x| > r) ~ r^-alpha shows as a long
    right shoulder (a Gaussian's ends abruptly, a decade or so above its scale).
    """
    if not tensorboard_loggers(trainer):
        return
    x = values.detach().cpu().abs()
    x = x[torch.isfinite(x) & (x > 0)]
    if x.numel():
        log_histogram(trainer, tag, x.log10(), step)


class WarnOnce:
    """Warn (rank zero) the first time each kind of problem occurs; count every occurrence.

    ``count`` is the total (restored from checkpoints); ``kinds`` counts each kind and ``messages``
    keeps each kind's last message (this run only), for :class:`~chaos_callbacks.ChaosSummary`.
    """

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.seen: set[str] = set()
        self.count = 0
        self.kinds: dict[str, int] = {}
        self.messages: dict[str, str] = {}

    def __call__(self, kind: str, message: str) -> None:
        self.count += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.messages[kind] = message
        if kind not in self.seen:
            self.seen.add(kind)
            rank_zero_warn(f"{self.owner}: {message} (skipped; later occurrences are counted, not warned)")


def contain_failures(area: str | None, warn: str = "_warn") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate a per-step callback hook so that no exception raised in it stops training.

    Any ``Exception`` (not ``KeyboardInterrupt``/``SystemExit``) is warned once per type with its
    message, counted by the callback's :class:`WarnOnce` (attribute ``warn``) and logged as
    ``<area>/skipped`` (``area=None``: the instance's ``AREA``, for a callback whose area depends on
    its settings); the hook returns ``None``. Configuration errors belong in ``on_fit_start``/
    ``on_train_start``, which are not decorated, so they still fail the run before the first step.
    """

    def decorate(hook: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(hook)
        def contained(self: Any, trainer: Trainer, pl_module: LightningModule, *args: Any, **kwargs: Any) -> Any:
            try:
                return hook(self, trainer, pl_module, *args, **kwargs)
            except Exception as exc:
                counter: WarnOnce = getattr(self, warn)
                counter(f"error:{type(exc).__name__}", f"{hook.__name__} failed at step {trainer.global_step} with {type(exc).__name__}: {exc}")
                try:
                    where = self.AREA if area is None else area
                    log_scalars(trainer, pl_module, {f"{where}/skipped": counter.count}, trainer.global_step,
                                prefix=tag_prefix(self))
                except Exception:  # logging itself failed: the warning above is all we can do
                    pass
                return None

        return contained

    return decorate


def prefix_key(prefix: str) -> dict[str, str]:
    """The ``prefix`` entry of a callback's ``state_key`` (none when empty: older checkpoints keep their keys)."""
    return {"prefix": prefix} if prefix else {}


def tag_prefix(callback: Any) -> str:
    """What precedes the area in a callback's tags: its ``prefix``, and ``val/`` for a monitor of the
    validation split (its ``tag_prefix``): ``<prefix>[val/]<area>/<quantity>``."""
    return getattr(callback, "tag_prefix", getattr(callback, "prefix", ""))


def check_unique_tags(callback: Any, trainer: Trainer) -> None:
    """Refuse (``ValueError``, at fit start) a second callback writing the same tags: same ``AREA``
    (``hessian``, ``lyapunov``, …; an instance's own, e.g. ``ggn`` for a Gauss–Newton monitor) and same
    :func:`tag_prefix`; tags are ``<prefix>[val/]<area>/<quantity>``."""
    mine = tag_prefix(callback)
    for other in trainer.callbacks:
        if other is not callback and getattr(other, "AREA", None) == callback.AREA and tag_prefix(other) == mine:
            raise ValueError(
                f"{type(callback).__name__}: prefix={callback.prefix!r} is also the prefix of another "
                f"{type(other).__name__} in Trainer(callbacks=...); both would write the same '{mine}{callback.AREA}/...' "
                "tags. Give each instance its own prefix, e.g. prefix='probe_a/' and prefix='probe_b/'"
            )


def is_finite(*values: float | None) -> bool:
    """All given values are finite numbers."""
    return all(v is not None and math.isfinite(v) for v in values)
