"""The gradient noise scale of McCandlish, Kaplan, Amodei et al., "An empirical model of large-batch
training" (arXiv 1812.06162), from gradients measured at two batch sizes.

Model (the paper's eq. 2.2 and App. A.1). Per-example gradients g_i are i.i.d. with mean G (the
true gradient) and covariance Σ. The mean gradient of a batch of B examples, G_B = (1/B) Σ_i g_i,
then has

    E |G_B|² = |G|² + tr(Σ) / B,

and the *simple noise scale* is B_simple = tr(Σ) / |G|²: the batch size at which the noise in G_B
is as large as the signal (the critical batch size is close to it). More generally, for
G_w = Σ_k w_k g_k over disjoint batches k of b_k examples with weights summing to one,
E |G_w|² = |G|² + tr(Σ) Σ_k w_k² / b_k, i.e. G_w behaves like one batch of
:func:`effective_batch_size` (w, b) = 1 / Σ_k w_k² / b_k examples.

Two-batch-size estimators (App. A.1). Given |G_small|² (the mean of |g_k|² over one or several
small batches; B_small their harmonic mean size, :func:`harmonic_batch_size`) and |G_big|² of an
effective size B_big > B_small,

    |G|²  ≈ (B_big |G_big|² − B_small |G_small|²) / (B_big − B_small),
    tr Σ  ≈ (|G_small|² − |G_big|²) / (1/B_small − 1/B_big),

both unbiased by linearity of expectation, whatever the dependence between the small and big
batches (they may share examples: the big batch is usually the union of the small ones). With
per-example gradients (B_small = 1) tr Σ is the unbiased sample covariance trace
(1/(B−1)) Σ_i |g_i − G_B|². "i.i.d." means sampling with replacement; a batch drawn without
replacement from a finite set of N examples has E |G_B|² = |G|² + tr(Σ)/B · (N − B)/(N − 1),
and the estimators then estimate N/(N − 1) tr Σ (the finite-population correction, negligible
for B ≪ N; exact when the batch is the whole set).

Smoothing. Each estimate is unbiased but noisy (|G|² often comes out negative in one step), and
the ratio of two noisy numbers is biased. The paper smooths numerator and denominator separately
with exponential moving averages and divides the smoothed values: :class:`NoiseScaleSmoother`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "NoiseEstimate",
    "NoiseScaleSmoother",
    "SmoothedNoiseScale",
    "effective_batch_size",
    "harmonic_batch_size",
    "two_batch_estimate",
]


@dataclass(frozen=True)
class NoiseEstimate:
    """Unbiased estimates of |G|² and tr Σ from one step's gradients."""

    grad_norm_sq: float
    trace_cov: float


def harmonic_batch_size(sizes: Sequence[float]) -> float:
    """B_small for the mean of |g_k|² over small batches of ``sizes`` b_k: K / Σ_k 1/b_k.

    E mean_k |g_k|² = |G|² + tr(Σ) mean_k(1/b_k), so the mean behaves like batches of this size.
    """
    if not sizes or min(sizes) <= 0:
        raise ValueError(f"batch sizes must be positive and at least one, got {list(sizes)}")
    return len(sizes) / sum(1.0 / b for b in sizes)


def effective_batch_size(weights: Sequence[float], sizes: Sequence[float]) -> float:
    """B of G_w = Σ_k w_k g_k over disjoint batches of ``sizes`` b_k, Σ w_k = 1: 1 / Σ_k w_k² / b_k.

    Example-weighted mean (w_k = b_k / Σb): the total Σ b_k. Equal weights 1/K (DDP's all-reduce
    of K ranks, an accumulated gradient of K micro-batches): K² / Σ_k 1/b_k.
    """
    if len(weights) != len(sizes) or not sizes or min(sizes) <= 0:
        raise ValueError(f"need one positive size per weight, got weights {list(weights)} and sizes {list(sizes)}")
    if not math.isclose(sum(weights), 1.0, rel_tol=1e-9):
        raise ValueError(f"weights must sum to 1, got {sum(weights)}")
    return 1.0 / sum(w * w / b for w, b in zip(weights, sizes))


def two_batch_estimate(small_sq_norm: float, small_size: float, big_sq_norm: float, big_size: float) -> NoiseEstimate:
    """McCandlish et al. (App. A.1) unbiased estimators of |G|² and tr Σ (module docstring).

    Args:
        small_sq_norm: |G_small|², the mean of |g_k|² over the small batches.
        small_size: B_small (:func:`harmonic_batch_size` of the small batches).
        big_sq_norm: |G_big|².
        big_size: B_big (:func:`effective_batch_size`), larger than ``small_size``.
    """
    if not big_size > small_size > 0:
        raise ValueError(f"need B_big > B_small > 0, got B_small={small_size}, B_big={big_size}")
    grad_norm_sq = (big_size * big_sq_norm - small_size * small_sq_norm) / (big_size - small_size)
    trace_cov = (small_sq_norm - big_sq_norm) / (1.0 / small_size - 1.0 / big_size)
    return NoiseEstimate(grad_norm_sq=grad_norm_sq, trace_cov=trace_cov)


@dataclass(frozen=True)
class SmoothedNoiseScale:
    """Smoothed tr Σ, |G|² and B_simple = tr Σ / |G|², with standard errors (``NoiseScaleSmoother``).

    ``b_simple`` and ``b_simple_stderr`` are ``None`` when the smoothed |G|² is not positive.
    """

    trace_cov: float
    trace_cov_stderr: float
    grad_norm_sq: float
    grad_norm_sq_stderr: float
    b_simple: float | None
    b_simple_stderr: float | None
    num_estimates: int
    effective_count: float


MIN_ESTIMATES = 5  #: estimates before the smoother reports values and standard errors


class NoiseScaleSmoother:
    """Exponential moving averages of tr Σ and |G|², their ratio B_simple, and standard errors.

    Weights: the estimate t steps back weighs β^t (β = ``decay``; no start-up bias, the weights are
    normalised by their sum W = Σ β^t). S̄ = Σ w_t S_t / W, Ḡ² = Σ w_t G_t / W and
    B_simple = S̄ / Ḡ², the ratio of the smoothed estimates, not the smoothed ratio (McCandlish et
    al., App. A.1: the ratio of two noisy unbiased estimates is biased; the smoothed ones are
    nearly noiseless).

    Standard errors from the spread of the per-step estimates. Estimates of different steps come
    from different batches, so they are independent given the weights; for a stationary sequence
    Var(S̄) = Var(S_t) Σw_t² / W² = Var(S_t) / n_eff, n_eff = W² / Σ w_t². Var(S_t), Var(G_t) and
    their covariance are the weighted sample (co)variances with the unbiased reliability-weight
    correction W − Σw²/W; B_simple's by the delta method for a ratio,
    Var(S̄/Ḡ²) ≈ Var(S − R G) / (n_eff Ḡ⁴) with R = S̄/Ḡ². Why not a jackknife over the small
    batches of one step: it needs ≥ 3 small batches (two DDP ranks or two accumulated micro-batches
    leave one after deleting one, and B_small = B_big), and it measures one step's noise only,
    while the spread works for every source and measures the logged quantity itself. A drift of the
    true values within the averaging window adds to the spread, so the error is then conservative
    (too large), never too small. At least two estimates are needed (the first has no spread).
    The moments are updated by West's (1979) weighted incremental algorithm, with decay.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.count = 0
        self.weight = 0.0  # W = Σ w_t
        self.weight_sq = 0.0  # Σ w_t²
        self.mean = [0.0, 0.0]  # weighted means of (S_t, G_t)
        self.comoment = [0.0, 0.0, 0.0]  # Σ w_t (x_t − x̄)(y_t − ȳ) for (S,S), (S,G), (G,G)

    def update(self, estimate: NoiseEstimate) -> None:
        """Add one step's estimate (older ones decay by β)."""
        x = (estimate.trace_cov, estimate.grad_norm_sq)
        if not all(math.isfinite(v) for v in x):
            raise ValueError(f"non-finite noise estimate {estimate}")
        beta = self.decay
        self.count += 1
        self.weight = beta * self.weight + 1.0
        self.weight_sq = beta * beta * self.weight_sq + 1.0
        delta = [x[0] - self.mean[0], x[1] - self.mean[1]]
        self.mean = [m + d / self.weight for m, d in zip(self.mean, delta)]
        after = [x[0] - self.mean[0], x[1] - self.mean[1]]
        ss, sg, gg = self.comoment
        self.comoment = [beta * ss + delta[0] * after[0], beta * sg + delta[0] * after[1], beta * gg + delta[1] * after[1]]

    def result(self) -> SmoothedNoiseScale | None:
        """The smoothed values and their standard errors; ``None`` before :data:`MIN_ESTIMATES` estimates
        (a spread of fewer has 1–3 degrees of freedom: a standard error from it may be off by a factor
        of several, e.g. ±0.6 where the next estimate showed ±42)."""
        if self.count < MIN_ESTIMATES:
            return None
        n_eff = self.weight**2 / self.weight_sq
        # weighted sample (co)variances of one estimate, divided by n_eff: (co)variances of the means
        scale = 1.0 / (self.weight - self.weight_sq / self.weight) / n_eff
        var_s, cov_sg, var_g = (max(c, 0.0) * scale if i != 1 else c * scale for i, c in enumerate(self.comoment))
        s_bar, g_bar = self.mean
        ratio = ratio_stderr = None
        if g_bar > 0:
            ratio = s_bar / g_bar
            ratio_stderr = math.sqrt(max(var_s - 2 * ratio * cov_sg + ratio * ratio * var_g, 0.0)) / g_bar
        return SmoothedNoiseScale(
            trace_cov=s_bar,
            trace_cov_stderr=math.sqrt(var_s),
            grad_norm_sq=g_bar,
            grad_norm_sq_stderr=math.sqrt(var_g),
            b_simple=ratio,
            b_simple_stderr=ratio_stderr,
            num_estimates=self.count,
            effective_count=n_eff,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "weight": self.weight, "weight_sq": self.weight_sq,
                "mean": list(self.mean), "comoment": list(self.comoment)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.weight = float(state["weight"])
        self.weight_sq = float(state["weight_sq"])
        self.mean = [float(v) for v in state["mean"]]
        self.comoment = [float(v) for v in state["comoment"]]
