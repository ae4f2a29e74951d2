"""Bad arguments fail at construction with a ValueError naming the callback and the argument;
any exception inside an estimate is skipped, warned once, counted, and training goes on."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch

from chaos_callbacks import CurvatureLRScheduler, HessianSpectrumMonitor
from chaos_callbacks.callbacks import _validation as V
from tests.lightning_helpers import TinyNet, loader, trainer

BAD_INT = [2.5, True, None, "3", math.inf, math.nan, 0, -1]
BAD_FRACTION = [0, 1, -0.5, math.nan, math.inf, True, None, "0.1"]

MONITOR_BAD: list[tuple[str, Any]] = (
    [("every_n_steps", v) for v in BAD_INT]
    + [("top_k", v) for v in BAD_INT]
    + [("trace_samples", v) for v in [1, 2.0, False, None]]
    + [("density_probes", v) for v in [0, 1.5, None]]
    + [("density_steps", v) for v in [1, 3.5, None]]
    + [("density_every_n_steps", v) for v in [0, 2.5, True, 3]]  # 3 is no multiple of every_n_steps=2
    + [("tol", v) for v in BAD_FRACTION]
    + [("lambda_min_tol", v) for v in BAD_FRACTION]
    + [("max_hvps", v) for v in [1, 10.0, None, True]]
    + [("probe", v) for v in ["all", 0, -4, 2.5, True, None]]
    + [("method", v) for v in ["Lanczos", None, 1]]
    + [("hessian_mode", v) for v in ["training", None, True]]
    + [("loss_fn", v) for v in [1, "loss", [1]]]
    + [("lambda_min", v) for v in [1, "yes", None]]
    + [("trace", v) for v in [0, None]]
    + [("density", v) for v in ["no"]]
    + [("warm_start", v) for v in [None, 1]]
    + [("seed", v) for v in [-1, 0.5, None, True]]
)


@pytest.mark.parametrize(("argument", "value"), MONITOR_BAD)
def test_monitor_rejects_bad_arguments(argument: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"HessianSpectrumMonitor: {argument}"):
        HessianSpectrumMonitor(**{"every_n_steps": 2, argument: value})


SCHEDULER_BAD: list[tuple[str, Any]] = (
    [("every_n_steps", v) for v in BAD_INT]
    + [("mode", v) for v in ["newton", None]]
    + [("scale", v) for v in [0, -1, math.inf, math.nan, True, None]]
    + [("fraction", v) for v in [0, -0.1, math.nan, None]]
    + [("power", v) for v in [-0.1, 1.5, math.nan, None]]
    + [("ema", v) for v in [1, -0.1, math.nan, None]]
    + [("warmup_steps", v) for v in [-1, 1.5, None, True]]
    + [("min_lr", v) for v in [-1e-3, math.inf, math.nan, None]]
    + [("max_lr", v) for v in [0, -1, math.inf, math.nan, "1"]]
    + [("loss_fn", v) for v in [3]]
    + [("probe", v) for v in ["probe", 0]]
    + [("tol", v) for v in BAD_FRACTION]
    + [("max_hvps", v) for v in [1, 2.5, None]]
    + [("warm_start", v) for v in ["true"]]
    + [("seed", v) for v in [-2, None]]
)


@pytest.mark.parametrize(("argument", "value"), SCHEDULER_BAD)
def test_scheduler_rejects_bad_arguments(argument: str, value: Any) -> None:
    with pytest.raises(ValueError, match=rf"CurvatureLRScheduler: {argument}"):
        CurvatureLRScheduler(**{argument: value})


def test_scheduler_max_lr_below_min_lr_is_refused() -> None:
    with pytest.raises(ValueError, match="CurvatureLRScheduler: max_lr"):
        CurvatureLRScheduler(min_lr=0.1, max_lr=0.01)


def test_numpy_integers_and_floats_are_accepted() -> None:
    monitor = HessianSpectrumMonitor(every_n_steps=np.int64(5), top_k=np.int32(2), tol=np.float32(1e-3), max_hvps=np.int16(30))
    assert (monitor.every_n_steps, monitor.top_k, monitor.max_hvps) == (5, 2, 30)
    assert type(monitor.every_n_steps) is int and type(monitor.tol) is float
    scheduler = CurvatureLRScheduler(every_n_steps=np.uint8(3), max_lr=np.float64(1.0), probe=np.int64(32))
    assert scheduler.every_n_steps == 3 and scheduler.probe == 32


def test_validation_helpers_name_the_owner_and_argument() -> None:
    with pytest.raises(ValueError, match=r"^Owner: arg must be an int >= 1, got 2\.5$"):
        V.check_int("Owner", "arg", 2.5, minimum=1)
    with pytest.raises(ValueError, match=r"^Owner: arg must be a finite number in \(0, 1\), got nan$"):
        V.check_float("Owner", "arg", math.nan, 0, 1, low_open=True, high_open=True)
    assert V.check_choice("Owner", "arg", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match="one of 'a', 'b'"):
        V.check_choice("Owner", "arg", 1, ("a", "b"))


class Surprise(Exception):
    """An exception type nobody anticipated."""


@pytest.mark.parametrize("error", [KeyError("missing"), Surprise("odd"), AssertionError("assert"), IndexError("index")])
def test_any_exception_inside_an_estimate_is_contained(error: Exception) -> None:
    calls = {"n": 0}

    def failing_loss(module: Any, batch: Any) -> torch.Tensor:
        calls["n"] += 1
        raise error

    monitor = HessianSpectrumMonitor(every_n_steps=1, loss_fn=failing_loss)
    scheduler = CurvatureLRScheduler(every_n_steps=1, loss_fn=failing_loss, batch_fraction=1.0)
    model = TinyNet()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(callbacks=[monitor, scheduler], max_epochs=1)
        t.fit(model, loader())
    assert t.global_step == 4 and calls["n"] == 4  # one shared forward per step serves both callbacks
    assert float(t.callback_metrics["hessian/skipped"]) == 4
    messages = [str(w.message) for w in caught if type(error).__name__ in str(w.message)]
    assert len([m for m in messages if m.startswith("HessianSpectrumMonitor")]) == 1
    assert len([m for m in messages if m.startswith("CurvatureLRScheduler")]) == 1
    assert scheduler.scheduler is not None and all(g["lr"] == 0.1 for g in t.optimizers[0].param_groups)
