"""LyapunovTwinRun when things go wrong: a diverging main run, failing user code, very long runs; and models that
need the shadow plumbing (torch.compile, nn.TransformerEncoderLayer)."""

import math
import pickle
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from chaos_callbacks.callbacks._twin_mirror import HISTORY_POINTS, Track, rescale_
from chaos_callbacks.callbacks._twin_mirror import distance as mirror_distance
from chaos_callbacks.dynamics.lyapunov import parameter_distance
from chaos_callbacks.callbacks.lyapunov_twin import LyapunovTwinRun, _fit_or_none
from chaos_callbacks.dynamics.lyapunov import local_exponent
from tests.callbacks.test_lyapunov_twin import Keep, fit
from tests.lightning_helpers import TinyNet, assert_identical_runs, fit_snapshot, loader, random_classification


def ours(caught) -> list[str]:
    return [str(w.message) for w in caught if "LyapunovTwinRun" in str(w.message)]


class ReluNet(TinyNet):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.net[1] = nn.ReLU()


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_sgd_at_lr_1e3_never_crashes_and_says_when_the_main_run_diverged(seed):
    """lr = 1e3: the tanh MLP's weights grow to ~1e4-1e5 and stay finite (the default ε follows them: no separation
    rounds to 0, no warning); the ReLU MLP's weights overflow to NaN within 10 steps: one warning, every later step
    counted in lyapunov/skipped, no re-seeding."""
    pl.seed_everything(seed, verbose=False)
    callback = LyapunovTwinRun(renormalize_every=5, n_twins=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(TinyNet(lr=1e3), loader(), [callback], max_epochs=3)
    assert ours(caught) == [] and math.isfinite(callback.mle)

    pl.seed_everything(seed, verbose=False)
    callback = LyapunovTwinRun(renormalize_every=5, n_twins=2)
    keep = Keep(callback)
    model = ReluNet(lr=1e3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, loader(), [callback, keep], max_epochs=3)
    assert not all(torch.isfinite(p).all() for p in model.parameters())
    messages = ours(caught)
    assert len(messages) == 1 and "the main run diverged: non-finite weights" in messages[0]
    first = min(s for s, m in keep.seen.items() if "lyapunov/skipped" in m)
    assert first < 12 and all(keep.seen[s] == {"lyapunov/skipped": float(s - first + 1)} for s in range(first, 13))
    assert callback._reseed_warn.count == 0


def test_twins_wait_for_finite_main_weights_then_restart():
    class Corrupt(pl.Callback):  # listed before the callback: acts after the main step, before the twins step
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 3:
                self.saved = [p.detach().clone() for p in pl_module.parameters()]
                for p in pl_module.parameters():
                    p.data.fill_(math.nan)
            if trainer.global_step == 5:
                for p, s in zip(pl_module.parameters(), self.saved):
                    p.data.copy_(s)

    callback = LyapunovTwinRun(renormalize_every=2)
    keep = Keep(callback)
    pl.seed_everything(0, verbose=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(TinyNet(), loader(), [Corrupt(), callback, keep], max_steps=10, max_epochs=None)
    assert len(ours(caught)) == 1
    assert [keep.seen[s] for s in (3, 4, 5)] == [{"lyapunov/skipped": n} for n in (1.0, 2.0, 3.0)]
    assert "lyapunov/distance" in keep.seen[6] and "lyapunov/mle" in keep.seen[7]
    assert callback.log_distance_curves()[0][0] == [5, 6, 7, 8, 9, 10]  # re-seeded from the restored weights
    assert callback._twins[0].benettin.steps == 6  # intervals 1-2, 6-7 and 8-9; the one cut by the divergence is lost


def test_a_failing_loss_fn_is_contained_and_the_twins_reseeded():
    calls = []

    def loss_fn(module, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        x, y = batch
        return nn.functional.cross_entropy(module(x), y)

    callback = LyapunovTwinRun(renormalize_every=2, loss_fn=loss_fn)
    keep = Keep(callback)
    baseline = fit_snapshot({}, [], max_steps=6, max_epochs=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        watched = fit_snapshot({}, [callback, keep], max_steps=6, max_epochs=None)
    assert_identical_runs(baseline, watched)
    messages = ours(caught)
    assert len(messages) == 2
    assert "on_train_batch_start failed at step 2 with RuntimeError: boom" in messages[0]
    assert "missed the main step 3" in messages[1] and "re-seeded" in messages[1]
    assert keep.seen[3] == {"lyapunov/skipped": 2.0}
    assert callback.log_distance_curves()[0][0] == [3, 4, 5, 6]
    assert callback._twins[0].benettin.steps == 4 and math.isfinite(callback.mle)  # steps 1-2 and 4-5


def test_the_log_distance_history_stays_bounded():
    track = Track()
    track.restart(0, 0.0)
    for step in range(1, 100_001):  # ln d = 0.01 t, then a plateau from t = 60 000
        track.record(step, 0.01 * min(step, 60_000))
        assert len(track.curve) <= HISTORY_POINTS + 1
    steps, log_d = track.curve.points()
    assert steps[0] == 0 and steps[-1] == 100_000 and np.all(np.diff(steps) > 0)
    assert len(pickle.dumps(track.state_dict())) < 100_000
    fit = _fit_or_none(track)
    assert fit.saturated and fit.slope == pytest.approx(0.01, rel=1e-9)
    full = local_exponent([0.01 * min(t, 60_000) for t in range(0, 100_001, 10)], list(range(0, 100_001, 10)))
    assert fit.slope == pytest.approx(full.slope, rel=1e-9)


# --------------------------------------------------------------------------- models that need the shadow plumbing


class Compiled(TinyNet):
    def __init__(self, compile: bool) -> None:
        super().__init__(dropout=0.2)
        if compile:
            self.net = torch.compile(self.net, backend="aot_eager")


def test_tangent_mode_on_a_compiled_module_equals_the_eager_one():
    """aot_autograd has no double backward: the Hessian products run on the eager module, with the same numbers."""
    results = []
    for compile in (False, True):
        callback = LyapunovTwinRun(mode="tangent", renormalize_every=2, n_twins=2)
        pl.seed_everything(0, verbose=False)
        data = TensorDataset(*[t.double() if t.is_floating_point() else t for t in random_classification().tensors])
        fit(Compiled(compile).double(), loader(data, shuffle=False), [callback], max_steps=4, max_epochs=None)
        results.append(callback.per_twin["mle"])
    np.testing.assert_allclose(results[1], results[0], rtol=1e-12)


class Transformer(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(2, 8)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.1, batch_first=True)
        self.head = nn.Linear(8, 3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        h = self.encoder(self.embed(x.reshape(len(x), 4, 2)))
        return nn.functional.cross_entropy(self.head(h.mean(1)), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


def test_transformer_twin_agrees_with_tangent():
    """Attention with dropout, float64: the twin (ε = 1e-8·‖θ‖) is the tangent vector to O(ε)."""
    data = TensorDataset(*[t.double() if t.is_floating_point() else t for t in random_classification().tensors])
    runs = {}
    for mode in ("twin", "tangent"):
        callback = LyapunovTwinRun(mode=mode, renormalize_every=2, n_twins=2)
        keep = Keep(callback)
        pl.seed_everything(0, verbose=False)
        fit(Transformer().double(), loader(data), [callback, keep], max_steps=6, max_epochs=None)
        runs[mode] = keep.seen
    for step in (2, 4, 6):
        for key in ("lyapunov/ftle", "lyapunov/mle", "lyapunov/mle_stderr", "lyapunov/log_distance"):
            assert runs["twin"][step][key] == pytest.approx(runs["tangent"][step][key], abs=1e-7), (step, key)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_per_step_distance_and_pull_back_against_float64(seed, dtype):
    """The chunked per-step distance (float32 chunk dots for float32/bf16 weights) is within 1e-6
    of the float64 distance of the same tensors, and the fused pull-back lands within rounding of
    m + (t − m)·f, with the distance after it re-measured exactly the same way."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(700, 300), (300,), (1 << 17,), (3, 5)]
    main = [torch.randn(s, generator=gen).to(dtype) for s in shapes]
    twin = [(m.double() + 1e-3 * torch.randn(s, generator=gen, dtype=torch.float64)).to(dtype) for m, s in zip(main, shapes)]
    for norm in ("l2", "l1"):
        exact = parameter_distance([t.double() for t in twin], [m.double() for m in main], norm)
        assert float(mirror_distance(twin, main, norm)) == pytest.approx(float(exact), rel=1e-6 if dtype != torch.float64 else 1e-13)
    expected = [(m.double() + (t.double() - m.double()) * 0.25) for t, m in zip(twin, main)]
    scale = [m.double().abs() + t.double().abs() for t, m in zip(twin, main)]  # a two-operation rounding bound
    rescale_(twin, main, 0.25)
    unit = torch.finfo(dtype).eps
    for t, e, sc in zip(twin, expected, scale):
        assert torch.all((t.double() - e).abs() <= unit * sc)
