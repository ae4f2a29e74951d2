"""Lyapunov-exponent bookkeeping for twin trajectories and for the tangent (linearised) map.

Two estimators of the maximal Lyapunov exponent (MLE) of a training map θ_{t+1} = Φ(θ_t):

* **Twin trajectories** (Jiménez-González, Soriano & Lacasa, "Leveraging chaotic transients in
  the training of artificial neural networks", arXiv 2506.08523): a twin starts at distance ε
  from the main run and both are trained with the same steps. Either the separation d(t) is
  recorded and the exponent is the slope of ln d(t) during the exponential phase, before d
  saturates at the size of the attractor (:func:`local_exponent`), or the twin is pulled back to
  distance ε every k steps (Benettin, Galgani, Giorgilli & Strelcyn, Meccanica 15, 1980) and the
  exponent is the running mean of ln(d/ε) per step (:func:`renormalize_`,
  :class:`BenettinAccumulator`).
* **Tangent vectors**, ε-free: a vector v is pushed through the Jacobian of one optimizer step,
  which for ``torch.optim.SGD`` needs only Hessian-vector products (:func:`tangent_sgd_step`,
  :class:`TangentAccumulator`). For a quadratic loss with Hessian eigenvalues λ_i, plain gradient
  descent is linear and its exponent is max_i ln|1 − ηλ_i| (Sasdelli et al., "A chaos theory
  approach to understand neural network optimization").

All exponents are natural logarithms per optimizer step. Parameters are sequences of tensors;
nothing here knows about Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

Norm = Literal["l2", "l1"]
_NORMS = ("l2", "l1")

# sqrt(unit roundoff) to the nearest decade, per unit of weight norm: float64 sqrt(1.1e-16) = 1.05e-8 → 1e-8
# (the paper's value); float32 sqrt(6.0e-8) = 2.4e-4 → 1e-4; bfloat16 (the compute dtype under bf16-mixed)
# sqrt(3.9e-3) = 0.0625 → 1e-1.
_DEFAULT_EPSILON = {torch.float64: 1e-8, torch.float32: 1e-4, torch.bfloat16: 1e-1}


def _check_norm(norm: str) -> None:
    if norm not in _NORMS:
        raise ValueError(f"norm must be 'l2' or 'l1', got {norm!r}")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _check_same_shapes(a: Sequence[Tensor], b: Sequence[Tensor], what: str) -> None:
    if len(a) == 0:
        raise ValueError(f"{what}: expected at least one tensor, got none")
    if len(a) != len(b):
        raise ValueError(f"{what}: expected the same number of tensors, got {len(a)} and {len(b)}")
    for i, (x, y) in enumerate(zip(a, b)):
        if x.shape != y.shape:
            raise ValueError(f"{what}: tensor {i} has shape {tuple(x.shape)} vs {tuple(y.shape)}")


def _norm64(tensors: Sequence[Tensor], norm: Norm) -> Tensor:
    """‖x‖ of the concatenation of ``tensors``, accumulated in float64 (no float64 copy of the inputs)."""
    if norm == "l1":
        return torch.stack([t.abs().sum(dtype=torch.float64) for t in tensors]).sum()
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t, dtype=torch.float64) for t in tensors]))


def _at_least_float32(t: Tensor) -> Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = half the machine epsilon of a floating dtype: the largest relative error of one rounding."""
    return torch.finfo(dtype).eps / 2


def default_epsilon(dtype: torch.dtype, weight_norm: float = 1.0) -> float:
    """Size ε of the twin perturbation for weights of norm ``weight_norm`` computed in ``dtype``.

    ε = c_dtype · max(‖θ‖, 1), in the norm used to compare the twins (L2 or L1 over all parameters),
    with c_dtype = √u to the nearest decade (u the unit roundoff). ε balances two errors, as the step
    of a forward finite difference does: the nonlinear (non-tangent) part of the separation grows
    like ε, while storing θ + δ rounds every coordinate by up to u·|θ_i|, an error of up to u·‖θ‖ in
    the separation (:func:`rounding_floor`), relative size u·‖θ‖/ε. Scaling ε with ‖θ‖ keeps that
    relative error at √u whatever the weights' size (an absolute 1e-8 is erased by float64 weights
    of size 1e8); the floor 1 keeps tiny or zero weights from shrinking ε towards 0.

    * float64: √(1.1e-16) ≈ 1.05e-8 → 1e-8, the value of Jiménez-González et al. (arXiv 2506.08523);
    * float32: √(6.0e-8) ≈ 2.4e-4 → 1e-4 (1e-8 would be erased: 1 + 1e-8 == 1 in float32);
    * bfloat16, the *compute* dtype under bf16 autocast (the weights stay float32 but every matmul
      rounds them and the activations to bfloat16, u = 2⁻⁸ ≈ 3.9e-3): √u ≈ 0.0625 → 1e-1. A
      separation below u·‖θ‖ is blurred by that rounding, so a bf16 exponent is the growth rate of
      separations of size 0.1·‖θ‖ above the rounding noise floor — a finite-size exponent, not the
      tangent exponent of the float32 map.

    float16 is refused (its training runs need a gradient scaler, whose skipped steps a twin cannot
    replay); so are integer dtypes.
    """
    if dtype not in _DEFAULT_EPSILON:
        raise ValueError(
            f"default_epsilon supports torch.float64, torch.float32 and torch.bfloat16 (compute dtype), got {dtype}"
        )
    if not (isinstance(weight_norm, (int, float)) and math.isfinite(weight_norm) and weight_norm >= 0):
        raise ValueError(f"weight_norm must be a finite number >= 0, got {weight_norm!r}")
    return _DEFAULT_EPSILON[dtype] * max(float(weight_norm), 1.0)


def parameter_norm(params: Sequence[Tensor], norm: Norm) -> float:
    """‖θ‖ over all tensors (``"l2"`` or ``"l1"``), accumulated in float64."""
    _check_norm(norm)
    if len(params) == 0:
        raise ValueError("parameter_norm: expected at least one tensor, got none")
    with torch.no_grad():
        return float(_norm64([_at_least_float32(p) for p in params], norm))


def rounding_floor(params: Sequence[Tensor], norm: Norm, compute_dtype: torch.dtype | None = None) -> float:
    """u·‖θ‖: how far rounding can move a separation δ stored (or computed) next to weights θ.

    Storing θ + δ in the parameters' dtype rounds coordinate i by at most u·|θ_i + δ_i|, so
    ‖fl(θ + δ) − θ − δ‖ ≤ u·‖θ + δ‖ ≈ u·‖θ‖ in L1 or L2; a separation ε is resolved to a relative
    error u·‖θ‖/ε. ``compute_dtype`` (e.g. ``torch.bfloat16`` under autocast) is a further rounding
    of the weights in every forward pass; u is the larger of the two unit roundoffs.
    """
    u = max(unit_roundoff(p.dtype) for p in params)
    if compute_dtype is not None:
        u = max(u, unit_roundoff(compute_dtype))
    return u * parameter_norm(params, norm)


def parameter_distance(a: Sequence[Tensor], b: Sequence[Tensor], norm: Norm) -> Tensor:
    """d(a, b) = ‖a − b‖ over all tensors, as a float64 scalar.

    ``norm="l2"``: d = (Σ_i (a_i − b_i)²)^{1/2}; ``norm="l1"``: d = Σ_i |a_i − b_i| (the distance of
    Jiménez-González et al.). Each difference is formed in the wider dtype of the pair (half types
    promoted to float32) and the norm is accumulated in float64. Subtraction is correctly rounded,
    so every difference has a relative error ≤ u of that dtype, and it is exact when the two entries
    are within a factor 2 of each other (Sterbenz's lemma) — always so for a twin ε-close to the main
    run — so a separation far below the weights' size is not lost. (Casting both inputs to float64
    first would remove that last rounding but allocate three float64 temporaries per tensor, which
    for a 0.8 MB MLP on one CPU thread took longer than its forward and backward pass.)
    """
    _check_norm(norm)
    _check_same_shapes(a, b, "parameter_distance")
    with torch.no_grad():
        return _norm64([_at_least_float32(x) - _at_least_float32(y) for x, y in zip(a, b)], norm)


def random_perturbation(
    params: Sequence[Tensor], eps: float, norm: Norm, generator: torch.Generator
) -> list[Tensor]:
    """A random perturbation δ with ‖δ‖ = ε, shaped and typed like ``params``.

    The direction is i.i.d. standard Gaussian over all coordinates (uniform on the L2 sphere),
    drawn in float64 from ``generator`` (the global RNG is never used, so training is unaffected)
    and scaled by ε/‖direction‖ in the chosen norm; the cast to each parameter's dtype is the only
    rounding, so ‖δ‖ = ε to the precision of that dtype. Draws are made on the generator's device
    and moved, so a CPU generator gives the same δ for CPU and GPU parameters.
    """
    _check_norm(norm)
    _check_positive("eps", eps)
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    if len(params) == 0:
        raise ValueError("random_perturbation: expected at least one tensor, got none")
    for i, p in enumerate(params):
        if not p.is_floating_point():
            raise ValueError(f"random_perturbation: tensor {i} has non-floating dtype {p.dtype}")
    directions = [
        torch.randn(p.shape, generator=generator, dtype=torch.float64, device=generator.device) for p in params
    ]
    scale = eps / _norm64(directions, norm)
    return [(u * scale).to(device=p.device, dtype=p.dtype) for u, p in zip(directions, params)]


def renormalize_(
    twin: Sequence[Tensor],
    main: Sequence[Tensor],
    eps: float,
    norm: Norm,
    *,
    twin_state: Sequence[Tensor] = (),
    main_state: Sequence[Tensor] = (),
) -> Tensor:
    """Benettin renormalisation, in place: twin ← main + (twin − main)·ε/d; returns d (before).

    d = ``parameter_distance(twin, main, norm)``. ``twin_state``/``main_state`` are further parts
    of the dynamical state that do not enter d but must be rescaled by the same factor so that the
    whole phase-space separation keeps its direction, e.g. SGD momentum buffers: the state of
    heavy-ball SGD is the pair (θ, buf), and rescaling only θ − θ' would rotate the separation.
    The update is computed in float64 and rounded once into each twin tensor.
    """
    _check_positive("eps", eps)
    _check_same_shapes(twin, main, "renormalize_")
    if len(twin_state) != len(main_state):
        raise ValueError(
            f"renormalize_: twin_state and main_state differ in length ({len(twin_state)} vs {len(main_state)})"
        )
    if len(twin_state):
        _check_same_shapes(twin_state, main_state, "renormalize_ state")
    d = parameter_distance(twin, main, norm)
    if not (torch.isfinite(d) and d > 0):
        raise ValueError(f"renormalize_: cannot rescale a separation d = {d.item()}; draw a new perturbation")
    factor = eps / d
    with torch.no_grad():
        for t, m in zip([*twin, *twin_state], [*main, *main_state]):
            m64 = m.to(torch.float64)
            t.copy_(m64 + (t.to(torch.float64) - m64) * factor)
    return d


class BenettinAccumulator:
    """Running maximal Lyapunov exponent from renormalisation intervals (Benettin et al. 1980).

    Interval j starts at separation ε_j, runs k_j optimizer steps and ends at separation d_j. The
    finite-time exponent of the interval is ln(d_j/ε_j)/k_j and the running MLE is

        λ_max ≈ Σ_j ln(d_j/ε_j) / Σ_j k_j        (natural log per optimizer step).

    For a linear map the sum telescopes to ln(‖M^T u‖/‖u‖) whatever the intervals, so the estimate
    does not depend on how often one renormalises. ``intervals`` counts the updates.
    """

    def __init__(self) -> None:
        self.log_growth = 0.0
        self.steps = 0
        self.intervals = 0

    def update(self, distance: float | Tensor, eps: float, steps: int) -> float:
        """Add one interval; return its finite-time exponent ln(d/ε)/steps."""
        d = float(distance)
        _check_positive("distance", d)
        _check_positive("eps", eps)
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        log_growth = math.log(d) - math.log(eps)
        self.log_growth += log_growth
        self.steps += steps
        self.intervals += 1
        return log_growth / steps

    @property
    def mle(self) -> float:
        """Σ ln(d_j/ε_j) / Σ k_j; NaN before the first update."""
        return self.log_growth / self.steps if self.steps else math.nan

    def state_dict(self) -> dict[str, float | int]:
        return {"log_growth": self.log_growth, "steps": self.steps, "intervals": self.intervals}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        missing = {"log_growth", "steps", "intervals"} - set(state)
        if missing:
            raise ValueError(f"BenettinAccumulator state is missing {sorted(missing)}")
        self.log_growth = float(state["log_growth"])
        self.steps = int(state["steps"])
        self.intervals = int(state["intervals"])


class DecimatedCurve:
    """Samples (t, y) of a growing curve in bounded memory: every sample, then every 2nd, 4th, ….

    The kept samples are those whose index since :meth:`clear` is a multiple of ``stride``; when
    they exceed ``max_points``, every other one is dropped and ``stride`` doubles. So at most
    ``max_points`` samples are kept (at least half that once decimation started), evenly spaced
    in the sample index, always including the first; the latest sample is kept as well (``tail``)
    when it falls between strides. A least-squares slope of y against t over the kept points
    estimates the same slope as over all points (the points are an evenly spaced subsample), so
    :func:`local_exponent` keeps its meaning; only its ``min_plateau`` counts kept points.
    """

    def __init__(self, max_points: int = 2048) -> None:
        if isinstance(max_points, bool) or not isinstance(max_points, int) or max_points < 4:
            raise ValueError(f"max_points must be an int >= 4, got {max_points!r}")
        self.max_points = max_points
        self.clear()

    def clear(self) -> None:
        self.t: list[float] = []
        self.y: list[float] = []
        self.stride = 1
        self.count = 0  # samples appended since clear()
        self.tail: tuple[float, float] | None = None

    def append(self, t: float, y: float) -> None:
        index, self.count = self.count, self.count + 1
        if index % self.stride:
            self.tail = (t, y)
            return
        self.tail = None
        self.t.append(t)
        self.y.append(y)
        if len(self.t) > self.max_points:
            self.t, self.y = self.t[::2], self.y[::2]
            self.stride *= 2

    def points(self) -> tuple[list[float], list[float]]:
        """(t, y) of the kept samples and the latest one, in order."""
        if self.tail is None:
            return list(self.t), list(self.y)
        return [*self.t, self.tail[0]], [*self.y, self.tail[1]]

    def __len__(self) -> int:
        return len(self.t) + (self.tail is not None)

    def state_dict(self) -> dict:
        return {"t": list(self.t), "y": list(self.y), "stride": self.stride, "count": self.count, "tail": self.tail}

    def load_state_dict(self, state: dict) -> None:
        missing = {"t", "y", "stride", "count", "tail"} - set(state)
        if missing:
            raise ValueError(f"DecimatedCurve state is missing {sorted(missing)}")
        self.t, self.y = list(state["t"]), list(state["y"])
        self.stride, self.count = int(state["stride"]), int(state["count"])
        self.tail = None if state["tail"] is None else tuple(state["tail"])


@dataclass(frozen=True)
class LocalExponentFit:
    """Least-squares line ln d(t) ≈ intercept + slope·t over the points ``start:stop``.

    ``saturated`` says whether a plateau was detected (then ``stop`` ends before it).
    """

    slope: float
    intercept: float
    start: int
    stop: int
    saturated: bool


def _line_fit(t: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    tc, yc = t - t.mean(), y - y.mean()
    slope = float(tc @ yc / (tc @ tc))
    return slope, float(y.mean() - slope * t.mean())


def _hinge_fit(t: np.ndarray, y: np.ndarray, min_plateau: int) -> tuple[int, float, bool]:
    """Best continuous "line then flat" fit y ≈ a + s·min(t, t_k); returns (k, s, accepted).

    For every break index k the model is a straight line in x = min(t, t_k), fitted in closed form
    from cumulative sums (O(n) for all k). Breaks leave at least ``min_plateau`` flat points;
    k = n − 1 is the plain line. The hinge is accepted when it lowers the Bayesian information
    criterion n·ln(SSE/n) + p·ln n with its one extra parameter, i.e. SSE_hinge·n^{1/n} < SSE_line.
    """
    n = len(t)
    t, y = t - t.mean(), y - y.mean()  # centring: Σy = 0 below, less cancellation
    ks = np.arange(1, n)
    flat = n - 1 - ks
    tk = t[ks]
    sx = np.cumsum(t)[ks] + flat * tk
    sxx = np.cumsum(t * t)[ks] + flat * tk * tk
    sxy = np.cumsum(t * y)[ks] - tk * np.cumsum(y)[ks]
    cxx = sxx - sx * sx / n
    sse = np.maximum(y @ y - sxy * sxy / cxx, 0.0)
    slopes = sxy / cxx
    hinges = np.flatnonzero(flat >= min_plateau)
    if hinges.size == 0:
        return n - 1, float(slopes[-1]), False
    best = hinges[np.argmin(sse[hinges])]
    if sse[best] * n ** (1.0 / n) < sse[-1]:
        return int(ks[best]), float(slopes[best]), True
    return n - 1, float(slopes[-1]), False


def local_exponent(
    log_d: np.ndarray | Sequence[float],
    steps: np.ndarray | Sequence[float] | None = None,
    *,
    start: int = 0,
    plateau_tol: float = math.log(10.0),
    min_plateau: int = 5,
) -> LocalExponentFit:
    """Local Lyapunov exponent: slope of ln d(t) over the exponential phase, before saturation.

    Jiménez-González et al. (arXiv 2506.08523) read the exponent of a twin pair off the linear
    part of ln d(t), which ends when d reaches the size of the attractor and levels off. Rule used
    here, on the points from ``start`` on (``start`` skips an initial alignment transient):

    1. Fit the continuous hinge ln d ≈ a + s·min(t, τ) (linear, then flat) by least squares over
       all break points τ = t_k leaving at least ``min_plateau`` flat points, and keep it only if
       it beats a single straight line by the Bayesian information criterion. A kept hinge means
       ``saturated=True``; the plateau level is a + s·τ.
    2. Saturated: the fit stops ``plateau_tol`` (default ln 10, one decade of d) before the
       plateau, i.e. uses the points with t ≤ τ − plateau_tol/|s|, which keeps the rounded knee
       out of the fit — but never cuts more than half the growth the hinge saw, s·(τ − t_start)/2,
       so a short exponential phase is not cut away entirely (if fewer than two points remain,
       it uses t ≤ τ). Not saturated: all points.
    3. ``slope`` and ``intercept`` are the least-squares line over ``start:stop``.

    The hinge also detects a decay that stalls on a floor (s < 0). ``steps`` are the optimizer
    steps of the samples (default 0, 1, 2, …), so ``slope`` is in natural log per step. The
    paper's network MLE is the mean of ``slope`` over twin pairs from several initialisations.
    """
    y = np.asarray(log_d, dtype=np.float64)
    if y.ndim != 1 or y.size < 3:
        raise ValueError(f"log_d must be 1-D with at least 3 points, got shape {y.shape}")
    if not np.all(np.isfinite(y)):
        raise ValueError("log_d must be finite (d > 0 at every sample)")
    t = np.arange(y.size, dtype=np.float64) if steps is None else np.asarray(steps, dtype=np.float64)
    if t.shape != y.shape:
        raise ValueError(f"steps must have the shape of log_d {y.shape}, got {t.shape}")
    if not (np.all(np.isfinite(t)) and np.all(np.diff(t) > 0)):
        raise ValueError("steps must be finite and strictly increasing")
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start <= y.size - 3:
        raise ValueError(f"start must be an int in [0, {y.size - 3}] (at least 3 points fitted), got {start!r}")
    _check_positive("plateau_tol", plateau_tol)
    if isinstance(min_plateau, bool) or not isinstance(min_plateau, int) or min_plateau < 1:
        raise ValueError(f"min_plateau must be an int >= 1, got {min_plateau!r}")

    ts, ys = t[start:], y[start:]
    k, s, saturated = _hinge_fit(ts, ys, min_plateau)
    stop = y.size
    if saturated:
        cut = min(plateau_tol, 0.5 * abs(s) * (ts[k] - ts[0]))
        cutoff = ts[k] - cut / abs(s) if s != 0 else ts[k]
        kept = int(np.count_nonzero(ts <= cutoff))
        stop = start + (kept if kept >= 2 else k + 1)
    slope, intercept = _line_fit(t[start:stop], y[start:stop])
    return LocalExponentFit(slope, intercept, start, stop, saturated)


def tangent_sgd_step(
    v: Sequence[Tensor],
    hvp: Callable[[list[Tensor]], Sequence[Tensor]],
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    momentum_v: Sequence[Tensor] | None = None,
    dampening: float = 0.0,
    nesterov: bool = False,
) -> tuple[list[Tensor], list[Tensor] | None]:
    """One step of the exact linearisation of ``torch.optim.SGD`` (``maximize=False``).

    ``torch.optim.SGD`` updates, with g = ∇L(θ):
        d = g + wd·θ;  buf = d on the first step, else buf = μ·buf + (1 − τ)·d;
        p = d + μ·buf (Nesterov) or p = buf (μ > 0) or p = d (μ = 0);  θ ← θ − η·p.
    Its Jacobian acts on the tangent pair (v, w) = (δθ, δbuf) as
        δd = Hv + wd·v;  w' = δd (first step) or μ·w + (1 − τ)·δd;
        v' = v − η·(δd + μ·w') (Nesterov), v − η·w' (μ > 0), v − η·δd (μ = 0),
    where H is the Hessian of the loss at θ_t (before the step, on the step's batch): ``hvp(v)``
    must return Hv. Pass ``momentum_v=None`` for the first step (torch's buffer does not exist
    yet) and the returned w afterwards; with μ = 0 the returned w is None. For a quadratic with
    eigenvalue λ and μ = 0 this is v' = (1 − η(λ + wd))v (Sasdelli et al.).
    """
    if not (math.isfinite(lr) and lr >= 0):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    for name, value in (("momentum", momentum), ("weight_decay", weight_decay), ("dampening", dampening)):
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("nesterov requires momentum > 0 and dampening == 0 (as torch.optim.SGD)")
    if momentum == 0 and momentum_v is not None:
        raise ValueError("momentum_v was given but momentum == 0: plain SGD has no momentum buffer")
    if momentum_v is not None:
        _check_same_shapes(v, momentum_v, "tangent_sgd_step momentum_v")
    v = list(v)
    hv = [h.detach() for h in hvp(v)]
    _check_same_shapes(v, hv, "tangent_sgd_step hvp(v)")
    dd = [h + weight_decay * x for h, x in zip(hv, v)]
    if momentum == 0:
        return [x - lr * g for x, g in zip(v, dd)], None
    if momentum_v is None:
        buf = dd
    else:
        buf = [momentum * w + (1 - dampening) * g for w, g in zip(momentum_v, dd)]
    direction = [g + momentum * w for g, w in zip(dd, buf)] if nesterov else buf
    return [x - lr * p for x, p in zip(v, direction)], buf


class TangentAccumulator:
    """ε-free MLE of the SGD map: unit tangent vector, renormalised after every step.

    Each :meth:`step` applies :func:`tangent_sgd_step` to (v, w) with ‖v‖ = 1, records the growth
    ‖v'‖ in a :class:`BenettinAccumulator` (as an interval of one step from separation 1), and
    divides both v' and w' by ‖v'‖. ``mle`` → ln of the largest growth rate per step.
    """

    def __init__(self, v0: Sequence[Tensor], norm: Norm) -> None:
        _check_norm(norm)
        if len(v0) == 0:
            raise ValueError("TangentAccumulator: expected at least one tensor, got none")
        size = float(_norm64(v0, norm))
        _check_positive("norm of v0", size)
        self.norm: Norm = norm
        self.v = [x.detach() / size for x in v0]
        self.momentum_v: list[Tensor] | None = None
        self.benettin = BenettinAccumulator()

    def step(
        self,
        hvp: Callable[[list[Tensor]], Sequence[Tensor]],
        lr: float,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
    ) -> float:
        """Advance one optimizer step; return its one-step exponent ln‖v'‖."""
        v, w = tangent_sgd_step(self.v, hvp, lr, momentum, weight_decay, self.momentum_v, dampening, nesterov)
        growth = float(_norm64(v, self.norm))
        exponent = self.benettin.update(growth, 1.0, 1)
        self.v = [x / growth for x in v]
        self.momentum_v = None if w is None else [x / growth for x in w]
        return exponent

    @property
    def mle(self) -> float:
        return self.benettin.mle

    def state_dict(self) -> dict:
        return {
            "v": [x.clone() for x in self.v],
            "momentum_v": None if self.momentum_v is None else [x.clone() for x in self.momentum_v],
            "benettin": self.benettin.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        missing = {"v", "momentum_v", "benettin"} - set(state)
        if missing:
            raise ValueError(f"TangentAccumulator state is missing {sorted(missing)}")
        _check_same_shapes(self.v, state["v"], "TangentAccumulator state v")
        self.v = [x.clone() for x in state["v"]]
        self.momentum_v = None if state["momentum_v"] is None else [x.clone() for x in state["momentum_v"]]
        self.benettin.load_state_dict(state["benettin"])
