"""One curvature estimate per optimizer step and probe, shared by the callbacks that need it.

In the spirit of Cockpit's orchestrator (Schneider et al., NeurIPS 2021), which asks every quantity
what it needs at a step and computes each shared piece once, and of curvlinops and
hessian-eigenthings v1, which keep linear operators apart from the algorithms run on them.

**Consumers.** A callback that estimates curvature (``HessianSpectrumMonitor``,
``CurvatureLRScheduler``) registers with the :class:`CurvatureEngine` of its Trainer at train start
(:func:`engine_for`) and implements two methods:

- ``_curvature_due(trainer, step) -> bool``: whether it estimates at this optimizer step (before its
  own hook has run at the step);
- ``_curvature_request(trainer, pl_module) -> Request``: what it needs (probe, loss, train/eval
  mode, parameters, a reusable top eigen-solve) and the computation to run on the operator.

**One pass per step.** The first consumer due at a step calls :meth:`CurvatureEngine.estimate` from
its ``on_train_batch_start``. The engine then asks *every* registered consumer whether it is due,
groups the requests by forward and curvature — same probe batches (a fixed probe set, or the same
share of the step's batch: ``Request.batch_fraction``), loss function, train/eval mode and curvature
kind (``Request.curvature``: the Hessian, or the generalised Gauss–Newton matrix with its output
split) — and for each group

1. enters :func:`~chaos_callbacks.callbacks._plumbing.no_harm` (``second_order=True``) once,
   forwards every probe batch once and builds one first-order graph
   (:class:`~chaos_callbacks.curvature.hvp.HessianOperator`, or
   :class:`~chaos_callbacks.curvature.ggn.GGNOperator`, over the union of the group's parameters);
2. runs each consumer's computation on its own :class:`~chaos_callbacks.curvature.hvp.HessianView`
   of that graph (its own parameters in its own order, its own product counter), wrapped in its own
   operator if it needs another one (a scheduler's ``R^{1/2} H R^{1/2}``, Adam's
   ``P^{-1/2} H P^{-1/2}``), and further views of the same graph if it asks (:meth:`Shared.view`: the
   diagonal blocks of the monitor's ``blocks``);
3. frees the graph and leaves ``no_harm`` (buffers, RNG streams and modes restored after the last
   autograd call of the step).

Each consumer's outcome — its result or the exception that stopped it — waits for its own hook,
which logs it in its own area, so a failure is warned and counted by every consumer it hit. Nothing
is kept across steps. The computations of all due consumers run at the first one's hook: a callback
listed between two consumers that changes the weights or the loss in its own
``on_train_batch_start`` is not seen by the later one.

**Shared solves.** Consumers that need only the top of ``H`` itself on the same parameters (and the
same curvature kind: a Gauss–Newton consumer never reuses a Hessian solve, nor the reverse)
(``Request.top``, e.g. the scheduler with SGD and one learning rate) reuse the certified solve of a
producer in their group (``Request.produces_top``, the monitor's Lanczos): the producer solves at the
strictest tolerance and the largest budget of those it serves (:meth:`Shared.top_need`) and
publishes its values, certified bounds and Ritz vectors (:meth:`Shared.publish_top`); a consumer takes
them with no product when the bound meets its own tolerance (:meth:`Shared.top`), else it solves on
its own view. A producer that fails before publishing fails every consumer waiting for its solve.
``‖Hg‖/‖g‖`` and ``gᵀHg/‖g‖²`` on the same parameters come from one product ``Hg`` per group
(:meth:`Shared.grad_curvature`, :meth:`Shared.batch_sharpness`). A consumer that needs the gradients
of the two halves of the probe (:meth:`Shared.half_gradients`, DAL's noise-free ``v``) gets them by one
more first-order pass, inside the same ``no_harm``.

**Products.** Every estimating callback logs ``<area>/hvps``: the Hessian-vector products its own
computations took at that step (its views' counters). A shared product is counted once, by the
callback that took it; a callback that reused a solve logs 0 for it.

**DDP.** Consumers are asked, grouped and run in registration order (the order of
``trainer.callbacks``, the same on every rank), and every decision depends on reduced values only,
so every rank runs the same collectives in the same order.
"""

from __future__ import annotations

import functools
import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor

from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.callbacks import _outputs
from chaos_callbacks.curvature import GGNOperator, HessianOperator, flatten, gradient_curvatures
from chaos_callbacks.curvature.hvp import HessianView

#: The curvature matrices a consumer can ask for: the Hessian, or the generalised Gauss–Newton matrix.
CURVATURES = ("hessian", "ggn")


@dataclass(frozen=True)
class TopNeed:
    """What a consumer needs of the top of ``H``: ``k`` eigenvalues, each certified within
    ``tol · |λ_1|``, within ``max_hvps`` products."""

    tol: float
    max_hvps: int
    k: int = 1

    def strictest(self, other: TopNeed | None) -> TopNeed:
        if other is None:
            return self
        return TopNeed(min(self.tol, other.tol), max(self.max_hvps, other.max_hvps), max(self.k, other.k))


@dataclass(frozen=True)
class TopSolve:
    """A certified top-``k`` solve: values (descending), bounds ``|λ_i − θ_i| ≤ errors[i]`` (given the
    index assumption of :mod:`chaos_callbacks.curvature.lanczos`), Ritz vectors ``[k, n]`` or ``None``."""

    values: list[float]
    errors: list[float]
    vectors: Tensor | None = None

    def meets(self, need: TopNeed) -> bool:
        """Every wanted bound is within the need's tolerance, relative to ``|λ_1|``."""
        if len(self.values) < need.k or not self.values[0]:
            return False
        scale = abs(self.values[0])
        return all(math.isfinite(e) and e <= need.tol * scale for e in self.errors[: need.k])


@dataclass
class Request:
    """What a due consumer needs at this step.

    Attributes:
        compute: runs inside ``no_harm`` on the shared operator and returns the consumer's result.
        params: the consumer's coordinates (trainable parameters, in its order).
        loss_fn: its loss (``None``: the module's ``training_step``).
        probe: a fixed probe set (CPU batches, from :meth:`CurvatureEngine.probe_set`), or ``None``
            for the step's batch.
        batch_fraction: with ``probe=None``, the share of the step's batch the operator is built on: its
            first ``⌈f · B⌉`` examples (:func:`~chaos_callbacks.callbacks._plumbing.batch_head`).
        train_mode: passed to ``no_harm`` (``True``: train mode, ``False``: eval, ``None``: as is).
        top: the top of ``H`` on ``params`` this consumer would take from another's solve.
        produces_top: ``compute`` publishes a top solve of ``H`` on ``params`` for others.
        curvature: ``"hessian"`` or ``"ggn"`` (``H`` is then the Gauss–Newton matrix ``Jᵀ H_out J``);
            requests of different kinds never share an operator or a solve.
        output_split: for ``"ggn"``, where the loss is split into outputs and ``ℓ(outputs)``
            (:class:`~chaos_callbacks.callbacks._outputs.OutputSplit`; ``None``: the module's
            ``forward`` output, captured while the loss is computed).
    """

    compute: Callable[[Shared], Any]
    params: Sequence[Tensor]
    loss_fn: plumb.LossFn | None = None
    probe: list[Any] | None = None
    batch_fraction: float = 1.0
    train_mode: bool | None = True
    top: TopNeed | None = None
    produces_top: bool = False
    curvature: str = "hessian"
    output_split: _outputs.OutputSplit | None = None

    def group_key(self) -> tuple[Any, ...]:
        """Requests with equal keys share one forward and one operator: same probe (and share of the step's
        batch), loss, mode and curvature."""
        probe = ("batch", self.batch_fraction) if self.probe is None else id(self.probe)
        split = None if self.output_split is None else (id(self.output_split.output_fn), id(self.output_split.output_loss_fn))
        return probe, id(self.loss_fn), self.train_mode, self.curvature, split if self.curvature == "ggn" else None


@dataclass
class Outcome:
    """A consumer's result at a step, or what stopped it, and the products it took."""

    result: Any = None
    error: Exception | None = None
    hvps: int = 0

    def get(self) -> Any:
        """The result; raises the exception that stopped the computation."""
        if self.error is not None:
            raise self.error
        return self.result


class _Channel:
    """Shared results of ``H`` on one set of parameters within a group: the top solve, ``‖Hg‖/‖g‖``."""

    def __init__(self) -> None:
        self.producer: Any = None
        self.need: TopNeed | None = None
        self.top: TopSolve | None = None
        self.top_view: HessianView | None = None
        self.failure: Exception | None = None
        self.grad_curvature: tuple[float | None, float | None] | None = None


class Shared:
    """What one consumer's computation sees: its operator view and the group's shared results."""

    def __init__(self, operator: HessianView, channel: _Channel, consumer: Any,
                 halves: Callable[[Sequence[Tensor]], tuple[Tensor, Tensor]] | None = None) -> None:
        self.operator = operator
        self._channel = channel
        self._consumer = consumer
        self._views: list[HessianView] = []
        self._halves = halves

    def view(self, params: Sequence[Tensor]) -> HessianView:
        """Another view of the group's operator over some of this consumer's parameters (e.g. a diagonal
        block ``H_SS``), on the same graph; its products count in this consumer's ``hvps``."""
        view = self.operator.view(params)
        self._views.append(view)
        return view

    @property
    def num_matvecs(self) -> int:
        """The products this consumer took, through its operator view and every further view."""
        return self.operator.num_matvecs + sum(v.num_matvecs for v in self._views)

    def top_need(self) -> TopNeed | None:
        """For the producer: the strictest need of the consumers that will reuse its solve (``None``: none)."""
        return self._channel.need if self._channel.producer is self._consumer else None

    def publish_top(self, solve: TopSolve) -> None:
        """For the producer: offer its certified solve (vectors in its own coordinates) to the others."""
        if self._channel.producer is not self._consumer:
            return
        vectors = solve.vectors
        if vectors is not None and (vectors.ndim != 2 or vectors.shape[1] != self.operator.dim):
            vectors = None
        self._channel.top = TopSolve(list(solve.values), list(solve.errors), vectors)
        self._channel.top_view = self.operator

    def top(self) -> TopSolve | None:
        """The producer's published solve, its vectors in this consumer's coordinates (no copy when
        both see the operator's own parameter order); ``None`` without a producer, or when it
        finished with nothing certified to offer.

        Raises :class:`~chaos_callbacks.callbacks._plumbing.EstimateSkipped` when the producer failed
        before publishing: the shared estimate failed for everyone who needed it.
        """
        channel = self._channel
        if channel.producer is None or channel.producer is self._consumer:
            return None
        if channel.failure is not None:
            why = channel.failure
            raise plumb.EstimateSkipped(
                f"the shared Hessian solve of {type(channel.producer).__name__} failed ({type(why).__name__}: {why})"
            )
        if channel.top is None:
            return None
        vectors, source = channel.top.vectors, channel.top_view
        if vectors is not None and source is not None and not (source.native and self.operator.native):
            vectors = torch.stack([self.operator.restrict(source.extend(v)) for v in vectors])
        return TopSolve(channel.top.values, channel.top.errors, vectors)

    def grad_curvature(self) -> float | None:
        """``‖Hg‖/‖g‖`` of the probe gradient on these parameters, computed once per group."""
        return self._gradient_curvatures()[0]

    def batch_sharpness(self) -> float | None:
        """``gᵀHg/‖g‖²`` of the probe gradient on these parameters, from the same product ``Hg`` as
        :meth:`grad_curvature` (Andreyev & Beneventano, arXiv 2412.20553)."""
        return self._gradient_curvatures()[1]

    def half_gradients(self) -> tuple[Tensor, Tensor]:
        """``g₁, g₂``: the probe gradient on the first and on the second half of every probe batch
        (weighted like the batches, reduced like the operator), in this consumer's coordinates. Each
        half is forwarded on its own (one more first-order pass over the probe, no second-order graph):
        layers that couple the examples of a batch (BatchNorm in train mode) see half batches, and
        dropout draws its own masks."""
        if self._halves is None:
            raise plumb.EstimateSkipped("this operator has no probe batches to split")
        return self._halves(self.operator.params)

    def _gradient_curvatures(self) -> tuple[float | None, float | None]:
        channel = self._channel
        if channel.grad_curvature is None:
            channel.grad_curvature = gradient_curvatures(self.operator, self.operator.gradient)
        return channel.grad_curvature


def _same_batches(a: Any, b: Any) -> bool:
    """Two (nested) batches hold equal tensors and values (unknown objects that do not compare: not equal)."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_batches(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same_batches(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:
        return False


class CurvatureEngine:
    """The per-Trainer orchestrator of curvature estimates (module docstring)."""

    def __init__(self) -> None:
        self._consumers: list[Any] = []
        self._probe_sets: dict[tuple[str, int], list[Any]] = {}
        self._step: int | None = None
        self._outcomes: dict[Any, Outcome] = {}

    def register(self, consumer: Any) -> None:
        """Add a consumer (once); called at train start, which also forgets any previous fit's step."""
        if not any(c is consumer for c in self._consumers):
            self._consumers.append(consumer)
        self._step = None
        self._outcomes.clear()

    def probe_set(self, trainer: Trainer, size: int, existing: list[Any] | None, split: str = "train") -> list[Any]:
        """One fixed probe set of ``size`` examples of ``split`` (``"train"`` or ``"val"``) per Trainer, so
        consumers with the same ``probe`` and split share its forward: ``existing`` (a consumer's restored
        set) if it is the first of its size and split or equals the shared one, else drawn once with
        :func:`~chaos_callbacks.callbacks._plumbing.draw_probe_batches`."""
        shared = self._probe_sets.get((split, size))
        if shared is None:
            shared = existing if existing is not None else plumb.draw_probe_batches(trainer, size, split)
            self._probe_sets[(split, size)] = shared
            return shared
        if existing is None or existing is shared or _same_batches(existing, shared):
            return shared
        return existing

    def estimate(self, consumer: Any, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> Outcome:
        """``consumer``'s outcome at this step (it is due); runs the step's shared pass if not done yet."""
        if not any(c is consumer for c in self._consumers):
            self._consumers.append(consumer)
        step = trainer.global_step
        if self._step != step:
            self._step = step
            self._outcomes.clear()
            others = [c for c in self._consumers if c is not consumer and self._due(c, trainer, step)]
            self._run([consumer, *others], trainer, pl_module, batch, batch_idx)
        if consumer not in self._outcomes:  # not due when the step's pass ran: on its own
            self._run([consumer], trainer, pl_module, batch, batch_idx)
        return self._outcomes.pop(consumer)

    @staticmethod
    def _due(consumer: Any, trainer: Trainer, step: int) -> bool:
        try:
            return bool(consumer._curvature_due(trainer, step))
        except Exception:  # its own hook will find out and warn
            return False

    # ------------------------------------------------------------------ one pass
    def _run(self, consumers: list[Any], trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        order = {id(c): i for i, c in enumerate(self._consumers)}
        groups: dict[tuple[Any, ...], list[tuple[Any, Request]]] = {}
        for consumer in sorted(consumers, key=lambda c: order.get(id(c), len(order))):
            try:
                request = consumer._curvature_request(trainer, pl_module)
            except Exception as exc:
                self._outcomes[consumer] = Outcome(error=exc)
                continue
            groups.setdefault(request.group_key(), []).append((consumer, request))
        for members in groups.values():
            self._run_group(members, trainer, pl_module, batch, batch_idx)

    def _run_group(self, members: list[tuple[Any, Request]], trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        """One forward and first-order graph for ``members`` (same group key); each computes on its view."""
        first = members[0][1]
        outcomes = {id(consumer): Outcome() for consumer, _ in members}
        for consumer, _ in members:
            self._outcomes[consumer] = outcomes[id(consumer)]
        shared: dict[int, Shared] = {}
        try:
            if first.probe is None:
                batches = [plumb.batch_head(batch, first.batch_fraction)]
            else:
                batches = [plumb.to_device(trainer, b) for b in first.probe]
            sizes = [plumb.batch_size_of(b) for b in batches]
            union = list({id(p): p for _, r in members for p in r.params}.values())
            with plumb.no_harm(pl_module, train_mode=first.train_mode, second_order=True):
                weights = [s / sum(sizes) for s in sizes]
                op = _operator(first, union, batches, weights, trainer, pl_module, batch_idx)
                halves = functools.partial(_half_gradients, first, batches, weights, trainer, pl_module, batch_idx)
                try:
                    channels = self._channels(members)
                    for consumer, request in sorted(members, key=lambda m: not m[1].produces_top):  # producers first
                        channel = channels[frozenset(id(p) for p in request.params)]
                        outcome = outcomes[id(consumer)]
                        try:
                            mine = shared[id(consumer)] = Shared(op.view(request.params), channel, consumer, halves)
                            outcome.result = request.compute(mine)
                        except Exception as exc:  # this consumer's failure; the others go on
                            outcome.error = exc
                            if channel.producer is consumer and channel.top is None:
                                channel.failure = exc
                        finally:
                            outcome.hvps = shared[id(consumer)].num_matvecs if id(consumer) in shared else 0
                finally:
                    op.release()
        except Exception as exc:  # the probe, the forward or the graph failed: every member skips
            for consumer, _ in members:
                outcomes[id(consumer)].result, outcomes[id(consumer)].error = None, exc

    @staticmethod
    def _channels(members: list[tuple[Any, Request]]) -> dict[frozenset[int], _Channel]:
        """One channel per parameter set: its first producer and the strictest need it serves."""
        channels: dict[frozenset[int], _Channel] = {}
        for consumer, request in members:
            channel = channels.setdefault(frozenset(id(p) for p in request.params), _Channel())
            if request.produces_top and channel.producer is None:
                channel.producer = consumer
        for consumer, request in members:
            channel = channels[frozenset(id(p) for p in request.params)]
            if request.top is not None and channel.producer is not None and channel.producer is not consumer:
                channel.need = request.top.strictest(channel.need)
        return channels


def _operator(request: Request, params: list[Tensor], batches: list[Any], weights: list[float], trainer: Trainer,
              pl_module: LightningModule, batch_idx: int) -> HessianOperator | GGNOperator:
    """The group's operator (inside ``no_harm``): the Hessian of the probe loss, or its Gauss–Newton
    matrix split at the request's outputs."""
    reduce = plumb.mean_reducer(trainer)
    if request.curvature == "ggn":
        split_closures = [(lambda b=b: _outputs.outputs_and_loss(pl_module, b, request.loss_fn, batch_idx, request.output_split)) for b in batches]
        return GGNOperator(params, split_closures, weights, reduce=reduce)
    closures = [(lambda b=b: plumb.compute_loss(pl_module, b, request.loss_fn, batch_idx)) for b in batches]
    return HessianOperator(params, closures, weights, reduce=reduce)


def _half_gradients(request: Request, batches: list[Any], weights: list[float], trainer: Trainer, pl_module: LightningModule,
                    batch_idx: int, params: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """The gradients on ``params`` of the first and of the second half of every batch (examples
    ``[0, n//2)`` and ``[n//2, n)``), weighted like the batches and mean-reduced across ranks (inside ``no_harm``)."""
    reduce = plumb.mean_reducer(trainer)
    halves = []
    for part in (0, 1):
        total = torch.zeros(sum(p.numel() for p in params), dtype=params[0].dtype, device=params[0].device)
        for batch, weight in zip(batches, weights):
            n = plumb.batch_size_of(batch)
            if n < 2:
                raise plumb.EstimateSkipped(f"a probe batch of {n} example has no two halves")
            start, stop = (0, n // 2) if part == 0 else (n // 2, n)
            total += weight * flatten(plumb.slice_gradient(pl_module, params, batch, start, stop, request.loss_fn, batch_idx))
        halves.append(reduce(total))
    return halves[0], halves[1]


_ENGINES: weakref.WeakKeyDictionary[Trainer, CurvatureEngine] = weakref.WeakKeyDictionary()


def engine_for(trainer: Trainer) -> CurvatureEngine:
    """The engine of ``trainer`` (created on first use, gone with the trainer)."""
    engine = _ENGINES.get(trainer)
    if engine is None:
        engine = _ENGINES[trainer] = CurvatureEngine()
    return engine
