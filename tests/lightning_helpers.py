"""LightningModules, data and trainer helpers shared by the callback tests."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import torch
import torchmetrics
from lightning.pytorch import Callback
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def random_classification(n: int = 64, features: int = 8, classes: int = 3, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    y = (x @ w).argmax(dim=1)
    return TensorDataset(x, y)


class TinyNet(pl.LightningModule):
    """An MLP with optional BatchNorm and dropout; logs ``train_loss`` and a torchmetrics accuracy."""

    def __init__(
        self,
        features: int = 8,
        hidden: int = 16,
        classes: int = 3,
        batch_norm: bool = False,
        dropout: float = 0.0,
        lr: float = 0.1,
        momentum: float = 0.0,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        layers: list[nn.Module] = [nn.Linear(features, hidden)]
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.Tanh())
        if dropout:
            layers.append(nn.Dropout(dropout))
        layers.append(nn.Linear(hidden, classes))
        self.net = nn.Sequential(*layers)
        self.train_acc = torchmetrics.classification.MulticlassAccuracy(num_classes=classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = nn.functional.cross_entropy(logits, y)
        self.train_acc(logits, y)
        self.log("train_loss", loss, on_step=True, on_epoch=True)
        self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr, momentum=self.hparams.momentum)


class ManualTinyNet(TinyNet):
    """TinyNet with manual optimization: its ``training_step`` steps the optimizer itself."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as ``(step, metrics)``."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.rows.append((step, {k: float(v) for k, v in metrics.items()}))

    def log_hyperparams(self, *args: Any, **kwargs: Any) -> None:
        pass

    def series(self, key: str) -> dict[int | None, float]:
        """``{step: value}`` of one tag."""
        return {step: m[key] for step, m in self.rows if key in m}


def loader(dataset: TensorDataset | None = None, batch_size: int = 16, shuffle: bool = True) -> DataLoader:
    return DataLoader(dataset or random_classification(), batch_size=batch_size, shuffle=shuffle)


def trainer(**kwargs: Any) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=2,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


class Recorder(Callback):
    """Records the user's logged values and the RNG state after every training batch."""

    def __init__(self, keys: tuple[str, ...] = ("train_loss_step",)) -> None:
        self.keys = keys
        self.values: list[dict[str, float]] = []
        self.rng: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.values.append({k: float(trainer.callback_metrics[k]) for k in self.keys if k in trainer.callback_metrics})
        self.rng.append(torch.get_rng_state())


AREAS = frozenset({"hessian", "ggn", "lyapunov", "curvature_lr", "diffusion", "grad_tail", "gradient_noise"})


def ours(tag: str) -> bool:
    """A tag a chaos_callbacks callback wrote: ``[<prefix>]<area>/<quantity>``."""
    return bool(AREAS.intersection(tag.split("/")[:-1]))


def fit_snapshot(model_kwargs: dict[str, Any], callbacks: list[Callback], seed: int = 0, **trainer_kwargs: Any) -> dict[str, Any]:
    """Train a TinyNet from ``seed`` and return everything the run produced."""
    pl.seed_everything(seed, verbose=False)
    model = TinyNet(**model_kwargs)
    recorder = Recorder()
    t = trainer(callbacks=[*callbacks, recorder], **trainer_kwargs)
    t.fit(model, loader())
    return {
        "state": copy.deepcopy(model.state_dict()),
        "optimizer": copy.deepcopy(t.optimizers[0].state_dict()),
        "logged": recorder.values,
        "rng": recorder.rng,
        "epoch_metrics": {k: float(v) for k, v in t.callback_metrics.items() if not ours(k)},
        "final_rng": torch.get_rng_state(),
    }


def assert_identical_runs(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Bit-identical weights, buffers, optimizer state, RNG streams and user-logged values."""
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert torch.equal(a["state"][k], b["state"][k]), f"state {k} differs"
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for k in pa:
            assert torch.equal(torch.as_tensor(pa[k]), torch.as_tensor(pb[k])), f"optimizer state {k} differs"
    assert a["logged"] == b["logged"]
    assert a["epoch_metrics"] == b["epoch_metrics"]
    assert all(torch.equal(x, y) for x, y in zip(a["rng"], b["rng"]))
    assert torch.equal(a["final_rng"], b["final_rng"])


def run_ddp(target: str, out_dir, devices: int = 2, timeout: float = 240) -> list[dict[str, Any]]:
    """Run ``tests.ddp_runner`` for scenario ``module:function`` and return each rank's result.

    DDP tests use 2 CPU processes with the gloo backend (Lightning's default on CPU).
    """
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.ddp_runner", target, str(out_dir), str(devices)],
        cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(devices)]
