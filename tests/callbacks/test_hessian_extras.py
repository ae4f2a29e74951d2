"""HessianSpectrumMonitor's extra quantities (issue 16, items 3–6) against exact answers."""

import re
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


# ---------------------------------------------------------------------- split="val"
class ValNet(TinyNet):
    """TinyNet with a validation step (so that Lightning sets up the validation loader)."""

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))


class ExactOfProbe(pl.Callback):
    """Eigenvalues of the dense Hessian of the loss of ``(x, y)`` at each estimate of ``monitor``."""

    def __init__(self, monitor: HessianSpectrumMonitor, x: torch.Tensor, y: torch.Tensor) -> None:
        self.monitor, self.x, self.y, self.exact, self.estimates = monitor, x, y, {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step % self.monitor.every_n_steps == 0:
            with torch.enable_grad():
                self.exact[trainer.global_step] = torch.linalg.eigvalsh(exact_hessian(pl_module.net, self.x, self.y))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.monitor._last_step == trainer.global_step - 1:
            self.estimates[self.monitor._last_step] = dict(self.monitor.last_estimate)


@pytest.mark.parametrize("seed", [0, 1])
def test_val_and_train_monitors_side_by_side_match_their_dense_hessians(seed, tmp_path):
    from chaos_callbacks import ChaosSummary
    from chaos_callbacks.callbacks.summary import custom_scalars_layout

    train_dl, val_dl = double_loader(seed=seed), double_loader(seed=seed + 10)
    kw = dict(every_n_steps=2, probe=32, top_k=2, tol=1e-6, max_hvps=300)
    train_monitor, val_monitor = HessianSpectrumMonitor(**kw), HessianSpectrumMonitor(split="val", **kw)
    checks = [ExactOfProbe(train_monitor, *train_dl.dataset.tensors), ExactOfProbe(val_monitor, *val_dl.dataset.tensors)]
    pl.seed_everything(seed, verbose=False)
    t = trainer(callbacks=[*checks, train_monitor, val_monitor], max_steps=5, max_epochs=None, num_sanity_val_steps=0)
    t.fit(ValNet().double(), train_dl, val_dl)
    for check in checks:
        assert set(check.estimates) == {0, 2, 4}
        for step, est in check.estimates.items():
            evals = check.exact[step]
            assert est["hessian/eig_1"] == pytest.approx(float(evals[-1]), rel=2e-6)
            assert est["hessian/eig_2"] == pytest.approx(float(evals[-2]), abs=2e-6 * float(evals[-1]))
    assert checks[0].estimates[4]["hessian/lambda_max"] != checks[1].estimates[4]["hessian/lambda_max"]  # two probes, not one
    assert torch.equal(val_monitor._probe_batches[0][0], val_dl.dataset.tensors[0])
    assert t.callback_metrics["val/hessian/lambda_max"] == pytest.approx(checks[1].estimates[4]["hessian/lambda_max"])
    assert t.callback_metrics["hessian/lambda_max"] == pytest.approx(checks[0].estimates[4]["hessian/lambda_max"])
    layout = custom_scalars_layout(t.callbacks)
    assert {"hessian", "val/hessian"} <= set(layout)
    assert all(spec[1][0].startswith("^val/hessian/") for spec in layout["val/hessian"].values())
    assert not any(re.search(spec[1][0], "val/hessian/lambda_max") for spec in layout["hessian"].values())
    rows = {r.tag: r for r in ChaosSummary().rows(t, t.lightning_module)}
    assert rows["val/hessian/lambda_max"].certification == "certified"
    assert rows["val/hessian/batch_sharpness"].certification == "exact"


def test_two_val_monitors_with_one_prefix_are_refused_and_no_val_loader_is_refused():
    kw = dict(every_n_steps=1, probe=16, split="val")
    with pytest.raises(ValueError, match="val/hessian"):
        trainer(callbacks=[HessianSpectrumMonitor(**kw), HessianSpectrumMonitor(top_k=2, **kw)], max_steps=1,
                max_epochs=None).fit(ValNet(), double_loader(), double_loader())
    with pytest.raises(ValueError, match="HessianSpectrumMonitor: split='val'"):
        trainer(callbacks=[HessianSpectrumMonitor(**kw)], max_steps=1, max_epochs=None).fit(ValNet(), double_loader())


@pytest.mark.parametrize("kwargs", [dict(split="test"), dict(split=None), dict(split=1), dict(split="val"), dict(split="val", probe="batch"),
                                    dict(preconditioned=None), dict(preconditioned=1)])
def test_invalid_extra_arguments(kwargs):
    with pytest.raises(ValueError, match="HessianSpectrumMonitor"):
        HessianSpectrumMonitor(**kwargs)


def test_resume_keeps_the_val_probe(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(val_seed, ckpt_path=None, save=False):
        pl.seed_everything(0, verbose=False)
        monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=2, probe=24, split="val")
        check = ExactOfProbe(monitor, *double_loader(n=24, seed=7).dataset.tensors)
        cbs = [check, monitor]
        if save:
            cbs.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
        val = double_loader(n=24, batch_size=8, seed=val_seed)
        t = trainer(callbacks=cbs, max_epochs=4, enable_checkpointing=save, num_sanity_val_steps=0)
        t.fit(ValNet().double(), double_loader(n=64, batch_size=16), val, ckpt_path=ckpt_path)
        return check, monitor

    full, _ = run(7, save=True)
    # resumed with another validation set: the probe drawn at the first fit start is kept
    resumed, monitor = run(8, ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert min(resumed.estimates) == 8 and len(monitor._probe_batches) == 3  # 24 examples in the val loader's batches of 8
    assert torch.equal(torch.cat([b[0] for b in monitor._probe_batches]), double_loader(n=24, seed=7).dataset.tensors[0])
    for step, est in resumed.estimates.items():
        assert est == full.estimates[step]
        assert est["hessian/lambda_max"] == pytest.approx(float(resumed.exact[step][-1]), rel=1e-2)


# ---------------------------------------------------------------------- landscape=True
@pytest.mark.parametrize("seed", [0, 1])
def test_landscape_second_differences_match_the_ritz_values(seed, tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dl = double_loader(seed=seed)
    monitor = HessianSpectrumMonitor(every_n_steps=2, probe=32, top_k=2, tol=1e-6, max_hvps=300, landscape=True,
                                     landscape_every_n_steps=4, landscape_points=3, landscape_radius=1e-3)
    exact = ExactAtEstimates(monitor, *dl.dataset.tensors)
    seen = {}

    class Keep(pl.Callback):
        def on_train_batch_end(self, trainer, *args):
            seen[trainer.global_step - 1] = monitor.last_landscape

    pl.seed_everything(seed, verbose=False)
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    trainer(callbacks=[exact, monitor, Keep()], logger=logger, max_steps=5, max_epochs=None).fit(TinyNet().double(), dl)
    assert seen[0] is not None and seen[1] is seen[0] and seen[4] is not seen[0]  # at steps 0 and 4 only
    for step in (0, 4):
        land, est = seen[step], exact.estimates[step]
        H, g = exact.exact[step]
        loss0 = land.loss0
        assert land.line[1] == loss0 and land.plane[1, 1] == loss0  # θ itself: the probe loss, restored weights
        h, k = float(land.t[2]), float(land.s[2])
        assert float(land.line[0] - 2 * land.line[1] + land.line[2]) / h**2 == pytest.approx(est["hessian/eig_1"], rel=1e-4)
        assert float(land.plane[1, 0] - 2 * land.plane[1, 1] + land.plane[1, 2]) / k**2 == pytest.approx(est["hessian/eig_2"], rel=1e-4)
        assert land.eigenvalues == [est["hessian/eig_1"], est["hessian/eig_2"]]
        evals, evecs = torch.linalg.eigh(H)  # the model's slopes are g·v (v up to sign)
        for j, slope in enumerate(land.slopes):
            assert abs(slope) == pytest.approx(abs(float(evecs[:, -1 - j] @ g)), rel=1e-4, abs=1e-8)
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 10})
    acc.Reload()
    assert [e.step for e in acc.Images("hessian/landscape")] == [0, 4]


def test_bit_identical_training_with_landscape(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger

    from tests.lightning_helpers import assert_identical_runs, fit_snapshot

    model_kwargs = dict(batch_norm=True, dropout=0.3, momentum=0.9)
    kw = dict(max_epochs=2, accumulate_grad_batches=2)
    baseline = fit_snapshot(model_kwargs, [], logger=TensorBoardLogger(tmp_path, name="a"), **kw)
    for probe in ("batch", 24):
        monitor = HessianSpectrumMonitor(every_n_steps=1, top_k=2, probe=probe, landscape=True, landscape_points=5)
        watched = fit_snapshot(model_kwargs, [monitor], logger=TensorBoardLogger(tmp_path, name=f"b{probe}"), **kw)
        assert monitor.last_landscape is not None and monitor.last_landscape.plane.shape == (5, 5)
        assert_identical_runs(baseline, watched)


@pytest.mark.parametrize("kwargs", [dict(landscape=1), dict(landscape_points=4), dict(landscape_points=1), dict(landscape_points=5.0),
                                    dict(landscape_radius=0.0), dict(landscape_radius=float("inf")),
                                    dict(every_n_steps=2, landscape_every_n_steps=3)])
def test_invalid_landscape_arguments(kwargs):
    with pytest.raises(ValueError, match="HessianSpectrumMonitor: landscape"):
        HessianSpectrumMonitor(**kwargs)


def test_resume_with_adam_continues_the_preconditioned_solve(tmp_path):
    """The preconditioned solve's warm vector is checkpointed: a resumed run logs what an uninterrupted one does."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None, save=False):
        pl.seed_everything(0, verbose=False)
        monitor = HessianSpectrumMonitor(every_n_steps=2, probe=16)
        seen = {}

        class Keep(pl.Callback):
            def on_train_batch_end(self, trainer, *args):
                if monitor._last_step == trainer.global_step - 1:
                    seen[monitor._last_step] = dict(monitor.last_estimate)

        cbs = [monitor, Keep()]
        if save:
            cbs.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
        t = trainer(callbacks=cbs, max_epochs=3, enable_checkpointing=save)
        t.fit(TinyNet(optimizer="adam", lr=0.01).double(), double_loader(n=64, batch_size=16), ckpt_path=ckpt_path)
        return seen

    full = run(save=True)
    resumed = run(ckpt_path=str(tmp_path / "epoch=0.ckpt"))
    assert min(resumed) == 4 and "hessian/preconditioned_lambda_max" in resumed[4]
    for step in resumed:
        assert resumed[step] == full[step]


def ddp_scenario(devices: int):
    """Adam, a validation probe and a landscape: 2 ranks × 16 validation examples or 1 process × 32."""
    pl.seed_everything(0, verbose=False)
    train, val = double_loader(n=32, batch_size=32 // devices), double_loader(n=32, batch_size=32 // devices, seed=5)

    class WithVal(ValNet):
        def val_dataloader(self):
            return val

    model = WithVal(optimizer="adam", lr=0.01).double()
    monitor = HessianSpectrumMonitor(every_n_steps=1, top_k=2, probe=32 // devices, split="val", tol=1e-6, max_hvps=300,
                                     landscape=True, landscape_points=3)

    def collect(trainer, model, callbacks):
        land = callbacks[0].last_landscape
        return {**callbacks[0].last_estimate, "line": land.line.tolist(), "plane": land.plane.flatten().tolist()}

    return model, train, [monitor], collect, dict(max_steps=2, max_epochs=None, num_sanity_val_steps=0)


@pytest.mark.ddp
def test_ddp_two_shards_equal_single_process_on_union(tmp_path):
    from tests.lightning_helpers import run_ddp

    ranks = run_ddp("tests.callbacks.test_hessian_extras:ddp_scenario", tmp_path / "ddp", devices=2)
    (single,) = run_ddp("tests.callbacks.test_hessian_extras:ddp_scenario", tmp_path / "single", devices=1)
    assert ranks[0] == ranks[1]
    for key in ("hessian/lambda_max", "hessian/eig_2", "hessian/batch_sharpness", "hessian/preconditioned_lambda_max"):
        assert ranks[0][key] == pytest.approx(single[key], rel=1e-6), key
    assert ranks[0]["line"] == pytest.approx(single["line"], rel=1e-9)
    assert ranks[0]["plane"] == pytest.approx(single["plane"], rel=1e-9)
