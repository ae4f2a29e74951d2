"""HessianSpectrumMonitor's extra quantities (issue 16, items 3–6) against exact answers."""

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
