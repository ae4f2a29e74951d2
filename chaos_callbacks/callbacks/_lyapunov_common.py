"""Helpers shared by the modes of ``LyapunovTwinRun``: finiteness checks and the means over twins
(with their standard errors) that become ``lyapunov/<quantity>`` and ``lyapunov/<quantity>_stderr``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def all_finite(tensors: Sequence[Tensor]) -> bool:
    """Whether every entry of every tensor is finite (one device sync)."""
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def finite_mean(values: Sequence[float]) -> float:
    """Mean of the finite values (over twins); NaN when there is none."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean over twins, s/√n with s the sample standard deviation; NaN for n < 2."""
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    if n < 2:
        return math.nan
    mean = sum(finite) / n
    return math.sqrt(sum((v - mean) ** 2 for v in finite) / (n - 1) / n)


def summarise(values: dict[str, list[float]], with_stderr: Sequence[str]) -> dict[str, float]:
    """``lyapunov/<name>``: the mean over twins of each list, and ``<name>_stderr`` for ``with_stderr``."""
    metrics = {f"lyapunov/{k}": finite_mean(v) for k, v in values.items() if v}
    metrics.update({f"lyapunov/{k}_stderr": standard_error(values[k]) for k in with_stderr if len(values.get(k, ())) >= 2})
    return {k: v for k, v in metrics.items() if math.isfinite(v)}
