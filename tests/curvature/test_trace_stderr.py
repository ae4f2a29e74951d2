"""Hutchinson's standard error against the actual spread of the estimate over random probes."""

import math

import pytest
import torch

from chaos_callbacks.curvature import hutchinson_trace, lanczos
from tests.curvature.test_lanczos import _problem


@pytest.mark.parametrize("deflate", [False, True])
def test_stderr_matches_the_spread_over_seeds(deflate):
    _, _, H = _problem("mlp")
    matvec = lambda v: H @ v  # noqa: E731  (the dense float64 Hessian: fast, exact)
    n = H.shape[0]
    kw = {}
    if deflate:
        res = lanczos(matvec, n, k=5, tol=1e-8, max_matvecs=400, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        kw = dict(deflate_vectors=res.eigenvectors, deflate_values=res.eigenvalues)
    samples, seeds = 10, 400
    estimates = [hutchinson_trace(matvec, n, num_samples=samples, dtype=torch.float64, generator=torch.Generator().manual_seed(s), **kw)
                 for s in range(seeds)]
    traces = torch.tensor([e.trace for e in estimates], dtype=torch.float64)
    spread = float(traces.std())
    # E[sample std] = c4 σ with c4(10) = 0.9727 (Gaussian); the Rademacher quadratic form is close to it
    mean_stderr = sum(e.stderr for e in estimates) / seeds / 0.9727
    assert mean_stderr == pytest.approx(spread, rel=0.12)
    # unbiased: the mean over seeds is within 4 standard errors of the mean of the exact trace
    assert abs(float(traces.mean()) - float(torch.trace(H))) <= 4 * spread / math.sqrt(seeds)
    if deflate:  # the projected-out directions carried variance: the deflated spread is smaller
        plain = [hutchinson_trace(matvec, n, num_samples=samples, dtype=torch.float64, generator=torch.Generator().manual_seed(s)).trace for s in range(100)]
        assert spread < float(torch.tensor(plain).std())
