"""``split_gradient_curvature``: DAL's ``v² = (Hg₁)·(Hg₂)/(g₁·g₂)`` from two independent gradients.

Exact on a dense quadratic; unbiased numerator and denominator (against the closed forms ``‖Hḡ‖²``,
``‖ḡ‖²``) over random half batches of a least-squares problem, where the plain ``‖Hg_B‖/‖g_B‖``
carries the noise terms ``tr(HΣH)/B`` and ``tr Σ/B`` (also checked against their closed forms).
"""

import math

import pytest
import torch

from chaos_callbacks.curvature import split_gradient_curvature


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_exact_on_a_dense_quadratic(seed):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    H = q @ torch.diag(torch.linspace(-1.0, 5.0, 7, dtype=torch.float64)) @ q.T
    g1, g2 = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g, dtype=torch.float64)
    g2 = g2 + 2 * g1  # a positive cross product g₁·g₂ for most draws
    split = split_gradient_curvature(lambda v: H @ v, g1, g2)
    num, den = float((H @ g1) @ (H @ g2)), float(g1 @ g2)
    assert split.numerator == pytest.approx(num, rel=1e-12, abs=1e-12)
    assert split.denominator == pytest.approx(den, rel=1e-12, abs=1e-12)
    mean = (g1 + g2) / 2
    assert split.plain == pytest.approx(float((H @ mean).norm() / mean.norm()), rel=1e-12)
    if num > 0 and den > 0:
        assert split.problem is None and split.value == pytest.approx(math.sqrt(num / den), rel=1e-12)
    else:
        assert split.value is None and "noise-dominated" in split.problem


def test_equal_halves_give_the_plain_curvature():
    H = torch.diag(torch.tensor([1.0, 3.0, 5.0], dtype=torch.float64))
    g = torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64)
    split = split_gradient_curvature(lambda v: H @ v, g, g)
    assert split.value == pytest.approx(float((H @ g).norm() / g.norm()), rel=1e-14) == pytest.approx(split.plain, rel=1e-14)


@pytest.mark.parametrize(
    "g1, g2, problem",
    [
        ([1.0, 1.0], [-1.0, 0.5], "g₁·g₂ ≤ 0"),  # g₁·g₂ = −0.5, (Hg₁)·(Hg₂) = 49
        ([1.0, 1.0], [1.0, -0.5], "(Hg₁)·(Hg₂) ≤ 0"),  # g₁·g₂ = 0.5, (Hg₁)·(Hg₂) = −49
        ([1.0, 0.0], [0.0, 1.0], "g₁·g₂ ≤ 0"),  # orthogonal halves: no common signal
    ],
)
def test_a_non_positive_cross_product_gives_no_curvature(g1, g2, problem):
    H = torch.diag(torch.tensor([1.0, 10.0], dtype=torch.float64))
    split = split_gradient_curvature(lambda v: H @ v, torch.tensor(g1, dtype=torch.float64), torch.tensor(g2, dtype=torch.float64))
    assert split.value is None and problem in split.problem


def test_zero_gradient_has_no_plain_curvature():
    split = split_gradient_curvature(lambda v: v, torch.zeros(3), torch.zeros(3))
    assert split.plain is None and split.value is None


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unbiased_over_random_halves_of_least_squares_where_the_plain_estimate_is_biased(seed):
    """L(θ) = ½ mean_i (x_iᵀθ − y_i)² over n points: H = XᵀX/n and ḡ = Xᵀr/n exactly (r = Xθ − y), θ
    near the least-squares solution (a small ḡ, gradients mostly noise).
    Batches of B points drawn with replacement; g₁, g₂ the gradients of their two halves."""
    g = torch.Generator().manual_seed(seed)
    n, d, B, draws = 400, 6, 16, 20_000
    X = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(2.0, 0.2, d, dtype=torch.float64)
    y = X @ torch.randn(d, generator=g, dtype=torch.float64) + torch.randn(n, generator=g, dtype=torch.float64)
    theta_ls = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    theta = theta_ls + 0.3 * torch.randn(d, generator=g, dtype=torch.float64) / torch.linspace(2.0, 0.2, d, dtype=torch.float64)
    r = X @ theta - y
    H, g_bar = X.T @ X / n, X.T @ r / n
    per_example = X * r[:, None]  # ∇ℓ_i = x_i r_i
    sigma = (per_example - g_bar).T @ (per_example - g_bar) / n  # covariance of one draw

    idx = torch.randint(0, n, (draws, B), generator=g)
    half1, half2 = per_example[idx[:, : B // 2]].mean(1), per_example[idx[:, B // 2 :]].mean(1)
    splits = [split_gradient_curvature(lambda v: H @ v, a, b) for a, b in zip(half1, half2)]
    num = torch.tensor([s.numerator for s in splits], dtype=torch.float64)
    den = torch.tensor([s.denominator for s in splits], dtype=torch.float64)
    full = (half1 + half2) / 2
    plain_num, plain_den = ((full @ H) ** 2).sum(1), (full**2).sum(1)

    def within(samples, expected, k=4.0):
        stderr = float(samples.std() / math.sqrt(draws))
        return abs(float(samples.mean()) - expected) <= k * stderr

    true_num, true_den = float((H @ g_bar).norm() ** 2), float(g_bar.norm() ** 2)
    assert within(num, true_num) and within(den, true_den)
    # the plain estimate: E‖Hg_B‖² = ‖Hḡ‖² + tr(HΣH)/B and E‖g_B‖² = ‖ḡ‖² + tr Σ/B, far from the truth
    assert within(plain_num, true_num + float(torch.trace(H @ sigma @ H)) / B)
    assert within(plain_den, true_den + float(torch.trace(sigma)) / B)
    assert not within(plain_num, true_num, k=20) and not within(plain_den, true_den, k=20)
    v_true = math.sqrt(true_num / true_den)
    v_split = math.sqrt(float(num.mean() / den.mean()))
    v_plain = math.sqrt(float(plain_num.mean() / plain_den.mean()))
    # the ratio: v from the means, within its standard error (delta method, correlation ignored: conservative)
    se_v = 0.5 * v_split * math.hypot(float(num.std()) / float(num.mean()), float(den.std()) / float(den.mean())) / math.sqrt(draws)
    assert abs(v_split - v_true) <= 4 * se_v and abs(v_plain - v_true) >= 4 * se_v
