import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from chaos_callbacks import HessianSpectrumMonitor
from tests.helpers import exact_hessian
from tests.lightning_helpers import (
    ManualTinyNet,
    TinyNet,
    assert_identical_runs,
    fit_snapshot,
    loader,
    random_classification,
    run_ddp,
    trainer,
)


class Capture(pl.Callback):
    """Keeps the monitor's estimate and an exact Hessian of the same weights and probe data."""

    def __init__(self, monitor: HessianSpectrumMonitor, data) -> None:
        self.monitor, self.data, self.exact = monitor, data, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step % self.monitor.every_n_steps == 0:
            x, y = self.data if self.data is not None else batch
            # a probe set is processed in the loader's batches of 16 (batch-norm statistics per batch):
            # its Hessian is the mean of the per-batch Hessians
            H = sum(exact_hessian(pl_module.net, xc, yc) for xc, yc in zip(x.split(16), y.split(16)))
            self.exact[trainer.global_step] = torch.linalg.eigvalsh(H / len(x.split(16)))


@pytest.mark.parametrize("batch_norm", [False, True])
@pytest.mark.parametrize("probe", ["batch", 32])
def test_estimates_match_exact_hessian(batch_norm, probe):
    data = random_classification(n=64)
    # max_hvps 300: certifying the index of the top 3 and of λ_min (a deflation check from a second random
    # start each) to 1e-4 costs more than the default budget of 100 on this 195-parameter net
    monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=3, probe=probe, trace=True, trace_samples=400, tol=1e-4,
                                     lambda_min_tol=1e-4, max_hvps=300, lambda_min=True,
                                     lambda_min_every_n_steps=2, lambda_min_max_hvps=300)
    # the Capture callback runs first, so it sees the weights the monitor sees
    capture = Capture(monitor, None if probe == "batch" else (data.tensors[0][:32], data.tensors[1][:32]))
    pl.seed_everything(0, verbose=False)
    model = TinyNet(batch_norm=batch_norm).double()
    t = trainer(callbacks=[capture, monitor], max_steps=5, max_epochs=None)
    estimates = {}

    class Keep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if monitor.last_estimate and monitor._last_step == trainer.global_step:
                estimates[trainer.global_step] = dict(monitor.last_estimate)

    t.callbacks.append(Keep())
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(data.tensors[0].double(), data.tensors[1]), batch_size=16, shuffle=False)
    t.fit(model, dl)
    assert set(estimates) == {0, 2, 4}
    for step, est in estimates.items():
        evals = capture.exact[step]
        scale = float(evals.abs().max())
        for i in range(3):
            assert est[f"hessian/eig_{i + 1}"] == pytest.approx(float(evals[-1 - i]), abs=2e-4 * scale)
        assert est["hessian/lambda_max"] == est["hessian/eig_1"]
        assert est["hessian/lambda_min"] == pytest.approx(float(evals[0]), abs=2e-4 * scale)
        assert est["hessian/trace"] == pytest.approx(float(evals.sum()), abs=0.05 * float(evals.abs().sum()))
        assert est["hessian/sharpness_lr"] == pytest.approx(0.1 * est["hessian/lambda_max"])


def test_grad_curvature_and_methods_against_exact():
    data = random_classification(n=32)
    x, y = data.tensors[0].double(), data.tensors[1]
    for method, key in [("power", "hessian/lambda_dominant"), ("lyapunov", "hessian/lambda_max")]:
        pl.seed_everything(0, verbose=False)
        model = TinyNet().double()
        H = exact_hessian(model.net, x, y)
        evals = torch.linalg.eigvalsh(H)
        loss = nn.functional.cross_entropy(model.net(x), y)
        g = torch.cat([p.reshape(-1) for p in torch.autograd.grad(loss, list(model.parameters()))]).detach()
        monitor = HessianSpectrumMonitor(every_n_steps=10, method=method, tol=1e-6, max_hvps=500)
        t = trainer(callbacks=[monitor], max_steps=1, max_epochs=None)
        t.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=32))
        dominant = float(evals[evals.abs().argmax()])
        expected = dominant if method == "power" else float(evals[-1])
        assert monitor.last_estimate[key] == pytest.approx(expected, rel=1e-3)
        assert monitor.last_estimate["hessian/grad_curvature"] == pytest.approx(float((H @ g).norm() / g.norm()), rel=1e-6)


def test_bit_identical_training_with_monitor():
    model_kwargs = dict(batch_norm=True, dropout=0.3, momentum=0.9)
    kw = dict(max_epochs=2, accumulate_grad_batches=2)
    baseline = fit_snapshot(model_kwargs, [], **kw)
    monitor = HessianSpectrumMonitor(every_n_steps=1, top_k=2, probe=24, trace=True, density=True, density_steps=10)
    watched = fit_snapshot(model_kwargs, [monitor], **kw)
    assert monitor.last_estimate, "the monitor produced no estimate"
    assert_identical_runs(baseline, watched)
    # training_step-derived loss: batch-mode monitor too
    watched_batch = fit_snapshot(model_kwargs, [HessianSpectrumMonitor(every_n_steps=1)], **kw)
    assert_identical_runs(baseline, watched_batch)


def test_warm_start_uses_fewer_hvps():
    hvps = {}
    for warm in (False, True):
        monitor = HessianSpectrumMonitor(every_n_steps=1, warm_start=warm, lambda_min=False, tol=1e-3)
        seen = []

        class Keep(pl.Callback):
            def on_train_batch_end(self, *args):
                seen.append(monitor.last_estimate["hessian/hvps"])

        fit_snapshot(dict(lr=0.01), [monitor, Keep()], max_steps=8, max_epochs=None)
        hvps[warm] = sum(seen[1:]) / len(seen[1:])
    assert hvps[True] < hvps[False]


def test_logs_at_the_estimate_step_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    monitor = HessianSpectrumMonitor(every_n_steps=3, top_k=2, density=True, density_steps=20, density_probes=1, lambda_min=True,
                                     lambda_min_every_n_steps=3)
    pl.seed_everything(0, verbose=False)
    t = trainer(callbacks=[monitor], logger=logger, max_steps=7, max_epochs=None, log_every_n_steps=50)
    t.fit(TinyNet(), loader())
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 10})
    acc.Reload()
    for tag in ("hessian/lambda_max", "hessian/lambda_min", "hessian/eig_2", "hessian/sharpness_lr", "hessian/grad_curvature", "hessian/hvps"):
        assert [e.step for e in acc.Scalars(tag)] == [0, 3, 6], tag
    assert "hessian/spectral_density" in acc.Tags()["images"]
    assert "hessian/lambda_max" in t.callback_metrics


def test_nan_loss_is_skipped_with_one_warning():
    calls = []

    def bad_loss(module, batch):
        calls.append(1)
        x, y = batch
        return nn.functional.cross_entropy(module(x), y) * float("nan")

    monitor = HessianSpectrumMonitor(every_n_steps=1, loss_fn=bad_loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pl.seed_everything(0, verbose=False)
        t = trainer(callbacks=[monitor], max_steps=4, max_epochs=None)
        t.fit(TinyNet(), loader())
    assert t.global_step == 4 and len(calls) == 4
    ours = [w for w in caught if "HessianSpectrumMonitor" in str(w.message)]
    assert len(ours) == 1 and "non-finite" in str(ours[0].message)
    assert float(t.callback_metrics["hessian/skipped"]) == 4


def test_no_trainable_parameters_is_skipped():
    model = TinyNet()
    monitor = HessianSpectrumMonitor(every_n_steps=1, loss_fn=lambda m, b: nn.functional.cross_entropy(m(b[0]).detach().requires_grad_(), b[1]))
    with pytest.warns(UserWarning, match="skipped"):
        trainer(callbacks=[monitor], max_steps=2, max_epochs=None).fit(model, loader())


def test_manual_optimization_without_loss_fn_is_refused():
    with pytest.raises(ValueError, match="loss_fn"):
        trainer(callbacks=[HessianSpectrumMonitor()], max_steps=1, max_epochs=None).fit(ManualTinyNet(), loader())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(every_n_steps=0),
        dict(top_k=0),
        dict(method="arnoldi"),
        dict(method="power", top_k=2),
        dict(probe="first"),
        dict(probe=0),
        dict(tol=0.0),
        dict(max_hvps=1),
        dict(hessian_mode="test"),
        dict(trace_samples=1),
        dict(lambda_min_tol=0.0),
        dict(every_n_steps=10, density=True, density_every_n_steps=15),
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        HessianSpectrumMonitor(**kwargs)


def test_resume_continues_as_if_never_interrupted(tmp_path):
    def run(ckpt_path=None, max_epochs=4, save=False):
        pl.seed_everything(0, verbose=False)
        monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=2, probe=16)
        seen = {}

        class Keep(pl.Callback):
            def on_train_batch_end(self, trainer, *args):
                if monitor._last_step == trainer.global_step - 1:
                    seen[monitor._last_step] = dict(monitor.last_estimate)

        cbs = [monitor, Keep()]
        if save:
            cbs.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
        t = trainer(callbacks=cbs, max_epochs=max_epochs, enable_checkpointing=save)
        t.fit(TinyNet(), loader(shuffle=False), ckpt_path=ckpt_path)
        return seen, monitor

    full, _ = run(save=True)
    resumed, monitor = run(ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert min(resumed) == 8  # 4 batches/epoch, resumed after epoch 2
    for step in resumed:
        assert resumed[step] == full[step]
    assert monitor._num_estimates == len(full)


def test_two_instances_have_distinct_state_keys():
    a, b = HessianSpectrumMonitor(every_n_steps=5), HessianSpectrumMonitor(every_n_steps=7)
    assert a.state_key != b.state_key


def ddp_scenario(devices: int):
    """32 examples: 2 ranks × 16 (interleaved shards) or 1 process × 32 — the same global batch."""
    pl.seed_everything(0, verbose=False)
    model = TinyNet().double()
    data = random_classification(n=32)
    dataset = torch.utils.data.TensorDataset(data.tensors[0].double(), data.tensors[1])
    dl = torch.utils.data.DataLoader(dataset, batch_size=32 // devices, shuffle=False)
    monitor = HessianSpectrumMonitor(every_n_steps=1, top_k=2, trace=True, tol=1e-6, max_hvps=200, lambda_min=True,
                                     lambda_min_every_n_steps=1)

    def collect(trainer, model, callbacks):
        return callbacks[0].last_estimate

    return model, dl, [monitor], collect, dict(max_steps=1, max_epochs=None)


@pytest.mark.ddp
def test_ddp_two_shards_equal_single_process_on_union(tmp_path):
    ranks = run_ddp("tests.callbacks.test_hessian_spectrum:ddp_scenario", tmp_path / "ddp", devices=2)
    (single,) = run_ddp("tests.callbacks.test_hessian_spectrum:ddp_scenario", tmp_path / "single", devices=1)
    assert ranks[0] == ranks[1]  # identical on all ranks
    for key in ("hessian/lambda_max", "hessian/eig_2", "hessian/lambda_min", "hessian/grad_curvature", "hessian/trace"):
        assert ranks[0][key] == pytest.approx(single[key], rel=1e-6, abs=1e-9), key
