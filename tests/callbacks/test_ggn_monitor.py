"""Gauss–Newton curvature (issue 16, item 2): ``HessianSpectrumMonitor(curvature="ggn")`` against the
dense float64 ``Jᵀ H_out J`` (``tests.helpers.dense_ggn``: torch.autograd.functional.jacobian and
hessian), several seeds; PSD; GGN = Hessian for a linear model with squared error; the explicit
``output_fn``/``output_loss_fn`` split; blocks; the engine never mixing the two curvatures."""

import re
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from chaos_callbacks import ChaosSummary, HessianSpectrumMonitor
from chaos_callbacks.callbacks.curvature_lr import CurvatureLRScheduler
from chaos_callbacks.callbacks.summary import custom_scalars_layout
from tests.callbacks.test_hessian_blocks import block_index, double_loader
from tests.helpers import dense_ggn, exact_hessian
from tests.lightning_helpers import TinyNet, assert_identical_runs, fit_snapshot, loader, trainer

CE = nn.functional.cross_entropy


def mse(z, y):
    return ((z - y) ** 2).mean()


class Regression(pl.LightningModule):
    """A regression MLP (``hidden=0``: a linear model) whose ``training_step`` calls ``forward`` ``calls`` times."""

    def __init__(self, hidden: int = 8, calls: int = 1) -> None:
        super().__init__()
        self.calls = calls
        self.net = nn.Linear(5, 2) if not hidden else nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 2))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self(x)
        for _ in range(self.calls - 1):  # e.g. a consistency term on a second pass
            z = 0.5 * (z + self(x))
        return mse(z, y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def regression_loader(seed: int, n: int = 32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, generator=g, dtype=torch.float64)
    y = torch.randn(n, 2, generator=g, dtype=torch.float64)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=False)


class Exact(pl.Callback):
    """Listed before the monitors: the dense GGN (and Hessian) of the step's batch."""

    def __init__(self, loss, hessian: bool = False) -> None:
        self.loss, self.hessian, self.ggn, self.exact_hessian = loss, hessian, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        x, y = batch
        self.ggn[trainer.global_step] = dense_ggn(pl_module.net, x, y, self.loss)
        if self.hessian:
            self.exact_hessian[trainer.global_step] = exact_hessian(pl_module.net, x, y)


class Keep(pl.Callback):
    def __init__(self, *monitors) -> None:
        self.monitors, self.seen = monitors, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        self.seen[step] = {}
        for m in self.monitors:
            if getattr(m, "_last_step", None) == step:
                self.seen[step].update(m.last_estimate)


def assert_certified(est: dict, area: str, G: torch.Tensor, k: int, lambda_min: bool = True, trace: bool = True) -> None:
    evals = torch.linalg.eigvalsh(G)
    scale = float(evals.abs().max())
    assert float(evals[0]) >= -1e-12 * scale  # the exact GGN is positive semi-definite
    for i in range(1, k + 1):
        value, bound = est[f"{area}/eig_{i}"], est[f"{area}/eig_{i}_error"]
        assert abs(value - float(evals[-i])) <= bound + 1e-12 * scale, (area, i, value, float(evals[-i]), bound)
        assert bound <= 1e-6 * scale
    if lambda_min:
        low = est[f"{area}/lambda_min"] - est[f"{area}/lambda_min_error"]
        assert low - 1e-12 * scale <= float(evals[0]) <= est[f"{area}/lambda_min"] + 1e-12 * scale
        assert low >= -1e-4 * scale - 1e-12  # PSD within the certificate
    if trace:
        assert abs(est[f"{area}/trace"] - float(evals.sum())) <= 5 * est[f"{area}/trace_stderr"] + 1e-9 * scale


def ggn_monitor(**kw):
    settings = dict(every_n_steps=2, top_k=2, tol=1e-6, max_hvps=300, lambda_min=True, lambda_min_tol=1e-4,
                    lambda_min_every_n_steps=2, lambda_min_max_hvps=300, trace=True, trace_samples=400, curvature="ggn")
    return HessianSpectrumMonitor(**(settings | kw))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ggn_of_a_cross_entropy_mlp_with_blocks_matches_dense(seed):
    blocks = {"hidden": r"^net\.0\.", "output": r"^net\.2\.", "weights": r"weight$"}
    monitor = ggn_monitor(blocks=blocks, seed=seed)
    exact, keep = Exact(CE), Keep(monitor)
    pl.seed_everything(seed, verbose=False)
    model = TinyNet().double()
    trainer(callbacks=[exact, monitor, keep], max_steps=3, max_epochs=None).fit(model, double_loader(seed))
    for step in (0, 2):
        est, G = keep.seen[step], exact.ggn[step]
        assert not any(k.startswith("hessian/") for k in est)
        assert_certified(est, "ggn", G, k=2)
        for name, pattern in blocks.items():
            index = block_index(model, pattern)
            assert_certified(est, f"ggn/{name}", G[index][:, index], k=2)
        assert est["ggn/hvps"] > sum(est[f"ggn/{name}/hvps"] for name in blocks) > 0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ggn_of_a_squared_error_mlp_with_an_explicit_split(seed):
    """``training_step`` calls ``forward`` twice: the default split is undefined, the explicit one works."""
    split = dict(output_fn=lambda module, batch: 0.5 * (module(batch[0]) + module(batch[0])),
                 output_loss_fn=lambda z, batch: mse(z, batch[1]))
    monitor = ggn_monitor(**split, seed=seed)
    exact, keep = Exact(mse), Keep(monitor)
    pl.seed_everything(seed, verbose=False)
    trainer(callbacks=[exact, monitor, keep], max_steps=3, max_epochs=None).fit(Regression(calls=2).double(), regression_loader(seed))
    for step in (0, 2):
        assert_certified(keep.seen[step], "ggn", exact.ggn[step], k=2)


def test_the_landscape_of_an_explicit_split_is_the_split_loss():
    """The landscape is drawn on the loss whose curvature it shows: ``output_loss_fn`` (here 2·MSE), not
    ``training_step``'s MSE; at t = 0 it is the operator's loss, along v₁ its second difference is λ₁."""
    split = dict(output_fn=lambda module, batch: module(batch[0]), output_loss_fn=lambda z, batch: 2 * mse(z, batch[1]))
    monitor = ggn_monitor(**split, landscape=True, landscape_points=5)
    pl.seed_everything(0, verbose=False)
    model = Regression().double()
    x, y = next(iter(regression_loader(0)))
    with torch.no_grad():
        split_loss, step_loss = float(2 * mse(model(x), y)), float(model.training_step((x, y), 0))
    trainer(callbacks=[monitor], max_steps=1, max_epochs=None).fit(model, regression_loader(0))
    land = monitor.last_landscape  # drawn at step 0, on the weights before the first step
    assert land.loss0 == pytest.approx(split_loss, rel=1e-12) and step_loss == pytest.approx(split_loss / 2, rel=1e-12)
    assert float(land.line[2]) == pytest.approx(split_loss, rel=1e-12)  # t = 0: the split's loss, not training_step's


@pytest.mark.parametrize("calls", [0, 2])
def test_an_undefined_default_split_is_skipped_with_the_remedy(calls):
    """``forward`` twice in ``training_step``, or never in a ``loss_fn`` that calls the inner net."""
    loss_fn = (lambda module, batch: mse(module.net(batch[0]), batch[1])) if calls == 0 else None
    monitor = HessianSpectrumMonitor(every_n_steps=1, curvature="ggn", loss_fn=loss_fn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(callbacks=[monitor], max_steps=2, max_epochs=None)
        t.fit(Regression(calls=max(calls, 1)).double(), regression_loader(0))
    ours = [str(w.message) for w in caught if "HessianSpectrumMonitor" in str(w.message)]
    assert len(ours) == 1 and f"forward ran {calls} times" in ours[0] and "output_fn" in ours[0] and "Gauss-Newton" in ours[0]
    assert float(t.callback_metrics["ggn/skipped"]) == 2 and "hessian/skipped" not in t.callback_metrics


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ggn_equals_hessian_for_a_linear_model_with_squared_error(seed):
    """Side by side with the same prefix; both certified against the same dense matrix; the GGN monitor
    also takes the loss from ``training_step`` (forward captured on the shadow, no hook left behind)."""
    hess = HessianSpectrumMonitor(every_n_steps=1, top_k=2, tol=1e-8, max_hvps=100, prefix="p/")
    ggn = HessianSpectrumMonitor(every_n_steps=1, top_k=2, tol=1e-8, max_hvps=100, prefix="p/", curvature="ggn")
    exact, keep = Exact(mse), Keep(hess, ggn)
    pl.seed_everything(seed, verbose=False)
    model = Regression(hidden=0).double()
    summary = ChaosSummary()
    t = trainer(callbacks=[exact, hess, ggn, keep, summary], max_steps=2, max_epochs=None)
    t.fit(model, regression_loader(seed))
    assert not model._forward_hooks and not model.net._forward_hooks
    for step in (0, 1):
        est = keep.seen[step]
        assert_certified(est, "hessian", exact.ggn[step], k=2, lambda_min=False, trace=False)
        assert_certified(est, "ggn", exact.ggn[step], k=2, lambda_min=False, trace=False)
        assert est["ggn/hvps"] > 0 and est["hessian/hvps"] > 0  # no solve shared across curvatures
    rows = {r.tag: r for r in summary.rows(t)}
    assert rows["p/ggn/lambda_max"].certification == "certified" and rows["p/ggn/hvps"].certification == "exact"
    assert rows["p/ggn/sharpness_lr"].uncertainty == pytest.approx(0.05 * rows["p/ggn/lambda_max"].uncertainty, rel=1e-9)
    layout = custom_scalars_layout(t.callbacks)
    assert {"p/hessian", "p/ggn"} <= set(layout)
    assert any(re.search(spec[1][0], "p/ggn/lambda_max") for spec in layout["p/ggn"].values())
    assert not any(re.search(spec[1][0], "p/ggn/lambda_max") for spec in layout["p/hessian"].values())


def test_a_scheduler_never_reuses_a_gauss_newton_solve():
    """On a nonlinear model the two differ: the scheduler's λ is the Hessian's, computed by itself."""
    ggn = HessianSpectrumMonitor(every_n_steps=1, tol=1e-8, max_hvps=200, curvature="ggn")
    scheduler = CurvatureLRScheduler(every_n_steps=1, tol=1e-8, max_hvps=200, batch_fraction=1.0)
    exact, keep = Exact(CE, hessian=True), Keep(ggn, scheduler)
    pl.seed_everything(0, verbose=False)
    trainer(callbacks=[exact, ggn, scheduler, keep], max_steps=1, max_epochs=None).fit(TinyNet().double(), double_loader(0))
    est = keep.seen[0]
    lam_h = float(torch.linalg.eigvalsh(exact.exact_hessian[0])[-1])
    lam_g = float(torch.linalg.eigvalsh(exact.ggn[0])[-1])
    assert abs(lam_h - lam_g) > 1e-3 * lam_h
    assert est["curvature_lr/lambda"] == pytest.approx(lam_h, rel=1e-6)
    assert est["ggn/lambda_max"] == pytest.approx(lam_g, rel=1e-6)
    assert est["curvature_lr/hvps"] > 0


def test_gauss_newton_monitoring_is_harmless():
    kw = dict(max_epochs=1, accumulate_grad_batches=2)
    model_kwargs = dict(batch_norm=True, dropout=0.3, momentum=0.9)
    baseline = fit_snapshot(model_kwargs, [], **kw)
    monitor = HessianSpectrumMonitor(every_n_steps=1, probe=24, trace=True, curvature="ggn", blocks={"out": "net.4"})
    watched = fit_snapshot(model_kwargs, [monitor], **kw)
    assert "ggn/lambda_max" in monitor.last_estimate and "ggn/out/lambda_max" in monitor.last_estimate
    assert_identical_runs(baseline, watched)


def test_two_gauss_newton_monitors_with_one_prefix_are_refused():
    a, b = HessianSpectrumMonitor(curvature="ggn", every_n_steps=3), HessianSpectrumMonitor(curvature="ggn", every_n_steps=5)
    assert HessianSpectrumMonitor().state_key != HessianSpectrumMonitor(curvature="ggn").state_key
    with pytest.raises(ValueError, match="ggn/"):
        trainer(callbacks=[a, b], max_steps=1, max_epochs=None).fit(TinyNet(), loader())


def _fn(module, batch):
    return module(batch[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(curvature="gn"),
        dict(curvature="GGN"),
        dict(curvature=None),
        dict(curvature="ggn", output_fn=3, output_loss_fn=_fn),
        dict(curvature="ggn", output_fn=_fn, output_loss_fn="mse"),
        dict(curvature="ggn", output_fn=_fn),
        dict(curvature="ggn", output_loss_fn=_fn),
        dict(output_fn=_fn, output_loss_fn=_fn),  # curvature="hessian"
        dict(curvature="ggn", output_fn=_fn, output_loss_fn=_fn, loss_fn=_fn),
    ],
)
def test_invalid_gauss_newton_arguments(kwargs):
    with pytest.raises(ValueError, match="HessianSpectrumMonitor: (curvature|output_fn|output_loss_fn|pass either)"):
        HessianSpectrumMonitor(**kwargs)


def ddp_scenario(devices: int):
    """32 examples: 2 ranks × 16 or 1 process × 32 — the same global batch; GGN with a block."""
    pl.seed_everything(0, verbose=False)
    monitor = HessianSpectrumMonitor(every_n_steps=1, top_k=2, trace=True, tol=1e-6, max_hvps=200, curvature="ggn",
                                     blocks={"output": r"^net\.2\."})

    def collect(trainer, model, callbacks):
        return callbacks[0].last_estimate

    loader32 = double_loader(0, n=32)
    dl = torch.utils.data.DataLoader(loader32.dataset, batch_size=32 // devices, shuffle=False)
    return TinyNet().double(), dl, [monitor], collect, dict(max_steps=1, max_epochs=None)


@pytest.mark.ddp
def test_ddp_two_shards_equal_single_process_on_union(tmp_path):
    from tests.lightning_helpers import run_ddp

    ranks = run_ddp("tests.callbacks.test_ggn_monitor:ddp_scenario", tmp_path / "ddp", devices=2)
    (single,) = run_ddp("tests.callbacks.test_ggn_monitor:ddp_scenario", tmp_path / "single", devices=1)
    assert ranks[0] == ranks[1]
    for key in ("ggn/lambda_max", "ggn/eig_2", "ggn/grad_curvature", "ggn/trace", "ggn/output/lambda_max", "ggn/output/eig_2"):
        assert ranks[0][key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
