"""The twins of ``LyapunovTwinRun``: copies of the trained parameters that repeat the main run's optimizer
steps (:class:`Twin`), and the ln d(t) record of each perturbed trajectory (:class:`Track`).

Plain torch (no Lightning): the callback decides when a twin steps, with which gradient and
hyperparameters; this module holds the twin's tensors, rebuilds the main optimizer over them,
evaluates the module at the twin's weights without copying, and keeps the bounded history.
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from chaos_callbacks.dynamics.lyapunov import BenettinAccumulator, DecimatedCurve, parameter_norm

HISTORY_POINTS = 2048  # ln d(t) samples kept per twin
_CHUNK = 1 << 16  # entries per chunk of the per-step distance (256 KiB in float32)
_HALF = (torch.float16, torch.bfloat16)


def _wide(x: Tensor, y: Tensor) -> torch.dtype:
    """The wider dtype of a pair, at least float32."""
    return torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)


def distance(a: Sequence[Tensor], b: Sequence[Tensor], norm: str) -> Tensor:
    """d(a, b) = ‖a − b‖ over all tensors, ``"l2"`` or ``"l1"``, as a float64 scalar tensor.

    The distance of :func:`~chaos_callbacks.dynamics.lyapunov.parameter_distance`, computed every
    step without parameter-sized temporaries: chunk by chunk (2¹⁶ entries) into one reused buffer,
    the difference in the wider dtype of the pair, at least float32 (exact for ε-close entries by
    Sterbenz's lemma), its absolute values or squares summed in that dtype by PyTorch's cascade
    summation and the chunk sums added in float64. For float32 weights the relative error is a few
    10⁻⁸ (the tests bound it by 10⁻⁶), far below the statistical error of any exponent; float64
    pairs are reduced in float64, and so is everything again when a float32 sum overflowed.
    """
    total = _chunked_sum(a, b, norm, torch.float32)
    if not torch.isfinite(total):  # squares of differences beyond ~1e19 overflow float32
        total = _chunked_sum(a, b, norm, torch.float64)
    return total if norm == "l1" else total.sqrt()


def _chunked_sum(a: Sequence[Tensor], b: Sequence[Tensor], norm: str, at_least: torch.dtype) -> Tensor:
    """Σ|a − b| (``"l1"``) or Σ(a − b)² over all tensors, chunk by chunk, in float64."""
    parts: list[Tensor] = []
    with torch.no_grad():
        for x, y in zip(a, b):
            fx, fy = x.detach().reshape(-1), y.detach().reshape(-1)
            dtype = torch.promote_types(_wide(x, y), at_least)
            diff = torch.empty(min(_CHUNK, fx.numel()), dtype=dtype, device=x.device)
            for start in range(0, fx.numel(), _CHUNK):
                cx, cy = fx[start : start + _CHUNK], fy[start : start + _CHUNK]
                chunk = diff[: cx.numel()]
                if cx.dtype != dtype or cy.dtype != dtype:
                    chunk.copy_(cx)
                    chunk.sub_(cy)
                else:
                    torch.sub(cx, cy, out=chunk)
                parts.append(chunk.abs_().sum() if norm == "l1" else chunk.mul_(chunk).sum())
    if not parts:
        return torch.zeros((), dtype=torch.float64)
    return torch.stack([p.to(device=parts[0].device, dtype=torch.float64) for p in parts]).sum()


def weight_norm(params: Sequence[Tensor], norm: str) -> float:
    """‖θ‖ over all tensors (``"l2"`` or ``"l1"``): each tensor's norm in its dtype (at least
    float32, cascade-summed), combined in float64 — no parameter-sized temporaries; in float64
    (:func:`~chaos_callbacks.dynamics.lyapunov.parameter_norm`) when float32 overflowed."""
    order = 1 if norm == "l1" else 2
    with torch.no_grad():
        parts = [torch.linalg.vector_norm(p.detach() if p.dtype not in _HALF else p.detach().float(), order) for p in params]
        value = float(torch.linalg.vector_norm(torch.stack([p.to(parts[0].device) for p in parts]).double(), order))
    return value if math.isfinite(value) else float(parameter_norm(params, norm))


def rescale_(twin: Sequence[Tensor], main: Sequence[Tensor], factor: float) -> None:
    """t ← m + (t − m)·factor in place for every pair (``torch.lerp``, one fused pass per tensor).

    The Benettin pull-back of :func:`~chaos_callbacks.dynamics.lyapunov.renormalize_` (factor =
    ε/d, d measured by the caller). The result is rounded in the tensor's dtype; the caller
    re-measures the distance after the pull-back, so that rounding never enters an exponent.
    """
    with torch.no_grad():
        for t, m in zip(twin, main):
            torch.lerp(m.detach(), t, factor, out=t)


@contextmanager
def swapped(targets: Sequence[Tensor], values: Sequence[Tensor]) -> Iterator[None]:
    """Point each target at the storage of the matching value (no copy); put the originals back on exit.

    The module's parameters keep their identity, so the user's own ``training_step`` evaluates the
    twin and ``torch.autograd.grad`` w.r.t. those parameters gives the twin's gradient; in-place
    buffer updates (batch-norm running statistics) land in the twin's buffers. The main values
    return bit for bit: their storage is only detached, never written.
    """
    saved = [t.data for t in targets]
    try:
        for t, v in zip(targets, values):
            t.data = v
        yield
    finally:
        for t, s in zip(targets, saved):
            t.data = s


def hyperparameters(optimizer: Optimizer) -> list[dict[str, Any]]:
    """Every param group's hyperparameters (all keys but ``params``)."""
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def structure(optimizer: Optimizer) -> tuple[int, ...]:
    """Number of parameters in each param group."""
    return tuple(len(group["params"]) for group in optimizer.param_groups)


def rebuild_optimizer(optimizer: Optimizer, params: Sequence[Tensor]) -> Optimizer:
    """``type(optimizer)`` over ``params``, with the same param groups and hyperparameters.

    Constructor defaults are passed only where the constructor accepts them (``AdamW.defaults``
    holds keys its ``__init__`` does not take); each group carries all its own values anyway.
    """
    signature = inspect.signature(type(optimizer).__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.values())
    defaults = {k: v for k, v in optimizer.defaults.items() if takes_any or k in signature}
    groups, offset = [], 0
    for values, size in zip(hyperparameters(optimizer), structure(optimizer)):
        groups.append({**values, "params": list(params[offset : offset + size])})
        offset += size
    return type(optimizer)(groups, **defaults)


class Twin:
    """One twin trajectory: parameters, buffers and optimizer of its own, shaped like the main run's."""

    def __init__(self, optimizer: Optimizer, params: Sequence[Tensor], buffers: Sequence[Tensor]) -> None:
        self.params = [p.detach().clone() for p in params]
        self.buffers = [b.detach().clone() for b in buffers]
        self.optimizer = rebuild_optimizer(optimizer, self.params)
        self.grads: list[Tensor | None] = [None] * len(self.params)
        self.loss: Tensor | None = None
        self.benettin = BenettinAccumulator()

    def reset(
        self, optimizer: Optimizer, params: Sequence[Tensor], buffers: Sequence[Tensor], delta: Sequence[Tensor | None]
    ) -> None:
        """Twin ← main + δ, with the main run's buffers and a copy of its optimizer state."""
        with torch.no_grad():
            for t, p, dp in zip(self.params, params, delta):
                t.copy_(p if dp is None else p + dp)
            for t, b in zip(self.buffers, buffers):
                t.copy_(b)
        self.optimizer.load_state_dict(copy.deepcopy(optimizer.state_dict()))
        self.discard_gradients()

    def discard_gradients(self) -> None:
        self.grads = [None] * len(self.params)
        self.loss = None

    def accumulate(self, grads: Sequence[Tensor | None], loss: Tensor) -> None:
        """Add one micro-batch's gradient and loss (both already divided by the accumulation count)."""
        stored: set[int] = set()
        for i, g in enumerate(grads):
            if g is None:
                continue
            if self.grads[i] is not None:
                self.grads[i].add_(g)
                continue
            # autograd hands one buffer to several inputs (e.g. both terms of a + b); accumulation and
            # norm clipping work in place, so each parameter needs its own
            self.grads[i] = g.clone() if g.data_ptr() in stored else g
            stored.add(g.data_ptr())
        self.loss = loss if self.loss is None else self.loss + loss

    def step(self, hyperparameters: Sequence[dict[str, Any]], clip_val: float, clip_by_value: bool) -> None:
        """One optimizer step with the main run's current hyperparameters and gradient clipping.

        Clipping repeats Lightning's ``Precision.clip_gradients``: ``clip_grad_value_`` or
        ``clip_grad_norm_`` (L2) over the parameters that have a gradient, when ``clip_val > 0``.
        """
        for group, values in zip(self.optimizer.param_groups, hyperparameters):
            group.update(values)
        for t, g in zip(self.params, self.grads):
            t.grad = g
        with_grad = [t for t in self.params if t.grad is not None]
        if clip_val > 0 and with_grad:
            if clip_by_value:
                torch.nn.utils.clip_grad_value_(with_grad, clip_val)
            else:
                torch.nn.utils.clip_grad_norm_(with_grad, clip_val)
        self.optimizer.step()
        for t in self.params:
            t.grad = None
        self.discard_gradients()

    def momentum_pairs(self, optimizer: Optimizer, params: Sequence[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """(twin, main) optimizer-state tensors shaped like their parameter (momentum, Adam moments)."""
        twin_state, main_state = [], []
        for tp, mp in zip(self.params, params):
            main = optimizer.state.get(mp, {})
            for key, value in self.optimizer.state.get(tp, {}).items():
                other = main.get(key)
                if isinstance(value, Tensor) and value.is_floating_point() and value.shape == tp.shape:
                    if isinstance(other, Tensor) and other.shape == value.shape:
                        twin_state.append(value)
                        main_state.append(other)
        return twin_state, main_state

    @property
    def nbytes(self) -> int:
        state = [v for s in self.optimizer.state.values() for v in s.values() if isinstance(v, Tensor)]
        return sum(t.numel() * t.element_size() for t in [*self.params, *self.buffers, *state])

    def state_dict(self) -> dict[str, Any]:
        return {
            "params": [t.cpu().clone() for t in self.params],
            "buffers": [t.cpu().clone() for t in self.buffers],
            "optimizer": copy.deepcopy(self.optimizer.state_dict()),
            "benettin": self.benettin.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        with torch.no_grad():
            for t, saved in zip([*self.params, *self.buffers], [*state["params"], *state["buffers"]]):
                t.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.benettin.load_state_dict(state["benettin"])


class Track:
    """ln d(t) of one perturbed trajectory since its last (re)seed, and its current Benettin interval.

    The history is a :class:`~chaos_callbacks.dynamics.lyapunov.DecimatedCurve` of at most
    ``HISTORY_POINTS`` samples, whatever the length of the run. A track without a valid separation
    (its ε was erased by rounding) is ``idle`` until the next re-seed.
    """

    def __init__(self) -> None:
        self.curve = DecimatedCurve(HISTORY_POINTS)
        self.last = math.nan  # ln d measured after the latest step, before any renormalisation
        self.now = math.nan  # ln d of the current state (after renormalisation)
        self.interval_start = math.nan  # ln d at the start of the current interval
        self.since = 0  # optimizer steps into the current interval
        self.ftle = math.nan

    @property
    def idle(self) -> bool:
        return not math.isfinite(self.now)

    def restart(self, step: int, log_d: float) -> None:
        """A new history from ``log_d`` (NaN: no valid separation, the track is idle)."""
        self.curve.clear()
        if math.isfinite(log_d):
            self.curve.append(step, log_d)
        self.last = log_d
        self.start_interval(log_d)

    def start_interval(self, log_d: float) -> None:
        self.interval_start, self.now, self.since = log_d, log_d, 0

    def record(self, step: int, log_d: float) -> None:
        self.curve.append(step, log_d)
        self.last = self.now = log_d
        self.since += 1

    def state_dict(self) -> dict[str, Any]:
        return {**vars(self), "curve": self.curve.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.curve.load_state_dict(state.pop("curve"))
        vars(self).update(state)
