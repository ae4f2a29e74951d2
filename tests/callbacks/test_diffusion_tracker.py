"""Known answers for ``DiffusionTracker`` inside a real Trainer.

A one-parameter-vector module ``Walker`` is trained by a real ``torch.optim.SGD`` on the loss
L_t(θ) = ½k‖θ‖² + θ·x̄_t, where x̄_t is the mean of the batch's data rows, so
θ_{t+1} = (1 − ηk) θ_t − η x̄_t:

* rows iid N(0, I) from a dedicated generator, k = 0: Brownian walk, MSD(τ) = η² n τ (α = 1);
* identical rows c: ballistic motion θ_t = θ_0 − η c t, MSD(τ) = η²‖c‖² τ² (α = 2, d_f = 1,
  and the loss θ_t·c is linear along a straight path, so H = 1);
* rows iid N(0, I), k > 0, θ_0 stationary: Ornstein–Uhlenbeck, MSD(τ) = 2 n s² (1 − a^τ) with
  a = 1 − ηk and s² = η² / (1 − a²) — diffusion stops at long lags.
"""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader, TensorDataset

from chaos_callbacks.callbacks.diffusion_tracker import DiffusionTracker
from chaos_callbacks.dynamics.diffusion import fit_two_regime, log_spaced_lags, time_averaged_msd
from tests.lightning_helpers import ManualTinyNet, TinyNet, assert_identical_runs, fit_snapshot, loader, trainer

SCALARS = ("exponent", "exponent_stderr", "crossover_pvalue", "hurst", "hurst_stderr", "fractal_dim", "temperature", "loss_variance")
CROSSOVER = ("exponent_short", "exponent_short_stderr", "exponent_long", "exponent_long_stderr", "crossover", "crossover_stderr")


class Walker(pl.LightningModule):
    """θ ∈ R^n under SGD on ½k‖θ‖² + θ·x̄ (see the module docstring); logs ``walk_loss``."""

    def __init__(self, n: int, lr: float, stiffness: float = 0.0, init: torch.Tensor | None = None, manual: bool = False) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64) if init is None else init.clone())
        self.lr, self.stiffness = lr, stiffness
        self.automatic_optimization = not manual

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * self.stiffness * self.theta.square().sum() + self.theta @ x.mean(0)

    def training_step(self, batch, batch_idx):
        loss = self.loss(batch[0])
        self.log("walk_loss", loss)
        if self.automatic_optimization:
            return loss
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


class Capture(pl.Callback):
    """The weights before each optimizer step and the true loss of each micro-batch at them."""

    def __init__(self) -> None:
        self.weights: dict[int, torch.Tensor] = {}
        self.losses: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        step = trainer.global_step
        self.weights.setdefault(step, pl_module.theta.detach().clone())
        with torch.no_grad():
            self.losses.setdefault(step, []).append(float(pl_module.loss(batch[0])))

    def trajectory(self, steps) -> np.ndarray:
        return torch.stack([self.weights[t] for t in steps]).numpy()

    def step_loss(self, step: int) -> float:
        return float(np.mean(self.losses[step]))


def gaussian_rows(steps: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(steps, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def walk(rows: torch.Tensor, callbacks, lr: float = 0.1, stiffness: float = 0.0, init=None, manual=False, **kwargs):
    model = Walker(rows.shape[1], lr, stiffness, init, manual)
    t = trainer(callbacks=callbacks, **{"max_epochs": 1, **kwargs})
    t.fit(model, DataLoader(TensorDataset(rows), batch_size=1, shuffle=False))
    return t


def test_brownian_walk_has_exponent_one_and_the_exact_msd():
    n, window, lr = 256, 200, 0.1
    rows = gaussian_rows(2 * window, n, seed=0)
    tracker, capture = DiffusionTracker(window=window, exact=True), Capture()
    t = walk(rows, [capture, tracker], lr=lr)
    assert [w.t_w for w in tracker.windows] == [0, window]
    for w in tracker.windows:
        steps = range(w.t_w, w.t_w + window)
        X = capture.trajectory(steps)
        np.testing.assert_allclose(w.msd, time_averaged_msd(X, w.lags), rtol=1e-10)
        np.testing.assert_allclose(w.msd[0], lr**2 * n, rtol=0.1)  # E‖θ_{t+1} − θ_t‖² = η² n
        assert w.exponent == pytest.approx(1.0, abs=0.1)
        assert w.fractal_dim == pytest.approx(2.0, abs=0.15)
        # each recorded loss is that of the weights before the step: θ_t · x_t
        losses = [float(capture.weights[s] @ rows[s]) for s in steps]
        assert w.loss_variance == pytest.approx(np.var(losses), rel=1e-10)
    assert float(t.callback_metrics["diffusion/exponent"]) == pytest.approx(tracker.windows[-1].exponent, rel=1e-6)
    assert float(t.callback_metrics["diffusion/temperature"]) == pytest.approx(lr / 2)  # batch size 1


def test_ballistic_walk_exact_answers_per_window_with_stride_and_accumulation(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    n, lr, c = 16, 0.1, 0.5
    rows = torch.full((160, n), c, dtype=torch.float64)  # 2 micro-batches per step: 80 steps
    tracker = DiffusionTracker(window=20, every_n_steps=2)  # sketched: S(θ_t − θ_0) = −η t S c is still a line
    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    walk(rows, [tracker], lr=lr, accumulate_grad_batches=2, logger=logger, log_every_n_steps=50)
    # samples at steps 0, 2, …, 78; windows of 20 samples end at steps 38 and 78
    assert [w.t_w for w in tracker.windows] == [0, 40]
    speed2 = n * c**2  # ‖c‖²
    for w in tracker.windows:
        np.testing.assert_array_equal(w.lags, 2 * log_spaced_lags(20, 24))  # in steps
        assert w.exponent == pytest.approx(2.0, abs=1e-9) and w.exponent_stderr < 1e-9
        # one exact power law: no crossover (a straight line has no second regime)
        assert w.crossover_pvalue == 1.0 and all(math.isnan(getattr(w, name)) for name in CROSSOVER)
        assert w.fractal_dim == pytest.approx(1.0, abs=1e-9)
        assert w.hurst == pytest.approx(1.0, abs=0.05)  # binned distances k·Δr: 1 up to the binning
        # L_t = θ_t·c = −η‖c‖² t at t = t_w, t_w + 2, …, t_w + 38
        assert w.loss_variance == pytest.approx((lr * speed2) ** 2 * np.var(np.arange(0, 40, 2)), rel=1e-9)
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 10})
    acc.Reload()
    for name in SCALARS:
        events = acc.Scalars(f"diffusion/{name}")
        assert [e.step for e in events] == [38, 78], name
    assert not any(f"diffusion/{name}" in acc.Tags()["scalars"] for name in CROSSOVER)
    assert acc.Scalars("diffusion/temperature")[0].value == pytest.approx(lr / (2 * 2))  # B = 2 micro-batches
    for tag in ("diffusion/msd", "diffusion/msd_log_derivative", "diffusion/msl", "diffusion/exponents"):  # once, at the end of training
        assert [e.step for e in acc.Images(tag)] == [78], tag


def test_confined_walk_stops_diffusing_at_long_lags():
    n, window, lr, stiffness = 256, 400, 0.1, 1.0
    a = 1 - lr * stiffness  # relaxation time 1 / (ηk) = 10 steps
    s2 = lr**2 / (1 - a**2)
    init = math.sqrt(s2) * gaussian_rows(1, n, seed=1)[0]  # start in the stationary state
    tracker = DiffusionTracker(window=window)
    walk(gaussian_rows(window, n, seed=2), [tracker], lr=lr, stiffness=stiffness, init=init)
    (w,) = tracker.windows
    expected = 2 * n * s2 * (1 - a ** w.lags.astype(float))
    np.testing.assert_allclose(w.msd, expected, rtol=0.25)
    short, long, crossover = fit_two_regime(w.lags, expected)  # 0.90, −0.01, 12.8: the estimator without noise
    assert w.crossover_pvalue < 0.01
    assert w.exponent_long == pytest.approx(long, abs=max(3 * w.exponent_long_stderr, 0.05)) and abs(w.exponent_long) < 0.15
    assert w.exponent_short == pytest.approx(short, abs=max(3 * w.exponent_short_stderr, 0.05))
    relaxation = -1 / math.log(a)  # MSD ∝ 1 − e^{−τ/relaxation}: the asymptotes cross at τ = relaxation
    assert 1 / 1.6 < w.crossover / relaxation < 1.6
    assert abs(math.log(w.crossover / crossover)) < 3 * w.crossover_stderr / w.crossover


def test_sketch_agrees_with_exact_weights():
    rows = gaussian_rows(100, 4096, seed=3)
    exact, sketch = DiffusionTracker(window=100, exact=True, prefix="exact/"), DiffusionTracker(window=100, dim=1024)
    walk(rows, [exact, sketch])
    assert sketch.state_dict()["projector"] == {"kind": "strided_sign", "num_params": 4096, "dim": 1021, "seed": 0}  # largest prime ≤ 1024
    (e,), (s,) = exact.windows, sketch.windows
    np.testing.assert_allclose(s.msd, e.msd, rtol=3 * math.sqrt(2 / 1021))
    assert s.exponent == pytest.approx(e.exponent, abs=0.03)
    assert s.loss_variance == e.loss_variance  # the same losses


def test_each_step_pairs_the_weights_before_it_with_its_mean_micro_batch_loss():
    # 7 micro-batches with accumulate_grad_batches=2: steps of 2, 2, 2 and (at the epoch end) 1
    rows = torch.arange(1.0, 8.0, dtype=torch.float64)[:, None] * torch.linspace(-1, 1, 8, dtype=torch.float64)
    from_outputs, from_metric, capture = DiffusionTracker(window=10, exact=True), DiffusionTracker(window=10, exact=True, seed=1, loss_key="walk_loss", prefix="keyed/"), Capture()
    walk(rows, [capture, from_outputs, from_metric], init=torch.ones(8, dtype=torch.float64), accumulate_grad_batches=2)
    assert [len(capture.losses[t]) for t in range(4)] == [2, 2, 2, 1]
    X = capture.trajectory(range(4))
    for tracker in (from_outputs, from_metric):
        state = tracker.state_dict()["accumulator"]
        assert state["count"] == 4 and state["t_w"] == 0
        np.testing.assert_allclose(state["buffer"].numpy(), X - X[0], atol=1e-15)
        np.testing.assert_allclose(state["losses"].numpy(), [capture.step_loss(t) for t in range(4)], rtol=1e-12)


def test_resume_continues_as_if_never_interrupted(tmp_path):
    def run(ckpt_path=None, save=False):
        pl.seed_everything(0, verbose=False)
        tracker = DiffusionTracker(window=9)
        cbs = [tracker] + ([ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")] if save else [])
        trainer(callbacks=cbs, max_epochs=7, enable_checkpointing=save).fit(TinyNet(), loader(shuffle=False), ckpt_path=ckpt_path)
        return tracker.windows

    full = run(save=True)
    resumed = run(ckpt_path=str(tmp_path / "epoch=1.ckpt"))  # step 8: 8 samples into the first window
    assert [w.t_w for w in full] == [0, 9, 18]
    assert len(resumed) == len(full)
    for a, b in zip(full, resumed):
        for field in ("lags", "msd", "log_derivative", "msl_distances", "msl"):
            np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
        np.testing.assert_array_equal(list(a.scalars().values()), list(b.scalars().values()))  # NaN == NaN
        assert a.t_w == b.t_w


def test_checkpoint_with_a_count_sketch_resumes_with_the_same_count_sketch(tmp_path, monkeypatch):
    # a checkpoint of an earlier version (projector kind "count_sketch", dim 1024) keeps its
    # sketch on resume: the resumed windows equal those of an uninterrupted CountSketch run
    from chaos_callbacks.dynamics.sketch import CountSketch

    def old_projector(self, num_params):
        return CountSketch(num_params, self.dim, self.seed)

    def run(ckpt_path=None, save=False):
        pl.seed_everything(0, verbose=False)
        tracker = DiffusionTracker(window=9)
        cbs = [tracker] + ([ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")] if save else [])
        trainer(callbacks=cbs, max_epochs=5, enable_checkpointing=save).fit(TinyNet(), loader(shuffle=False), ckpt_path=ckpt_path)
        return tracker

    with monkeypatch.context() as patch:
        patch.setattr(DiffusionTracker, "_new_projector", old_projector)
        full = run(save=True)
    resumed = run(ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert isinstance(resumed._projector, CountSketch) and resumed._projector.dim == 1024
    assert resumed.state_dict()["projector"]["kind"] == "count_sketch"
    assert [w.t_w for w in resumed.windows] == [w.t_w for w in full.windows] == [0, 9]
    for a, b in zip(full.windows, resumed.windows):
        np.testing.assert_array_equal(a.msd, b.msd)
        np.testing.assert_array_equal(list(a.scalars().values()), list(b.scalars().values()))


def test_bit_identical_training_with_tracker(tmp_path):
    model_kwargs = dict(batch_norm=True, dropout=0.3, momentum=0.9)
    kw = dict(max_epochs=4, accumulate_grad_batches=2)
    baseline = fit_snapshot(model_kwargs, [], logger=TensorBoardLogger(tmp_path, name="a"), **kw)
    trackers = [DiffusionTracker(window=4, figure_every_n_windows=2), DiffusionTracker(window=4, exact=True, every_n_steps=2, prefix="exact/")]
    watched = fit_snapshot(model_kwargs, trackers, logger=TensorBoardLogger(tmp_path, name="b"), **kw)
    assert len(trackers[0].windows) == 2 and len(trackers[1].windows) == 1
    assert_identical_runs(baseline, watched)


def count_ours(caught) -> list[str]:
    return [str(w.message) for w in caught if "DiffusionTracker" in str(w.message)]


def test_frozen_and_nan_weights_are_skipped_with_one_warning():
    frozen = DiffusionTracker(window=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = walk(gaussian_rows(12, 8, seed=4), [frozen], lr=0.0)
    assert t.global_step == 12 and frozen.windows == []
    (message,) = count_ours(caught)
    assert "fit failed" in message
    assert float(t.callback_metrics["diffusion/skipped"]) == 3

    rows = gaussian_rows(12, 8, seed=5)
    rows[5, 0] = float("nan")  # loss NaN at step 5, weights NaN from step 6 on
    poisoned = DiffusionTracker(window=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = walk(rows, [poisoned])
    assert t.global_step == 12 and [w.t_w for w in poisoned.windows] == [0]
    (message,) = count_ours(caught)
    assert "non-finite" in message and "t_w=4" in message
    assert float(t.callback_metrics["diffusion/skipped"]) == 2


def test_manual_optimization_without_a_loss_still_tracks_the_weights():
    rows = torch.full((8, 4), 1.0, dtype=torch.float64)  # ballistic: θ_t = −η t (1, 1, 1, 1)
    missing = DiffusionTracker(window=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = walk(rows, [missing], manual=True)
    (message,) = count_ours(caught)
    assert "loss_key" in message and "hurst" in message
    assert "diffusion/hurst" not in t.callback_metrics and "diffusion/loss_variance" not in t.callback_metrics
    assert "diffusion/skipped" not in t.callback_metrics
    assert float(t.callback_metrics["diffusion/exponent"]) == pytest.approx(2.0, abs=1e-9)
    keyed = DiffusionTracker(window=4, loss_key="walk_loss", seed=1)
    walk(rows, [keyed], manual=True)
    for tracker in (missing, keyed):
        assert [w.t_w for w in tracker.windows] == [0, 4]
        assert [w.exponent for w in tracker.windows] == pytest.approx([2.0, 2.0], abs=1e-9)
        assert [w.fractal_dim for w in tracker.windows] == pytest.approx([1.0, 1.0], abs=1e-9)
    assert all(math.isnan(w.hurst) and math.isnan(w.loss_variance) and w.msl.size == 0 for w in missing.windows)
    # L_t = θ_t · 1 = −4η t at t = 0 … 3 of each window
    assert [w.loss_variance for w in keyed.windows] == pytest.approx([(4 * 0.1) ** 2 * np.var(np.arange(4))] * 2)


def test_manual_optimization_module_gets_windows_without_loss_statistics():
    tracker = DiffusionTracker(window=4)
    t = trainer(callbacks=[tracker], max_epochs=3)  # 4 batches per epoch, one optimizer step each
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t.fit(ManualTinyNet(), loader())
    assert [w.t_w for w in tracker.windows] == [0, 4, 8]
    for w in tracker.windows:
        assert math.isfinite(w.exponent) and math.isfinite(w.exponent_stderr) and math.isfinite(w.fractal_dim)
        assert math.isnan(w.hurst) and math.isnan(w.loss_variance)
    assert {"diffusion/exponent", "diffusion/exponent_stderr", "diffusion/fractal_dim", "diffusion/temperature"} <= set(t.callback_metrics)
    assert not {"diffusion/hurst", "diffusion/loss_variance", "diffusion/skipped"} & set(t.callback_metrics)


class StepSizeDescent(torch.optim.Optimizer):
    """Gradient descent whose param groups hold ``step_size`` and no ``lr``."""

    def __init__(self, params, step_size: float = 0.1) -> None:
        super().__init__(params, {"step_size": step_size})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.add_(p.grad, alpha=-group["step_size"])
        return loss


class StepSizeNet(TinyNet):
    def configure_optimizers(self):
        return StepSizeDescent(self.parameters())


def test_optimizer_without_lr_omits_only_the_temperature():
    tracker = DiffusionTracker(window=4)
    t = trainer(callbacks=[tracker], max_epochs=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t.fit(StepSizeNet(), loader())
    assert "lr" not in t.optimizers[0].param_groups[0]
    assert count_ours(caught) == [] and [w.t_w for w in tracker.windows] == [0, 4]
    assert "diffusion/temperature" not in t.callback_metrics
    assert {"diffusion/exponent", "diffusion/loss_variance"} <= set(t.callback_metrics)


def test_a_failing_hook_is_contained(monkeypatch):
    from chaos_callbacks.dynamics.sketch import StridedSignSketch

    def explode(self, params):
        raise RuntimeError("projection exploded")

    monkeypatch.setattr(StridedSignSketch, "project", explode)
    tracker = DiffusionTracker(window=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = walk(gaussian_rows(8, 4, seed=6), [tracker])
    assert t.global_step == 8 and tracker.windows == []
    (message,) = count_ours(caught)
    assert "RuntimeError" in message and "projection exploded" in message
    assert float(t.callback_metrics["diffusion/skipped"]) == 8


def test_window_history_stays_bounded_without_changing_any_fit():
    bounded, full = DiffusionTracker(window=4, max_windows=6, seed=2), DiffusionTracker(window=4, max_windows=10**6, seed=2)
    sizes = []

    class Size(pl.Callback):
        def on_train_batch_end(self, *args):
            sizes.append((len(bounded.windows), len(bounded.state_dict()["windows"])))

    walk(gaussian_rows(200, 8, seed=7), [bounded, Size()])
    walk(gaussian_rows(200, 8, seed=7), [full])  # the same run (state keys would clash in one)
    assert len(full.windows) == 50 and max(max(pair) for pair in sizes) <= 6
    t_ws = [w.t_w for w in bounded.windows]
    assert t_ws[0] == 0 and t_ws[-3:] == [188, 192, 196] and t_ws == sorted(t_ws)
    by_t_w = {w.t_w: w for w in full.windows}
    for w in bounded.windows:  # the same statistics as without the bound
        np.testing.assert_array_equal(w.msd, by_t_w[w.t_w].msd)
        np.testing.assert_array_equal(list(w.scalars().values()), list(by_t_w[w.t_w].scalars().values()))
    assert bounded.state_dict()["num_windows"] == 50


def test_parameter_filters_and_fit_start_errors():
    for params, expected in ((None, 195), (["net.0"], 8 * 16 + 16), (lambda name: name.endswith("bias"), 16 + 3)):
        tracker = DiffusionTracker(window=4, params=params)
        trainer(callbacks=[tracker], max_steps=1, max_epochs=None).fit(TinyNet(), loader())
        assert tracker.state_dict()["projector"]["num_params"] == expected
    with pytest.raises(ValueError, match="selects no trainable parameter"):
        trainer(callbacks=[DiffusionTracker(params="encoder.")], max_steps=1, max_epochs=None).fit(TinyNet(), loader())
    with pytest.raises(ValueError, match="max_exact_bytes"):
        trainer(callbacks=[DiffusionTracker(exact=True, max_exact_bytes=1000)], max_steps=1, max_epochs=None).fit(TinyNet(), loader())


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(window=3),
        dict(window=10.0),
        dict(dim=0),
        dict(dim=1),
        dict(exact="yes"),
        dict(lags=2),
        dict(params=42),
        dict(params=[]),
        dict(every_n_steps=0),
        dict(figure_every_n_windows=-1),
        dict(loss_key=3),
        dict(max_exact_bytes=0),
        dict(max_exact_bytes=float("inf")),
        dict(seed=-1),
        dict(seed=True),
        dict(window=True),
        dict(window=np.float64(10)),
        dict(dim=None),
        dict(exact=1),
        dict(lags=3.0),
        dict(every_n_steps=np.int64(0)),
        dict(params=["net.0", 3]),
        dict(crossover_level=0.0),
        dict(crossover_level=1.0),
        dict(crossover_level=float("nan")),
        dict(crossover_level="0.01"),
        dict(max_windows=1),
        dict(max_windows=10.0),
    ],
)
def test_invalid_arguments(kwargs):
    (name,) = kwargs
    with pytest.raises(ValueError, match=f"DiffusionTracker: {name} must be"):
        DiffusionTracker(**kwargs)


def test_numpy_integers_are_accepted():
    tracker = DiffusionTracker(
        window=np.int64(10), dim=np.int32(8), lags=np.int64(5), every_n_steps=np.int16(2), figure_every_n_windows=np.uint8(0),
        max_exact_bytes=np.int64(2**20), seed=np.uint8(3), crossover_level=np.float32(0.05), max_windows=np.int64(4), exact=np.bool_(False),
    )  # fmt: skip
    assert type(tracker.window) is int and tracker.window == 10 and type(tracker.max_windows) is int


def test_two_instances_have_distinct_state_keys():
    assert DiffusionTracker(window=100).state_key != DiffusionTracker(window=200).state_key
