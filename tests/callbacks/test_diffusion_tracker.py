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
from tests.lightning_helpers import TinyNet, assert_identical_runs, fit_snapshot, loader, trainer

SCALARS = ("exponent", "exponent_short", "exponent_long", "crossover", "hurst", "fractal_dim", "temperature", "loss_variance")


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
        assert w.exponent == pytest.approx(2.0, abs=1e-9)
        assert w.exponent_short == pytest.approx(2.0, abs=1e-9) and w.exponent_long == pytest.approx(2.0, abs=1e-9)
        assert w.crossover in w.lags[1:-1]
        assert w.fractal_dim == pytest.approx(1.0, abs=1e-9)
        assert w.hurst == pytest.approx(1.0, abs=0.05)  # binned distances k·Δr: 1 up to the binning
        # L_t = θ_t·c = −η‖c‖² t at t = t_w, t_w + 2, …, t_w + 38
        assert w.loss_variance == pytest.approx((lr * speed2) ** 2 * np.var(np.arange(0, 40, 2)), rel=1e-9)
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 10})
    acc.Reload()
    for name in SCALARS:
        events = acc.Scalars(f"diffusion/{name}")
        assert [e.step for e in events] == [38, 78], name
    assert acc.Scalars("diffusion/temperature")[0].value == pytest.approx(lr / (2 * 2))  # B = 2 micro-batches
    for tag in ("diffusion/msd", "diffusion/msd_log_derivative", "diffusion/msl"):  # once, at the end of training
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
    short, long, crossover = fit_two_regime(w.lags, expected)  # 0.80, 0.05, 14
    assert w.exponent_long == pytest.approx(long, abs=0.1) and abs(w.exponent_long) < 0.15
    assert w.exponent_short == pytest.approx(short, abs=0.15)
    assert crossover / 2 <= w.crossover <= crossover * 2


def test_sketch_agrees_with_exact_weights():
    rows = gaussian_rows(100, 4096, seed=3)
    exact, sketch = DiffusionTracker(window=100, exact=True), DiffusionTracker(window=100, dim=1024)
    walk(rows, [exact, sketch])
    (e,), (s,) = exact.windows, sketch.windows
    np.testing.assert_allclose(s.msd, e.msd, rtol=3 * math.sqrt(2 / 1024))
    assert s.exponent == pytest.approx(e.exponent, abs=0.03)
    assert s.loss_variance == e.loss_variance  # the same losses


def test_each_step_pairs_the_weights_before_it_with_its_mean_micro_batch_loss():
    # 7 micro-batches with accumulate_grad_batches=2: steps of 2, 2, 2 and (at the epoch end) 1
    rows = torch.arange(1.0, 8.0, dtype=torch.float64)[:, None] * torch.linspace(-1, 1, 8, dtype=torch.float64)
    from_outputs, from_metric, capture = DiffusionTracker(window=10, exact=True), DiffusionTracker(window=10, exact=True, seed=1, loss_key="walk_loss"), Capture()
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


def test_bit_identical_training_with_tracker(tmp_path):
    model_kwargs = dict(batch_norm=True, dropout=0.3, momentum=0.9)
    kw = dict(max_epochs=4, accumulate_grad_batches=2)
    baseline = fit_snapshot(model_kwargs, [], logger=TensorBoardLogger(tmp_path, name="a"), **kw)
    trackers = [DiffusionTracker(window=4, figure_every_n_windows=2), DiffusionTracker(window=4, exact=True, every_n_steps=2)]
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


def test_manual_optimization_needs_a_loss_key():
    rows = torch.full((8, 4), 1.0, dtype=torch.float64)
    missing, keyed = DiffusionTracker(window=4), DiffusionTracker(window=4, loss_key="walk_loss", seed=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        walk(rows, [missing, keyed], manual=True)
    (message,) = count_ours(caught)
    assert "loss_key" in message and missing.windows == []
    assert [w.exponent for w in keyed.windows] == pytest.approx([2.0, 2.0], abs=1e-9)


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
        dict(exact="yes"),
        dict(lags=2),
        dict(params=42),
        dict(params=[]),
        dict(every_n_steps=0),
        dict(figure_every_n_windows=-1),
        dict(loss_key=3),
        dict(max_exact_bytes=0),
        dict(seed=-1),
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        DiffusionTracker(**kwargs)


def test_two_instances_have_distinct_state_keys():
    assert DiffusionTracker(window=100).state_key != DiffusionTracker(window=200).state_key
