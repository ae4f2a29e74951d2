"""Tests for chaos_callbacks.recipes.module.ClassificationModule (short CPU runs on scikit-learn digits)."""

from __future__ import annotations

import re
import sys

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from chaos_callbacks.recipes.data import DigitsDataModule
from chaos_callbacks.recipes.module import ClassificationModule


def make_trainer(**options) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    return L.Trainer(**{**defaults, **options})


def digits_module(datamodule: DigitsDataModule, **options) -> ClassificationModule:
    return ClassificationModule(datamodule.num_classes, datamodule.in_shape, **options)


def test_mlp_learns_digits() -> None:
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    module = digits_module(dm, widths=[64], lr=0.1, momentum=0.9)
    trainer = make_trainer(max_epochs=4)
    trainer.fit(module, dm)
    metrics = trainer.callback_metrics
    assert metrics["val/acc"] >= 0.9
    assert {"train/loss", "train/acc", "val/loss", "val/acc"} <= set(metrics)
    test_metrics = trainer.test(module, dm, verbose=False)[0]
    assert test_metrics["test/acc"] >= 0.85 and "test/loss" in test_metrics


def test_float64_module_and_data() -> None:
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(dtype="float64", full_batch=True)
    module = digits_module(dm, activation="tanh", init="normal", dtype="float64")
    assert all(p.dtype == torch.float64 for p in module.parameters())
    trainer = make_trainer(max_steps=3, limit_val_batches=1)
    trainer.fit(module, dm)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    assert trainer.callback_metrics["train/loss"].dtype == torch.float64


def test_float64_module_accepts_float32_inputs() -> None:
    module = ClassificationModule(10, (1, 8, 8), model="lenet", dtype="float64")
    logits = module(torch.randn(4, 1, 8, 8))
    assert logits.dtype == torch.float64 and logits.shape == (4, 10)


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")
def test_training_step_returns_loss_and_mse_matches_one_hot() -> None:
    module = ClassificationModule(10, (1, 8, 8), loss="mse")
    x, y = torch.randn(5, 1, 8, 8), torch.arange(5)
    loss = module.training_step((x, y), 0)
    assert isinstance(loss, torch.Tensor) and loss.ndim == 0 and loss.requires_grad
    torch.testing.assert_close(loss, F.mse_loss(module(x), F.one_hot(y, 10).float()))


def test_mse_loss_trains() -> None:
    L.seed_everything(0, verbose=False)
    dm = DigitsDataModule(batch_size=64)
    module = digits_module(dm, loss="mse", lr=0.5, momentum=0.9)
    trainer = make_trainer(max_epochs=2)
    trainer.fit(module, dm)
    assert trainer.callback_metrics["val/acc"] >= 0.8


def test_model_options_reach_the_network() -> None:
    module = ClassificationModule(10, (1, 8, 8), model="resnet20", activation="gelu")
    assert module(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    assert any(isinstance(m, torch.nn.GELU) for m in module.model.modules())
    assert module.hparams.model == "resnet20" and module.hparams.in_shape == (1, 8, 8)


@pytest.mark.parametrize(
    "optimizer, options, expected",
    [
        ("sgd", {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}, torch.optim.SGD),
        ("adam", {"lr": 1e-3, "weight_decay": 1e-4}, torch.optim.Adam),
    ],
)
def test_configure_optimizers(optimizer: str, options: dict, expected: type) -> None:
    module = ClassificationModule(10, (1, 8, 8), optimizer=optimizer, **options)
    configured = module.configure_optimizers()
    assert isinstance(configured, expected)
    for key, value in options.items():
        assert configured.defaults[key] == value


@pytest.mark.parametrize(
    "options, message",
    [
        ({"loss": "hinge"}, "loss='hinge' is not supported; allowed: 'cross_entropy', 'mse'"),
        ({"optimizer": "rmsprop"}, "optimizer='rmsprop' is not supported; allowed: 'sgd', 'adam'"),
        ({"lr": 0.0}, "lr must be positive"),
        ({"momentum": 1.0}, "momentum must be in [0, 1)"),
        ({"optimizer": "adam", "momentum": 0.9}, "momentum only applies to optimizer='sgd'"),
        ({"weight_decay": -1.0}, "weight_decay must be >= 0"),
        ({"dtype": "bfloat16"}, "dtype='bfloat16' is not supported"),
        ({"model": "resnet18"}, "model='resnet18' is not supported"),
    ],
)
def test_invalid_arguments(options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        ClassificationModule(10, (1, 8, 8), **options)


def test_lightning_cli_builds_linked_module_and_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """The module and data module parse from plain CLI/YAML values, with the model's
    ``num_classes`` and ``in_shape`` linked from the data module."""
    monkeypatch.setattr(sys, "argv", ["chaos-train"])  # keep pytest's own arguments away
    pytest.importorskip("jsonargparse")
    from lightning.pytorch.cli import LightningCLI

    class LinkedCLI(LightningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
            parser.link_arguments("data.in_shape", "model.in_shape", apply_on="instantiate")

    args = [
        "--model.model=mlp",
        "--model.widths=[32, 16]",
        "--model.activation=tanh",
        "--model.init=normal",
        "--model.dtype=float64",
        "--data.full_batch=true",
        "--data.subset=100",
        "--data.dtype=float64",
        "--trainer.logger=false",
    ]
    cli = LinkedCLI(ClassificationModule, DigitsDataModule, run=False, args=args, save_config_callback=None)
    assert cli.model.hparams.widths == [32, 16] and cli.model.hparams.num_classes == 10
    assert tuple(cli.model.hparams.in_shape) == (1, 8, 8)
    assert cli.datamodule.full_batch and cli.datamodule.subset == 100
    assert next(cli.model.parameters()).dtype == torch.float64
