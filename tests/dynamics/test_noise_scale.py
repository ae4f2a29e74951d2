"""Tests of chaos_callbacks.dynamics.noise_scale against exact answers.

The reference: a linear regression on a finite data set of N examples, whose per-example
gradients g_i = (w·x_i − y_i) x_i can be enumerated; with the data set as the law (batches drawn
with replacement) the exact values are G = mean_i g_i, tr Σ = mean_i |g_i − G|² and
B_simple = tr Σ / |G|².
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from chaos_callbacks.dynamics.noise_scale import (
    NoiseEstimate,
    NoiseScaleSmoother,
    effective_batch_size,
    harmonic_batch_size,
    two_batch_estimate,
)

SEEDS = range(4)


def regression_gradients(seed: int, n: int = 200, d: int = 5) -> np.ndarray:
    """Per-example gradients (n, d) of ½(w·x − y)² at a w away from the optimum."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    y = x @ rng.normal(size=d) + 0.5 * rng.normal(size=n)
    w = rng.normal(size=d)
    return (x @ w - y)[:, None] * x


def exact(g: np.ndarray) -> tuple[float, float]:
    """(|G|², tr Σ) with the data set as the law (population covariance, 1/N)."""
    mean = g.mean(axis=0)
    return float(mean @ mean), float(((g - mean) ** 2).sum(axis=1).mean())


def estimates_from_batches(g: np.ndarray, index: np.ndarray, splits: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Vectorised two-batch estimates for many batches ``index`` (M, B) cut into small batches of ``splits``."""
    batches = g[index]  # (M, B, d)
    edges = np.cumsum([0, *splits])
    small = np.stack([batches[:, a:b].mean(axis=1) for a, b in zip(edges[:-1], edges[1:])], axis=1)  # (M, K, d)
    small_sq = (small**2).sum(axis=2).mean(axis=1)
    big = batches.mean(axis=1)  # example-weighted: the mean of all B examples
    big_sq = (big**2).sum(axis=1)
    b_small = harmonic_batch_size(splits)
    b_big = effective_batch_size([s / sum(splits) for s in splits], splits)
    assert b_big == pytest.approx(sum(splits))
    est = [two_batch_estimate(s, b_small, b, b_big) for s, b in zip(small_sq, big_sq)]
    return np.array([e.grad_norm_sq for e in est]), np.array([e.trace_cov for e in est])


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("splits", [[1] * 16, [4, 4, 4, 4], [3, 5, 8], [8, 8]])
def test_both_estimators_are_unbiased_with_replacement(seed, splits):
    g = regression_gradients(seed)
    grad_sq, trace = exact(g)
    rng = np.random.default_rng(100 + seed)
    index = rng.integers(0, len(g), size=(20000, sum(splits)))
    est_g, est_s = estimates_from_batches(g, index, splits)
    for values, truth in ((est_g, grad_sq), (est_s, trace)):
        stderr = values.std(ddof=1) / math.sqrt(len(values))
        assert abs(values.mean() - truth) < 4 * stderr, (values.mean(), truth, stderr)
        assert stderr < 0.05 * truth  # the test has power: 4 stderr is under 20 % of the value


@pytest.mark.parametrize("seed", SEEDS)
def test_without_replacement_the_finite_population_correction_applies(seed):
    """Batches without replacement estimate N/(N−1) tr Σ and |G|² − tr Σ/(N−1) (their expectations)."""
    g = regression_gradients(seed, n=40)
    n = len(g)
    grad_sq, trace = exact(g)
    rng = np.random.default_rng(200 + seed)
    index = np.argsort(rng.random((20000, n)), axis=1)[:, :20]
    est_g, est_s = estimates_from_batches(g, index, [5, 5, 5, 5])
    for values, truth in ((est_s, trace * n / (n - 1)), (est_g, grad_sq - trace / (n - 1))):
        stderr = values.std(ddof=1) / math.sqrt(len(values))
        assert abs(values.mean() - truth) < 4 * stderr, (values.mean(), truth, stderr)


@pytest.mark.parametrize("seed", SEEDS)
def test_per_example_on_the_whole_set_is_the_unbiased_sample_covariance(seed):
    """B_small = 1 on all N examples: tr Σ̂ = (1/(N−1)) Σ|g_i − G|², exactly (float64 rounding)."""
    g = regression_gradients(seed)
    n = len(g)
    grad_sq, trace = exact(g)
    est = two_batch_estimate(float((g**2).sum(axis=1).mean()), 1.0, grad_sq, float(n))
    assert est.trace_cov == pytest.approx(trace * n / (n - 1), rel=1e-12)
    assert est.grad_norm_sq == pytest.approx(grad_sq - trace / (n - 1), rel=1e-12)


def test_equal_weights_of_unequal_batches_need_the_effective_size():
    """DDP / accumulation average K batch means with weights 1/K: B_big = K² / Σ 1/b_k, not Σ b_k."""
    g = regression_gradients(0)
    grad_sq, trace = exact(g)
    sizes = [2, 6]
    rng = np.random.default_rng(7)
    index = rng.integers(0, len(g), size=(40000, sum(sizes)))
    small = np.stack([g[index[:, :2]].mean(axis=1), g[index[:, 2:]].mean(axis=1)], axis=1)
    small_sq = (small**2).sum(axis=2).mean(axis=1)
    big = small.mean(axis=1)
    big_sq = (big**2).sum(axis=1)
    b_big = effective_batch_size([0.5, 0.5], sizes)
    assert b_big == pytest.approx(4 / (1 / 2 + 1 / 6))
    est = [two_batch_estimate(s, harmonic_batch_size(sizes), b, b_big).trace_cov for s, b in zip(small_sq, big_sq)]
    stderr = np.std(est, ddof=1) / math.sqrt(len(est))
    assert abs(np.mean(est) - trace) < 4 * stderr
    wrong = [two_batch_estimate(s, harmonic_batch_size(sizes), b, 8.0).trace_cov for s, b in zip(small_sq, big_sq)]
    assert abs(np.mean(wrong) - trace) > 10 * stderr  # the naive B_big = 8 is detectably biased


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: two_batch_estimate(1.0, 4, 1.0, 4), "B_big > B_small"),
        (lambda: two_batch_estimate(1.0, 0, 1.0, 4), "B_big > B_small"),
        (lambda: harmonic_batch_size([]), "positive"),
        (lambda: harmonic_batch_size([2, 0]), "positive"),
        (lambda: effective_batch_size([0.5, 0.4], [2, 2]), "sum to 1"),
        (lambda: effective_batch_size([1.0], [2, 2]), "one positive size"),
        (lambda: NoiseScaleSmoother(1.0), "decay"),
        (lambda: NoiseScaleSmoother(0.0), "decay"),
        (lambda: NoiseScaleSmoother(0.5).update(NoiseEstimate(math.nan, 1.0)), "non-finite"),
    ],
)
def test_bad_inputs_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ------------------------------------------------------------------ smoother


def test_smoother_matches_the_direct_weighted_formulas():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(30, 2)) * [2.0, 0.5] + [10.0, 1.0]
    beta = 0.8
    smoother = NoiseScaleSmoother(beta)
    assert smoother.result() is None
    for s, gn in values:
        smoother.update(NoiseEstimate(grad_norm_sq=float(gn), trace_cov=float(s)))
    w = beta ** np.arange(len(values))[::-1]
    mean = (w[:, None] * values).sum(axis=0) / w.sum()
    centred = values - mean
    big_w, w2 = w.sum(), (w**2).sum()
    cov = (w[:, None, None] * centred[:, :, None] * centred[:, None, :]).sum(axis=0) / (big_w - w2 / big_w) * w2 / big_w**2
    r = mean[0] / mean[1]
    out = smoother.result()
    assert out.trace_cov == pytest.approx(mean[0], rel=1e-12) and out.grad_norm_sq == pytest.approx(mean[1], rel=1e-12)
    assert out.b_simple == pytest.approx(r, rel=1e-12)
    assert out.trace_cov_stderr == pytest.approx(math.sqrt(cov[0, 0]), rel=1e-10)
    assert out.grad_norm_sq_stderr == pytest.approx(math.sqrt(cov[1, 1]), rel=1e-10)
    ratio_var = (cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / mean[1] ** 2
    assert out.b_simple_stderr == pytest.approx(math.sqrt(ratio_var), rel=1e-10)
    assert out.effective_count == pytest.approx(big_w**2 / w2)


def test_smoother_state_round_trips():
    a, b = NoiseScaleSmoother(0.9), NoiseScaleSmoother(0.9)
    for i in range(5):
        a.update(NoiseEstimate(1.0 + i, 3.0 - 0.1 * i))
    b.load_state_dict(a.state_dict())
    for s in (a, b):
        s.update(NoiseEstimate(2.0, 2.5))
    assert a.result() == b.result()


def test_non_positive_gradient_norm_gives_no_ratio():
    smoother = NoiseScaleSmoother(0.5)
    for g in (-1.0, 0.25, -1.0, 0.25, -1.0):
        smoother.update(NoiseEstimate(grad_norm_sq=g, trace_cov=3.0))
    out = smoother.result()
    assert out.grad_norm_sq < 0 and out.b_simple is None and out.b_simple_stderr is None


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("decay", [0.8, 0.95])
def test_standard_errors_are_calibrated_on_a_known_law(seed, decay):
    """Per-example gradients ~ N(G, Σ) (|G|² = 4, tr Σ = 12, B_simple = 3), batches of 16, per-example
    estimates (B_small = 1), 60 smoothed steps, 600 independent runs: the z-scores of B_simple, tr Σ
    and |G|² against the exact values have standard deviation ≈ 1 and cover 95 % at ±1.96.
    (At β = 0.8, n_eff = 9: a variance from ~9 points, the z-scores spread like a t law, sd ≈ 1.1.)"""
    rng = np.random.default_rng(seed)
    d, batch, steps, runs = 6, 16, 60, 600
    mean = np.zeros(d)
    mean[0] = 2.0
    scales = np.sqrt(np.array([4.0, 2.0, 2.0, 2.0, 1.0, 1.0]))  # tr Σ = 12
    g = mean + scales * rng.normal(size=(runs, steps, batch, d))
    small_sq = (g**2).sum(axis=3).mean(axis=2)
    big_sq = (g.mean(axis=2) ** 2).sum(axis=2)
    z = {"b_simple": [], "trace_cov": [], "grad_norm_sq": []}
    truth = {"b_simple": 3.0, "trace_cov": 12.0, "grad_norm_sq": 4.0}
    for r in range(runs):
        smoother = NoiseScaleSmoother(decay)
        for t in range(steps):
            smoother.update(two_batch_estimate(small_sq[r, t], 1.0, big_sq[r, t], float(batch)))
        out = smoother.result()
        for key in z:
            z[key].append((getattr(out, key) - truth[key]) / getattr(out, f"{key}_stderr"))
    for key, values in z.items():
        values = np.array(values)
        assert 0.9 < values.std() < 1.2, (key, values.std())
        coverage = np.mean(np.abs(values) < 1.96)
        assert 0.90 < coverage < 0.985, (key, coverage)
        assert abs(values.mean()) < 0.2, (key, values.mean())  # the ratio's bias is small against its error
