"""LyapunovTwinRun against exact realised exponents: random products of matrices over the same mini-batches
(weights of size 1 and of 1e10), gradient clipping by value, manual optimization, bf16-mixed, and the
standard error over twins."""

import math
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from chaos_callbacks.callbacks.lyapunov_twin import LyapunovTwinRun
from chaos_callbacks.dynamics.lyapunov import random_perturbation
from tests.callbacks.test_lyapunov_twin import LAMBDAS, W_STAR, Keep, LeastSquares, fit, least_squares_data, linear_map_exponent

FEATURES, EXAMPLES, BATCH = 4, 64, 8


class LinearRegression(pl.LightningModule):
    """mean((Xw − y)²) on mini-batches with SGD: the step is affine, w ← (I − ηH_t)w + ηc_t with H_t = (2/B)X_tᵀX_t,
    so any separation evolves by the realised product M_t⋯M_1, M_t = I − ηH_t, whatever the weights."""

    def __init__(self, w0: torch.Tensor, lr: float, manual: bool = False) -> None:
        super().__init__()
        self.lr = lr
        self.automatic_optimization = not manual
        self.linear = nn.Linear(len(w0), 1, bias=False).to(w0.dtype)
        with torch.no_grad():
            self.linear.weight.copy_(w0.reshape(1, -1))

    def loss(self, batch):
        x, y = batch
        return nn.functional.mse_loss(self.linear(x), y)

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return self.loss(batch)
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(self.loss(batch))
        opt.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def regression(seed: int, scale: float):
    """Whitened inputs (XᵀX/n = I over the epoch), targets of an exact w* of size ``scale``, and w0 = w* + N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.linalg.qr(torch.randn(EXAMPLES, FEATURES, generator=g, dtype=torch.float64))[0] * math.sqrt(EXAMPLES)
    w_star = scale * torch.randn(FEATURES, generator=g, dtype=torch.float64)
    w0 = w_star + torch.randn(FEATURES, generator=g, dtype=torch.float64)
    return x, (x @ w_star).reshape(-1, 1), w0


def realised_exponents(x: torch.Tensor, lr: float, steps: int, n_twins: int, seed: int) -> list[float]:
    """(1/T) ln ‖M_T⋯M_1 u_i‖/‖u_i‖ for the callback's twin directions u_i over the loader's batches (float64).

    For a linear map the Benettin sum telescopes to this whatever the renormalisation schedule.
    """
    generator = torch.Generator().manual_seed(seed)
    directions = [random_perturbation([torch.zeros(1, FEATURES, dtype=torch.float64)], 1.0, "l2", generator)[0] for _ in range(n_twins)]
    batches = EXAMPLES // BATCH
    exponents = []
    for u in directions:
        v, log_growth = u.reshape(-1), 0.0
        for t in range(steps):
            xb = x[(t % batches) * BATCH : (t % batches + 1) * BATCH]
            v = v - lr * (2 / BATCH) * (xb.T @ (xb @ v))
            log_growth += math.log(float(v.norm()))
            v = v / v.norm()
        exponents.append(log_growth / steps)
    return exponents


def stderr(values) -> float:
    return float(np.std(values, ddof=1) / math.sqrt(len(values)))


# (lr, size of w*, steps): η = 0.05 contracts (exponents ≈ −0.10); the same with weights of 1e10, where float64
# rounding (spacing 2e-6) erases an absolute ε of 1e-8; η = 1.1 is unstable (exponents 0.4-0.6), the weights grow
# from 1 past 1e9 along the top Lyapunov vector
PRODUCTS = {"contracting": (0.05, 1.0, 96), "weights-1e10": (0.05, 1e10, 96), "growing": (1.1, 1.0, 56)}
PRODUCT_TOLERANCE = {torch.float64: 1e-7, torch.float32: 1e-3}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("case", PRODUCTS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_random_products_match_the_exact_realised_exponents(dtype, case, seed):
    lr, scale, steps = PRODUCTS[case]
    x, y, w0 = regression(seed, scale)
    exact = realised_exponents(x, lr, steps, n_twins=3, seed=seed)
    callback = LyapunovTwinRun(renormalize_every=8, n_twins=3, seed=seed)
    keep = Keep(callback)
    model = LinearRegression(w0.to(dtype), lr)
    data = DataLoader(TensorDataset(x.to(dtype), y.to(dtype)), batch_size=BATCH)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(model, data, [callback, keep], max_steps=steps, max_epochs=None)
    assert not [w for w in caught if "LyapunovTwinRun" in str(w.message)]
    weights = float(model.linear.weight.abs().max())
    assert weights > (1e9 if case != "contracting" else 0.1)
    tol = PRODUCT_TOLERANCE[dtype]
    np.testing.assert_allclose(callback.per_twin["mle"], exact, atol=tol, rtol=0)
    assert keep.seen[steps]["lyapunov/mle"] == pytest.approx(np.mean(exact), abs=tol)
    assert keep.seen[steps]["lyapunov/mle_stderr"] == pytest.approx(stderr(exact), abs=tol)
    assert callback._reseed_warn.count == 0 and callback._skip_warn.count == 0


def test_an_explicit_epsilon_keeps_its_absolute_size_with_one_warning():
    """The paper's absolute ε = 1e-8 next to float64 weights of 1e10 is erased by rounding: one warning, no log of 0,
    no crash, the collapsed twin counted; the default ε on the same run matches the exact exponent (test above)."""
    x, y, w0 = regression(0, 1e10)
    callback = LyapunovTwinRun(renormalize_every=8, epsilon=1e-8)
    data = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(ValueError, match="erased by rounding"):  # at fit start: nothing to measure
            fit(LinearRegression(w0, 0.05), data, [callback], max_steps=16, max_epochs=None)
    ours = [str(w.message) for w in caught if "LyapunovTwinRun" in str(w.message)]
    assert len(ours) == 1 and "epsilon=1e-08 is within 100x of the rounding" in ours[0]
    # weights of 1e7: 1e-8 survives their rounding (u·‖θ‖ = 1e-9), to ~10 %: warned once, roughly measured
    x, y, w0 = regression(0, 1e7)
    exact = realised_exponents(x, 0.05, 48, n_twins=1, seed=0)[0]
    callback = LyapunovTwinRun(renormalize_every=8, epsilon=1e-8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(LinearRegression(w0, 0.05), DataLoader(TensorDataset(x, y), batch_size=BATCH), [callback], max_steps=48, max_epochs=None)
    ours = [str(w.message) for w in caught if "LyapunovTwinRun" in str(w.message)]
    assert len(ours) == 1 and "rounding" in ours[0]
    assert callback.mle == pytest.approx(exact, abs=1e-2)


# --------------------------------------------------------------------------- gradient clipping by value


class Trajectory(pl.Callback):
    """The main weights at the start of every batch."""

    def __init__(self) -> None:
        self.w = []

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.w.append(pl_module.linear.weight.detach().reshape(-1).double().clone())


def test_clipping_by_value_is_mirrored_exactly():
    """Least squares with H = diag(8, 2, ½), η = 0.1, gradients clipped to ±½: a clipped coordinate moves by the
    constant ηc whatever the weights, so the step's Jacobian is diag(1 − ηλ_i if |g_i| < c else 1). The twins
    follow the main run's clipping (clipping them by norm instead separates them at O(ηc) per step)."""
    clip, lr, steps = 0.5, 0.1, 100
    w0 = W_STAR + torch.tensor([1.03, -1.07, 0.5], dtype=torch.float64)
    callback = LyapunovTwinRun(renormalize_every=10, n_twins=2, seed=4)
    keep, trajectory = Keep(callback), Trajectory()
    fit(
        LeastSquares(lr, w0), least_squares_data(torch.float64), [trajectory, callback, keep],
        max_steps=steps, max_epochs=None, gradient_clip_val=clip, gradient_clip_algorithm="value",
    )
    gradients = torch.stack([LAMBDAS * (w - W_STAR) for w in trajectory.w])
    assert (gradients.abs() - clip).abs().min() > 1e-6  # no coordinate near the clipping threshold: twins clip alike
    clipped = gradients.abs() > clip
    assert clipped[:10, 0].all() and not clipped[-50:].any()  # clipping bites early and stops later
    generator = torch.Generator().manual_seed(4)
    exact = []
    for _ in range(2):
        (u,) = random_perturbation([torch.zeros(1, 3, dtype=torch.float64)], 1.0, "l2", generator)
        v = u.reshape(3)
        for mask in clipped:
            v = torch.where(mask, v, (1 - lr * LAMBDAS) * v)
        exact.append(math.log(float(v.norm())) / steps)
    np.testing.assert_allclose(callback.per_twin["mle"], exact, atol=1e-8, rtol=0)
    assert keep.seen[steps]["lyapunov/mle_stderr"] == pytest.approx(stderr(exact), abs=1e-8)


# --------------------------------------------------------------------------- manual optimization, bf16-mixed


@pytest.mark.parametrize("mode", ["twin", "tangent"])
def test_manual_optimization_follows_the_first_optimizer_through_loss_fn(mode):
    lr, steps = 0.05, 48
    x, y, w0 = regression(1, 1.0)
    exact = realised_exponents(x, lr, steps, n_twins=2, seed=1)
    callback = LyapunovTwinRun(mode=mode, renormalize_every=8, n_twins=2, seed=1, loss_fn=lambda m, b: m.loss(b))
    keep = Keep(callback)
    fit(LinearRegression(w0, lr, manual=True), DataLoader(TensorDataset(x, y), batch_size=BATCH), [callback, keep], max_steps=steps, max_epochs=None)
    assert sorted(keep.seen) == list(range(1, steps + 1))
    np.testing.assert_allclose(callback.per_twin["mle"], exact, atol=1e-8, rtol=0)


def test_manual_optimization_that_skips_steps_is_followed():
    """A manual module that steps every other batch: the twin sums loss_fn's gradients until the main step, as the
    module's manual_backward does, and steps with it (here: gradient accumulation by hand, full batch in 2 halves)."""

    class EveryOther(LeastSquares):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            self.manual_backward(half_loss(self, batch))
            if batch_idx % 2:
                opt.step()
                opt.zero_grad()

    def half_loss(module, batch):  # half the mean over 2 rows: the two halves sum to the full-batch MSE
        x, y = batch
        return nn.functional.mse_loss(module.linear(x), y) / 2

    loader = least_squares_data(torch.float64)
    halves = DataLoader(loader.dataset, batch_size=2)
    lr, steps = 0.3, 30
    callback = LyapunovTwinRun(renormalize_every=5, seed=2, loss_fn=half_loss)
    keep = Keep(callback)
    fit(EveryOther(lr, W_STAR), halves, [callback, keep], max_steps=steps, max_epochs=None)
    assert sorted(keep.seen) == list(range(1, steps + 1))
    assert callback.mle == pytest.approx(linear_map_exponent([lr] * steps, 2, torch.float64), abs=1e-8)


def test_bf16_mixed_exponent_sits_within_the_rounding_noise_of_the_exact_one():
    """Under bf16-mixed both runs round the weights and activations to bfloat16 (u = 2⁻⁸); with the default ε = 0.1·‖θ‖
    the measured exponent of the linear GD map is within a few 1e-3 of the exact one — stable, unstable, and with the
    weights diverging to 1e10."""
    for lr, steps, offset in [(0.1, 100, 1.0), (0.3, 50, 0.0), (0.3, 70, 1.0)]:
        w0 = W_STAR + offset * torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
        for seed in range(3):
            callback = LyapunovTwinRun(renormalize_every=10, seed=seed)
            fit(LeastSquares(lr, w0.float()), least_squares_data(torch.float32), [callback], max_steps=steps, max_epochs=None, precision="bf16-mixed")
            exact = linear_map_exponent([lr] * steps, seed, torch.float32)
            assert callback.mle == pytest.approx(exact, abs=5e-3), (lr, offset, seed)
