"""HessianSpectrumMonitor's extra quantities (issue 16, items 3–6) against exact answers."""

import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from chaos_callbacks import HessianSpectrumMonitor
from tests.helpers import exact_hessian
from tests.lightning_helpers import TinyNet, random_classification, trainer


def double_loader(n: int = 32, batch_size: int = 32, seed: int = 0):
    data = random_classification(n=n, seed=seed)
    dataset = torch.utils.data.TensorDataset(data.tensors[0].double(), data.tensors[1])
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)


def flat_grad(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = nn.functional.cross_entropy(net(x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(net.parameters()))]).detach()


class ExactAtEstimates(pl.Callback):
    """Dense float64 Hessian and gradient of the (one-batch) probe loss at every estimate, and the
    monitor's logged values there. Listed before the monitor, so it sees the monitor's weights."""

    def __init__(self, monitor: HessianSpectrumMonitor, x: torch.Tensor, y: torch.Tensor) -> None:
        self.monitor, self.x, self.y = monitor, x, y
        self.exact: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.estimates: dict[int, dict[str, float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step % self.monitor.every_n_steps == 0:
            with torch.enable_grad():
                self.exact[trainer.global_step] = (exact_hessian(pl_module.net, self.x, self.y), flat_grad(pl_module.net, self.x, self.y))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor._last_step == trainer.global_step - 1:
            self.estimates[self.monitor._last_step] = dict(self.monitor.last_estimate)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_sharpness_matches_dense_hessian(seed):
    dl = double_loader(seed=seed)
    x, y = dl.dataset.tensors
    monitor = HessianSpectrumMonitor(every_n_steps=2, probe=32)
    exact = ExactAtEstimates(monitor, x, y)
    pl.seed_everything(seed, verbose=False)
    trainer(callbacks=[exact, monitor], max_steps=5, max_epochs=None).fit(TinyNet().double(), dl)
    assert set(exact.estimates) == {0, 2, 4}
    for step, est in exact.estimates.items():
        H, g = exact.exact[step]
        assert est["hessian/batch_sharpness"] == pytest.approx(float(g @ H @ g / (g @ g)), rel=1e-9)
        assert est["hessian/grad_curvature"] == pytest.approx(float((H @ g).norm() / g.norm()), rel=1e-9)


class AdamAtEstimates(ExactAtEstimates):
    """Also keeps Adam's state (second moments, step count) at every estimate, before the step."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.adam: dict[int, tuple[list[torch.Tensor], int] | None] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        opt = trainer.optimizers[0]
        states = [opt.state.get(p, {}) for p in pl_module.net.parameters()]
        self.adam[trainer.global_step] = None if not opt.state else ([s["exp_avg_sq"].clone() for s in states], int(states[0]["step"]))


def dense_preconditioned_top(H: torch.Tensor, exp_avg_sq: list[torch.Tensor], t: int, beta1=0.9, beta2=0.999, eps=1e-8) -> float:
    """``λ_max(P^{-1/2} H P^{-1/2})``, ``P = (1 − β₁^{t+1})(sqrt(v / (1 − β₂^t)) + ε)`` (Cohen et al. 2022), dense."""
    v = torch.cat([s.reshape(-1) for s in exp_avg_sq]).double()
    P = (1 - beta1 ** (t + 1)) * ((v / (1 - beta2**t)).sqrt() + eps)
    s = P.rsqrt()
    return float(torch.linalg.eigvalsh(s[:, None] * H * s[None, :])[-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_adam_preconditioned_sharpness_matches_dense(seed):
    dl = double_loader(seed=seed)
    x, y = dl.dataset.tensors
    monitor = HessianSpectrumMonitor(every_n_steps=2, probe=32, tol=1e-6, max_hvps=300)
    exact = AdamAtEstimates(monitor, x, y)
    pl.seed_everything(seed, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[exact, monitor], max_steps=7, max_epochs=None).fit(TinyNet(optimizer="adam", lr=0.01).double(), dl)
    assert not [w for w in caught if "HessianSpectrumMonitor" in str(w.message)]
    assert set(exact.estimates) == {0, 2, 4, 6}
    assert "hessian/preconditioned_lambda_max" not in exact.estimates[0]  # no preconditioner before Adam's first step
    assert "hessian/lambda_max" in exact.estimates[0] and monitor._warn.count == 0
    for step in (2, 4, 6):
        est, (H, _), (v, t) = exact.estimates[step], exact.exact[step], exact.adam[step]
        expected = dense_preconditioned_top(H, v, t)
        value, bound = est["hessian/preconditioned_lambda_max"], est["hessian/preconditioned_lambda_max_error"]
        assert abs(value - expected) <= bound + 1e-9 * expected and bound <= 1e-6 * expected
        assert est["hessian/preconditioned_sharpness_ratio"] == pytest.approx(0.01 * value * 0.1 / 3.8, rel=1e-12)
        assert est["hessian/preconditioned_sharpness_ratio_error"] == pytest.approx(0.01 * bound * 0.1 / 3.8, rel=1e-12)
        assert value > 10 * est["hessian/lambda_max"]  # P ≪ 1: the preconditioned operator is much sharper


def test_preconditioned_sharpness_only_for_adam_and_opt_out():
    dl = double_loader()
    for kwargs, model in [({}, TinyNet().double()), (dict(preconditioned=False), TinyNet(optimizer="adam", lr=0.01).double())]:
        monitor = HessianSpectrumMonitor(every_n_steps=1, probe=32, **kwargs)
        trainer(callbacks=[monitor], max_steps=3, max_epochs=None).fit(model, dl)
        assert "hessian/lambda_max" in monitor.last_estimate
        assert not any(k.startswith("hessian/preconditioned") for k in monitor.last_estimate)
