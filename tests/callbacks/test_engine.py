"""One curvature estimate per step and probe, shared by the monitor and the scheduler (issue 14, item 5).

Exact answers: dense float64 Hessians of the probe batch (``tests.helpers.exact_hessian``), in the
coordinates each consumer uses (``H``, ``R^{1/2} H R^{1/2}``, ``P^{-1/2} H P^{-1/2}``); the product and
forward counts are counted independently of the callbacks' own counters.
"""

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn

from chaos_callbacks import HessianSpectrumMonitor
from chaos_callbacks.callbacks.curvature_lr import CurvatureLRScheduler
from chaos_callbacks.callbacks.lyapunov_twin import LyapunovTwinRun
from chaos_callbacks.curvature import HessianOperator
from tests.helpers import exact_hessian
from tests.lightning_helpers import TinyNet, assert_identical_runs, fit_snapshot, loader, random_classification, run_ddp, trainer

FORWARDS = [0]


class CountingNet(TinyNet):
    """TinyNet counting its forward calls (a module-level counter: the shadow copies instance state)."""

    def forward(self, x):
        FORWARDS[0] += 1
        return super().forward(x)


class TwoGroups(CountingNet):
    """Two parameter groups: the hidden layer at ``lr``, the output layer at ``lr / 2``."""

    def configure_optimizers(self):
        lr = self.hparams.lr
        return torch.optim.SGD([{"params": self.net[0].parameters(), "lr": lr}, {"params": self.net[-1].parameters(), "lr": lr / 2}])


@pytest.fixture
def products(monkeypatch):
    """Counts every Hessian-vector product taken through any HessianOperator."""
    count = [0]
    matvec = HessianOperator.matvec

    def counted(self, v):
        count[0] += 1
        return matvec(self, v)

    monkeypatch.setattr(HessianOperator, "matvec", counted)
    monkeypatch.setattr(HessianOperator, "__call__", counted)
    return count


class Around(pl.Callback):
    """Listed first and last: the forwards and products taken between them at each step's batch start,
    the monitor's and the scheduler's estimates of the step, and the exact answers of the weights."""

    def __init__(self, products=None, exact=None) -> None:
        self.products, self.exact = products, exact
        self.counts: dict[int, tuple[int, int]] = {}
        self.answers: dict[int, dict[str, float]] = {}
        self.monitor: dict[int, dict[str, float]] = {}
        self.scheduler: dict[int, dict[str, float]] = {}
        self._start = (0, 0)

    def first(self):
        outer = self

        class First(pl.Callback):
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                outer._start = (FORWARDS[0], outer.products[0] if outer.products else 0)
                if outer.exact is not None:
                    outer.answers[trainer.global_step] = outer.exact(trainer, pl_module, batch)

        return First()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.counts[step] = (FORWARDS[0] - self._start[0], (self.products[0] if self.products else 0) - self._start[1])
        for cb in trainer.callbacks:
            if isinstance(cb, HessianSpectrumMonitor) and cb._last_step == step and cb.last_estimate:
                self.monitor[step] = dict(cb.last_estimate)
            if isinstance(cb, CurvatureLRScheduler) and "curvature_lr/hvps" in cb.last_estimate and cb._last_step == step:
                self.scheduler[step] = dict(cb.last_estimate)
        for cb in trainer.callbacks:
            if isinstance(cb, CurvatureLRScheduler):
                cb.last_estimate = {}


def data64(n=64, dtype=torch.float64):
    data = random_classification(n=n)
    return torch.utils.data.TensorDataset(data.tensors[0].to(dtype), data.tensors[1])


def fit(model, callbacks, around, steps, batch_size=16, **kw):
    """Train ``model`` on 64 examples in fixed batches of 16, in the model's dtype."""
    t = trainer(callbacks=[around.first(), *callbacks, around], max_steps=steps, max_epochs=None, **kw)
    dtype = next(model.parameters()).dtype
    t.fit(model, torch.utils.data.DataLoader(data64(dtype=dtype), batch_size=batch_size, shuffle=False))
    return t


def top(H: torch.Tensor) -> float:
    return float(torch.linalg.eigvalsh(H)[-1])


def hessian_of_batch(trainer, pl_module, batch):
    x, y = batch
    return {"H": exact_hessian(pl_module.net, x, y)}


# ------------------------------------------------------------------ same operator: one solve
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("order", ["monitor_first", "scheduler_first"])
def test_same_operator_shares_one_solve(products, seed, order):
    pl.seed_everything(seed, verbose=False)
    monitor = HessianSpectrumMonitor(every_n_steps=1, top_k=2, tol=1e-6, max_hvps=200)
    scheduler = CurvatureLRScheduler(scale=1.0, batch_fraction=1.0, ema=0.0, every_n_steps=1, tol=1e-4)
    around = Around(products, hessian_of_batch)
    cbs = [monitor, scheduler] if order == "monitor_first" else [scheduler, monitor]
    fit(CountingNet(lr=0.05).double(), cbs, around, steps=3)
    assert set(around.scheduler) == set(around.monitor) == {0, 1, 2}
    for step in range(3):
        est, sched = around.monitor[step], around.scheduler[step]
        assert sched["curvature_lr/lambda"] == est["hessian/lambda_max"]  # exactly: the same solve
        assert sched["curvature_lr/hvps"] == 0
        assert around.counts[step] == (1, est["hessian/hvps"])  # one forward, the monitor's products only
        exact = top(around.answers[step]["H"])
        assert abs(est["hessian/lambda_max"] - exact) <= est["hessian/lambda_max_error"] + 1e-12 * exact
        assert est["hessian/lambda_max_error"] <= 1e-6 * exact
        assert sched["curvature_lr/lr"] == pytest.approx(1 / exact, rel=1e-6)


def test_the_total_is_one_solve_of_the_monitor_alone(products):
    """At step 0 (same weights in both runs) monitor + scheduler take exactly the products of the monitor alone."""
    totals = {}
    for cbs in ("both", "monitor"):
        pl.seed_everything(0, verbose=False)
        monitor = HessianSpectrumMonitor(every_n_steps=1, tol=1e-5, max_hvps=200, probe=32)
        callbacks = [monitor] + ([CurvatureLRScheduler(scale=1.0, ema=0.0, every_n_steps=1, tol=1e-3, probe=32)] if cbs == "both" else [])
        around = Around(products)
        fit(CountingNet().double(), callbacks, around, steps=1)
        totals[cbs] = (around.counts[0], around.monitor[0])
    (forwards, total), est = totals["both"]
    assert forwards == 2  # the probe set of 32 in the loader's two batches of 16, forwarded once
    assert totals["both"] == totals["monitor"]
    assert total == est["hessian/hvps"]


def test_a_stricter_scheduler_tightens_the_shared_solve(products):
    pl.seed_everything(0, verbose=False)
    monitor = HessianSpectrumMonitor(every_n_steps=1, tol=1e-2, lambda_min=False)
    scheduler = CurvatureLRScheduler(scale=1.0, batch_fraction=1.0, ema=0.0, every_n_steps=1, tol=1e-7, max_hvps=150)
    around = Around(products, hessian_of_batch)
    fit(CountingNet().double(), [monitor, scheduler], around, steps=2)
    for step in range(2):
        est, sched = around.monitor[step], around.scheduler[step]
        exact = top(around.answers[step]["H"])
        assert sched["curvature_lr/hvps"] == 0 and sched["curvature_lr/lambda"] == est["hessian/lambda_max"]
        assert est["hessian/lambda_max_error"] <= 1e-7 * est["hessian/lambda_max"]  # solved at the scheduler's tol
        assert est["hessian/lambda_max"] == pytest.approx(exact, rel=2e-7)
    assert monitor.tol == 1e-2 and monitor.max_hvps == 150  # its own settings are back


# ------------------------------------------------------------------ different operators: one forward
def scaled_answers(trainer, pl_module, batch):
    """H and the scheduler's operator S H S with S² = R P⁻¹ (R: rate ratios, P: Adam's preconditioner;
    the optimizer's parameters are the module's, in the same order). Adam before its first step: H only."""
    x, y = batch
    H = exact_hessian(pl_module.net, x, y)
    optimizer = trainer.optimizers[0]
    adam = isinstance(optimizer, torch.optim.Adam)
    if adam and not optimizer.state:
        return {"H": H}
    top_lr = max(g["lr"] for g in optimizer.param_groups)
    s2 = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            r = torch.full((p.numel(),), group["lr"] / top_lr, dtype=torch.float64)
            if adam:
                st, (b1, b2) = optimizer.state[p], group["betas"]
                t = int(st["step"])
                r = r / ((1 - b1 ** (t + 1)) * ((st["exp_avg_sq"].double().reshape(-1) / (1 - b2**t)).sqrt() + group["eps"]))
            s2.append(r)
    S = torch.cat(s2).sqrt()
    return {"H": H, "SHS": S[:, None] * H * S[None, :]}


@pytest.mark.parametrize("case", ["param_groups", "adam"])
@pytest.mark.parametrize("seed", [0, 1])
def test_different_operators_share_the_forward(products, case, seed):
    pl.seed_everything(seed, verbose=False)
    if case == "adam":
        model = CountingNet(lr=0.01, optimizer="adam").double()
        scheduler = CurvatureLRScheduler(scale=1.0, batch_fraction=1.0, ema=0.0, every_n_steps=1, mode="edge_of_stability", tol=1e-8, max_hvps=200)
    else:
        model = TwoGroups(lr=0.1).double()
        scheduler = CurvatureLRScheduler(scale=1.0, batch_fraction=1.0, ema=0.0, every_n_steps=1, tol=1e-8, max_hvps=200)
    monitor = HessianSpectrumMonitor(every_n_steps=1, tol=1e-8, max_hvps=300, lambda_min=False)
    around = Around(products, scaled_answers)
    fit(model, [monitor, scheduler], around, steps=3)
    both = sorted(set(around.monitor) & set(around.scheduler))
    assert both == ([1, 2] if case == "adam" else [0, 1, 2])  # Adam has no preconditioner before its first step
    for step in both:
        est, sched, answer = around.monitor[step], around.scheduler[step], around.answers[step]
        assert around.counts[step] == (1, est["hessian/hvps"] + sched["curvature_lr/hvps"])  # one forward
        assert sched["curvature_lr/hvps"] > 0  # its own solve on its own operator
        assert est["hessian/lambda_max"] == pytest.approx(top(answer["H"]), rel=1e-7)
        assert sched["curvature_lr/lambda"] == pytest.approx(top(answer["SHS"]), rel=1e-7)
        assert abs(top(answer["SHS"]) - top(answer["H"])) > 1e-3 * top(answer["H"])  # truly another operator


# ------------------------------------------------------------------ no harm
NO_HARM = dict(batch_norm=True, dropout=0.3, momentum=0.9, lr=0.05)


@pytest.mark.parametrize(
    "model_kwargs, scheduler_kwargs",
    [
        (dict(NO_HARM, optimizer="adam", lr=0.01), dict(mode="edge_of_stability")),  # another operator: own solve
        (NO_HARM, dict(share=False)),  # same operator, own solve on the shared forward
        (NO_HARM, dict(min_lr=0.05, max_lr=0.05)),  # shared solve; the rate pinned
    ],
    ids=["adam", "sgd_share_false", "sgd_shared_pinned"],
)
def test_the_monitor_adds_no_harm_to_the_scheduler(model_kwargs, scheduler_kwargs):
    kw = dict(max_epochs=2, accumulate_grad_batches=2)
    alone_cb = CurvatureLRScheduler(scale=1.0, batch_fraction=1.0, ema=0.0, tol=1e-2, every_n_steps=1, **scheduler_kwargs)
    alone = fit_snapshot(model_kwargs, [alone_cb], **kw)
    both_cb = CurvatureLRScheduler(scale=1.0, batch_fraction=1.0, ema=0.0, tol=1e-2, every_n_steps=1, **scheduler_kwargs)
    monitor = HessianSpectrumMonitor(every_n_steps=1, top_k=2, trace=True, trace_samples=4)
    both = fit_snapshot(model_kwargs, [monitor, both_cb], **kw)
    assert monitor.last_estimate and both_cb._rates[0].curvature is not None
    assert_identical_runs(alone, both)
    if "min_lr" in scheduler_kwargs:  # the shared solve is the monitor's: within both certified bounds (tol 1e-2)
        assert both_cb._rates[0].curvature == pytest.approx(alone_cb._rates[0].curvature, rel=2e-2)
    else:  # its own solve, on the shared forward: bit for bit
        assert both_cb._rates[0].curvature == alone_cb._rates[0].curvature


# ------------------------------------------------------------------ failures
def test_a_failed_shared_solve_is_a_skip_for_both_each_in_its_own_area():
    # float32: Weinstein residuals floor near 1e-6·λ, so tol 1e-9 is never certified within the budget
    monitor = HessianSpectrumMonitor(every_n_steps=1, tol=1e-9, max_hvps=30, lambda_min=False)
    scheduler = CurvatureLRScheduler(scale=1.0, batch_fraction=1.0, ema=0.0, every_n_steps=1, tol=1e-9, max_hvps=30)
    pl.seed_everything(0, verbose=False)
    around = Around()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = fit(CountingNet(lr=0.05), [monitor, scheduler], around, steps=3)
        lrs = [g["lr"] for g in t.optimizers[0].param_groups]
    assert lrs == [0.05]  # held
    assert float(t.callback_metrics["hessian/skipped"]) == 3 and scheduler._warn.count == 3
    assert around.scheduler[2]["curvature_lr/hvps"] == 0 and around.scheduler[2]["curvature_lr/skipped"] == 3
    ours = [str(w.message) for w in caught]
    assert any("HessianSpectrumMonitor" in m and "did not certify" in m for m in ours)
    assert any("CurvatureLRScheduler" in m and "shared Hessian solve of HessianSpectrumMonitor failed" in m for m in ours)


def test_a_failed_forward_is_a_skip_for_every_consumer_of_it():
    calls = []

    def loss_fn(module, batch):
        calls.append(module.trainer.global_step)
        if module.trainer.global_step == 1:
            raise RuntimeError("probe loss exploded")
        x, y = batch
        return nn.functional.cross_entropy(module(x), y)

    monitor = HessianSpectrumMonitor(every_n_steps=1, loss_fn=loss_fn, lambda_min=False)
    scheduler = CurvatureLRScheduler(scale=1.0, batch_fraction=1.0, ema=0.0, every_n_steps=1, loss_fn=loss_fn)
    pl.seed_everything(0, verbose=False)
    FORWARDS[0] = 0
    with pytest.warns(UserWarning, match="probe loss exploded"):
        t = fit(CountingNet(lr=0.05), [monitor, scheduler], Around(), steps=3)
    assert t.global_step == 3
    assert float(t.callback_metrics["hessian/skipped"]) == 1 and scheduler._warn.count == 1
    assert calls == [0, 1, 2]  # one forward per step, shared; the failed one was not retried
    assert monitor._last_step == 2 and scheduler._rates[0].curvature is not None


# ------------------------------------------------------------------ resume
def test_resume_with_a_shared_solve(tmp_path):
    def run(ckpt_path=None, save=False):
        pl.seed_everything(0, verbose=False)
        monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=2, probe=16)
        scheduler = CurvatureLRScheduler(scale=1.0, every_n_steps=2, ema=0.5, probe=16, tol=1e-2)
        around = Around()
        cbs = [around.first(), monitor, scheduler, around]
        if save:
            cbs.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
        t = trainer(callbacks=cbs, max_epochs=4, enable_checkpointing=save)
        t.fit(TinyNet(lr=0.05), loader(shuffle=False), ckpt_path=ckpt_path)
        return around, t.optimizers[0].param_groups[0]["lr"]

    full, lr_full = run(save=True)
    resumed, lr_resumed = run(ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert sorted(resumed.monitor) == [8, 10, 12, 14]  # 4 batches/epoch, resumed after epoch 2
    for step in resumed.monitor:
        assert resumed.monitor[step] == full.monitor[step]
        assert resumed.scheduler[step] == full.scheduler[step]
        assert resumed.scheduler[step]["curvature_lr/hvps"] == 0  # the restored probe sets are still shared
    assert lr_resumed == lr_full


# ------------------------------------------------------------------ DDP
def ddp_scenario(devices: int):
    """32 examples: 2 ranks × 16 (interleaved shards) or 1 process × 32 — the same global batch."""
    pl.seed_everything(0, verbose=False)
    model = TinyNet(lr=0.05).double()
    dl = torch.utils.data.DataLoader(data64(32), batch_size=32 // devices, shuffle=False)
    monitor = HessianSpectrumMonitor(every_n_steps=1, top_k=2, tol=1e-6, max_hvps=200)
    scheduler = CurvatureLRScheduler(scale=1.0, batch_fraction=1.0, ema=0.0, every_n_steps=1, tol=1e-4)
    adam_like = []

    class Keep(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            adam_like.append({"lambda_max": monitor.last_estimate["hessian/lambda_max"], **scheduler.last_estimate,
                              "lr": trainer.optimizers[0].param_groups[0]["lr"]})

    def collect(trainer, model, callbacks):
        return {"steps": adam_like, "weights": [float(p.double().sum()) for p in model.parameters()]}

    return model, dl, [monitor, scheduler, Keep()], collect, dict(max_steps=3, max_epochs=None)


@pytest.mark.ddp
def test_ddp_ranks_share_and_agree(tmp_path):
    ranks = run_ddp("tests.callbacks.test_engine:ddp_scenario", tmp_path / "ddp", devices=2)
    (single,) = run_ddp("tests.callbacks.test_engine:ddp_scenario", tmp_path / "single", devices=1)
    assert ranks[0] == ranks[1]  # identical on all ranks, bit for bit
    assert len(ranks[0]["steps"]) == 3
    for shared, one in zip(ranks[0]["steps"], single["steps"]):
        assert shared["curvature_lr/lambda"] == shared["lambda_max"] and shared["curvature_lr/hvps"] == 0
        assert shared["curvature_lr/lambda"] == pytest.approx(one["curvature_lr/lambda"], rel=1e-5)
        assert shared["lr"] == pytest.approx(one["lr"], rel=1e-5)


# ------------------------------------------------------------------ the twin's products
class MemoryLogger(Logger):
    name, version = "memory", 0

    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))


def test_tangent_twin_logs_its_products(products):
    logger = MemoryLogger()
    twin = LyapunovTwinRun(mode="tangent", n_twins=2, renormalize_every=1, summary_every_n_steps=None)
    pl.seed_everything(0, verbose=False)
    t = trainer(callbacks=[twin], logger=logger, max_steps=3, max_epochs=None, accumulate_grad_batches=2)
    t.fit(TinyNet(), loader())
    hvps = {}
    for step, m in logger.metrics:
        if "lyapunov/hvps" in m:
            hvps[step] = m["lyapunov/hvps"]  # the last write of a step is its total
    assert hvps == {0: 4.0, 1: 4.0, 2: 4.0}  # 2 tangent vectors × 2 micro-batches
    assert products[0] == 12 and math.isfinite(twin.mle)


def test_different_probes_do_not_share(products):
    pl.seed_everything(0, verbose=False)
    monitor = HessianSpectrumMonitor(every_n_steps=1, lambda_min=False)
    scheduler = CurvatureLRScheduler(scale=1.0, ema=0.0, every_n_steps=1, probe=16)
    around = Around(products)
    fit(CountingNet().double(), [monitor, scheduler], around, steps=2)
    for step in range(2):
        est, sched = around.monitor[step], around.scheduler[step]
        assert around.counts[step] == (2, est["hessian/hvps"] + sched["curvature_lr/hvps"])
        assert sched["curvature_lr/hvps"] > 0
