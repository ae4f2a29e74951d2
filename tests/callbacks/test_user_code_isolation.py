"""Re-running the user's code leaves the module's Python state alone; Hessian products work on
compiled modules and PyTorch's default attention, with the eager run's numbers."""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from chaos_callbacks import CurvatureLRScheduler, HessianSpectrumMonitor
from chaos_callbacks.callbacks import _plumbing as plumb
from chaos_callbacks.callbacks._shadow import shadow
from tests.lightning_helpers import TinyNet, loader, random_classification, trainer


class Counter:
    def __init__(self) -> None:
        self.calls = 0
        self.history: list[int] = []


class StatefulNet(TinyNet):
    """Keeps Python state the way people do: lists of outputs, a counter object, a generator, a dict cache."""

    def __init__(self) -> None:
        super().__init__()
        self.training_step_outputs: list[torch.Tensor] = []
        self.counter = Counter()
        self.cache: dict[str, Any] = {"seen": []}
        self.noise = torch.Generator().manual_seed(7)
        self.calls = 0
        self.last_loss = torch.zeros(())

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx) + 0 * torch.rand((), generator=self.noise)
        self.training_step_outputs.append(loss.detach())
        self.counter.calls += 1
        self.counter.history.append(batch_idx)
        self.cache["seen"].append(batch_idx)
        self.calls += 1
        self.last_loss += loss.detach()  # an in-place update of a tensor attribute
        return loss

    def on_train_epoch_end(self) -> None:
        self.log("epoch_mean", torch.stack(self.training_step_outputs).mean())
        self.training_step_outputs.clear()

    def user_state(self) -> dict[str, Any]:
        return {
            "outputs": len(self.training_step_outputs),
            "counter": (self.counter.calls, list(self.counter.history)),
            "seen": list(self.cache["seen"]),
            "noise": self.noise.get_state(),
            "calls": self.calls,
            "last_loss": float(self.last_loss),
        }


def _run(callbacks: list[pl.Callback]) -> tuple[StatefulNet, pl.Trainer]:
    pl.seed_everything(0, verbose=False)
    model = StatefulNet()
    t = trainer(callbacks=callbacks, max_epochs=2)
    t.fit(model, loader())
    return model, t


def test_rerunning_training_step_leaves_python_state_unchanged() -> None:
    plain, t_plain = _run([])
    monitored, t_monitored = _run([HessianSpectrumMonitor(every_n_steps=1, probe=16)])
    a, b = plain.user_state(), monitored.user_state()
    assert torch.equal(a.pop("noise"), b.pop("noise"))
    assert a == b
    assert float(t_monitored.callback_metrics["epoch_mean"]) == float(t_plain.callback_metrics["epoch_mean"])


def test_the_scheduler_changes_the_rate_but_not_the_users_python_state() -> None:
    plain, _ = _run([])
    scheduled, _ = _run([CurvatureLRScheduler(every_n_steps=1)])
    a, b = plain.user_state(), scheduled.user_state()
    assert torch.equal(a["noise"], b["noise"])
    assert (a["outputs"], a["counter"], a["seen"], a["calls"]) == (b["outputs"], b["counter"], b["seen"], b["calls"])


def test_shadow_shares_parameters_and_buffers_and_copies_the_rest() -> None:
    model = StatefulNet()
    model.net.append(nn.BatchNorm1d(3))
    twin = shadow(model)
    assert twin is not model and type(twin) is type(model)
    assert all(p is q for p, q in zip(twin.parameters(), model.parameters()))
    assert all(b is c for b, c in zip(twin.buffers(), model.buffers()))
    assert twin.training_step_outputs is not model.training_step_outputs
    assert twin.counter is not model.counter and twin.counter.history is not model.counter.history
    assert twin.noise is not model.noise
    assert twin.net is not model.net and twin.net[0] is not model.net[0]


def test_shadow_keeps_shared_submodules_shared() -> None:
    layer = nn.Linear(2, 2)
    model = nn.Sequential(layer, nn.Tanh(), layer)
    twin = shadow(model)
    assert twin[0] is twin[2] and twin[0] is not layer


def test_shadow_rebinds_bound_methods_to_the_shadow() -> None:
    model = StatefulNet()
    model.step_fn = model.training_step  # a bound method kept as an attribute
    twin = shadow(model)
    assert twin.step_fn.__self__ is twin


def _lambda_max_of(model: pl.LightningModule, fit_target: Any, batches: DataLoader) -> dict[str, float]:
    monitor = HessianSpectrumMonitor(every_n_steps=1, top_k=2, lambda_min=False, tol=1e-5, max_hvps=200)
    t = trainer(callbacks=[monitor], max_steps=1, max_epochs=1)
    t.fit(fit_target, batches)
    return monitor.last_estimate


@pytest.mark.parametrize("backend", ["aot_eager"])
def test_compiled_module_gives_the_eager_numbers(backend: str) -> None:
    data = loader(shuffle=False)
    torch.manual_seed(0)
    eager = TinyNet()
    compiled_model = copy.deepcopy(eager)
    expected = _lambda_max_of(eager, eager, data)
    got = _lambda_max_of(compiled_model, torch.compile(compiled_model, backend=backend), data)
    assert got["hessian/lambda_max"] == pytest.approx(expected["hessian/lambda_max"], rel=1e-5)
    assert got["hessian/eig_2"] == pytest.approx(expected["hessian/eig_2"], rel=1e-5)


class EncoderClassifier(pl.LightningModule):
    """A stock ``nn.TransformerEncoderLayer`` (default scaled-dot-product attention) on token ids."""

    def __init__(self, vocab: int = 7, width: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(width, 2, 16, dropout=0.0, batch_first=True), 1)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)).mean(dim=1))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        return nn.functional.cross_entropy(self(tokens), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_transformer_encoder_layer_eigenvalues_match_the_dense_hessian() -> None:
    g = torch.Generator().manual_seed(0)
    tokens, labels = torch.randint(0, 7, (6, 5), generator=g), torch.randint(0, 3, (6,), generator=g)
    torch.manual_seed(0)
    model = EncoderClassifier()
    reference = copy.deepcopy(model)
    got = _lambda_max_of(model, model, DataLoader(TensorDataset(tokens, labels), batch_size=6))

    # independent reference: central differences of float64 gradients (math attention kernel). torch.func's
    # forward-over-reverse Hessian of this layer is off by 2e-4 relative (a forward-mode derivative of one of
    # its kernels), so it cannot serve as the reference here.
    reference = reference.double().train()
    params = list(reference.parameters())
    flat = torch.cat([p.detach().reshape(-1) for p in params])

    def gradient_at(point: torch.Tensor) -> torch.Tensor:
        torch.nn.utils.vector_to_parameters(point, params)
        with plumb.second_order_kernels():
            loss = nn.functional.cross_entropy(reference(tokens), labels)
            return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    h = 1e-5
    columns = []
    for i in range(flat.numel()):
        step = torch.zeros_like(flat)
        step[i] = h
        columns.append((gradient_at(flat + step) - gradient_at(flat - step)) / (2 * h))
    dense = torch.stack(columns, dim=1)
    dense = (dense + dense.T) / 2
    top = torch.linalg.eigvalsh(dense).flip(0)
    assert got["hessian/lambda_max"] == pytest.approx(float(top[0]), rel=1e-4)
    assert got["hessian/eig_2"] == pytest.approx(float(top[1]), rel=1e-4)


def test_a_probe_set_leaves_a_seeded_loaders_batch_order_unchanged() -> None:
    """A loader with its own ``torch.Generator`` (shuffling and the workers' base seed draw from it): a
    probe set drawn from it at fit start must not advance it (regression: it changed every epoch's order)."""
    def run(callbacks: list[Any]) -> list[torch.Tensor]:
        pl.seed_everything(0, verbose=False)
        model, order = TinyNet(), []
        data = DataLoader(random_classification(), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))

        class Order(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                order.append(batch[1].clone())

        trainer(callbacks=[Order(), *callbacks], max_epochs=2).fit(model, data)
        return order + [p.detach().clone() for p in model.parameters()]

    plain = run([])
    probed = run([HessianSpectrumMonitor(every_n_steps=2, probe=24)])
    assert len(plain) == len(probed) and all(torch.equal(a, b) for a, b in zip(plain, probed))
