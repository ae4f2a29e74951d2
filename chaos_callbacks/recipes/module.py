"""A generic image-classification LightningModule around the :mod:`chaos_callbacks.recipes.models` zoo."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lightning import LightningModule
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from chaos_callbacks.recipes.models import build_model, check_choice, resolve_dtype

LOSSES: tuple[str, ...] = ("cross_entropy", "mse")
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")


class ClassificationModule(LightningModule):
    """Trains a :func:`chaos_callbacks.recipes.models.build_model` classifier with SGD or Adam.

    Logs ``train/loss`` (every step), ``train/acc`` (per epoch), ``val/loss``, ``val/acc``,
    ``test/loss`` and ``test/acc``. Inputs are cast to the module's dtype in :meth:`forward`,
    so float32 batches also work with ``dtype="float64"``.

    Args:
        num_classes: number of classes (link from the datamodule's ``num_classes``).
        in_shape: ``(channels, height, width)`` of one image (link from ``in_shape``).
        model: ``mlp``, ``linear``, ``lenet``, ``resnet{14,20,32,44,56,110}`` or
            ``plain{14,20,32,44,56,110}`` (see :mod:`chaos_callbacks.recipes.models`).
        widths: hidden widths of ``mlp`` (``None``: ``[64]``).
        activation: ``relu``, ``tanh`` or ``gelu``.
        init: ``default`` (PyTorch's) or ``normal`` (weights N(0, ``init_std``²), zero biases).
        init_std: standard deviation of the ``normal`` initialisation.
        bias: whether layers have biases.
        batch_norm: add BatchNorm (``None``: the architecture's standard).
        dropout: dropout probability after hidden fully connected layers (mlp, lenet).
        loss: ``cross_entropy``, or ``mse`` (mean squared error between the logits and one-hot
            targets, averaged over all batch × class entries).
        optimizer: ``sgd`` or ``adam``.
        lr: learning rate.
        momentum: SGD momentum (``sgd`` only).
        weight_decay: L2 penalty coefficient passed to the optimizer.
        dtype: ``float32`` or ``float64`` parameters.
    """

    def __init__(
        self,
        num_classes: int,
        in_shape: tuple[int, ...],
        model: str = "mlp",
        widths: list[int] | None = None,
        activation: str = "relu",
        init: str = "default",
        init_std: float = 1.0,
        bias: bool = True,
        batch_norm: bool | None = None,
        dropout: float = 0.0,
        loss: str = "cross_entropy",
        optimizer: str = "sgd",
        lr: float = 0.1,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dtype: str = "float32",
    ) -> None:
        super().__init__()
        check_choice("loss", loss, LOSSES)
        check_choice("optimizer", optimizer, OPTIMIZERS)
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if momentum and optimizer != "sgd":
            raise ValueError(f"momentum only applies to optimizer='sgd', not {optimizer!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        self.save_hyperparameters()
        self.model = build_model(
            model,
            in_shape,
            num_classes,
            widths=widths,
            activation=activation,
            init=init,
            init_std=init_std,
            bias=bias,
            batch_norm=batch_norm,
            dropout=dropout,
        )
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.to(resolve_dtype(dtype))  # also sets self.dtype, used to cast inputs

    def forward(self, x: Tensor) -> Tensor:
        """Return the logits of the image batch ``x`` (cast to the parameters' dtype)."""
        return self.model(x.to(self.dtype))

    def loss_fn(self, logits: Tensor, targets: Tensor) -> Tensor:
        """The configured loss of ``logits`` (N, C) against integer ``targets`` (N,)."""
        if self.hparams.loss == "mse":
            one_hot = F.one_hot(targets, logits.shape[1]).to(logits.dtype)
            return F.mse_loss(logits, one_hot)
        return F.cross_entropy(logits, targets)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """Return the loss of one training batch and log ``train/loss`` and ``train/acc``."""
        x, y = batch
        logits = self(x)
        loss = self.loss_fn(logits, y)
        self.train_acc(logits, y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Log ``val/loss`` and ``val/acc`` of one validation batch."""
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """Log ``test/loss`` and ``test/acc`` of one test batch."""
        self._evaluate(batch, "test", self.test_acc)

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        self.log(f"{stage}/loss", self.loss_fn(logits, y), batch_size=len(y))
        self.log(f"{stage}/acc", accuracy, prog_bar=True, batch_size=len(y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """SGD (with ``momentum``) or Adam over all parameters, with ``lr`` and ``weight_decay``."""
        hp = self.hparams
        if hp.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        return torch.optim.SGD(self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
