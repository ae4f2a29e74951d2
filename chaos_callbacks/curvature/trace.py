"""Hessian trace by Hutchinson's estimator, optionally deflated by known Ritz pairs.

Hutchinson (1990): for Rademacher ``z``, ``E[zᵀ H z] = tr(H)``. With orthonormal Ritz vectors
``Q`` (columns) and Ritz values ``θ`` from a Lanczos run, ``QᵀHQ = diag(θ)`` and

    tr(H) = Σ_i θ_i + E[zᵀ (I − QQᵀ) H (I − QQᵀ) z],

the deflation of Hutch++ (Meyer, Musco, Musco & Woodruff, SOSA 2021) with the sketch replaced by
the Ritz vectors the spectrum estimate already paid for: the dominant eigen-directions, which
carry most of the variance, are removed at no extra product.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from chaos_callbacks.curvature.lanczos import MatVec


@dataclass(frozen=True)
class TraceEstimate:
    """``trace`` ± ``stderr`` (standard error of the sample mean) from ``num_matvecs`` products."""

    trace: float
    stderr: float
    num_matvecs: int


def hutchinson_trace(
    matvec: MatVec,
    n: int,
    *,
    num_samples: int = 20,
    deflate_vectors: Tensor | None = None,
    deflate_values: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> TraceEstimate:
    """Estimate ``tr(H)`` with ``num_samples`` Rademacher probes.

    Args:
        deflate_vectors: orthonormal Ritz vectors ``[k, n]`` to project out.
        deflate_values: their Ritz values (added exactly to the estimate).
    """
    if num_samples < 2:
        raise ValueError(f"num_samples must be >= 2 (for a standard error), got {num_samples}")
    if (deflate_vectors is None) != (deflate_values is None):
        raise ValueError("pass both deflate_vectors and deflate_values, or neither")
    Q = None if deflate_vectors is None else deflate_vectors.reshape(-1, n).to(device=device, dtype=dtype)
    exact = 0.0 if deflate_values is None else float(deflate_values.double().sum())
    samples = []
    for _ in range(num_samples):
        z = (torch.randint(0, 2, (n,), generator=generator, dtype=torch.int8) * 2 - 1).to(device=device, dtype=dtype)
        if Q is not None:
            z = z - Q.T @ (Q @ z)
        samples.append(float((matvec(z).to(dtype) * z).sum(dtype=torch.float64)))  # zᵀHz, summed in float64
    t = torch.tensor(samples, dtype=torch.float64)
    return TraceEstimate(exact + float(t.mean()), float(t.std()) / math.sqrt(num_samples), num_samples)
