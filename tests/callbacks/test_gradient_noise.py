"""GradientNoiseScale against exact values: a linear regression on a finite data set, whose
per-example gradients r_i (x_i, 1) (r_i = w·x_i + b − y_i) are enumerated in float64.

Exact values. With the data set as the law (batches drawn with replacement): G = mean_i g_i,
tr Σ = mean_i |g_i − G|². A batch drawn without replacement (a shuffled epoch, or the whole set)
makes both estimators estimate N/(N−1) tr Σ and |G|² − tr Σ/(N−1) (finite-population
correction, ``chaos_callbacks.dynamics.noise_scale``); that is the exact value the per-example
path must give on the whole set. Each source is also checked step by step against the two-batch
formula applied to the enumerated gradients of the very examples it saw (float64, 1e-10).
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

from chaos_callbacks import GradientNoiseScale
from chaos_callbacks.dynamics.noise_scale import NoiseEstimate, effective_batch_size, harmonic_batch_size, two_batch_estimate
from tests.lightning_helpers import MemoryLogger, TinyNet, assert_identical_runs, fit_snapshot, loader, run_ddp, trainer

TAGS = ("b_simple", "trace_cov", "grad_norm_sq", "b_simple_over_batch")


class LinReg(pl.LightningModule):
    """½(w·x + b − y)², the batch mean; SGD at ``lr`` (0: the weights never move)."""

    def __init__(self, features: int = 5, lr: float = 0.0, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(features, 1).double()
        self.lr = lr
        self.calls: list[int] = []  # Python state the re-run must not touch

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = 0.5 * ((self.lin(x).squeeze(-1) - y) ** 2).mean()
        self.log("train_loss", loss)
        self.calls.append(batch_idx)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def regression_data(seed: int, n: int, features: int = 5) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g, dtype=torch.float64)
    y = x @ torch.randn(features, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, generator=g, dtype=torch.float64)
    return TensorDataset(x, y)


def per_example_gradients(model: LinReg, data: TensorDataset) -> torch.Tensor:
    """(N, features + 1): the gradient of each example's loss w.r.t. (weight, bias), parameter order."""
    x, y = data.tensors
    r = x @ model.lin.weight.detach()[0] + model.lin.bias.detach()[0] - y
    return torch.cat([r[:, None] * x, r[:, None]], dim=1)


def exact_values(g: torch.Tensor) -> tuple[float, float]:
    """(|G|², tr Σ) of the data set as the law."""
    mean = g.mean(0)
    return float(mean @ mean), float(((g - mean) ** 2).sum(1).mean())


def formula(g: torch.Tensor, groups: list[list[int]], equal_weights: bool = False) -> NoiseEstimate:
    """The two-batch estimate from the enumerated gradients of small batches ``groups``; G_big is
    their example-weighted mean (one batch split) or equal-weight mean (accumulation, DDP)."""
    sizes = [len(idx) for idx in groups]
    small = [g[idx].mean(0) for idx in groups]
    small_sq = float(sum(s @ s for s in small)) / len(small)
    if equal_weights:
        big, b_big = torch.stack(small).mean(0), effective_batch_size([1 / len(sizes)] * len(sizes), sizes)
    else:
        big, b_big = g[sum(groups, [])].mean(0), float(sum(sizes))
    return two_batch_estimate(small_sq, harmonic_batch_size(sizes), float(big @ big), b_big)


def recorded(callback: GradientNoiseScale) -> list[NoiseEstimate]:
    """Every per-step (unsmoothed) estimate the callback makes from now on."""
    seen: list[NoiseEstimate] = []
    update = callback._smoother.update

    def record(estimate: NoiseEstimate) -> None:
        seen.append(estimate)
        update(estimate)

    callback._smoother.update = record  # type: ignore[method-assign]
    return seen


def assert_estimate(got: NoiseEstimate, want: NoiseEstimate, rel: float = 1e-10) -> None:
    assert got.trace_cov == pytest.approx(want.trace_cov, rel=rel)
    assert got.grad_norm_sq == pytest.approx(want.grad_norm_sq, rel=rel)


def fit(callbacks: list, data: TensorDataset, batch_size: int, model: LinReg | None = None, sampler=None, **kwargs: Any) -> LinReg:
    model = model or LinReg()
    kwargs = {"max_epochs": 1, **kwargs}
    dl = DataLoader(data, batch_size=batch_size, shuffle=False, sampler=sampler)
    trainer(callbacks=callbacks, **kwargs).fit(model, dl)
    return model


# ------------------------------------------------------------------ exact values, step by step


@pytest.mark.parametrize("seed", range(3))
def test_per_example_and_micro_batches_on_the_whole_set_give_the_exact_value(seed):
    n = 24
    data = regression_data(seed, n)
    per_example = GradientNoiseScale(every_n_steps=1, source="per_example", chunk_size=7)
    singletons = GradientNoiseScale(every_n_steps=1, source="micro_batches", num_micro_batches=n, prefix="single/")
    quarters = GradientNoiseScale(every_n_steps=1, source="micro_batches", num_micro_batches=4, prefix="quarter/")
    fifths = GradientNoiseScale(every_n_steps=1, source="micro_batches", num_micro_batches=5, prefix="fifth/")
    halves = GradientNoiseScale(every_n_steps=1, prefix="half/")  # auto: the step's gradient against its first half
    runs = {cb: recorded(cb) for cb in (per_example, singletons, quarters, fifths, halves)}
    model = fit(list(runs), data, batch_size=n, max_epochs=2, model=LinReg(seed=seed))
    g = per_example_gradients(model, data)
    grad_sq, trace = exact_values(g)
    exact = NoiseEstimate(grad_norm_sq=grad_sq - trace / (n - 1), trace_cov=trace * n / (n - 1))
    assert all(len(r) == 2 for r in runs.values())
    for a, b in zip(runs[per_example], runs[singletons]):
        assert_estimate(a, exact)
        assert_estimate(b, exact)
    bounds = [list(map(int, c)) for c in torch.arange(n).tensor_split(5)]  # sizes 5, 5, 5, 5, 4
    for got in runs[quarters]:
        assert_estimate(got, formula(g, [list(range(i, i + 6)) for i in range(0, n, 6)]))
    for got in runs[fifths]:
        assert_estimate(got, formula(g, bounds))
    for got in runs[halves]:
        assert_estimate(got, formula(g, [list(range(n // 2)), list(range(n // 2, n))]))
    assert per_example.source_in_use == "per_example" and halves.source_in_use == "halves"


def test_halves_of_an_odd_batch_are_weighted_by_their_sizes():
    data = regression_data(5, 25)
    cb = GradientNoiseScale(every_n_steps=1, source="halves")
    seen = recorded(cb)
    model = fit([cb], data, batch_size=25, max_epochs=2, model=LinReg(seed=5))
    g = per_example_gradients(model, data)
    assert len(seen) == 2
    for got in seen:
        assert_estimate(got, formula(g, [list(range(12)), list(range(12, 25))]))


@pytest.mark.parametrize("n", [36, 34])
def test_accumulation_uses_the_micro_batches_and_the_accumulated_gradient(n):
    """Batches of 6, accumulate 4: step 0 = four micro-batches; the epoch's last step has two (6+6 or
    6+4), and Lightning's accumulated gradient is their equal-weight mean scaled by 2/4."""
    data = regression_data(1, n)
    cb = GradientNoiseScale(every_n_steps=1)
    seen = recorded(cb)
    model = fit([cb], data, batch_size=6, accumulate_grad_batches=4, model=LinReg(lr=0.0))
    assert cb.source_in_use == "accumulation"
    g = per_example_gradients(model, data)
    batches = [list(range(i, min(i + 6, n))) for i in range(0, n, 6)]
    assert len(seen) == 2
    assert_estimate(seen[0], formula(g, batches[:4], equal_weights=True))
    assert_estimate(seen[1], formula(g, batches[4:], equal_weights=True))


def test_accumulation_follows_the_weights_as_they_move():
    """With lr > 0 each step's micro-batch gradients are those at that step's weights."""
    data = regression_data(2, 48)
    cb = GradientNoiseScale(every_n_steps=2)
    seen = recorded(cb)
    weights = []

    class Weights(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if batch_idx % 2 == 0:
                weights.append((pl_module.lin.weight.detach().clone(), pl_module.lin.bias.detach().clone()))

    model = LinReg(lr=0.05, seed=3)
    fit([Weights(), cb], data, batch_size=6, accumulate_grad_batches=2, model=model)
    assert len(seen) == 2  # steps 0 and 2 of 4
    for estimate, step in zip(seen, (0, 2)):
        with torch.no_grad():
            model.lin.weight.copy_(weights[step][0])
            model.lin.bias.copy_(weights[step][1])
        g = per_example_gradients(model, data)
        first = 12 * step
        assert_estimate(estimate, formula(g, [list(range(first, first + 6)), list(range(first + 6, first + 12))], equal_weights=True))


# ------------------------------------------------------------------ unbiased over random batches


@pytest.mark.parametrize("seed", range(2))
@pytest.mark.parametrize(
    ("source", "batch_size", "kwargs", "trainer_kwargs"),
    [("per_example", 8, {}, {}), ("micro_batches", 8, {"num_micro_batches": 4}, {}), ("halves", 8, {}, {}),
     ("auto", 2, {}, {"accumulate_grad_batches": 4})],
)
def test_estimates_are_unbiased_for_the_exact_value(seed, source, batch_size, kwargs, trainer_kwargs):
    """Fixed weights, 8 examples per step drawn with replacement, 500 steps: the mean estimate of
    tr Σ and |G|² is within 4 standard errors of the exact value (power: 4 standard errors are < 24 %; the exact step-by-step tests above pin the plumbing)."""
    data = regression_data(10 + seed, 60)
    cb = GradientNoiseScale(every_n_steps=1, source=source, **kwargs)
    seen = recorded(cb)
    steps = 500
    sampler = RandomSampler(data, replacement=True, num_samples=8 * steps, generator=torch.Generator().manual_seed(seed))
    model = fit([cb], data, batch_size=batch_size, sampler=sampler, model=LinReg(seed=seed), **trainer_kwargs)
    grad_sq, trace = exact_values(per_example_gradients(model, data))
    assert len(seen) == steps
    for values, truth in (([e.trace_cov for e in seen], trace), ([e.grad_norm_sq for e in seen], grad_sq)):
        stderr = np.std(values, ddof=1) / math.sqrt(steps)
        assert abs(np.mean(values) - truth) < 4 * stderr, (np.mean(values), truth, stderr)
        assert stderr < 0.06 * truth


# ------------------------------------------------------------------ logging


def test_logged_values_are_the_smoothed_ratio_with_standard_errors():
    data = regression_data(4, 64)
    logger = MemoryLogger()
    cb = GradientNoiseScale(every_n_steps=2, smoothing=0.5)
    seen = recorded(cb)
    t = trainer(callbacks=[cb], logger=logger, max_epochs=2, accumulate_grad_batches=2)
    t.fit(LinReg(lr=0.01), DataLoader(data, batch_size=4, shuffle=True))
    series = {q: logger.series(f"gradient_noise/{q}") for q in (*TAGS, *(f"{q}_stderr" for q in TAGS))}
    # 16 batches per epoch = 8 steps; estimates at steps 0, 2, ..., 14; logged from the fifth on
    assert sorted(series["trace_cov"]) == [8, 10, 12, 14]
    weights = [0.5 ** (len(seen) - 1 - i) for i in range(len(seen))]
    mean_s = sum(w * e.trace_cov for w, e in zip(weights, seen)) / sum(weights)
    mean_g = sum(w * e.grad_norm_sq for w, e in zip(weights, seen)) / sum(weights)
    assert series["trace_cov"][14] == pytest.approx(mean_s) and series["grad_norm_sq"][14] == pytest.approx(mean_g)
    for step, value in series["b_simple"].items():
        assert value == pytest.approx(series["trace_cov"][step] / series["grad_norm_sq"][step])
        assert series["b_simple_over_batch"][step] == pytest.approx(value / 8)  # 4 examples × 2 micro-batches
        assert series["b_simple_over_batch_stderr"][step] == pytest.approx(series["b_simple_stderr"][step] / 8)
        assert series["b_simple_stderr"][step] > 0
    assert "gradient_noise/b_simple" in t.progress_bar_metrics


def test_no_ratio_while_the_smoothed_gradient_norm_is_not_positive():
    """At the least-squares optimum G = 0: the |G|² estimates scatter around 0; whenever the smoothed
    one is not positive, B_simple is not logged and the estimate counts as skipped."""
    data = regression_data(5, 32)
    model = LinReg()
    x, y = data.tensors
    solution = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], 1), y[:, None]).solution[:, 0]
    with torch.no_grad():
        model.lin.weight.copy_(solution[:-1])
        model.lin.bias.copy_(solution[-1])
    logger = MemoryLogger()
    cb = GradientNoiseScale(every_n_steps=1, smoothing=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(callbacks=[cb], logger=logger, max_epochs=4).fit(model, DataLoader(data, batch_size=4, shuffle=True))
    norms = logger.series("gradient_noise/grad_norm_sq")
    ratios = logger.series("gradient_noise/b_simple")
    negative = [s for s, v in norms.items() if v <= 0]
    assert negative and set(ratios) == set(norms) - set(negative)
    assert logger.series("gradient_noise/skipped")[max(negative)] >= 1


# ------------------------------------------------------------------ no harm, resume, arguments


def _without_our_tags(snapshot: dict) -> dict:
    snapshot["epoch_metrics"] = {k: v for k, v in snapshot["epoch_metrics"].items() if "gradient_noise/" not in k}
    return snapshot


def _ce(module, batch):
    x, y = batch
    return nn.functional.cross_entropy(module(x), y)


@pytest.mark.parametrize(
    ("model_kwargs", "callback_kwargs", "trainer_kwargs", "source"),
    [
        ({"dropout": 0.2, "batch_norm": True}, {}, {}, "halves"),  # auto without DDP or accumulation
        ({"dropout": 0.3}, {"source": "per_example", "loss_fn": _ce, "chunk_size": 5}, {}, "per_example"),
        ({"batch_norm": True, "momentum": 0.9}, {"source": "micro_batches", "num_micro_batches": 3}, {}, "micro_batches"),
        ({"dropout": 0.2, "optimizer": "adam"}, {}, {"accumulate_grad_batches": 2, "max_epochs": 3}, "accumulation"),
    ],
)
def test_no_harm(model_kwargs, callback_kwargs, trainer_kwargs, source):
    """Bit-identical weights, optimizer state, RNG streams and user-logged values with the callback."""
    baseline = _without_our_tags(fit_snapshot(model_kwargs, [], **trainer_kwargs))
    cb = GradientNoiseScale(every_n_steps=1, **callback_kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watched = _without_our_tags(fit_snapshot(model_kwargs, [cb], **trainer_kwargs))
    assert cb.source_in_use == source and "gradient_noise/b_simple" in cb.last_estimate
    assert_identical_runs(baseline, watched)


def test_the_users_python_state_is_untouched():
    model = fit([GradientNoiseScale(every_n_steps=1)], regression_data(0, 32), batch_size=8, max_epochs=2)
    assert model.calls == [0, 1, 2, 3] * 2


def test_resume_continues_as_if_never_interrupted(tmp_path):
    data = regression_data(6, 32)

    def run(ckpt_path=None, save=False):
        cb = GradientNoiseScale(every_n_steps=1, smoothing=0.8)
        logger = MemoryLogger()
        cbs = [cb] + ([ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}")] if save else [])
        t = trainer(callbacks=cbs, logger=logger, max_epochs=4, enable_checkpointing=save)
        t.fit(LinReg(lr=0.05), DataLoader(data, batch_size=8, shuffle=False), ckpt_path=ckpt_path)
        return {s: m for s, m in logger.rows if any(k.startswith("gradient_noise/") for k in m)}

    full = run(save=True)
    resumed = run(ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert sorted(full) == list(range(4, 16)) and sorted(resumed) == list(range(8, 16))
    for step in resumed:
        assert resumed[step] == full[step]  # the smoother was restored


BAD_INT = [2.5, True, None, "3", math.inf, math.nan, 0, -1]
BAD: list[tuple[str, Any]] = (
    [("every_n_steps", v) for v in BAD_INT]
    + [("source", v) for v in ["DDP", "per-example", None, 1, True]]
    + [("num_micro_batches", v) for v in [1, *BAD_INT]]
    + [("chunk_size", v) for v in BAD_INT]
    + [("smoothing", v) for v in [0, 1, -0.1, 1.5, math.nan, math.inf, True, None, "0.9"]]
    + [("loss_fn", v) for v in [1, "loss", [1]]]
    + [("prefix", v) for v in ["/a", "a//b", 1, None, "a b"]]
)


@pytest.mark.parametrize(("argument", "value"), BAD)
def test_bad_arguments_are_refused(argument, value):
    with pytest.raises(ValueError, match=rf"GradientNoiseScale: {argument}"):
        GradientNoiseScale(**{argument: value})


def test_numpy_numbers_are_accepted():
    cb = GradientNoiseScale(every_n_steps=np.int64(3), num_micro_batches=np.int32(4), chunk_size=np.int16(8), smoothing=np.float32(0.5))
    assert (cb.every_n_steps, cb.num_micro_batches, cb.chunk_size) == (3, 4, 8) and type(cb.every_n_steps) is int


@pytest.mark.parametrize(
    ("callback_kwargs", "trainer_kwargs", "match"),
    [
        ({"source": "ddp"}, {}, "source='ddp' needs several processes"),
        ({"source": "accumulation"}, {}, "accumulate_grad_batches >= 2"),
        ({"source": "halves"}, {"accumulate_grad_batches": 2}, "source='halves' reads the step's own gradient"),
    ],
)
def test_sources_that_cannot_work_are_refused_at_fit_start(callback_kwargs, trainer_kwargs, match):
    with pytest.raises(ValueError, match=match):
        trainer(callbacks=[GradientNoiseScale(**callback_kwargs)], max_steps=1, **trainer_kwargs).fit(TinyNet(), loader())


def test_two_instances_with_one_prefix_are_refused():
    with pytest.raises(ValueError, match="prefix"):
        trainer(callbacks=[GradientNoiseScale(), GradientNoiseScale(every_n_steps=3)], max_steps=1).fit(TinyNet(), loader())


def test_state_keys_distinguish_instances():
    assert GradientNoiseScale().state_key != GradientNoiseScale(source="micro_batches").state_key
    assert GradientNoiseScale().state_key != GradientNoiseScale(prefix="a/").state_key


def test_unexpected_errors_are_contained(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr("chaos_callbacks.callbacks.gradient_noise.two_batch_estimate", broken)
    logger = MemoryLogger()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[GradientNoiseScale(every_n_steps=1)], logger=logger, max_steps=3).fit(LinReg(), DataLoader(regression_data(0, 32), batch_size=8))
    ours = [str(w.message) for w in caught if "GradientNoiseScale" in str(w.message)]
    assert len(ours) == 1 and "RuntimeError: boom" in ours[0], ours
    assert logger.series("gradient_noise/skipped") == {0: 1.0, 1: 2.0, 2: 3.0}


# ------------------------------------------------------------------ DDP


class SeenExamples(pl.Callback):
    """Records the data-set indices of the examples in every training batch (rows of ``data``)."""

    def __init__(self, data: TensorDataset) -> None:
        self.x = data.tensors[0]
        self.seen: list[list[int]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.seen.append([int((self.x == row).all(1).nonzero()[0]) for row in batch[0]])


def ddp_scenario(devices: int):
    """32 examples, 8 per step over all ranks (6 steps), weights fixed: the ranks' local gradients ("ddp") and
    per-example gradients pooled over the ranks ("per_example", prefix pe/). Lightning's
    DistributedSampler shuffles training data whatever the loader says, so each rank records the
    examples it saw."""
    pl.seed_everything(0, verbose=False)
    data = regression_data(7, 32)
    dl = DataLoader(data, batch_size=8 // devices, shuffle=False)
    callbacks = [GradientNoiseScale(every_n_steps=1, source="ddp" if devices > 1 else "micro_batches", num_micro_batches=2),
                 GradientNoiseScale(every_n_steps=1, source="per_example", prefix="pe/"), SeenExamples(data)]
    records = [recorded(cb) for cb in callbacks[:2]]

    def collect(trainer, model, cbs):
        return {"local": [[e.grad_norm_sq, e.trace_cov] for e in records[0]],
                "per_example": [[e.grad_norm_sq, e.trace_cov] for e in records[1]],
                "sources": [cb.source_in_use for cb in cbs[:2]],
                "seen": cbs[2].seen,
                "logged": cbs[0].last_estimate}

    return LinReg(seed=0), dl, callbacks, collect, dict(max_steps=6, max_epochs=None)


@pytest.mark.ddp
def test_ddp_local_and_per_example_paths_are_exact(tmp_path):
    """Under DDP, step by step: "ddp" = the two-batch formula on the ranks' enumerated gradients =
    single-process micro-batches on the same examples (rank 0's then rank 1's); per-example pooled
    over the ranks = single-process per-example on the same 8 examples = its exact formula."""
    ranks = run_ddp("tests.callbacks.test_gradient_noise:ddp_scenario", tmp_path / "ddp", devices=2)
    assert ranks[0]["local"] == ranks[1]["local"] and ranks[0]["per_example"] == ranks[1]["per_example"]
    assert ranks[0]["sources"] == ["ddp", "per_example"]
    data = regression_data(7, 32)
    order = [i for step in range(6) for rank in ranks for i in rank["seen"][step]]
    model, _, callbacks, collect, kwargs = ddp_scenario(1)
    t = trainer(callbacks=callbacks, **kwargs)
    t.fit(model, DataLoader(torch.utils.data.Subset(data, order), batch_size=8, shuffle=False))
    single = collect(t, model, callbacks)
    g = per_example_gradients(model, data)
    for step in range(6):
        groups = [rank["seen"][step] for rank in ranks]
        want = formula(g, groups, equal_weights=True)
        assert ranks[0]["local"][step] == pytest.approx([want.grad_norm_sq, want.trace_cov], rel=1e-10)
        assert single["local"][step] == pytest.approx(ranks[0]["local"][step], rel=1e-10)
        exact = formula(g, [[i] for i in groups[0] + groups[1]])
        assert ranks[0]["per_example"][step] == pytest.approx([exact.grad_norm_sq, exact.trace_cov], rel=1e-10)
        assert single["per_example"][step] == pytest.approx(ranks[0]["per_example"][step], rel=1e-10)
    logged = ranks[0]["logged"]
    assert logged == ranks[1]["logged"]
    assert logged["gradient_noise/b_simple_over_batch"] == pytest.approx(logged["gradient_noise/b_simple"] / 8)


class ManualTinyNet(TinyNet):
    """Manual optimization: ``training_step`` steps the optimizer itself (no ``.grad`` to read)."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        loss = nn.functional.cross_entropy(self(batch[0]), batch[1])
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def _masked_ce(module, batch):
    """A loss torch.func cannot vmap (a data-dependent boolean mask)."""
    x, y = batch
    keep = y >= 0
    return nn.functional.cross_entropy(module(x)[keep], y[keep])


def test_manual_optimization_uses_per_example_gradients_and_falls_back_to_micro_batches():
    plain = GradientNoiseScale(every_n_steps=1, loss_fn=_ce)
    trainer(callbacks=[plain], max_steps=6).fit(ManualTinyNet(), loader())
    assert plain.source_in_use == "per_example" and plain.last_estimate["gradient_noise/b_simple"] > 0
    masked = GradientNoiseScale(every_n_steps=1, loss_fn=_masked_ce)
    with pytest.warns(UserWarning, match="source='auto' uses 'micro_batches' from now on"):
        trainer(callbacks=[masked], max_steps=6).fit(ManualTinyNet(), loader())
    assert masked.source_in_use == "micro_batches" and masked.last_estimate["gradient_noise/b_simple"] > 0
    with pytest.raises(ValueError, match="source='halves'"):
        trainer(callbacks=[GradientNoiseScale(source="halves", loss_fn=_ce)], max_steps=1).fit(ManualTinyNet(), loader())
