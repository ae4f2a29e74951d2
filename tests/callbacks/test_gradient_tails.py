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
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.plugins import MixedPrecision
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from chaos_callbacks.callbacks.gradient_tails import GradientTailFitter, layer_name, sample_entries, uniform_subset
from tests.lightning_helpers import assert_identical_runs, fit_snapshot, random_classification, run_ddp, trainer

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


class MemoryLogger(Logger):
    """Keeps every ``log_metrics`` call as (step, metrics)."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[int, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.rows.append((step, dict(metrics)))

    def series(self, key: str) -> dict[int, float]:
        return {step: m[key] for step, m in self.rows if key in m}


def fit_stable(xi: torch.Tensor, fitter: GradientTailFitter, sizes=(DIM,), **kwargs) -> MemoryLogger:
    """Train StableGradModule on the rows of ``xi`` (one per batch, in order) and return the log."""
    logger = MemoryLogger()
    module_kw = {k: kwargs.pop(k) for k in ("matmul", "fused") if k in kwargs}
    t = trainer(callbacks=[fitter], logger=logger, max_epochs=1, **kwargs)
    t.fit(StableGradModule(sizes, **module_kw), DataLoader(TensorDataset(xi), batch_size=1, shuffle=False))
    return logger


def median_of(logger: MemoryLogger, key: str) -> float:
    return statistics.median(logger.series(key).values())


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
def test_sampling_is_uniform_without_replacement_and_seeded():
    for total, k in [(6000, 5000), (10**7, 5000)]:  # dense (permutation) and sparse (distinct draws) paths
        idx = uniform_subset(total, k, torch.Generator().manual_seed(1))
        assert idx.numel() == k == idx.unique().numel() and 0 <= int(idx.min()) and int(idx.max()) < total
    # entries of two tensors holding their own global index: 30000 + 10000 entries
    values = torch.arange(40_000, dtype=torch.float32)
    sources = [(values[:30_000].reshape(100, 300), None), (values[30_000:], None)]
    draws = sample_entries(sources, 5000, torch.Generator().manual_seed(3))
    again = sample_entries(sources, 5000, torch.Generator().manual_seed(3))
    assert torch.equal(draws, again) and draws.dtype == torch.float64
    assert draws.unique().numel() == 5000
    # uniform over all 40000 entries: 3/4 from the first tensor, mean index 20000 (4 sigma bounds)
    assert abs(float((draws < 30_000).double().mean()) - 0.75) < 4 * math.sqrt(0.75 * 0.25 / 5000)
    assert abs(float(draws.mean()) - 19_999.5) < 4 * 40_000 / math.sqrt(12 * 5000)
    # with a running mean the entry is g - m
    mean = torch.full((40_000,), 0.5)
    shifted = sample_entries([(values, mean)], 5000, torch.Generator().manual_seed(3))
    assert torch.equal(shifted + 0.5, sample_entries([(values, None)], 5000, torch.Generator().manual_seed(3)))
    # more samples than entries: all of them
    assert sorted(sample_entries([(torch.arange(7.0), None)], 50, torch.Generator()).tolist()) == list(range(7))


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
    hill = median_of(log, "grad_tail/hill")  # top-sqrt(n) Hill: biased up as alpha -> 2
    assert alpha - 0.3 < hill < alpha + 1.2


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
    layer_keys = {k for _, m in log.rows for k in m if k.startswith("grad_tail/alpha/")}
    assert layer_keys == {"grad_tail/alpha/blocks.0", "grad_tail/alpha/blocks.1"}
    assert median_of(log, "grad_tail/alpha/blocks.0") == pytest.approx(1.2, abs=0.05)
    assert median_of(log, "grad_tail/alpha/blocks.1") == pytest.approx(1.8, abs=0.05)
    assert 1.2 < median_of(log, "grad_tail/alpha") < 1.8  # the global sample mixes both
    # a name filter, and a cap on the number of layers (with one warning)
    log = fit_stable(xi, GradientTailFitter(every_n_steps=1, layer_filter=r"\.1$"), sizes=sizes)
    assert {k for _, m in log.rows for k in m if k.startswith("grad_tail/alpha/")} == {"grad_tail/alpha/blocks.1"}
    with pytest.warns(UserWarning, match="max_layers=1"):
        log = fit_stable(xi, GradientTailFitter(every_n_steps=1, max_layers=1), sizes=sizes)
    assert {k for _, m in log.rows for k in m if k.startswith("grad_tail/alpha/")} == {"grad_tail/alpha/blocks.0"}


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
        assert "grad_tail/alpha/net.0" in fitter.last_estimate, fitter.last_estimate
        assert_identical_runs(baseline, watched)


def test_tensorboard_scalars_histogram_and_figure(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = TensorBoardLogger(tmp_path, name="run", version=0)
    fitter = GradientTailFitter(every_n_steps=3, figure_every_n_estimates=2)
    t = trainer(callbacks=[fitter], logger=logger, max_epochs=1, log_every_n_steps=50)
    t.fit(StableGradModule((DIM, 500)), DataLoader(TensorDataset(stable_rows(1.5, 7, DIM + 500)), batch_size=1))
    acc = EventAccumulator(str(tmp_path / "run" / "version_0"), size_guidance={"images": 10, "histograms": 10})
    acc.Reload()
    for tag in ("grad_tail/alpha", "grad_tail/scale", "grad_tail/hill", "grad_tail/llr_gauss", "grad_tail/vuong_p", "grad_tail/alpha/blocks.0", "grad_tail/alpha/blocks.1"):
        assert [e.step for e in acc.Scalars(tag)] == [0, 3, 6], tag
    assert [e.step for e in acc.Histograms("grad_tail/samples")] == [0, 3, 6]
    assert [e.step for e in acc.Images("grad_tail/density")] == [0, 6]
    assert "grad_tail/alpha" in t.callback_metrics


def _zero(w, xi):
    return (w * 0.0).sum()


def _nan(w, xi):
    return (w * float("nan")).sum()


def _mostly_zero(w, xi):  # 60% of the entries exactly zero, like dead ReLU units: zero IQR
    return (w * xi * (torch.arange(xi.numel()) % 5 < 2)).sum()


@pytest.mark.parametrize(("loss", "message"), [(_zero, "all finite samples are equal"), (_nan, "non-finite"), (_mostly_zero, "interquartile range is zero")])
def test_degenerate_gradients_are_skipped_with_one_warning(loss, message):
    class Degenerate(StableGradModule):
        def training_step(self, batch, batch_idx):
            return loss(self.blocks[0].weight, batch[0][0])

    fitter = GradientTailFitter(every_n_steps=1)
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t = trainer(callbacks=[fitter], logger=logger, max_epochs=1)
        t.fit(Degenerate((2000,)), DataLoader(TensorDataset(stable_rows(1.5, 4, 2000)), batch_size=1))
    assert t.global_step == 4
    ours = [w for w in caught if "GradientTailFitter" in str(w.message)]
    assert len(ours) == 1 and message in str(ours[0].message), [str(w.message) for w in ours]
    assert logger.series("grad_tail/skipped") == {0: 1.0, 1: 2.0, 2: 3.0, 3: 4.0}
    assert fitter.last_estimate == {} and fitter.state_dict()["skipped"] == 4


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(every_n_steps=0),
        dict(num_samples=10),
        dict(method="scipy"),
        dict(target="weights"),
        dict(ema_decay=1.0),
        dict(ema_decay=0.0),
        dict(max_layers=0),
        dict(hill_k=0),
        dict(hill_k=5000),
        dict(figure_every_n_estimates=-1),
        dict(layer_filter="net.("),
    ],
)
def test_invalid_arguments(kwargs):
    with pytest.raises(ValueError):
        GradientTailFitter(**kwargs)


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
    assert fitter.state_dict()["num_estimates"] == len(full)


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
    assert ranks[0] == ranks[1] and "grad_tail/alpha/net.0" in ranks[0]
    assert ranks[0].keys() == single.keys()
    for key in single:
        assert ranks[0][key] == pytest.approx(single[key], rel=1e-6, abs=1e-12), key
