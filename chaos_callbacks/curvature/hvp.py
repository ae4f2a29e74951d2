"""Exact Hessian-vector products of a loss over one or more probe batches.

The Hessian of ``L(θ) = Σ_b w_b L_b(θ)`` is exposed as a linear operator on flat vectors
``v ∈ R^n`` (``n`` = number of parameters that require grad). Each product is the exact
Pearlmutter (1994) product ``H v = ∇_θ (∇_θ L · v)`` by double backward through a *cached*
first-order graph: every probe batch is forwarded once, ``g_b = ∇L_b`` is built with
``create_graph=True``, and each product is one backward pass of ``g_b · v``. Because the
forward pass is shared, dropout masks, augmentations and batch-norm batch statistics are
identical across all products of one estimate — the operator is a fixed symmetric matrix.

Several consumers of one operator (a monitor, a learning-rate scheduler) each take a
:class:`HessianView`: the same cached graph seen in their own coordinates (a subset or reordering of
the parameters, e.g. an optimizer's parameter groups), with their own product counter. A consumer
that needs another operator built on ``H`` (a scaled ``S H S``, a preconditioned one) wraps its view
(curvlinops and hessian-eigenthings v1 keep operators apart from algorithms in the same way).

``benchmarks/bench_hvp_backends.py`` compares this with ``torch.func`` forward-over-reverse
(``jvp(grad(L))``), which recomputes forward and backward for every product.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Reduce = Callable[[Tensor], Tensor]


class NoTrainableParametersError(ValueError):
    """Raised when a model has no parameter with ``requires_grad=True``."""


def flatten(tensors: Sequence[Tensor]) -> Tensor:
    """Concatenate tensors into one flat vector."""
    return torch.cat([t.reshape(-1) for t in tensors])


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Split a flat vector into views shaped like ``like``."""
    out, offset = [], 0
    for t in like:
        out.append(vector[offset : offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


class ProbeOperator:
    """What every curvature operator of probe-batch losses shares: its trainable parameters, the
    batches' weights, the reduction, the product counter and the checks of :meth:`matvec`'s input.
    Subclasses build their graphs from the closures and set :attr:`loss` and :attr:`gradient`
    (:meth:`_set_loss_and_gradient`)."""

    def __init__(self, params: Sequence[Tensor], closures: Sequence[object], weights: Sequence[float] | None, reduce: Reduce | None) -> None:
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise NoTrainableParametersError("the model has no parameters with requires_grad=True")
        if not closures:
            raise ValueError(f"{type(self).__name__} needs at least one probe-batch closure")
        if weights is None:
            weights = [1.0 / len(closures)] * len(closures)
        if len(weights) != len(closures):
            raise ValueError(f"got {len(weights)} weights for {len(closures)} closures")
        self.weights = list(weights)
        self._reduce = reduce or (lambda t: t)
        self.num_matvecs = 0
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.device = self.params[0].device

    def _set_loss_and_gradient(self, loss_total: Tensor, grad_total: Tensor) -> None:
        self.loss = float(self._reduce(loss_total))
        self.gradient = self._reduce(grad_total)

    def _parts(self, v: Tensor) -> list[Tensor]:
        """``v`` checked and split into views shaped like the parameters."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {tuple(v.shape)}")
        return unflatten(v.to(self.dtype), self.params)

    def matvec(self, v: Tensor) -> Tensor:
        raise NotImplementedError

    def __call__(self, v: Tensor) -> Tensor:
        return self.matvec(v)

    def view(self, params: Sequence[Tensor]) -> HessianView:
        """This operator in the coordinates of ``params`` (a subset or reordering of :attr:`params`):
        its diagonal block over them."""
        return HessianView(self, params)


class HessianOperator(ProbeOperator):
    """The Hessian of a weighted sum of probe-batch losses, as a matrix-free operator.

    Args:
        params: the parameters to differentiate (those with ``requires_grad``).
        losses: one closure per probe batch, each returning the scalar loss at the current
            parameters. Each is called exactly once, at construction.
        weights: weight of each batch loss (default: equal weights summing to one, i.e. the
            loss of the union of equally sized batches).
        reduce: applied to every gradient and product (e.g. a mean all-reduce under DDP so that
            every rank holds the operator of the global batch).

    Attributes:
        num_matvecs: the number of Hessian-vector products computed so far.
        loss: the weighted probe loss (detached).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        losses: Sequence[Callable[[], Tensor]],
        weights: Sequence[float] | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        super().__init__(params, losses, weights, reduce)
        self._graphs: list[tuple[Tensor, ...]] = []
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for closure, w in zip(losses, self.weights):
            loss = closure()
            if loss.ndim != 0:
                raise ValueError(f"a probe loss must be a scalar tensor, got shape {tuple(loss.shape)}")
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
            grads = tuple(
                g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)
            )
            self._graphs.append(grads)
            loss_total += w * loss.detach().double()
            grad_total += w * flatten([g.detach() for g in grads])
        self._set_loss_and_gradient(loss_total, grad_total)

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``H v`` for a flat vector ``v`` (one counted Hessian-vector product)."""
        v_parts = self._parts(v)
        out: Tensor | None = None  # the first batch's product, scaled in place; later ones added into it
        for grads, w in zip(self._graphs, self.weights):
            differentiable = [(g, u, p) for g, u, p in zip(grads, v_parts, self.params) if g.requires_grad]
            if not differentiable:
                continue
            gs, us, _ = zip(*differentiable)
            hv = torch.autograd.grad(gs, self.params, grad_outputs=us, retain_graph=True, allow_unused=True)
            part = flatten([h if h is not None else torch.zeros_like(p) for h, p in zip(hv, self.params)])
            if out is None:
                out = part if w == 1.0 else part.mul_(w)
            else:
                out.add_(part, alpha=w)
        self.num_matvecs += 1
        if out is None:
            out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        return self._reduce(out)

    def release(self) -> None:
        """Free the cached first-order graphs."""
        self._graphs = []


class HessianView:
    """The Hessian of a :class:`HessianOperator` seen in the coordinates of some of its parameters
    (or any operator with its interface, e.g. :class:`~chaos_callbacks.curvature.ggn.GGNOperator`).

    For parameters ``S`` (in their own order) the view applies the principal submatrix ``H_SS``:
    ``v`` is zero-padded onto the other parameters, one product of the shared graph is taken and its
    ``S`` entries are returned. The padding adds exact zeros, so ``H_SS v`` has the bits of an operator
    built on ``S`` alone. When ``S`` is the operator's own parameter list, vectors pass through
    without a copy.

    Attributes:
        num_matvecs: the products taken through this view (the operator's counter is the total).
        dim, dtype, device: of the view's vectors.
    """

    def __init__(self, base: ProbeOperator, params: Sequence[Tensor]) -> None:
        offsets, offset = {}, 0
        for p in base.params:
            offsets[id(p)] = (offset, p.numel())
            offset += p.numel()
        missing = [tuple(p.shape) for p in params if id(p) not in offsets]
        if missing:
            raise ValueError(f"a view's parameters must be among the operator's; not there: shapes {missing}")
        self.params = list(params)
        if not self.params:
            raise NoTrainableParametersError("a view needs at least one parameter")
        self._base = base
        self._segments = [offsets[id(p)] for p in self.params]
        self._identity = [id(p) for p in self.params] == [id(p) for p in base.params]
        self._gradient: Tensor | None = None
        self.num_matvecs = 0
        self.dim = sum(n for _, n in self._segments)
        self.dtype, self.device = base.dtype, base.device

    @property
    def native(self) -> bool:
        """The view's coordinates are the operator's own: vectors pass through without a copy."""
        return self._identity

    @property
    def loss(self) -> float:
        """The operator's probe loss."""
        return self._base.loss

    @property
    def gradient(self) -> Tensor:
        """The probe gradient restricted to the view's parameters."""
        if self._gradient is None:
            self._gradient = self.restrict(self._base.gradient)
        return self._gradient

    def restrict(self, full: Tensor) -> Tensor:
        """The view's entries of a vector over all of the operator's parameters."""
        if self._identity:
            return full
        return torch.cat([full[o : o + n] for o, n in self._segments])

    def extend(self, v: Tensor) -> Tensor:
        """A vector over all of the operator's parameters: ``v`` on the view's, zero elsewhere."""
        if self._identity:
            return v
        full = torch.zeros(self._base.dim, dtype=self.dtype, device=self.device)
        start = 0
        for o, n in self._segments:
            full[o : o + n] = v[start : start + n]
            start += n
        return full

    def view(self, params: Sequence[Tensor]) -> HessianView:
        """Another view of the same operator, in the coordinates of ``params`` (e.g. a diagonal block)."""
        return self._base.view(params)

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``H_SS v`` (one counted product here and on the operator)."""
        if v.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {tuple(v.shape)}")
        out = self.restrict(self._base.matvec(self.extend(v)))
        self.num_matvecs += 1
        return out

    __call__ = matvec
