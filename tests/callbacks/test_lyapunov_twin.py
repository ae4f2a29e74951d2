"""LyapunovTwinRun against closed forms (linear GD maps, the chaotic double well), an independent twin run,
bit-identical main runs, DDP, resume and failure handling."""

import json
import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from chaos_callbacks.callbacks.lyapunov_twin import LyapunovTwinRun
from chaos_callbacks.dynamics.lyapunov import default_epsilon, parameter_norm, random_perturbation
from chaos_callbacks.plotting.lyapunov import log_distance_figure
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


class Keep(pl.Callback):
    """Records the callback's metrics after every optimizer step (attach after the callback)."""

    def __init__(self, callback: LyapunovTwinRun) -> None:
        self.callback, self.seen = callback, {}

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.callback.last_metrics and trainer.global_step not in self.seen:
            self.seen[trainer.global_step] = dict(self.callback.last_metrics)


def fit(model, data, callbacks, **kwargs):
    t = trainer(callbacks=callbacks, **kwargs)
    t.fit(model, data)
    return t


def double_data() -> TensorDataset:
    x, y = random_classification().tensors
    return TensorDataset(x.double(), y)


# --------------------------------------------------------------------------- full-batch GD on least squares

SCALES = torch.tensor([4.0, 2.0, 1.0], dtype=torch.float64)
LAMBDAS = SCALES**2 / 2  # MSE over 4 rows of X = [diag(SCALES); 0]: H = (2/4) XᵀX = diag(8, 2, 0.5)
W_STAR = torch.tensor([0.5, 0.25, -1.0], dtype=torch.float64)


class LeastSquares(pl.LightningModule):
    """mean((Xw − y)²) with a minimiser w* where the residual is exactly zero in floating point."""

    def __init__(self, lr: float, w0: torch.Tensor, step_lr: int | None = None) -> None:
        super().__init__()
        self.lr, self.step_lr = lr, step_lr
        self.linear = nn.Linear(3, 1, bias=False).to(w0.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(w0.reshape(1, 3))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self.linear(x), y)

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr)
        if self.step_lr is None:
            return opt
        scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=self.step_lr, gamma=0.5)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


def least_squares_data(dtype) -> DataLoader:
    x = torch.zeros(4, 3, dtype=dtype)
    x[0, 0], x[1, 1], x[2, 2] = SCALES.to(dtype)
    return DataLoader(TensorDataset(x, (x @ W_STAR.to(dtype)).reshape(4, 1)), batch_size=4)


def linear_map_exponent(lrs, seed: int, dtype) -> float:
    """(1/T) ln ‖Π_t (I − η_t H) u‖/‖u‖ for the callback's first perturbation direction u (exact, float64)."""
    (u,) = random_perturbation([torch.zeros(1, 3, dtype=dtype)], 1.0, "l2", torch.Generator().manual_seed(seed))
    v = u.reshape(3).double()
    for lr in lrs:
        v = (1 - lr * LAMBDAS) * v
    return math.log(float(v.norm() / u.double().norm())) / len(lrs)


# float32 twin: rounding the weights (|w| ~ 1) moves a separation of ε = 1e-4 by ~u/ε = 6e-4 per interval of 10 steps
TOLERANCE = {("twin", torch.float64): 1e-8, ("twin", torch.float32): 2e-4, ("tangent", torch.float64): 1e-13, ("tangent", torch.float32): 1e-7}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["twin", "tangent"])
@pytest.mark.parametrize("lr,steps,offset", [(0.1, 100, 1.0), (0.3, 50, 0.0), (0.3, 70, 1.0)])
def test_least_squares_exponent_is_max_log_one_minus_lr_lambda(lr, steps, offset, mode, dtype):
    """GD on a quadratic is linear: separations evolve by I − ηH and λ_max = max_i ln|1 − ηλ_i|.

    η = 0.1: factors (0.2, 0.8, 0.95), stable, from w* + (1, −1, ½) (the main run converges);
    η = 0.3: factors (−1.4, 0.4, 0.85), unstable, from w* (where the gradient is exactly zero), or from
    w* + (1, −1, ½), where the main run diverges to ‖w‖ ≈ 1.7e10: an absolute ε would be erased by
    rounding the weights (float64 spacing 2e-6 at 1e10), the default ε follows their norm.
    """
    w0 = W_STAR + offset * torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    callback = LyapunovTwinRun(mode=mode, renormalize_every=10, seed=3)
    keep = Keep(callback)
    model = LeastSquares(lr, w0.to(dtype))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, least_squares_data(dtype), [callback, keep], max_steps=steps, max_epochs=None)
    assert not [w for w in caught if "LyapunovTwinRun" in str(w.message)]
    if steps == 70:
        assert float(model.linear.weight.norm()) > 1e10
    tol = TOLERANCE[mode, dtype]
    assert sorted(s for s, m in keep.seen.items() if "lyapunov/ftle" in m) == list(range(10, steps + 1, 10))
    # Benettin telescopes: the running MLE is the growth of the first direction over all steps
    assert callback.mle == pytest.approx(linear_map_exponent([lr] * steps, 3, dtype), abs=tol)
    assert keep.seen[steps]["lyapunov/mle"] == callback.mle
    # the last interval's direction is aligned with the top eigenvector
    top = float(torch.log((1 - lr * LAMBDAS).abs()).max())
    assert keep.seen[steps]["lyapunov/ftle"] == pytest.approx(top, abs=tol)


@pytest.mark.parametrize("mode", ["twin", "tangent"])
def test_learning_rate_changes_are_mirrored(mode):
    """StepLR halves η every 10 steps (0.3, 0.15, 0.075) and, from step 25, a callback listed after this one
    sets η = 0.05 just before each step: the exponent is that of Π_t (I − η_t H) with the η_t used."""

    class SetLR(pl.Callback):  # e.g. a curvature-driven learning rate
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step >= 25:
                optimizer.param_groups[0]["lr"] = 0.05

    lrs, twin_lrs = [], []

    class Record(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            lrs.append(optimizer.param_groups[0]["lr"])

        def on_train_batch_end(self, *args):
            if mode == "twin":
                twin_lrs.append(callback._twins[0].optimizer.param_groups[0]["lr"])

    callback = LyapunovTwinRun(mode=mode, renormalize_every=5, seed=1)
    model = LeastSquares(0.3, W_STAR, step_lr=10)
    fit(model, least_squares_data(torch.float64), [callback, SetLR(), Record()], max_steps=30, max_epochs=None)
    assert lrs == [0.3] * 10 + [0.15] * 10 + [0.075] * 5 + [0.05] * 5
    # twin: after the unstable phase the separation lies along λ = 8, which η = 0.15 contracts by 0.2⁵ per
    # interval, to d ~ 3e-12 where rounding the weights (1e-16) is a relative 3e-5
    tol = 1e-6 if mode == "twin" else 1e-13
    assert callback.mle == pytest.approx(linear_map_exponent(lrs, 1, torch.float64), abs=tol)
    if mode == "twin":
        assert twin_lrs == lrs


# --------------------------------------------------------------------------- chaos: the 1-D double well


class DoubleWell(pl.LightningModule):
    """f(w) = w⁴/4 − w²/2 at η = 2: GD is 3w − 2w³, conjugate to the Chebyshev tripling map (exponent ln 3)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3], dtype=torch.float64))

    def training_step(self, batch, batch_idx):
        return (self.w**4 / 4 - self.w**2 / 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=2.0)


class Orbit(pl.Callback):
    def __init__(self) -> None:
        self.w = []

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.w.append(pl_module.w.item())


def double_well(callback: LyapunovTwinRun, steps: int) -> np.ndarray:
    orbit = Orbit()
    data = DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1)
    fit(DoubleWell(), data, [orbit, callback], max_steps=steps, max_epochs=None)
    return np.array(orbit.w)


def test_double_well_positive_exponent_ln3():
    steps = 300
    tangent = LyapunovTwinRun(mode="tangent", perturb="all", summary_every_n_steps=None)
    w = double_well(tangent, steps)
    log_derivative = np.log(np.abs(1 - 2.0 * (3 * w**2 - 1)))  # ln|φ'(w_t)|, φ'(w) = 1 − η f''(w)
    # 1-D: the tangent exponent is exactly the orbit average of ln|φ'|, which telescopes to ln 3 + O(1/T)
    assert tangent.mle == pytest.approx(log_derivative.mean(), abs=1e-12)
    assert tangent.mle == pytest.approx(math.log(3), rel=0.02)
    twin = LyapunovTwinRun(renormalize_every=5, perturb="all", summary_every_n_steps=None)
    assert np.array_equal(double_well(twin, steps), w)  # the main run is unchanged
    # finite ε = 1e-8: the twin leaves the tangent regime only where the orbit passes near φ'(w) = 0
    assert twin.mle == pytest.approx(log_derivative.mean(), rel=1e-2)


def test_free_evolution_grows_then_saturates():
    """Without renormalisation ln d(t) follows ln ε + Σ ln|φ'(w_s)| until d reaches the attractor's size."""
    callback = LyapunovTwinRun(renormalize_every=None, n_twins=2, perturb="all", summary_every_n_steps=None)
    w = double_well(callback, 40)
    linear = math.log(1e-8) + np.concatenate([[0.0], np.cumsum(np.log(np.abs(3 - 6 * w**2)))])
    for steps, log_d in callback.log_distance_curves():
        assert steps == list(range(41))
        small = np.array(log_d) < math.log(1e-4)
        assert small[:8].all()
        np.testing.assert_allclose(np.array(log_d)[small], linear[small], atol=1e-3)
        assert max(log_d) < math.log(2 * math.sqrt(2))  # |w − w'| ≤ 2√2 on the invariant interval
    assert all(f.saturated for f in callback.local_fits)
    assert callback.last_metrics["lyapunov/saturated"] == 1.0
    assert callback.last_metrics["lyapunov/local_exponent"] == pytest.approx(math.log(3), rel=0.1)
    assert "lyapunov/mle" not in callback.last_metrics
    fig = log_distance_figure(callback.log_distance_curves(), callback.local_fits)
    assert len(fig.axes[0].lines) == 2 * 3  # per twin: ln d(t), the fitted line, the plateau marker


# --------------------------------------------------------------------------- the twin is a second training run

MODEL = dict(batch_norm=True, dropout=0.3)
TRAIN = dict(max_epochs=2, accumulate_grad_batches=2, gradient_clip_val=0.05)


class PerturbedStart(pl.Callback):
    """Adds the callback's twin perturbation number ``draw`` to the weights at fit start (an independent twin run).

    Its size is the callback's default ε, relative to the norm of all parameters (bfloat16 compute under bf16-mixed).
    """

    def __init__(self, draw: int = 0) -> None:
        self.draw = draw

    def on_train_start(self, trainer, pl_module):
        everything = list(pl_module.parameters())
        params = [p for p in everything if p.ndim >= 2]
        dtype = torch.bfloat16 if trainer.precision == "bf16-mixed" else everything[0].dtype
        eps = default_epsilon(dtype, parameter_norm(everything, "l2"))
        generator = torch.Generator().manual_seed(0)
        for _ in range(self.draw + 1):
            delta = random_perturbation(params, eps, "l2", generator)
        with torch.no_grad():
            for p, dp in zip(params, delta):
                p.add_(dp)


def cross_entropy(module, batch):
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


class ManualBatchNormNet(TinyNet):
    """TinyNet(batch_norm, dropout, momentum) with manual optimization: training_step steps the optimizer itself."""

    def __init__(self) -> None:
        super().__init__(**MODEL, momentum=0.9)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = super().training_step(batch, batch_idx)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


INDEPENDENT_RUNS = {
    "sgd-momentum": (lambda: TinyNet(**MODEL, momentum=0.9).double(), {}, TRAIN),
    "adam": (lambda: TinyNet(**MODEL, optimizer="adam").double(), {}, TRAIN),
    "clip-by-value": (lambda: TinyNet(**MODEL, momentum=0.9).double(), {}, dict(TRAIN, gradient_clip_algorithm="value")),
    "bf16-mixed": (lambda: TinyNet(**MODEL, momentum=0.9), {}, dict(TRAIN, precision="bf16-mixed")),
    "manual": (lambda: ManualBatchNormNet().double(), dict(loss_fn=cross_entropy), dict(max_epochs=2)),
}


@pytest.mark.parametrize("case", INDEPENDENT_RUNS)
def test_twin_equals_an_independent_run_from_the_perturbed_start(case):
    """Same batches, dropout masks, batch-norm statistics, optimizer state, accumulation, clipping (by norm or by
    value), bf16 autocast, manual optimization through loss_fn: twin i is, bit for bit, the run from θ_0 + δ_i."""
    make, kwargs, train = INDEPENDENT_RUNS[case]
    callback = LyapunovTwinRun(renormalize_every=None, n_twins=2, function_space=True, summary_every_n_steps=None, **kwargs)
    keep = Keep(callback)
    pl.seed_everything(0, verbose=False)
    main = make()
    data = double_data() if main.dtype == torch.float64 else random_classification()
    fit(main, loader(data, shuffle=False), [callback, keep], **train)
    last = max(keep.seen)
    assert last == (8 if case == "manual" else 4)
    references = []
    for i, twin in enumerate(callback._twins):
        pl.seed_everything(0, verbose=False)
        references.append(make())
        fit(references[i], loader(data, shuffle=False), [PerturbedStart(draw=i)], **train)
        for t, p in zip(twin.params, references[i].parameters()):
            assert torch.equal(t, p)
        for t, b in zip(twin.buffers, references[i].buffers()):
            assert torch.equal(t, b)
    delta = [(t - p.detach()).double() for t, p in zip(callback._twins[1].params, main.parameters())]
    exact = float(torch.cat([d.reshape(-1) for d in delta]).norm())  # float32 weights: float32 chunk sums (≤ 1e-6)
    assert callback.per_twin["distance"][1] == pytest.approx(exact, rel=1e-12 if main.dtype == torch.float64 else 1e-6)
    # function space: outputs of the runs (eval mode, the main step's autocast) on the first batch
    x = data.tensors[0][:16]
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=case == "bf16-mixed"):
        expected = np.mean([float((r.eval()(x).double() - main.eval()(x).double()).norm()) for r in references])
    assert keep.seen[last]["lyapunov/function_distance"] == pytest.approx(expected, rel=1e-10)


def test_twin_and_tangent_modes_agree():
    """Same first direction, ε = 1e-8 in float64: the twin separation is the tangent vector to O(ε)."""
    runs = {}
    for mode in ("twin", "tangent"):
        callback = LyapunovTwinRun(mode=mode, renormalize_every=2, n_twins=2)
        keep = Keep(callback)
        pl.seed_everything(0, verbose=False)
        fit(TinyNet(**MODEL, momentum=0.9).double(), loader(double_data()), [callback, keep], max_epochs=2)
        runs[mode] = keep.seen
    assert runs["twin"].keys() == runs["tangent"].keys() == set(range(1, 9))
    for step, metrics in runs["twin"].items():
        assert metrics["lyapunov/log_distance"] == pytest.approx(runs["tangent"][step]["lyapunov/log_distance"], abs=5e-8)
        if step % 2 == 0:
            assert metrics["lyapunov/ftle"] == pytest.approx(runs["tangent"][step]["lyapunov/ftle"], abs=5e-8)
            assert metrics["lyapunov/mle"] == pytest.approx(runs["tangent"][step]["lyapunov/mle"], abs=5e-8)


def test_main_run_is_bit_identical_with_the_callback():
    kw = dict(max_epochs=2, accumulate_grad_batches=2)
    model = dict(**MODEL, momentum=0.9)
    baseline = fit_snapshot(model, [], **kw)
    twin = LyapunovTwinRun(renormalize_every=3, n_twins=2, function_space=True)
    assert_identical_runs(baseline, fit_snapshot(model, [twin], **kw))
    assert math.isfinite(twin.mle) and len(twin.per_twin["mle"]) == 2
    tangent = LyapunovTwinRun(mode="tangent", renormalize_every=3, n_twins=2)
    assert_identical_runs(baseline, fit_snapshot(model, [tangent], **kw))
    assert math.isfinite(tangent.mle)


# --------------------------------------------------------------------------- logging, resume, DDP


def test_logs_at_the_step_to_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    callback = LyapunovTwinRun(renormalize_every=3, summary_every_n_steps=5, function_space=True)
    pl.seed_everything(0, verbose=False)
    fit(TinyNet(), loader(), [callback], logger=logger, max_steps=7, max_epochs=None, log_every_n_steps=50)
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 10})
    acc.Reload()
    for tag in ("lyapunov/distance", "lyapunov/log_distance", "lyapunov/twin_loss", "lyapunov/function_distance"):
        assert [e.step for e in acc.Scalars(tag)] == list(range(1, 8)), tag
    for tag in ("lyapunov/ftle", "lyapunov/mle"):
        assert [e.step for e in acc.Scalars(tag)] == [3, 6], tag
    assert [e.step for e in acc.Images("lyapunov/log_distance")] == [5, 7]  # cadence, then fit end
    assert acc.Scalars("lyapunov/mle")[-1].value == pytest.approx(callback.mle, rel=1e-6)


def test_resume_continues_as_if_never_interrupted(tmp_path):
    def run(mode, ckpt_path=None, save=False):
        pl.seed_everything(0, verbose=False)
        callback = LyapunovTwinRun(mode=mode, renormalize_every=3, n_twins=2)
        keep = Keep(callback)
        callbacks = [callback, keep]
        if save:
            callbacks.append(ModelCheckpoint(dirpath=tmp_path / mode, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
        t = trainer(callbacks=callbacks, max_epochs=4, enable_checkpointing=save)
        t.fit(TinyNet(momentum=0.9), loader(shuffle=False), ckpt_path=ckpt_path)
        return keep.seen

    for mode in ("twin", "tangent"):
        full = run(mode, save=True)
        resumed = run(mode, ckpt_path=str(tmp_path / mode / "epoch=1.ckpt"))  # step 8, mid-interval
        assert sorted(resumed) == list(range(9, 17))
        assert all(resumed[step] == full[step] for step in resumed), mode


def ddp_scenario(devices: int):
    """32 examples: 2 ranks × 16 (interleaved shards) or 1 process × 32 — the same global batch."""
    pl.seed_everything(0, verbose=False)
    model = TinyNet(momentum=0.9).double()
    data = double_data()
    dl = DataLoader(TensorDataset(*(t[:32] for t in data.tensors)), batch_size=32 // devices, shuffle=False)
    twin, tangent = LyapunovTwinRun(renormalize_every=2, n_twins=2), LyapunovTwinRun(mode="tangent", renormalize_every=2, prefix="tangent/")
    keeps = {"twin": Keep(twin), "tangent": Keep(tangent)}

    def collect(trainer, model, callbacks):
        return {mode: {str(step): m for step, m in keep.seen.items()} for mode, keep in keeps.items()}

    return model, dl, [twin, tangent, *keeps.values()], collect, dict(max_steps=4, max_epochs=None)


@pytest.mark.ddp
def test_ddp_two_shards_equal_single_process_on_union(tmp_path):
    ranks = run_ddp("tests.callbacks.test_lyapunov_twin:ddp_scenario", tmp_path / "ddp", devices=2)
    model, dl, callbacks, collect, trainer_kwargs = ddp_scenario(1)  # the reference, in this process
    single = json.loads(json.dumps(collect(fit(model, dl, callbacks, **trainer_kwargs), model, callbacks)))
    assert ranks[0] == ranks[1]  # twins identical on every rank
    for mode in ("twin", "tangent"):
        assert ranks[0][mode].keys() == single[mode].keys() == {"1", "2", "3", "4"}
        for step, metrics in single[mode].items():
            assert metrics.keys() == ranks[0][mode][step].keys()
            for key, value in metrics.items():
                assert ranks[0][mode][step][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (mode, step, key)
    assert "lyapunov/mle" in single["twin"]["4"] and "lyapunov/twin_loss" in single["twin"]["4"]


# --------------------------------------------------------------------------- failures and refusals


@pytest.mark.parametrize("mode", ["twin", "tangent"])
def test_non_finite_twin_is_reseeded_with_one_warning(mode):
    calls = []

    def loss_fn(module, batch):  # the callback's loss only: the main run uses training_step
        calls.append(1)
        x, y = batch
        loss = nn.functional.cross_entropy(module(x), y)
        return loss * float("nan") if len(calls) in (3, 4) else loss

    class WeightNorm(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            norms[trainer.global_step] = parameter_norm(list(pl_module.parameters()), "l2")

    norms = {}
    callback = LyapunovTwinRun(mode=mode, renormalize_every=2, loss_fn=loss_fn)
    keep = Keep(callback)
    baseline = fit_snapshot({}, [], max_steps=8, max_epochs=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = fit_snapshot({}, [callback, keep, WeightNorm()], max_steps=8, max_epochs=None)
    assert_identical_runs(baseline, watched)
    ours = [w for w in caught if "LyapunovTwinRun" in str(w.message)]
    assert len(ours) == 1 and "re-seeded" in str(ours[0].message)
    assert keep.seen[3] == {"lyapunov/reseeds": 1.0} and keep.seen[4] == {"lyapunov/reseeds": 2.0}
    assert callback.log_distance_curves()[0][0] == [4, 5, 6, 7, 8]  # a fresh pair from step 4
    # re-seeded at distance ε = 1e-4·‖θ‖ (the default, float32) from the main weights after step 4
    assert callback.log_distance_curves()[0][1][0] == pytest.approx(math.log(1e-4 * norms[4]), abs=1e-3)
    # the exponent counts the 6 good steps (1, 2, 5-8), not the two that failed
    accumulator = callback._twins[0].benettin if mode == "twin" else callback._tangents[0].benettin
    assert accumulator.steps == 6 and math.isfinite(callback.mle)


class CustomClipping(TinyNet):
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self.clip_gradients(optimizer, 0.1, "value")


class TwoGroups(TinyNet):
    def configure_optimizers(self):
        return torch.optim.SGD([{"params": self.net[0].parameters(), "lr": 0.1}, {"params": self.net[-1].parameters(), "lr": 0.2}])


@pytest.mark.parametrize(
    "kwargs,model,trainer_kwargs,match",
    [
        (dict(mode="tangent"), lambda: TinyNet(optimizer="adam"), {}, "SGD only"),
        (dict(mode="tangent"), TwoGroups, {}, "one set of SGD hyperparameters"),
        (dict(mode="tangent"), TinyNet, dict(gradient_clip_val=1.0), "clipping"),
        (dict(), TinyNet, dict(precision="bf16-true"), "precision"),
        (dict(), CustomClipping, {}, "configure_gradient_clipping"),
        (dict(), ManualTinyNet, {}, "manual optimization"),  # without loss_fn
        (dict(mode="tangent"), ManualTinyNet, {}, "manual optimization"),
        (dict(), DoubleWell, {}, "perturb='all'"),
        (dict(epsilon=1e-12), TinyNet, {}, "erased by rounding"),
    ],
)
def test_refused_at_fit_start(kwargs, model, trainer_kwargs, match):
    with pytest.raises(ValueError, match=match):
        fit(model(), loader(), [LyapunovTwinRun(**kwargs)], max_steps=1, max_epochs=None, **trainer_kwargs)


def test_adam_twin_with_two_param_groups_runs():
    """Any optimizer class is mirrored (here AdamW, whose defaults its constructor does not all accept)."""

    class AdamW(TinyNet):
        def configure_optimizers(self):
            return torch.optim.AdamW([{"params": self.net[0].parameters()}, {"params": self.net[-1].parameters(), "lr": 0.01}], lr=0.05)

    callback = LyapunovTwinRun(renormalize_every=2)
    pl.seed_everything(0, verbose=False)
    fit(AdamW(), loader(), [callback], max_steps=6, max_epochs=None)
    twin = callback._twins[0].optimizer
    assert type(twin) is torch.optim.AdamW and [g["lr"] for g in twin.param_groups] == [0.05, 0.01]
    # parameters, exp_avg and exp_avg_sq (float32), and one float32 step counter per parameter tensor
    assert callback.memory_bytes == 3 * 4 * sum(p.numel() for p in AdamW().parameters()) + 4 * 4
    assert math.isfinite(callback.mle)


BAD_ARGUMENTS = {
    "mode": ["chaos", None, 1, True],
    "renormalize_every": [0, -1, 2.5, True, "3", math.inf, math.nan],
    "n_twins": [0, -1, 2.5, True, None, "3", math.inf],
    "epsilon": [0, 0.0, -1e-8, True, "3", math.inf, math.nan],
    "perturb": ["biases", None, True],
    "norm": ["linf", None, 2],
    "function_space": [None, 1, "yes"],
    "output_fn": [1, "f"],
    "loss_fn": [1, "cross_entropy", torch.zeros(())],
    "summary_every_n_steps": [0, -1, 2.5, True, "3", math.nan],
    "seed": [-1, 1.5, True, None, "3", math.inf],
}


@pytest.mark.parametrize("name,value", [(n, v) for n, values in BAD_ARGUMENTS.items() for v in values])
def test_invalid_arguments(name, value):
    with pytest.raises(ValueError, match=f"LyapunovTwinRun: {name} must be"):
        LyapunovTwinRun(**{name: value})


def test_arguments_accept_numpy_integers_and_none_where_allowed():
    callback = LyapunovTwinRun(renormalize_every=np.int64(5), n_twins=np.int32(2), seed=np.uint8(3), epsilon=np.float64(1e-3))
    assert (callback.renormalize_every, callback.n_twins, callback.seed, callback.epsilon) == (5, 2, 3, 1e-3)
    assert type(callback.n_twins) is int
    LyapunovTwinRun(renormalize_every=None, epsilon=None, summary_every_n_steps=None, loss_fn=None, output_fn=None)
    with pytest.raises(ValueError, match="function_space=True needs mode='twin'"):
        LyapunovTwinRun(mode="tangent", function_space=True)


def test_two_instances_have_distinct_state_keys():
    assert LyapunovTwinRun().state_key != LyapunovTwinRun(mode="tangent").state_key
    assert LyapunovTwinRun(n_twins=2).state_key != LyapunovTwinRun(n_twins=3).state_key
