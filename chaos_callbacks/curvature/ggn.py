"""Exact generalised Gauss–Newton products of a loss over one or more probe batches.

Split the loss at the model's outputs, ``L(θ) = ℓ(z(θ))``. Its Hessian is
``∇²L = Jᵀ ∇²_z ℓ J + Σ_k ∂ℓ/∂z_k ∇²z_k`` with ``J = ∂z/∂θ``; the generalised Gauss–Newton matrix
keeps the first term,

    G = Jᵀ H_out J,   H_out = ∇²_z ℓ,

(Schraudolph 2002, "Fast curvature matrix-vector products for second-order gradient descent";
Martens 2010/2020, "New insights and perspectives on the natural gradient method"). It is positive
semi-definite whenever ``ℓ`` is convex in ``z`` (squared error, cross-entropy on logits), and equals
the Hessian when ``z`` is linear in ``θ``. For any loss it is defined through the Hessian of the loss
with respect to the outputs.

Each product ``G v`` is exact and matrix-free, through the cached first-order graph of every batch:

1. ``J v`` by the double-vjp trick: ``Jᵀu`` is built once with ``create_graph=True`` for a dummy
   ``u`` (it is linear in ``u``), and ``J v = ∂(Jᵀu · v)/∂u`` is one backward pass of that graph;
2. ``H_out (J v)`` by double backward of ``∂ℓ/∂z`` (built once with ``create_graph=True``) with
   respect to the intermediate tensor ``z``: autograd differentiates only the paths from ``z`` to
   the loss, so a term of the loss that depends on ``θ`` other than through ``z`` (a weight penalty)
   adds no curvature;
3. ``Jᵀ w`` by one vector-Jacobian product of ``z``.

The operator has the interface of :class:`~chaos_callbacks.curvature.hvp.HessianOperator`
(``matvec``, ``dim``, ``loss``, ``gradient``, ``view``, ``release``), so Lanczos, Hutchinson and
the spectral density run on it unchanged, and a :class:`~chaos_callbacks.curvature.hvp.HessianView`
of a parameter subset ``S`` applies its diagonal block ``G_SS = J_Sᵀ H_out J_S``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from chaos_callbacks.curvature.hvp import ProbeOperator, Reduce, flatten

#: A probe batch's closure: its outputs ``z`` (a tensor in the autograd graph) and its scalar loss ``ℓ(z)``.
OutputsAndLoss = Callable[[], tuple[Tensor, Tensor]]


class _Batch:
    """The cached graphs of one probe batch: ``Jᵀu`` (linear in the dummy ``u``), ``∂ℓ/∂z`` and ``z``."""

    def __init__(self, params: list[Tensor], outputs: Tensor, loss: Tensor) -> None:
        if not isinstance(outputs, Tensor):
            raise ValueError(f"the outputs must be a tensor, got {type(outputs).__name__}")
        if not outputs.requires_grad:
            raise ValueError("the outputs do not depend on any parameter that requires grad")
        self.outputs = outputs
        (grad_out,) = torch.autograd.grad(loss, outputs, create_graph=True, retain_graph=True, allow_unused=True)
        if grad_out is None:
            raise ValueError("the loss was not computed from the outputs (no path from them to the loss)")
        self.grad_out = grad_out
        self.dummy = torch.zeros_like(outputs, requires_grad=True)
        jtu = torch.autograd.grad(outputs, params, grad_outputs=self.dummy, create_graph=True, allow_unused=True)
        self.jtu = [(g, i) for i, g in enumerate(jtu) if g is not None and g.requires_grad]

    def jvp(self, v_parts: list[Tensor]) -> Tensor:
        """``J v`` (output-shaped) by the double-vjp trick."""
        if not self.jtu:
            return torch.zeros_like(self.outputs)
        gs, us = zip(*[(g, v_parts[i]) for g, i in self.jtu])
        (jv,) = torch.autograd.grad(gs, self.dummy, grad_outputs=us, retain_graph=True, allow_unused=True)
        return torch.zeros_like(self.outputs) if jv is None else jv

    def output_hvp(self, w: Tensor) -> Tensor:
        """``H_out w``: the Hessian of the loss w.r.t. the outputs, by double backward."""
        if not self.grad_out.requires_grad:  # the loss is linear in the outputs
            return torch.zeros_like(w)
        (hw,) = torch.autograd.grad(self.grad_out, self.outputs, grad_outputs=w, retain_graph=True, allow_unused=True)
        return torch.zeros_like(w) if hw is None else hw

    def vjp(self, params: list[Tensor], w: Tensor) -> Tensor:
        """``Jᵀ w`` (flat, over ``params``)."""
        parts = torch.autograd.grad(self.outputs, params, grad_outputs=w, retain_graph=True, allow_unused=True)
        return flatten([g if g is not None else torch.zeros_like(p) for g, p in zip(parts, params)])


class GGNOperator(ProbeOperator):
    """The generalised Gauss–Newton matrix ``Σ_b w_b J_bᵀ H_out,b J_b`` of probe-batch losses, matrix-free.

    Args:
        params: the parameters to differentiate (those with ``requires_grad``).
        closures: one per probe batch, each returning ``(z, ℓ(z))`` at the current parameters: the
            outputs (a tensor in the autograd graph) and the scalar loss computed from them. Each is
            called exactly once, at construction.
        weights: weight of each batch loss (default: equal weights summing to one).
        reduce: applied to every gradient and product (a mean all-reduce under DDP).

    Attributes:
        num_matvecs: the number of GGN-vector products computed so far.
        loss: the weighted probe loss (detached).
        gradient: the weighted probe gradient ``∇_θ L`` (of the whole loss, every path).
    """

    def __init__(
        self,
        params: Sequence[Tensor],
        closures: Sequence[OutputsAndLoss],
        weights: Sequence[float] | None = None,
        reduce: Reduce | None = None,
    ) -> None:
        super().__init__(params, closures, weights, reduce)
        self._batches: list[_Batch] = []
        loss_total = torch.zeros((), dtype=torch.float64, device=self.device)
        grad_total = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for closure, w in zip(closures, self.weights):
            outputs, loss = closure()
            if not isinstance(loss, Tensor) or loss.ndim != 0:
                raise ValueError(f"a probe loss must be a scalar tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
            grads = torch.autograd.grad(loss, self.params, retain_graph=True, allow_unused=True)
            self._batches.append(_Batch(self.params, outputs, loss))
            loss_total += w * loss.detach().double()
            grad_total += w * flatten([g if g is not None else torch.zeros_like(p) for g, p in zip(grads, self.params)])
        self._set_loss_and_gradient(loss_total, grad_total)

    def matvec(self, v: Tensor) -> Tensor:
        """Return ``G v = Σ_b w_b J_bᵀ H_out,b J_b v`` (one counted product)."""
        v_parts = self._parts(v)
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for batch, w in zip(self._batches, self.weights):
            out.add_(batch.vjp(self.params, batch.output_hvp(batch.jvp(v_parts))), alpha=w)
        self.num_matvecs += 1
        return self._reduce(out)

    def release(self) -> None:
        """Free the cached graphs."""
        self._batches = []
