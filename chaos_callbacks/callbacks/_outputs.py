"""Where a loss is split into model outputs and a loss of the outputs, for Gauss–Newton curvature.

The generalised Gauss–Newton matrix ``Jᵀ H_out J`` (:mod:`chaos_callbacks.curvature.ggn`) needs
the outputs ``z`` as a tensor of the autograd graph and the loss computed from them. By default
``z`` is the return value of the LightningModule's ``forward``, captured by a forward hook on the
shadow the user's code runs on (:func:`~chaos_callbacks.callbacks._plumbing.compute_loss`) while the
loss is computed: the real module gets no hook. ``forward`` must then run exactly once in the loss
and return one tensor; otherwise the split is undefined and the estimate is skipped, asking for an
explicit :class:`OutputSplit` (``output_fn``/``output_loss_fn``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning.pytorch import LightningModule
from torch import Tensor

from chaos_callbacks.callbacks import _plumbing as plumb

OutputFn = Callable[[LightningModule, Any], Tensor]
OutputLossFn = Callable[[Tensor, Any], Tensor]

_ASK = ("pass output_fn=lambda module, batch: <outputs> and output_loss_fn=lambda outputs, batch: <scalar loss> "
        "to say where the loss splits")


@dataclass(frozen=True)
class OutputSplit:
    """An explicit split: ``z = output_fn(module, batch)`` and the loss ``output_loss_fn(z, batch)``."""

    output_fn: OutputFn
    output_loss_fn: OutputLossFn

    def loss(self, module: LightningModule, batch: Any) -> Tensor:
        """The split's loss ``output_loss_fn(output_fn(module, batch), batch)``, as a ``loss_fn``."""
        return self.output_loss_fn(self.output_fn(module, batch), batch)


def outputs_and_loss(pl_module: LightningModule, batch: Any, loss_fn: plumb.LossFn | None, batch_idx: int,
                     split: OutputSplit | None) -> tuple[Tensor, Tensor]:
    """The outputs ``z`` of ``batch`` and the scalar loss computed from them (call inside ``no_harm``).

    With ``split``: its two functions, on a shadow of the module. Without: the loss of
    :func:`~chaos_callbacks.callbacks._plumbing.compute_loss` (``loss_fn`` or ``training_step``), ``z``
    the output of the module's one ``forward`` call in it.

    Raises:
        EstimateSkipped: ``forward`` ran zero or several times, or returned something other than a tensor.
    """
    module = plumb.user_module(pl_module)
    if split is not None:
        outputs = split.output_fn(module, batch)
        if not isinstance(outputs, Tensor):
            raise plumb.EstimateSkipped(f"output_fn returned {type(outputs).__name__}, not a tensor")
        loss = split.output_loss_fn(outputs, batch)
        if not isinstance(loss, Tensor) or loss.ndim != 0:
            raise plumb.EstimateSkipped(f"output_loss_fn must return a scalar tensor, got {getattr(loss, 'shape', type(loss).__name__)}")
        return outputs, loss
    captured: list[Any] = []
    handle = module.register_forward_hook(lambda _module, _args, out: captured.append(out))
    try:
        loss = plumb.compute_loss(pl_module, batch, loss_fn, batch_idx, module=module)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise plumb.EstimateSkipped(
            f"the module's forward ran {len(captured)} times while the loss was computed, so its output does not "
            f"define the Gauss–Newton split; {_ASK}"
        )
    if not isinstance(captured[0], Tensor):
        raise plumb.EstimateSkipped(f"the module's forward returned {type(captured[0]).__name__}, not a tensor; {_ASK}")
    return captured[0], loss
