"""GradientTailFitter against known answers: gradients that ARE alpha-stable samples.

``StableGradModule`` has parameter vectors w_l (module paths ``blocks.<l>``) and the loss
sum_l (w_l · ξ_l), so a real backward pass gives ∇w_l = ξ_l exactly, with ξ drawn from
scipy.stats.levy_stable (fixed seeds) — the fitted alpha and scale are known.
"""

from __future__ import annotations

import math
import statistics
import warnings

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from chaos_callbacks.callbacks.gradient_tails import GradientTailFitter, layer_name, sample_nonzero_entries, uniform_subset
from chaos_callbacks.dynamics.tails import mcculloch_alpha_stderr
from tests.lightning_helpers import MemoryLogger, assert_identical_runs, fit_snapshot, random_classification, run_ddp, trainer

DIM = 20_000
SCALE = 1e-3


def stable_rows(alpha: float, rows: int, dim: int = DIM, seed: int = 0, scale: float = SCALE) -> torch.Tensor:
    """``rows × dim`` i.i.d. S(alpha, 0, scale, 0) (alpha = 2: Gaussian with variance 2 scale²)."""
    if alpha == 2.0:
        x = np.random.default_rng(seed).normal(0.0, math.sqrt(2.0) * scale, (rows, dim))
    else:
        x = stats.levy_stable.rvs(alpha, 0.0, scale=scale, size=(rows, dim), random_state=seed)
    return torch.tensor(x, dtype=torch.float32)


class Vector(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))


class StableGradModule(pl.LightningModule):
    """Loss sum_l w_l · ξ_l with ξ the batch (one row per batch, split by layer sizes): ∇w_l = ξ_l."""

    def __init__(self, sizes: tuple[int, ...] = (DIM,), matmul: bool = False, fused: bool = False) -> None:
        super().__init__()
        self.sizes, self.matmul, self.fused = sizes, matmul, fused
        self.blocks = nn.ModuleList(Vector(n) for n in sizes)

    def training_step(self, batch, batch_idx):
        (xi,) = batch
        loss = 0.0
        for block, chunk in zip(self.blocks, xi[0].split(self.sizes)):
            # matmul runs in the autocast dtype under mixed precision; the product is float32
            loss = loss + (torch.matmul(block.weight, chunk) if self.matmul else (block.weight * chunk).sum())
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, fused=self.fused)


def fit_stable(xi: torch.Tensor, fitter: GradientTailFitter, sizes=(DIM,), **kwargs) -> MemoryLogger:
    """Train StableGradModule on the rows of ``xi`` (one per batch, in order) and return the log."""
    logger = MemoryLogger()
    module_kw = {k: kwargs.pop(k) for k in ("matmul", "fused") if k in kwargs}
    t = trainer(callbacks=[fitter], logger=logger, max_epochs=1, **kwargs)
    t.fit(StableGradModule(sizes, **module_kw), DataLoader(TensorDataset(xi), batch_size=1, shuffle=False))
    return logger


def median_of(logger: MemoryLogger, key: str) -> float:
    return statistics.median(logger.series(key).values())


GLOBAL_TAGS = {"alpha", "alpha_stderr", "scale", "scale_stderr", "llr_gauss_stderr", "llr_student_t_stderr", "llr_gauss", "vuong_p", "llr_student_t", "vuong_p_student_t", "zero_fraction", "zero_fraction_stderr", "skipped"}
LAYER_QUANTITIES = ("alpha", "alpha_stderr", "zero_fraction", "zero_fraction_stderr")


def layer_tags(logger: MemoryLogger) -> set[str]:
    """Logged tags of the form grad_tail/<layer>/<quantity>."""
    return {k for _, m in logger.rows for k in m if k.count("/") == 2 and not k.startswith("grad_tail/optimizer_")}


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
def sample_entries(sources, k, generator, grad_scale=1.0):
    return sample_nonzero_entries(sources, k, generator, grad_scale).values


def test_sampling_is_uniform_without_replacement_and_seeded():
    for total, k in [(6000, 5000), (10**7, 5000)]:  # dense (permutation) and sparse (distinct draws) paths
        idx = uniform_subset(total, k, torch.Generator().manual_seed(1))
        assert idx.numel() == k == idx.unique().numel() and 0 <= int(idx.min()) and int(idx.max()) < total
    # entries of two tensors holding their own global index + 1: 30000 + 10000 entries, none zero
    values = torch.arange(1, 40_001, dtype=torch.float32)
    sources = [(values[:30_000].reshape(100, 300), None), (values[30_000:], None)]
    drawn = sample_nonzero_entries(sources, 5000, torch.Generator().manual_seed(3))
    assert (drawn.draws, drawn.zeros, drawn.total, drawn.zero_fraction) == (5000 * 5 // 4 + 64, 0, 40_000, 0.0)
    draws = drawn.values
    assert torch.equal(draws, sample_entries(sources, 5000, torch.Generator().manual_seed(3))) and draws.dtype == torch.float64
    assert draws.unique().numel() == 5000
    # uniform over all 40000 entries: 3/4 from the first tensor, mean 20000.5 (4 sigma bounds)
    assert abs(float((draws <= 30_000).double().mean()) - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 5000)
    assert abs(float(draws.mean()) - 20_000.5) < 4 * 40_000 / math.sqrt(12 * 5000)
    # with a running mean the entry is g - m
    mean = torch.full((40_000,), 0.5)
    shifted = sample_entries([(values, mean)], 5000, torch.Generator().manual_seed(3))
    assert torch.equal(shifted + 0.5, sample_entries([(values, None)], 5000, torch.Generator().manual_seed(3)))
    # more samples than entries: all of them
    assert sorted(sample_entries([(torch.arange(1.0, 8.0), None)], 50, torch.Generator()).tolist()) == list(range(1, 8))


def zero_pattern(n: int, fraction: float, seed: int) -> torch.Tensor:
    """Entries 1..n (their index + 1) with exactly round(fraction n) of them set to 0 at random places."""
    values = torch.arange(1, n + 1, dtype=torch.float32)
    values[torch.from_numpy(np.random.default_rng(seed).permutation(n)[: round(fraction * n)])] = 0.0
    return values


def test_sampling_skips_exact_zeros_uniformly():
    # 60% exact zeros in two tensors: a uniform draw among the 16000 nonzero entries
    values = zero_pattern(40_000, 0.6, seed=0)
    sources = [(values[:30_000].reshape(300, 100), None), (values[30_000:], None)]
    drawn = sample_nonzero_entries(sources, 5000, torch.Generator().manual_seed(4))
    assert drawn.values.numel() == 5000 == drawn.values.unique().numel() and bool((drawn.values != 0).all())
    nonzero = values[values != 0].double()
    assert abs(float(drawn.values.mean()) - float(nonzero.mean())) < 4 * float(nonzero.std()) / math.sqrt(5000)
    share = float((nonzero <= 30_000).double().mean())
    assert abs(float((drawn.values <= 30_000).double().mean()) - share) < 4 * math.sqrt(share * (1 - share) / 5000)
    # noise target: an entry is zero when g equals its running mean (a unit whose gradient is always 0)
    mean = torch.where(torch.arange(40_000) % 2 == 0, values, torch.full((), 7.0))
    noise = sample_nonzero_entries([(values, mean)], 5000, torch.Generator().manual_seed(5))
    assert bool((noise.values != 0).all()) and noise.values.numel() == 5000
    assert set(noise.values.tolist()) <= set((values - mean)[values != mean].tolist())
    # every entry read: the count is exact, with standard error 0
    small = sample_nonzero_entries([(values[:1000], None)], 5000, torch.Generator())
    assert small.draws == 1000 and small.zero_fraction == float((values[:1000] == 0).double().mean()) and small.zero_fraction_stderr == 0.0
    assert sorted(small.values.tolist()) == sorted(values[:1000][values[:1000] != 0].tolist())
    # all zero: nothing to draw; every entry read, zero fraction exactly 1
    empty = sample_nonzero_entries([(torch.zeros(100), None)], 50, torch.Generator())
    assert empty.values.numel() == 0 and empty.zero_fraction == 1.0 and empty.zero_fraction_stderr == 0.0


@pytest.mark.parametrize("fraction", [0.3, 0.63, 0.97])
def test_zero_fraction_is_unbiased_with_its_stderr(fraction):
    # 10^6 entries, 100 seeds: the estimate averages to the exact fraction and its standard error
    # matches the spread over seeds; at 97% zeros the 20 k cap on the draw leaves ~3000 of 5000
    values = zero_pattern(10**6, fraction, seed=1)
    draws = [sample_nonzero_entries([(values, None)], 5000, torch.Generator().manual_seed(s), max_draws=100_000) for s in range(100)]
    estimates = np.array([d.zero_fraction for d in draws])
    stderr = float(np.mean([d.zero_fraction_stderr for d in draws]))
    assert abs(estimates.mean() - fraction) < 4 * estimates.std(ddof=1) / math.sqrt(100)
    assert 1 / 1.5 < stderr / estimates.std(ddof=1) < 1.5
    assert all(d.draws <= 100_000 for d in draws)
    found = [d.values.numel() for d in draws]
    assert min(found) == 5000 if fraction < 0.95 else 2000 < statistics.mean(found) < 5000


def test_layer_names_are_module_paths():
    assert layer_name("net.0.weight") == "net.0"
    assert layer_name("blocks.1.body.bias") == "blocks.1.body"
    assert layer_name("w") == "w"


# --------------------------------------------------------------------------------------------
# known alpha through a real backward pass
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [1.1, 1.3, 1.5, 1.7, 1.9])
def test_recovers_known_alpha_of_the_gradient(alpha):
    log = fit_stable(stable_rows(alpha, rows=5, seed=int(alpha * 10)), GradientTailFitter(every_n_steps=1, per_layer=False))
    assert sorted(log.series("grad_tail/alpha")) == [0, 1, 2, 3, 4]  # logged at every step
    assert median_of(log, "grad_tail/alpha") == pytest.approx(alpha, abs=0.05)
    assert median_of(log, "grad_tail/scale") == pytest.approx(SCALE, rel=0.05)
    assert median_of(log, "grad_tail/llr_gauss") > 0  # the stable law wins ...
    if alpha <= 1.7:  # ... significantly (at alpha = 1.9, 5000 samples give p of a few %)
        assert median_of(log, "grad_tail/vuong_p") < 0.01
    # ... and is not rejected for the finite-variance Student t (|V| < 2.576); at alpha = 1.9 the
    # quantile estimate can reach 2 (a Gaussian), which the t then beats
    if alpha <= 1.8:
        llr_t, p_t = log.series("grad_tail/llr_student_t").values(), log.series("grad_tail/vuong_p_student_t").values()
        assert all(llr > 0 or p > 0.01 for llr, p in zip(llr_t, p_t))
    # the standard error of McCulloch's alpha from 5000 nonzero entries; no exact zeros here
    for step, a in log.series("grad_tail/alpha").items():
        assert log.series("grad_tail/alpha_stderr")[step] == pytest.approx(mcculloch_alpha_stderr(a, 5000), rel=1e-12)
    assert set(log.series("grad_tail/zero_fraction").values()) == {0.0}
    assert all(0 < e < 1e-3 for e in log.series("grad_tail/zero_fraction_stderr").values())
    assert not any(k.endswith("hill") for _, m in log.rows for k in m)


@pytest.mark.parametrize("df", [3, 5])
def test_student_t_gradient_is_heavy_tailed_but_not_stable(df):
    """Finite-variance t(3), t(5) gradients: the stable law beats the Gaussian, loses to the t."""
    rows = torch.tensor(stats.t.rvs(df, size=(5, DIM), random_state=df) * SCALE, dtype=torch.float32)
    log = fit_stable(rows, GradientTailFitter(every_n_steps=1, per_layer=False))
    assert median_of(log, "grad_tail/llr_gauss") > 0
    assert max(log.series("grad_tail/llr_student_t").values()) < 0
    assert median_of(log, "grad_tail/vuong_p_student_t") < 0.01


def test_gaussian_gradient_gives_alpha_two_and_no_stable_preference():
    log = fit_stable(stable_rows(2.0, rows=5, seed=7), GradientTailFitter(every_n_steps=1, per_layer=False))
    assert median_of(log, "grad_tail/alpha") >= 1.95
    assert max(log.series("grad_tail/llr_gauss").values()) <= 1e-3
    assert median_of(log, "grad_tail/scale") == pytest.approx(SCALE, rel=0.05)


def test_mle_method():
    log = fit_stable(stable_rows(1.5, rows=3, seed=2), GradientTailFitter(every_n_steps=1, method="mle", per_layer=False))
    assert median_of(log, "grad_tail/alpha") == pytest.approx(1.5, abs=0.05)
    assert median_of(log, "grad_tail/scale") == pytest.approx(SCALE, rel=0.05)


def test_per_layer_alphas_named_by_module_path():
    # blocks.0: alpha 1.2, blocks.1: alpha 1.8, blocks.2: 30 entries (< 50, left out)
    sizes = (DIM, DIM, 30)
    xi = torch.cat([stable_rows(1.2, 3, seed=1), stable_rows(1.8, 3, seed=2), stable_rows(1.5, 3, 30, seed=3)], dim=1)
    log = fit_stable(xi, GradientTailFitter(every_n_steps=1), sizes=sizes)
    assert layer_tags(log) == {f"grad_tail/blocks.{i}/{q}" for i in (0, 1) for q in LAYER_QUANTITIES}
    assert median_of(log, "grad_tail/blocks.0/alpha") == pytest.approx(1.2, abs=0.05)
    assert median_of(log, "grad_tail/blocks.1/alpha") == pytest.approx(1.8, abs=0.05)
    assert median_of(log, "grad_tail/blocks.1/alpha_stderr") == pytest.approx(mcculloch_alpha_stderr(1.8, 5000), rel=0.1)
    assert 1.2 < median_of(log, "grad_tail/alpha") < 1.8  # the global sample mixes both
    # a name filter, and a cap on the number of layers (with one warning)
    log = fit_stable(xi, GradientTailFitter(every_n_steps=1, layer_filter=r"\.1$"), sizes=sizes)
    assert {t for t in layer_tags(log) if t.endswith("/alpha")} == {"grad_tail/blocks.1/alpha"}
    with pytest.warns(UserWarning, match="max_layers=1"):
        log = fit_stable(xi, GradientTailFitter(every_n_steps=1, max_layers=1), sizes=sizes)
    assert {t for t in layer_tags(log) if t.endswith("/alpha")} == {"grad_tail/blocks.0/alpha"}


def test_accumulated_gradient_is_fitted():
    # accumulate_grad_batches=2: Lightning divides each loss by 2, so the optimizer's gradient is
    # (ξ1 + ξ2)/2 ~ S(alpha, 0, scale 2^(1/alpha - 1), 0): same alpha, smaller scale
    alpha = 1.5
    log = fit_stable(stable_rows(alpha, rows=10, seed=5), GradientTailFitter(every_n_steps=1, per_layer=False), accumulate_grad_batches=2)
    assert sorted(log.series("grad_tail/alpha")) == [0, 1, 2, 3, 4]  # one fit per optimizer step
    assert median_of(log, "grad_tail/alpha") == pytest.approx(alpha, abs=0.05)
    assert median_of(log, "grad_tail/scale") == pytest.approx(SCALE * 2 ** (1 / alpha - 1), rel=0.05)


# --------------------------------------------------------------------------------------------
# mixed precision
# --------------------------------------------------------------------------------------------
def test_bf16_mixed_fits_the_gradient():
    # the loss is a matmul, which autocast runs in bfloat16; gradients stay float32
    log = fit_stable(stable_rows(1.5, rows=3, seed=4), GradientTailFitter(every_n_steps=1, per_layer=False), precision="bf16-mixed", matmul=True)
    assert median_of(log, "grad_tail/alpha") == pytest.approx(1.5, abs=0.05)
    assert median_of(log, "grad_tail/scale") == pytest.approx(SCALE, rel=0.05)


@pytest.mark.parametrize("fused", [False, True])
def test_16_mixed_grad_scaler_fits_the_unscaled_gradient(fused):
    # a real torch.amp.GradScaler (initial scale 65536) on the CPU: Lightning unscales before
    # on_before_optimizer_step; a fused optimizer unscales inside step(), so the fitter divides
    plugin = MixedPrecision("16-mixed", "cpu")
    log = fit_stable(stable_rows(1.5, rows=3, seed=4), GradientTailFitter(every_n_steps=1, per_layer=False), plugins=[plugin], fused=fused)
    assert plugin.scaler.get_scale() == 65536.0
    assert median_of(log, "grad_tail/alpha") == pytest.approx(1.5, abs=0.05)
    assert median_of(log, "grad_tail/scale") == pytest.approx(SCALE, rel=0.05)


def test_16_mixed_overflow_step_is_skipped():
    # fp16 matmul output: its incoming gradient 65536 overflows float16 -> inf gradients at step 0;
    # the scaler skips that step and halves its scale, the fitter skips it with one warning.
    # (alpha = 1.9: at scale 32768 an entry |ξ| > 2 = 2000 SCALE would overflow again)
    plugin = MixedPrecision("16-mixed", "cpu")
    fitter = GradientTailFitter(every_n_steps=1, per_layer=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = fit_stable(stable_rows(1.9, rows=3, seed=4), fitter, plugins=[plugin], matmul=True)
    ours = [w for w in caught if "GradientTailFitter" in str(w.message)]
    assert len(ours) == 1 and "non-finite" in str(ours[0].message)
    assert log.series("grad_tail/skipped") == {0: 1.0}
    assert plugin.scaler.get_scale() == 32768.0
    assert sorted(log.series("grad_tail/alpha")) == [1, 2]
    assert median_of(log, "grad_tail/alpha") == pytest.approx(1.9, abs=0.1)
    assert median_of(log, "grad_tail/scale") == pytest.approx(SCALE, rel=0.05)


# --------------------------------------------------------------------------------------------
# gradient noise
# --------------------------------------------------------------------------------------------
def test_noise_target_removes_the_running_mean():
    # g_t = mu + ξ_t with a fixed Gaussian mean mu (50x the noise scale). With m_0 = g_0 and
    # m_t = β m_{t-1} + (1-β) g_t, the noise g_t - m_{t-1} = ξ_t - sum_s w_s ξ_s (weights summing
    # to one: mu cancels) is S(alpha, 0, scale c_t, 0), c_t^alpha = 1 + β^(alpha(t-1)) + sum_j ((1-β)β^j)^alpha
    alpha, beta, rows = 1.5, 0.9, 8
    mu = torch.tensor(np.random.default_rng(0).normal(0.0, 50 * SCALE, DIM), dtype=torch.float32)
    g = mu + stable_rows(alpha, rows, seed=9)
    noise = fit_stable(g, GradientTailFitter(every_n_steps=1, target="noise", ema_decay=beta, per_layer=False))
    plain = fit_stable(g, GradientTailFitter(every_n_steps=1, per_layer=False))
    assert median_of(plain, "grad_tail/alpha") > 1.9  # the raw gradient is dominated by the Gaussian mean
    assert sorted(noise.series("grad_tail/alpha")) == list(range(1, rows))  # step 0: no running mean yet
    assert median_of(noise, "grad_tail/alpha") == pytest.approx(alpha, abs=0.05)
    ratios = []
    for t, scale in noise.series("grad_tail/scale").items():
        c = (1 + beta ** (alpha * (t - 1)) + sum(((1 - beta) * beta**j) ** alpha for j in range(t - 1))) ** (1 / alpha)
        ratios.append(scale / (SCALE * c))
    assert statistics.median(ratios) == pytest.approx(1.0, abs=0.05)


# --------------------------------------------------------------------------------------------
# contracts: no harm, logging, robustness, resume, DDP
# --------------------------------------------------------------------------------------------
def test_bit_identical_training_with_fitter():
    model_kwargs = dict(batch_norm=True, dropout=0.3, momentum=0.9)
    kw = dict(max_epochs=2, accumulate_grad_batches=2)
    baseline = fit_snapshot(model_kwargs, [], **kw)
    for target in ("gradient", "noise"):
        fitter = GradientTailFitter(every_n_steps=1, target=target, num_samples=100)
        watched = fit_snapshot(model_kwargs, [fitter], **kw)
        assert "grad_tail/net.0/alpha" in fitter.last_estimate, fitter.last_estimate
        assert_identical_runs(baseline, watched)


def test_tensorboard_scalars_histogram_and_figure(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    fitter = GradientTailFitter(every_n_steps=3, figure_every_n_estimates=2)
    t = trainer(callbacks=[fitter], logger=logger, max_epochs=1, log_every_n_steps=50)
    t.fit(StableGradModule((DIM, 500)), DataLoader(TensorDataset(stable_rows(1.5, 7, DIM + 500)), batch_size=1))
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 10, "histograms": 10})
    acc.Reload()
    tags = [f"grad_tail/{q}" for q in GLOBAL_TAGS - {"skipped"}] + [f"grad_tail/blocks.{i}/{q}" for i in (0, 1) for q in LAYER_QUANTITIES]
    for tag in tags:
        assert [e.step for e in acc.Scalars(tag)] == [0, 3, 6], tag
    assert [e.step for e in acc.Histograms("grad_tail/log10_abs_samples")] == [0, 3, 6]
    assert [e.step for e in acc.Images("grad_tail/density")] == [0, 3]  # estimates 1 and 2 (powers of two), not 3
    assert "grad_tail/alpha" in t.callback_metrics


def _zero(w, xi):
    return (w * 0.0).sum()


def _nan(w, xi):
    return (w * float("nan")).sum()


def _constant(w, xi):
    return w.sum()


@pytest.mark.parametrize(
    ("loss", "message", "estimate"),
    [
        (_zero, "need at least 50 finite samples, got 0", {"grad_tail/zero_fraction": 1.0, "grad_tail/zero_fraction_stderr": 0.0}),
        (_nan, "non-finite", {}),
        (_constant, "all finite samples are equal", {"grad_tail/zero_fraction": 0.0, "grad_tail/zero_fraction_stderr": 0.0}),
    ],
)
def test_degenerate_gradients_are_skipped_with_one_warning(loss, message, estimate):
    class Degenerate(StableGradModule):
        def training_step(self, batch, batch_idx):
            return loss(self.blocks[0].weight, batch[0][0])

    fitter = GradientTailFitter(every_n_steps=1, per_layer=False)
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(callbacks=[fitter], logger=logger, max_epochs=1)
        t.fit(Degenerate((2000,)), DataLoader(TensorDataset(stable_rows(1.5, 4, 2000)), batch_size=1))
    assert t.global_step == 4
    ours = [w for w in caught if "GradientTailFitter" in str(w.message)]
    assert len(ours) == 1 and message in str(ours[0].message), [str(w.message) for w in ours]
    assert logger.series("grad_tail/skipped") == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    assert fitter.last_estimate == estimate and fitter.state_dict()["skipped"] == 4


def with_zeros(x: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """``x`` with exactly ``round(fraction * columns)`` entries of every row set to 0 (random places,
    from numpy's generator: the fitter draws with torch generators seeded by the step)."""
    rng = np.random.default_rng(seed)
    out = x.clone()
    for row in out:
        row[torch.from_numpy(rng.permutation(row.numel())[: round(fraction * row.numel())])] = 0.0
    return out


@pytest.mark.parametrize("alpha", [1.2, 1.8])
def test_exact_zeros_are_left_out_and_counted(alpha):
    # 60% exact zeros (the ResNet-18 case: 63%) used to zero the interquartile range and skip
    # every fit; the nonzero entries are S(alpha, 0, SCALE, 0) samples
    rows = 8
    xi = with_zeros(stable_rows(alpha, rows=rows, seed=int(alpha * 10)), 0.6, seed=1)
    log = fit_stable(xi, GradientTailFitter(every_n_steps=1))
    assert sorted(log.series("grad_tail/alpha")) == list(range(rows))
    for tag in ("grad_tail/zero_fraction", "grad_tail/blocks.0/zero_fraction"):  # estimated from ~15000 draws
        for step, estimate in log.series(tag).items():
            assert abs(estimate - 0.6) < 4 * log.series(f"{tag}_stderr")[step] and log.series(f"{tag}_stderr")[step] < 0.003
    for tag in ("grad_tail/alpha", "grad_tail/blocks.0/alpha"):
        # unbiased within 3 standard errors of the mean of 8 independent fits
        stderr = statistics.mean(log.series(f"{tag}_stderr").values()) / math.sqrt(rows)
        assert abs(statistics.mean(log.series(tag).values()) - alpha) < 3 * stderr
    assert median_of(log, "grad_tail/scale") == pytest.approx(SCALE, rel=0.05)
    # the 5000 fitted entries were all nonzero: the standard error of n = 5000
    for step, a in log.series("grad_tail/alpha").items():
        assert log.series("grad_tail/alpha_stderr")[step] == pytest.approx(mcculloch_alpha_stderr(a, 5000), rel=1e-12)
    assert "grad_tail/skipped" not in {k for _, m in log.rows for k in m}


def test_all_zero_layer_is_skipped_alone():
    # blocks.0: alpha 1.3; blocks.1: gradient exactly 0 everywhere
    xi = torch.cat([stable_rows(1.3, 4, seed=6), torch.zeros(4, DIM)], dim=1)
    fitter = GradientTailFitter(every_n_steps=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = fit_stable(xi, fitter, sizes=(DIM, DIM))
    ours = [str(w.message) for w in caught if "GradientTailFitter" in str(w.message)]
    assert len(ours) == 1 and "'blocks.1'" in ours[0], ours
    for step, estimate in log.series("grad_tail/zero_fraction").items():
        assert abs(estimate - 0.5) < 4 * log.series("grad_tail/zero_fraction_stderr")[step]
    assert set(log.series("grad_tail/blocks.1/zero_fraction").values()) == {1.0}  # every entry read: exact
    assert set(log.series("grad_tail/blocks.1/zero_fraction_stderr").values()) == {0.0}
    assert "grad_tail/blocks.1/alpha" not in {k for _, m in log.rows for k in m}
    assert median_of(log, "grad_tail/blocks.0/alpha") == pytest.approx(1.3, abs=0.05)
    assert median_of(log, "grad_tail/alpha") == pytest.approx(1.3, abs=0.05)  # the zeros are left out


def test_skipped_global_fit_does_not_stop_layer_fits():
    # blocks.1 has a NaN gradient: the global fit is skipped, blocks.0 is still fitted
    class HalfNan(StableGradModule):
        def training_step(self, batch, batch_idx):
            (xi,) = batch
            return (self.blocks[0].weight * xi[0]).sum() + (self.blocks[1].weight * float("nan")).sum()

    fitter = GradientTailFitter(every_n_steps=1)
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(callbacks=[fitter], logger=logger, max_epochs=1)
        t.fit(HalfNan((DIM, DIM)), DataLoader(TensorDataset(stable_rows(1.6, 3, seed=8)), batch_size=1))
    ours = [str(w.message) for w in caught if "GradientTailFitter" in str(w.message)]
    assert len(ours) == 1 and "non-finite" in ours[0], ours
    assert logger.series("grad_tail/skipped") == {0: 1.0, 1: 2.0, 2: 3.0}
    assert "grad_tail/alpha" not in {k for _, m in logger.rows for k in m}
    assert sorted(logger.series("grad_tail/blocks.0/alpha")) == [0, 1, 2]
    assert median_of(logger, "grad_tail/blocks.0/alpha") == pytest.approx(1.6, abs=0.05)


BAD_ARGUMENTS = [
    ("every_n_steps", [0, -1, 2.0, True, None, "5", float("nan")]),
    ("num_samples", [49, 5000.0, True, None]),
    ("method", ["scipy", "MLE", None, 1]),
    ("target", ["weights", None, 0]),
    ("ema_decay", [0.0, 1.0, -0.5, float("nan"), float("inf"), True, None, "0.9"]),
    ("per_layer", [1, 0, None, "yes"]),
    ("layer_filter", ["net.(", 3, b"net"]),
    ("max_layers", [0, -2, 1.0, None]),
    ("figure_every_n_estimates", [-1, 0.5, None, False]),
    ("seed", [-1, 1.5, None, True]),
]


@pytest.mark.parametrize(("name", "value"), [(n, v) for n, values in BAD_ARGUMENTS for v in values])
def test_invalid_arguments(name, value):
    with pytest.raises(ValueError, match=f"^GradientTailFitter: {name} must be"):
        GradientTailFitter(**{name: value})


def test_valid_arguments_are_normalised():
    fitter = GradientTailFitter(every_n_steps=np.int64(3), num_samples=np.int32(100), ema_decay=np.float32(0.5), seed=np.uint8(7), per_layer=np.bool_(False))
    assert (fitter.every_n_steps, fitter.num_samples, fitter.seed) == (3, 100, 7)
    assert type(fitter.every_n_steps) is int and fitter.ema_decay == 0.5 and fitter.per_layer is False


# --------------------------------------------------------------------------------------------
# several optimizers: a GAN trained with manual optimization
# --------------------------------------------------------------------------------------------
class StableGAN(pl.LightningModule):
    """A GAN's training step as in the Lightning docs (manual optimization, two optimizers,
    ``toggle_optimizer``, ``self.log`` of each loss, ``manual_backward``, ``step``, ``zero_grad``),
    with losses linear in the weights so that the gradients are known: the generator's is the
    batch's ξ_g, the discriminator's its ξ_d. ``global_step`` advances twice per batch."""

    def __init__(self, dim: int = DIM) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = Vector(dim)
        self.discriminator = Vector(dim)

    def training_step(self, batch, batch_idx):
        xi_g, xi_d = batch
        opt_g, opt_d = self.optimizers()

        self.toggle_optimizer(opt_g)
        g_loss = (self.generator.weight * xi_g[0]).sum()
        self.log("g_loss", g_loss, prog_bar=True)
        self.manual_backward(g_loss)
        opt_g.step()
        opt_g.zero_grad()
        self.untoggle_optimizer(opt_g)

        self.toggle_optimizer(opt_d)
        d_loss = (self.discriminator.weight * xi_d[0]).sum()
        self.log("d_loss", d_loss, prog_bar=True)
        self.manual_backward(d_loss)
        opt_d.step()
        opt_d.zero_grad()
        self.untoggle_optimizer(opt_d)

    def configure_optimizers(self):
        return [torch.optim.SGD(self.generator.parameters(), lr=0.1), torch.optim.SGD(self.discriminator.parameters(), lr=0.1)]


def gan_data(batches: int = 6) -> DataLoader:
    """Generator gradients S(1.2, 0, SCALE, 0), discriminator gradients S(1.8, 0, SCALE, 0)."""
    return DataLoader(TensorDataset(stable_rows(1.2, batches, seed=11), stable_rows(1.8, batches, seed=12)), batch_size=1)


def test_gan_fits_each_optimizer_at_its_own_steps():
    logger = MemoryLogger()
    t = trainer(callbacks=[GradientTailFitter(every_n_steps=2)], logger=logger, max_epochs=1)
    t.fit(StableGAN(), gan_data(6))
    assert t.global_step == 12  # two optimizer steps per batch
    # each optimizer's steps 0, 2, 4 fall in batches 0, 2, 4: logged at the step of the user's metrics
    for part, alpha in (("optimizer_0", 1.2), ("optimizer_1", 1.8)):
        assert sorted(log_steps := logger.series(f"grad_tail/{part}/alpha")) == [0, 2, 4], log_steps
        assert median_of(logger, f"grad_tail/{part}/alpha") == pytest.approx(alpha, abs=0.05)
        assert set(logger.series(f"grad_tail/{part}/zero_fraction").values()) == {0.0}
    assert median_of(logger, "grad_tail/generator/alpha") == pytest.approx(1.2, abs=0.05)
    assert median_of(logger, "grad_tail/discriminator/alpha") == pytest.approx(1.8, abs=0.05)
    assert not any(k.startswith(("grad_tail/alpha", "grad_tail/scale")) for _, m in logger.rows for k in m)


def user_rows(callbacks, tmp_path) -> list[tuple[str, str, str]]:
    """(step, g_loss, d_loss) of the CSV rows that hold the user's own metrics."""
    import csv

    from lightning.pytorch.loggers import CSVLogger

    t = trainer(callbacks=callbacks, logger=CSVLogger(tmp_path, name="gan"), max_epochs=2, log_every_n_steps=1)
    t.fit(StableGAN(500), DataLoader(TensorDataset(stable_rows(1.5, 3, 500, seed=1), stable_rows(1.5, 3, 500, seed=2)), batch_size=1))
    with open(tmp_path / "gan" / "version_0" / "metrics.csv") as f:
        return [(r["step"], r["g_loss"], r["d_loss"]) for r in csv.DictReader(f) if r["g_loss"] or r["d_loss"]]


def test_gan_user_metrics_are_untouched(tmp_path):
    plain = user_rows([], tmp_path / "plain")
    assert [r[0] for r in plain] == ["0", "1", "2", "3", "4", "5"] and all(g and d for _, g, d in plain)
    assert user_rows([GradientTailFitter(every_n_steps=2, num_samples=100)], tmp_path / "watched") == plain


def test_resume_continues_as_if_never_interrupted(tmp_path):
    xi = torch.tensor(np.random.default_rng(0).normal(5e-3, 1e-3, (4, 3000)), dtype=torch.float32) + stable_rows(1.5, 4, 3000, seed=1)

    def run(ckpt_path=None, save=False):
        fitter = GradientTailFitter(every_n_steps=2, num_samples=1000, target="noise", ema_decay=0.7)
        logger = MemoryLogger()
        cbs = [fitter] + ([ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")] if save else [])
        t = trainer(callbacks=cbs, logger=logger, max_epochs=4, enable_checkpointing=save)
        t.fit(StableGradModule((3000,)), DataLoader(TensorDataset(xi), batch_size=1, shuffle=False), ckpt_path=ckpt_path)
        return {s: m for s, m in logger.rows if any(k.startswith("grad_tail/") for k in m)}, fitter

    full, _ = run(save=True)
    resumed, fitter = run(ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert sorted(full) == [2, 4, 6, 8, 10, 12, 14] and sorted(resumed) == [8, 10, 12, 14]
    for step in resumed:
        assert resumed[step] == full[step]  # the running mean of the gradient was restored
    assert fitter.state_dict()["num_estimates"] == {0: len(full)}


def test_checkpoint_of_the_single_optimizer_version_loads():
    fitter = GradientTailFitter()
    fitter.load_state_dict({"ema": {}, "last_step": 7, "num_estimates": 3, "skipped": 1})
    assert fitter.state_dict() == {"ema": {}, "optimizer_steps": {0: 8}, "num_estimates": {0: 3}, "skipped": 1}


def test_unexpected_errors_are_contained(monkeypatch):
    """An exception inside the hook warns once, counts as skipped, and training goes on."""

    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("chaos_callbacks.callbacks.gradient_tails.analyse_tails", broken)
    fitter = GradientTailFitter(every_n_steps=1, per_layer=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log = fit_stable(stable_rows(1.5, rows=3, seed=3), fitter)
    ours = [str(w.message) for w in caught if "GradientTailFitter" in str(w.message)]
    assert len(ours) == 1 and "RuntimeError: boom" in ours[0], ours
    assert log.series("grad_tail/skipped") == {0: 1.0, 1: 2.0, 2: 3.0}
    assert "grad_tail/alpha" not in {k for _, m in log.rows for k in m}


def test_state_keys_distinguish_instances():
    assert GradientTailFitter().state_key != GradientTailFitter(target="noise").state_key


def ddp_scenario(devices: int):
    """32 examples: 2 ranks × 16 or 1 process × 32 — the same (all-reduced) global gradient."""
    pl.seed_everything(0, verbose=False)
    from tests.lightning_helpers import TinyNet

    model = TinyNet().double()
    data = random_classification(n=32)
    dataset = TensorDataset(data.tensors[0].double(), data.tensors[1])
    dl = DataLoader(dataset, batch_size=32 // devices, shuffle=False)
    fitter = GradientTailFitter(every_n_steps=1, num_samples=100)

    def collect(trainer, model, callbacks):
        return callbacks[0].last_estimate

    return model, dl, [fitter], collect, dict(max_steps=2, max_epochs=None)


@pytest.mark.ddp
def test_ddp_ranks_fit_identically(tmp_path):
    ranks = run_ddp("tests.callbacks.test_gradient_tails:ddp_scenario", tmp_path / "ddp", devices=2)
    # the single-process reference on the union of the shards, in-process (a launch costs ~15 s)
    model, dl, callbacks, collect, kwargs = ddp_scenario(1)
    t = trainer(callbacks=callbacks, **kwargs)
    t.fit(model, dl)
    single = collect(t, model, callbacks)
    assert ranks[0] == ranks[1] and "grad_tail/net.0/alpha" in ranks[0]
    assert ranks[0].keys() == single.keys()
    for key in single:
        assert ranks[0][key] == pytest.approx(single[key], rel=1e-6, abs=1e-12), key


def test_tails_heavier_than_the_fit_covers_are_skipped_not_logged_at_the_bound():
    """Pareto tails of index 0.3 (|g| = U^(-1/0.3), random signs): McCulloch's α is clipped to 0.5 — a
    censored value, not an estimate — so neither the global nor the layer α is logged; one warning each."""
    g = torch.Generator().manual_seed(0)
    heavy = torch.rand(3, DIM, generator=g).pow(-1 / 0.3) * torch.sign(torch.randn(3, DIM, generator=g))
    with pytest.warns(UserWarning, match=r"heavier than α = 0.5") as caught:
        log = fit_stable(heavy.float(), GradientTailFitter(every_n_steps=1, per_layer=True))
    assert not log.series("grad_tail/alpha") and not layer_tags(log) & {"grad_tail/blocks.0/alpha"}
    assert max(log.series("grad_tail/skipped").values()) == 3  # every global fit, counted
    assert len([w for w in caught if "heavier than" in str(w.message)]) == 2  # global and the layer, once each
    # a Cauchy gradient (α = 1) next to it is still estimated
    log = fit_stable(stable_rows(1.0, rows=3, seed=1), GradientTailFitter(every_n_steps=1, per_layer=False))
    assert median_of(log, "grad_tail/alpha") == pytest.approx(1.0, abs=0.06)
