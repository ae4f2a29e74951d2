import copy
import math
import warnings
from typing import Any

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import Logger
from torch import nn

from chaos_callbacks.callbacks.curvature_lr import CurvatureLRScheduler
from tests.helpers import exact_hessian
from tests.lightning_helpers import TinyNet, assert_identical_runs, fit_snapshot, loader, random_classification, run_ddp, trainer


class Quadratic(pl.LightningModule):
    """``L(w) = ½ Σ a_i w_i²`` (Hessian ``diag(a)``), independent of the batch.

    ``groups`` splits ``w`` into parameter groups ``{"size": n, "lr": lr}`` (one tensor each).
    """

    def __init__(self, a, w0, lr: float = 0.1, groups=None, optimizer: str = "sgd", **opt_kwargs: Any) -> None:
        super().__init__()
        self.a = torch.tensor(a, dtype=torch.float64)
        sizes = [g["size"] for g in groups] if groups else [len(a)]
        self.lrs = [g["lr"] for g in groups] if groups else [lr]
        self.ws = nn.ParameterList(nn.Parameter(c.clone()) for c in torch.tensor(w0, dtype=torch.float64).split(sizes))
        self.optimizer, self.opt_kwargs = optimizer, opt_kwargs

    def loss(self) -> torch.Tensor:
        return 0.5 * (self.a * torch.cat(list(self.ws)) ** 2).sum()

    def training_step(self, batch, batch_idx):
        return self.loss()

    def configure_optimizers(self):
        groups = [{"params": [w], "lr": lr} for w, lr in zip(self.ws, self.lrs)]
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}[self.optimizer]
        return cls(groups, **self.opt_kwargs)


class StepLog(pl.Callback):
    """The rates each optimizer step really uses, the weights it starts from, the optimizer state."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.weights: list[torch.Tensor] = []
        self.adam: list[tuple[torch.Tensor, int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights.append(torch.cat([p.detach().clone().reshape(-1) for p in pl_module.parameters()]))
        state = trainer.optimizers[0].state
        if state and "exp_avg_sq" in next(iter(state.values())):
            st = [state[p] for p in pl_module.parameters()]
            self.adam.append((torch.cat([s["exp_avg_sq"].clone() for s in st]), int(st[0]["step"])))

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.lrs.append([g["lr"] for g in optimizer.param_groups])


def Scheduler(**kwargs: Any) -> CurvatureLRScheduler:
    """The rules in their plain form (``scale=1``, no smoothing), so that rates are closed forms;
    the defaults are tested in :func:`test_the_defaults`."""
    return CurvatureLRScheduler(**{"scale": 1.0, "ema": 0.0, **kwargs})


def fit_quadratic(model: pl.LightningModule, callback: CurvatureLRScheduler, steps: int, before=()) -> StepLog:
    """Train for ``steps`` steps; the ``before`` callbacks run ahead of the scheduler."""
    log = StepLog()
    data = torch.utils.data.TensorDataset(torch.zeros(64, 1))
    t = trainer(callbacks=[log, *before, callback], max_steps=steps, max_epochs=None)
    t.fit(model, torch.utils.data.DataLoader(data, batch_size=4))
    return log


def first(lrs: list[list[float]]) -> list[float]:
    return [lr[0] for lr in lrs]


@pytest.mark.parametrize(
    "mode, kwargs, expected",
    [
        ("quasi_newton", {}, 1 / 5),  # 1/λ_max
        ("quasi_newton", dict(scale=0.5), 0.5 / 5),
        ("edge_of_stability", dict(fraction=0.8), 0.8 * 2 / 5),  # fraction · 2/λ_max
    ],
)
def test_lambda_max_rules_on_a_known_hessian(mode, kwargs, expected):
    cb = Scheduler(every_n_steps=2, mode=mode, tol=1e-8, **kwargs)
    log = fit_quadratic(Quadratic([1.0, 3.0, 5.0], [1.0, -1.0, 0.5]), cb, steps=5)
    for lr in first(log.lrs):  # the first step already uses it
        assert lr == pytest.approx(expected, rel=1e-12)
    assert cb.last_estimate["curvature_lr/lambda"] == pytest.approx(5.0, rel=1e-12)
    assert cb.last_estimate["curvature_lr/skipped"] == 0


def test_edge_of_stability_uses_the_momentum_threshold():
    cb = Scheduler(every_n_steps=1, mode="edge_of_stability", fraction=0.5, tol=1e-8)
    log = fit_quadratic(Quadratic([1.0, 4.0], [1.0, 1.0], momentum=0.9), cb, steps=2)
    assert first(log.lrs) == pytest.approx([0.5 * (2 + 2 * 0.9) / 4] * 2, rel=1e-12)


def test_dal_on_w_squared_gives_one_and_follows_the_gradient():
    # L = w² (a = 2): v = ‖Hg‖/‖g‖ = 2, η = 2/v = 1
    log = fit_quadratic(Quadratic([2.0], [0.7]), Scheduler(every_n_steps=1, mode="dal"), steps=3)
    assert first(log.lrs) == [1.0, 1.0, 1.0]
    log = fit_quadratic(Quadratic([2.0], [0.7]), Scheduler(every_n_steps=1, mode="dal", power=0.5), steps=2)
    assert first(log.lrs) == pytest.approx([2 / math.sqrt(2)] * 2, rel=1e-14)
    # anisotropic: v = ‖A²w‖/‖Aw‖ changes with w; max_lr caps the rate
    a = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    cb = Scheduler(every_n_steps=1, mode="dal", max_lr=0.45)
    log = fit_quadratic(Quadratic(a.tolist(), [1.0, -1.0, 0.5]), cb, steps=4)
    for lr, w in zip(first(log.lrs), log.weights):
        assert lr == pytest.approx(min(2 / float((a * a * w).norm() / (a * w).norm()), 0.45), rel=1e-12)
    assert max(first(log.lrs)) == 0.45 and min(first(log.lrs)) < 0.45


class SetCurvature(pl.Callback):
    """Sets the coefficients of the probe loss ``½ Σ b_i w_i²`` before each step (ahead of the scheduler)."""

    def __init__(self, schedule) -> None:
        self.schedule = schedule

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        pl_module.b = torch.tensor(self.schedule[trainer.global_step], dtype=torch.float64)


def probe_loss(module, batch):
    return 0.5 * (module.b * torch.cat(list(module.ws)) ** 2).sum()


def test_bad_curvature_holds_the_previous_rate_and_warns_once():
    schedule = [[2.0], [2.0], [-1.0], [float("nan")], [-3.0], [0.0], [4.0]]
    cb = Scheduler(every_n_steps=1, tol=1e-8, loss_fn=probe_loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = fit_quadratic(Quadratic([2.0], [0.7]), cb, steps=7, before=[SetCurvature(schedule)])
    assert first(log.lrs) == pytest.approx([0.5, 0.5, 0.5, 0.5, 0.5, 0.5, 0.25], rel=1e-14)
    assert all(math.isfinite(lr) and lr > 0 for lr in first(log.lrs))
    ours = [str(w.message) for w in caught if "CurvatureLRScheduler" in str(w.message)]
    assert len(ours) == 2 and any("non-positive" in m for m in ours) and any("non-finite" in m for m in ours)
    assert cb.last_estimate["curvature_lr/skipped"] == 4
    assert cb.last_estimate["curvature_lr/lambda"] == pytest.approx(4.0, rel=1e-14)


def test_negative_curvature_from_the_start_keeps_the_optimizers_rate():
    cb = Scheduler(every_n_steps=1, max_lr=0.05)
    with pytest.warns(UserWarning, match="non-positive curvature"):
        log = fit_quadratic(Quadratic([-1.0, -2.0], [1.0, 1.0], lr=0.1), cb, steps=3)
    assert first(log.lrs) == [0.05, 0.05, 0.05]  # the held rate, clipped to the bounds
    assert cb.last_estimate["curvature_lr/skipped"] == 3 and "curvature_lr/lambda" not in cb.last_estimate


def test_zero_gradient_holds_the_rate_in_dal_mode():
    cb = Scheduler(every_n_steps=1, mode="dal")
    with pytest.warns(UserWarning, match="zero gradient"):
        log = fit_quadratic(Quadratic([2.0], [0.0], lr=0.3), cb, steps=2)
    assert first(log.lrs) == [0.3, 0.3]


def test_warmup_ema_and_bounds():
    # curvature 2, 4, 8, 8: smoothed (ema 0.5) 2, 3, 5.5, 6.75; warm-up keeps step 0 at the own rate
    cb = Scheduler(every_n_steps=1, scale=1.0, ema=0.5, warmup_steps=1, tol=1e-8, loss_fn=probe_loss)
    schedule = [[2.0], [4.0], [8.0], [8.0]]
    log = fit_quadratic(Quadratic([2.0], [0.7], lr=0.1), cb, steps=4, before=[SetCurvature(schedule)])
    assert first(log.lrs) == pytest.approx([0.1, 1 / 3, 1 / 5.5, 1 / 6.75], rel=1e-13)
    assert cb.last_estimate["curvature_lr/lambda"] == pytest.approx(6.75, rel=1e-13)
    # the first step after warm-up uses the latest estimate even off the cadence (estimates at 0, 3)
    cb = Scheduler(every_n_steps=3, warmup_steps=2, min_lr=0.3, tol=1e-8)
    log = fit_quadratic(Quadratic([5.0], [0.7], lr=0.1), cb, steps=4)
    assert first(log.lrs) == [0.1, 0.1, 0.3, 0.3]  # 1/5 = 0.2 raised to min_lr


@pytest.mark.parametrize("early, estimated", [(True, [0, 4, 8, 16, 20]), (False, [0, 20])])
def test_early_estimates_at_powers_of_two(early, estimated):
    # curvature s + 1 at step s: the rate of step s is 1/(t + 1), t the latest estimate step
    cb = Scheduler(every_n_steps=20, scale=1.0, early_estimates=early, tol=1e-8, loss_fn=probe_loss)
    schedule = [[float(s + 1)] for s in range(23)]
    log = fit_quadratic(Quadratic([2.0], [0.7], lr=0.1), cb, steps=23, before=[SetCurvature(schedule)])
    latest = [max(t for t in estimated if t <= s) for s in range(23)]
    assert first(log.lrs) == pytest.approx([1 / (t + 1) for t in latest], rel=1e-13)


@pytest.mark.parametrize(
    "kwargs, factor",
    [(dict(momentum=0.9), 0.1), (dict(momentum=0.9, dampening=0.5), 0.2), (dict(momentum=0.8, nesterov=True), 0.2), ({}, 1.0)],
)
def test_quasi_newton_matches_the_effective_rate_of_momentum(kwargs, factor):
    # heavy ball steps η(1 − d)/(1 − β)·g on a steady gradient: η = s(1 − β)/(1 − d)/λ_max gives s/λ_max
    cb = Scheduler(every_n_steps=1, scale=2.0, tol=1e-10)
    log = fit_quadratic(Quadratic([1.0, 4.0], [1.0, 1.0], **kwargs), cb, steps=2)
    assert first(log.lrs) == pytest.approx([2.0 * factor / 4] * 2, rel=1e-12)


def test_param_groups_keep_their_ratios():
    # groups (lr 0.1, 0.05) → R = diag(1, 1/2); R^½ H R^½ = diag(4, 6/2): λ = 4, η = 1/4
    groups = [{"size": 1, "lr": 0.1}, {"size": 1, "lr": 0.05}]
    cb = Scheduler(every_n_steps=1, tol=1e-8)
    log = fit_quadratic(Quadratic([4.0, 6.0], [1.0, 1.0], groups=groups), cb, steps=2)
    for lr0, lr1 in log.lrs:
        assert lr0 == pytest.approx(0.25, rel=1e-12) and lr1 / lr0 == 0.5
    assert cb.last_estimate["curvature_lr/lr"] == log.lrs[-1][0]


def test_adam_uses_the_preconditioned_sharpness():
    a = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    beta1, beta2, eps = 0.9, 0.99, 1e-8
    cb = Scheduler(every_n_steps=1, mode="edge_of_stability", fraction=0.5, tol=1e-10)
    model = Quadratic(a.tolist(), [1.0, -1.0, 0.5], lr=0.01, optimizer="adam", betas=(beta1, beta2), eps=eps)
    log = fit_quadratic(model, cb, steps=4)
    assert log.lrs[0] == [0.01]  # no preconditioner before Adam's first step: its own rate
    for lr, (v, t) in zip(first(log.lrs[1:]), log.adam):
        P = (1 - beta1 ** (t + 1)) * ((v / (1 - beta2**t)).sqrt() + eps)
        assert lr == pytest.approx(0.5 * (2 + 2 * beta1) / (1 - beta1) / float((a / P).max()), rel=1e-9)
    assert cb.last_estimate["curvature_lr/skipped"] == 0


@pytest.mark.parametrize("mode, rule", [("quasi_newton", lambda lam: 1 / lam), ("dal", None)])
def test_adam_in_every_mode_uses_the_preconditioned_curvature(mode, rule):
    """quasi-Newton: η = 1/λ_max(P^{-1/2} H P^{-1/2}); DAL: η = 2/v with v = ‖SHS(Sg)‖/‖Sg‖, S = P^{-1/2}."""
    a = torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64)
    beta1, beta2, eps = 0.9, 0.99, 1e-8
    cb = Scheduler(every_n_steps=1, mode=mode, tol=1e-10)
    model = Quadratic(a.tolist(), [1.0, -1.0, 0.5], lr=0.01, optimizer="adam", betas=(beta1, beta2), eps=eps)
    log = fit_quadratic(model, cb, steps=4)
    assert log.lrs[0] == [0.01]
    for lr, w, (v, t) in zip(first(log.lrs[1:]), log.weights[1:], log.adam):
        P = (1 - beta1 ** (t + 1)) * ((v / (1 - beta2**t)).sqrt() + eps)
        if rule is not None:
            expected = rule(float((a / P).max()))
        else:
            sg = (a * w) / P.sqrt()  # S g in the scaled coordinates
            expected = 2 / float((a / P * sg).norm() / sg.norm())
        assert lr == pytest.approx(expected, rel=1e-9)
    assert cb.last_estimate["curvature_lr/skipped"] == 0


def test_optimizers_without_a_rule_are_refused():
    class Rms(Quadratic):
        def configure_optimizers(self):
            return torch.optim.RMSprop(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="RMSprop"):
        fit_quadratic(Rms([1.0], [1.0]), Scheduler(), steps=1)
    with pytest.raises(ValueError, match="holds two CurvatureLRSchedulers"):
        trainer(callbacks=[Scheduler(), Scheduler(mode="dal", prefix="dal/")], max_steps=1, max_epochs=None).fit(TinyNet(), loader())


class Scheduled(Quadratic):
    """The quadratic with a user's scheduler in ``configure_optimizers``."""

    def __init__(self, *args, make=None, interval="step", monitor=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.make, self.interval, self.monitor = make, interval, monitor

    def training_step(self, batch, batch_idx):
        self.log("flat", 1.0)  # never improves: a plateau scheduler reduces after its patience
        return self.loss()

    def configure_optimizers(self):
        opt = super().configure_optimizers()
        config = {"scheduler": self.make(opt), "interval": self.interval}
        if self.monitor:
            config["monitor"] = self.monitor
        return {"optimizer": opt, "lr_scheduler": config}


def _alone(model_factory, steps):
    """The user's schedule without the callback: the rate of every step."""
    log = StepLog()
    data = torch.utils.data.TensorDataset(torch.zeros(64, 1))
    trainer(callbacks=[log], max_steps=steps, max_epochs=None).fit(model_factory(), torch.utils.data.DataLoader(data, batch_size=4))
    return log.lrs


@pytest.mark.parametrize("make, interval, monitor", [
    (lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5), "step", None),
    (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10), "step", None),
    (lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.5 if t < 2 else 1.0), "step", None),
    (lambda opt: torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=0), "epoch", "flat"),
])
def test_the_users_scheduler_shapes_the_curvature_rate(make, interval, monitor):
    """η_t = (1/λ_max) · u_t / b: the user's scheduler runs on its own rates u_t (as without the callback)
    and its factor u_t/b multiplies the curvature's rate; groups keep their ratios."""
    groups = [{"size": 1, "lr": 0.1}, {"size": 1, "lr": 0.05}]  # λ_max(R^½ H R^½) = 4 (see the groups test)
    factory = lambda: Scheduled([4.0, 6.0], [1.0, 1.0], groups=groups, make=make, interval=interval, monitor=monitor)  # noqa: E731
    steps = 40  # 16 steps per epoch: the plateau scheduler reduces twice
    users = _alone(factory, steps)
    cb = Scheduler(every_n_steps=1, tol=1e-10)
    log = fit_quadratic(factory(), cb, steps=steps)
    assert len(set(u[0] for u in users)) > 1  # the user's schedule does change the rate
    for (lr0, lr1), (u0, u1) in zip(log.lrs, users):
        assert lr0 == pytest.approx(0.25 * u0 / 0.1, rel=1e-9) and lr1 == pytest.approx(0.25 * u1 / 0.1, rel=1e-9)


def test_learning_rate_monitor_shows_the_composed_rate():
    logger, monitor = MemoryLogger(), LearningRateMonitor(logging_interval="step")
    make = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)  # noqa: E731
    log = StepLog()
    data = torch.utils.data.TensorDataset(torch.zeros(64, 1))
    t = trainer(callbacks=[log, monitor, Scheduler(every_n_steps=1, tol=1e-10)], logger=logger, max_steps=6,
                max_epochs=None, log_every_n_steps=1)
    t.fit(Scheduled([4.0], [1.0], lr=0.1, make=make), torch.utils.data.DataLoader(data, batch_size=4))
    shown = {step: m for step, m in logger.metrics if any(k.startswith("lr-SGD") for k in m)}
    for step, used in enumerate(first(log.lrs)):
        assert used == pytest.approx(0.25 * 0.5 ** (step // 2), rel=1e-9)
        assert all(v == used for k, v in shown[step].items() if k.startswith("lr-SGD"))


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.metrics: list[tuple[int, dict[str, float]]] = []

    name = "memory"
    version = 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.metrics.append((step, dict(metrics)))


def test_learning_rate_monitor_logs_the_rate_each_step_uses():
    logger, monitor = MemoryLogger(), LearningRateMonitor(logging_interval="step")
    cb = Scheduler(every_n_steps=2, mode="dal", dal_estimate="plain", early_estimates=False)
    pl.seed_everything(0, verbose=False)
    log = StepLog()
    # the monitor is listed first: the scheduler moves ahead of it
    t = trainer(callbacks=[log, monitor, cb], logger=logger, max_steps=6, max_epochs=None, log_every_n_steps=1)
    t.fit(TinyNet(lr=0.05), loader())
    seen = {step: m["lr-SGD"] for step, m in logger.metrics if "lr-SGD" in m}
    ours = {step: m["curvature_lr/lr"] for step, m in logger.metrics if "curvature_lr/lr" in m}
    assert sorted(seen) == list(range(6)) and sorted(ours) == [0, 2, 4]
    assert [seen[s] for s in range(6)] == first(log.lrs)
    assert all(seen[s] == ours[s] for s in ours)
    assert len(set(first(log.lrs))) == 3 and 0.05 not in first(log.lrs)


def test_no_harm_during_warmup_and_at_the_optimizers_own_rate():
    model_kwargs = dict(batch_norm=True, dropout=0.3, momentum=0.9, lr=0.1)
    kw = dict(max_epochs=2, accumulate_grad_batches=2)
    baseline = fit_snapshot(model_kwargs, [], **kw)
    warm = Scheduler(every_n_steps=1, warmup_steps=100, ema=0.5)
    assert_identical_runs(baseline, fit_snapshot(model_kwargs, [warm], **kw))
    assert warm.last_estimate["curvature_lr/lambda"] > 0  # estimates ran during the warm-up
    # after warm-up, a rate pinned to the optimizer's own one: every step sets it, nothing else changes
    pinned = Scheduler(every_n_steps=1, min_lr=0.1, max_lr=0.1, probe=24)
    assert_identical_runs(baseline, fit_snapshot(model_kwargs, [pinned], **kw))
    assert pinned.last_estimate["curvature_lr/lr"] == 0.1 and pinned._rates[0].curvature > 0


def test_resume_gives_the_same_rates_as_an_uninterrupted_run(tmp_path):
    def run(ckpt_path=None, save=False):
        pl.seed_everything(0, verbose=False)
        cb = Scheduler(every_n_steps=3, ema=0.5, warmup_steps=2, probe=16, tol=1e-4)
        log = StepLog()
        restored = []

        class Restored(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                restored.append(cb.scheduler.last_epoch)

        cbs = [log, cb, Restored()]
        if save:
            cbs.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
        t = trainer(callbacks=cbs, max_epochs=4, enable_checkpointing=save)
        t.fit(TinyNet(lr=0.05), loader(shuffle=False), ckpt_path=ckpt_path)
        return first(log.lrs), restored[0], cb

    full, _, _ = run(save=True)
    resumed, last_epoch, cb = run(ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert last_epoch == 8  # Lightning restored the HeldLR state (one scheduler step per optimizer step)
    assert resumed == full[8:]  # bit-identical rates; 4 batches per epoch, resumed after epoch 2
    assert len(set(full)) > 3


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(every_n_steps=0),
        dict(mode="newton"),
        dict(scale=0.0),
        dict(fraction=-1.0),
        dict(power=1.5),
        dict(power=-0.1),
        dict(dal_estimate="half"),
        dict(dal_estimate=None),
        dict(dal_estimate=True),
        dict(ema=1.0),
        dict(warmup_steps=-1),
        dict(min_lr=-1e-3),
        dict(max_lr=0.0),
        dict(min_lr=0.2, max_lr=0.1),
        dict(probe="first"),
        dict(probe=0),
        dict(tol=1.0),
        dict(max_hvps=1),
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        Scheduler(**kwargs)


def test_two_instances_have_distinct_state_keys():
    assert Scheduler(mode="dal").state_key != Scheduler().state_key


def ddp_scenario(devices: int):
    """32 examples: 2 ranks × 16 (the sampler's shards) or 1 process × 32 — the same global batch, whole
    (``batch_fraction=1``: the first halves of the ranks' shards are not the first half of the union)."""
    pl.seed_everything(0, verbose=False)
    model = TinyNet(lr=0.05).double()
    data = random_classification(n=32)
    dataset = torch.utils.data.TensorDataset(data.tensors[0].double(), data.tensors[1])
    dl = torch.utils.data.DataLoader(dataset, batch_size=32 // devices, shuffle=False)
    log = StepLog()
    cb = Scheduler(every_n_steps=1, tol=1e-8, max_hvps=200, batch_fraction=1.0)

    def collect(trainer, model, callbacks):
        return {"lrs": first(callbacks[0].lrs), "lambda": callbacks[1].last_estimate["curvature_lr/lambda"]}

    return model, dl, [log, cb], collect, dict(max_steps=3, max_epochs=None)


def ddp_half_batch_scenario(devices: int):
    """The default share: each rank estimates on the first half of its own shard, the products averaged over ranks."""
    model, dl, (log, _), collect, kwargs = ddp_scenario(devices)
    return model, dl, [log, Scheduler(every_n_steps=1, tol=1e-8, max_hvps=200)], collect, kwargs


def ddp_dal_scenario(devices: int):
    """DAL from the halves: each rank splits its own shard; the half gradients are averaged over ranks."""
    model, dl, (log, _), collect, kwargs = ddp_scenario(devices)
    return model, dl, [log, Scheduler(every_n_steps=1, mode="dal")], collect, kwargs


@pytest.mark.ddp
@pytest.mark.parametrize("scenario", ["ddp_dal_scenario", "ddp_half_batch_scenario"])
def test_ddp_dal_halves_and_half_batches_give_the_same_rates_on_every_rank(tmp_path, scenario):
    ranks = run_ddp(f"tests.callbacks.test_curvature_lr:{scenario}", tmp_path / "ddp", devices=2)
    assert ranks[0] == ranks[1] and len(ranks[0]["lrs"]) == 3


@pytest.mark.ddp
def test_ddp_rates_equal_on_ranks_and_on_the_union_batch(tmp_path):
    ranks = run_ddp("tests.callbacks.test_curvature_lr:ddp_scenario", tmp_path / "ddp", devices=2)
    (single,) = run_ddp("tests.callbacks.test_curvature_lr:ddp_scenario", tmp_path / "single", devices=1)
    assert ranks[0] == ranks[1]  # identical on all ranks
    assert len(ranks[0]["lrs"]) == 3 and len(set(ranks[0]["lrs"])) == 3
    assert ranks[0]["lrs"] == pytest.approx(single["lrs"], rel=1e-9)
    assert ranks[0]["lambda"] == pytest.approx(single["lambda"], rel=1e-9)


def test_a_tiny_curvature_never_crashes_the_optimizer_step():
    """Regression (a dead LeNet): λ ≈ 1e-40 gave a rate of 1e40, beyond float32, and SGD raised
    "value cannot be converted to type float without overflow" inside the optimizer step."""
    schedule = [[2.0], [1e-40], [1e-45], [4.0]]
    cb = Scheduler(every_n_steps=1, tol=1e-8, loss_fn=probe_loss)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = fit_quadratic(Quadratic([2.0], [0.7]), cb, steps=4, before=[SetCurvature(schedule)])
    assert first(log.lrs) == pytest.approx([0.5, 0.5, 0.5, 0.25], rel=1e-14)
    assert any("no float32 step can take" in str(w.message) for w in caught)
    assert cb.last_estimate["curvature_lr/skipped"] == 2


def test_a_budget_too_small_for_a_cold_estimate_is_refused_at_fit_start():
    """Regression: tol=0.1, max_hvps=10 skipped every estimate of an MNIST run (the first, cold one never
    certifies, so no warm vectors ever come) with one warning; now a ValueError names the argument."""
    from chaos_callbacks import HessianSpectrumMonitor

    with pytest.raises(ValueError, match=r"CurvatureLRScheduler: max_hvps=10 is below the 13 products"):
        trainer(callbacks=[Scheduler(max_hvps=10)], max_steps=1, max_epochs=None).fit(TinyNet(), loader())
    with pytest.raises(ValueError, match=r"HessianSpectrumMonitor: max_hvps=20 is below the 26 products"):
        trainer(callbacks=[HessianSpectrumMonitor(top_k=2, max_hvps=20)], max_steps=1, max_epochs=None).fit(TinyNet(), loader())
    Scheduler(mode="dal", max_hvps=2)  # DAL takes one product: no cold start


class TwoOptimizers(pl.LightningModule):
    """``L(u, w) = ½ Σ a_i u_i² + ½ Σ b_j w_j²`` under manual optimization: ``u`` stepped by one optimizer,
    ``w`` by another (SGD or Adam each)."""

    def __init__(self, a, b, kinds=("sgd", "sgd")) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
        self.u = nn.Parameter(torch.ones(len(a), dtype=torch.float64))
        self.w = nn.Parameter(torch.ones(len(b), dtype=torch.float64))
        self.kinds = kinds

    def loss(self) -> torch.Tensor:
        return 0.5 * (self.a * self.u**2).sum() + 0.5 * (self.b * self.w**2).sum()

    def training_step(self, batch, batch_idx):
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(self.loss())
        for opt in opts:
            opt.step()

    def configure_optimizers(self):
        cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
        return [cls[k]([p], lr=0.01) for k, p in zip(self.kinds, (self.u, self.w))]


class RatesLog(pl.Callback):
    """Each batch's rates (after the steps) and the second optimizer's Adam state before them."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []
        self.adam: list[tuple[torch.Tensor, int] | None] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        state = trainer.optimizers[1].state.get(pl_module.w, {})
        self.adam.append((state["exp_avg_sq"].clone(), int(state["step"])) if "exp_avg_sq" in state else None)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.lrs.append([opt.param_groups[0]["lr"] for opt in trainer.optimizers])


def _fit_two(model, cb, steps=3) -> RatesLog:
    log = RatesLog()
    t = trainer(callbacks=[log, cb], max_steps=2 * steps, max_epochs=None)
    t.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(64, 1)), batch_size=4))
    return log


def test_several_optimizers_get_one_rate_each_from_their_own_block():
    # one loss for both: optimizer 0 takes 1/λ_max of its block diag(1, 3), optimizer 1 of diag(5, 2)
    cb = Scheduler(every_n_steps=1, scale=1.0, tol=1e-10, loss_fn=lambda m, batch: m.loss())
    log = _fit_two(TwoOptimizers([1.0, 3.0], [5.0, 2.0]), cb)
    assert log.lrs == [pytest.approx([1 / 3, 1 / 5], rel=1e-12)] * 3
    assert cb.last_estimate["curvature_lr/optimizer_0/lambda"] == pytest.approx(3.0, rel=1e-12)
    assert cb.last_estimate["curvature_lr/optimizer_1/lambda"] == pytest.approx(5.0, rel=1e-12)
    # one loss per optimizer: optimizer 1's rate from 4·L's block, optimizer 0's from L's
    losses = [lambda m, batch: m.loss(), lambda m, batch: 4 * m.loss()]
    cb = Scheduler(every_n_steps=1, scale=1.0, tol=1e-10, loss_fn=losses)
    log = _fit_two(TwoOptimizers([1.0, 3.0], [5.0, 2.0]), cb)
    assert log.lrs == [pytest.approx([1 / 3, 1 / 20], rel=1e-12)] * 3


def test_several_optimizers_mix_sgd_and_adam():
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    b = torch.tensor([5.0, 2.0], dtype=torch.float64)
    cb = Scheduler(every_n_steps=1, scale=1.0, tol=1e-10, loss_fn=lambda m, batch: m.loss())
    model = TwoOptimizers([1.0, 3.0], b.tolist(), kinds=("sgd", "adam"))
    log = _fit_two(model, cb, steps=4)
    assert [lrs[0] for lrs in log.lrs] == pytest.approx([1 / 3] * 4, rel=1e-12)
    assert log.lrs[0][1] == 0.01 and log.adam[0] is None  # no preconditioner before Adam's first step
    for lrs, (v, t) in zip(log.lrs[1:], log.adam[1:]):
        P = (1 - beta1 ** (t + 1)) * ((v / (1 - beta2**t)).sqrt() + eps)
        assert lrs[1] == pytest.approx(1 / float((b / P).max()), rel=1e-9)


def test_several_optimizers_refusals():
    with pytest.raises(ValueError, match="CurvatureLRScheduler: loss_fn holds 3 losses for the module's 2 optimizers"):
        _fit_two(TwoOptimizers([1.0], [2.0]), Scheduler(loss_fn=[lambda m, b: m.loss()] * 3))
    with pytest.raises(ValueError, match="CurvatureLRScheduler: the module uses manual optimization"):
        _fit_two(TwoOptimizers([1.0], [2.0]), Scheduler())
    with pytest.raises(ValueError, match=r"CurvatureLRScheduler: loss_fn must be a callable"):
        Scheduler(loss_fn=[])
    with pytest.raises(ValueError, match=r"CurvatureLRScheduler: loss_fn must be a callable"):
        Scheduler(loss_fn=[lambda m, b: 0, "nope"])


def test_several_optimizers_resume_exactly(tmp_path):
    def run(ckpt_path=None, save=False):
        cb = Scheduler(every_n_steps=4, ema=0.5, tol=1e-10, loss_fn=lambda m, batch: m.loss())
        log = RatesLog()
        cbs = [log, cb] + ([ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")] if save else [])
        t = trainer(callbacks=cbs, max_epochs=3, enable_checkpointing=save)
        data = torch.utils.data.TensorDataset(torch.zeros(16, 1))  # 4 batches = 8 optimizer steps per epoch
        t.fit(TwoOptimizers([1.0, 3.0], [5.0, 2.0], kinds=("sgd", "adam")), torch.utils.data.DataLoader(data, batch_size=4), ckpt_path=ckpt_path)
        return log.lrs

    full = run(save=True)
    assert run(ckpt_path=str(tmp_path / "epoch=0.ckpt")) == full[4:]
    assert len({lrs[1] for lrs in full}) > 3


def test_a_checkpoint_of_version_0_1_resumes():
    # 0.1 kept the one optimizer's state at the top level; curvature 1 smoothed with λ = 5 at ema 0.5 → 3
    cb = Scheduler(every_n_steps=1, scale=1.0, ema=0.5, tol=1e-10)
    cb.load_state_dict({"eta": 0.7, "curvature": 1.0, "warm_vectors": None, "probe_batches": None, "last_step": -1,
                        "num_estimates": 3, "skipped": 0})
    log = fit_quadratic(Quadratic([5.0], [0.7]), cb, steps=1)
    assert first(log.lrs) == pytest.approx([1 / 3], rel=1e-12) and cb._rates[0].num_estimates == 4


@pytest.mark.parametrize("momentum, expected", [(0.0, 3 / 5), (0.9, 0.3 / 5)])
def test_the_defaults(momentum, expected):
    # scale 3 times the momentum factor; the smoothing of a constant curvature is that curvature
    cb = CurvatureLRScheduler(tol=1e-10)
    assert (cb.scale, cb.ema, cb.early_estimates, cb.mode) == (3.0, 0.9, True, "quasi_newton")
    log = fit_quadratic(Quadratic([1.0, 5.0], [1.0, 1.0], momentum=momentum), cb, steps=3)
    assert first(log.lrs) == pytest.approx([expected] * 3, rel=1e-12)


    CurvatureLRScheduler(mode="dal", max_hvps=2)  # DAL takes one product: no cold start


# ---------------------------------------------------------------------------- DAL from two half batches
class FrozenWeights(pl.Callback):
    """Zeroes the gradients before every optimizer step: the weights never move (plain SGD), so that
    every estimate is one more draw at the same point."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.zero_()


class BatchLog(pl.Callback):
    """A copy of the network and the batch each step starts from (ahead of the scheduler)."""

    def __init__(self) -> None:
        self.nets: list[nn.Module] = []
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.nets.append(copy.deepcopy(pl_module.net))
        self.batches.append((batch[0].clone(), batch[1].clone()))


def halves_by_hand(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """``(Hg₁)·(Hg₂)`` and ``g₁·g₂`` in float64: ``H`` the dense Hessian of the whole batch's loss, ``g_i``
    the gradients of its first and second halves."""
    H = exact_hessian(net, x, y)
    params = list(net.parameters())

    def grad(xs, ys):
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(nn.functional.cross_entropy(net(xs), ys), params)])

    h = len(x) // 2
    g1, g2 = grad(x[:h], y[:h]), grad(x[h:], y[h:])
    return float((H @ g1) @ (H @ g2)), float(g1 @ g2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dal_rate_from_the_halves_equals_the_formula_by_hand(seed):
    """η = min(2/v, max_lr), v² = (Hg₁)·(Hg₂)/(g₁·g₂) on each step's batch; a cross product ≤ 0 holds the rate."""
    pl.seed_everything(seed, verbose=False)
    data = random_classification(n=96, seed=seed)
    dataset = torch.utils.data.TensorDataset(data.tensors[0].double(), data.tensors[1])
    batches, log = BatchLog(), StepLog()
    cb = Scheduler(every_n_steps=1, mode="dal", max_lr=0.8)
    trainer(callbacks=[log, batches, cb], max_steps=6, max_epochs=None).fit(TinyNet(lr=0.05).double(), loader(dataset))
    expected, skipped = 0.05, 0
    for step, (net, (x, y)) in enumerate(zip(batches.nets, batches.batches)):
        num, den = halves_by_hand(net, x, y)
        if num > 0 and den > 0:
            expected = min(2 / math.sqrt(num / den), 0.8)
        else:
            skipped += 1
        assert first(log.lrs)[step] == pytest.approx(expected, rel=1e-10)
    assert cb.last_estimate["curvature_lr/skipped"] == skipped < 6
    assert cb.last_estimate["curvature_lr/hvps"] == 2


class LinearNoise(Quadratic):
    """``L_B(w) = ½ Σ a_i (w_i − w*_i)² + mean_{x ∈ B} xᵀw``: every example has the Hessian ``diag(a)``
    and its own gradient noise ``x``; a half batch's gradient is ``a ⊙ (w − w*) + x̄_half``."""

    def __init__(self, a, w0, target=None, **kwargs) -> None:
        super().__init__(a, w0, **kwargs)
        self.target = torch.zeros(len(a), dtype=torch.float64) if target is None else torch.tensor(target, dtype=torch.float64)

    def training_step(self, batch, batch_idx):
        w = torch.cat(list(self.ws))
        return 0.5 * (self.a * (w - self.target) ** 2).sum() + (batch[0] @ w).mean()


def fit_linear_noise(model, callback, rows, batch_size, steps, frozen=True):
    log = StepLog()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(rows), batch_size=batch_size, shuffle=False)
    callbacks = [log, callback] + ([FrozenWeights()] if frozen else [])
    trainer(callbacks=callbacks, max_steps=steps, max_epochs=None).fit(model, data)
    return log


def test_dal_halves_closed_form_and_skips_on_a_non_positive_cross_product():
    """H = diag(1, 10), w = 0: g_i = x̄_i. Step 0: g₁ = (1, 1), g₂ = (1, −0.5): g₁·g₂ = 0.5 > 0 but
    (Hg₁)·(Hg₂) = −49 (held); step 1: g₂ = (−1, 0.5): g₁·g₂ = −0.5 (held); step 2: g₁ = (1, 2), g₂ = (2, 1):
    v² = (1·2 + 20·10)/(2 + 2) = 50.5."""
    halves = [([1.0, 1.0], [1.0, -0.5]), ([1.0, 1.0], [-1.0, 0.5]), ([1.0, 2.0], [2.0, 1.0])]
    rows = torch.tensor([r for g1, g2 in halves for r in (g1, g1, g2, g2)], dtype=torch.float64)
    cb = Scheduler(every_n_steps=1, mode="dal")
    with pytest.warns(UserWarning, match="noise-dominated"):
        log = fit_linear_noise(LinearNoise([1.0, 10.0], [0.0, 0.0], lr=0.1), cb, rows, batch_size=4, steps=3)
    assert first(log.lrs) == pytest.approx([0.1, 0.1, 2 / math.sqrt(50.5)], rel=1e-13)
    assert cb.last_estimate["curvature_lr/skipped"] == 2


def test_dal_auto_is_halves_on_the_batch_and_plain_on_a_probe_set():
    assert CurvatureLRScheduler(mode="dal")._dal_halves
    assert not CurvatureLRScheduler(mode="dal", probe=64)._dal_halves
    assert CurvatureLRScheduler(mode="dal", probe=64, dal_estimate="halves")._dal_halves
    assert not CurvatureLRScheduler(mode="dal", dal_estimate="plain")._dal_halves


def noisy_quadratic(seed: int, dims: int = 1000, batch: int = 32, steps: int = 100, sigma: float = 0.6):
    """``a = (1, 0.3, 0.01, …)`` (``dims`` flat directions), ``w − w* = (1, 1, 0, …)``: ``v = ‖Hḡ‖/‖ḡ‖ ≈ 0.96``,
    so DAL's rate ``2/v ≈ 2.08``; isotropic per-example gradient noise of sd ``sigma``, i.e. mostly in the
    flat directions, where its curvature 0.01 pulls the plain ``‖Hg‖/‖g‖`` down to ≈ 0.3 (rate ≈ 6.6)."""
    a = [1.0, 0.3] + [0.01] * dims
    w0 = [1.0, 1.0] + [0.0] * dims
    rows = sigma * torch.randn(batch * steps, len(a), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return LinearNoise(a, w0, lr=0.1), rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dal_on_noisy_batches_no_longer_sits_at_max_lr(seed):
    """At fixed weights (100 fresh batches), the plain estimate puts the rate at max_lr = 4 nearly always,
    the halves almost never. In training, the plain rate's steps at the bound (ηλ = 4 on the stiff
    direction) blow the expected loss ``½ Σ a_i (w_i − w*_i)²`` up; DAL's own rate 2/v (v < λ_max) lets it
    grow far less."""
    fractions, growth = {}, {}
    for estimate in ("plain", "halves"):
        model, rows = noisy_quadratic(seed)
        cb = Scheduler(every_n_steps=1, mode="dal", max_lr=4.0, dal_estimate=estimate)
        log = fit_linear_noise(model, cb, rows, batch_size=32, steps=100)
        fractions[estimate] = sum(lr == 4.0 for lr in first(log.lrs)) / 100
        model, rows = noisy_quadratic(seed)
        cb = Scheduler(every_n_steps=1, mode="dal", max_lr=4.0, dal_estimate=estimate)
        log = fit_linear_noise(model, cb, rows, batch_size=32, steps=100, frozen=False)
        losses = [0.5 * float((model.a * w**2).sum()) for w in log.weights]  # w* = 0
        growth[estimate] = max(losses) / losses[0]
    assert fractions["plain"] >= 0.9 and fractions["halves"] <= 0.1
    assert growth["plain"] > 10 * growth["halves"]


def test_adam_takes_no_early_estimates():
    # Adam's preconditioned sharpness of its first steps measures P, not the landscape: the first estimate
    # is the first multiple of every_n_steps (step 0 has no preconditioner), the rate held before it
    cb = Scheduler(every_n_steps=6, tol=1e-10)
    model = Quadratic([1.0, 3.0, 5.0], [1.0, -1.0, 0.5], lr=0.01, optimizer="adam")
    log = fit_quadratic(model, cb, steps=8)
    assert first(log.lrs)[:6] == [0.01] * 6 and first(log.lrs)[6] != 0.01 and cb._rates[0].num_estimates == 1


# ---------------------------------------------------------------------------- a share of the step's batch
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("fraction, examples", [(None, 6), (0.25, 3), (1.0, 11)])
def test_the_curvature_is_that_of_the_first_share_of_the_batch(seed, fraction, examples):
    """λ_max of the dense float64 Hessian of the first ⌈f · 11⌉ examples of each step's batch of 11 (default
    f = ½), and the rate 1/λ_max (scale 1, no smoothing)."""
    pl.seed_everything(seed, verbose=False)
    data = random_classification(n=44, seed=seed)
    dataset = torch.utils.data.TensorDataset(data.tensors[0].double(), data.tensors[1])
    batches, log = BatchLog(), StepLog()
    cb = Scheduler(every_n_steps=1, batch_fraction=fraction, tol=1e-9, max_hvps=200)
    lambdas: list[float] = []
    after = pl.Callback()
    after.on_train_batch_start = lambda *args: lambdas.append(cb.last_estimate["curvature_lr/lambda"])
    t = trainer(callbacks=[log, batches, cb, after], max_steps=4, max_epochs=None)
    t.fit(TinyNet(lr=0.05).double(), torch.utils.data.DataLoader(dataset, batch_size=11))
    for step, (net, (x, y)) in enumerate(zip(batches.nets, batches.batches)):
        exact = float(torch.linalg.eigvalsh(exact_hessian(net, x[:examples], y[:examples]))[-1])
        assert lambdas[step] == pytest.approx(exact, rel=1e-8)
        assert first(log.lrs)[step] == pytest.approx(1 / exact, rel=1e-8)


def test_batch_fraction_is_refused_with_a_fixed_probe_set_and_out_of_range():
    with pytest.raises(ValueError, match=r"CurvatureLRScheduler: batch_fraction takes a share of the step's batch"):
        CurvatureLRScheduler(probe=64, batch_fraction=0.5)
    for bad in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError, match="CurvatureLRScheduler.*batch_fraction"):
            CurvatureLRScheduler(batch_fraction=bad)
    assert CurvatureLRScheduler()._batch_share == 0.5
    assert CurvatureLRScheduler(mode="dal")._batch_share == 1.0  # DAL splits the whole batch into its halves
    assert CurvatureLRScheduler(probe=64)._batch_share == 1.0


def test_a_batch_whose_tensors_disagree_on_dimension_0_is_used_whole():
    from chaos_callbacks.callbacks._plumbing import batch_head

    x, y = torch.arange(10.0).reshape(5, 2), torch.arange(5)
    head = batch_head({"x": x, "y": y, "scale": torch.tensor(2.0)}, 0.5)
    assert torch.equal(head["x"], x[:3]) and torch.equal(head["y"], y[:3]) and float(head["scale"]) == 2.0
    mixed = (x, torch.arange(7))
    assert batch_head(mixed, 0.5) is mixed
    assert batch_head((x, y), 1.0)[0] is x
    assert torch.equal(batch_head((x, y), 0.01)[0], x[:1])  # at least one example
