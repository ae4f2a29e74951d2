"""chaos_callbacks: chaos-theory and statistical-physics instruments for PyTorch Lightning.

The callbacks are imported lazily, so ``chaos_callbacks.curvature`` and
``chaos_callbacks.dynamics`` (pure math) never load Lightning.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_CALLBACKS = {
    "ChaosSummary": "chaos_callbacks.callbacks.summary",
    "CurvatureLRScheduler": "chaos_callbacks.callbacks.curvature_lr",
    "DiffusionTracker": "chaos_callbacks.callbacks.diffusion_tracker",
    "GradientNoiseScale": "chaos_callbacks.callbacks.gradient_noise",
    "GradientTailFitter": "chaos_callbacks.callbacks.gradient_tails",
    "LyapunovTwinRun": "chaos_callbacks.callbacks.lyapunov_twin",
    "HessianSpectrumMonitor": "chaos_callbacks.callbacks.hessian_spectrum",
}

__all__ = sorted(_CALLBACKS)


def __getattr__(name: str) -> Any:
    if name in _CALLBACKS:
        return getattr(importlib.import_module(_CALLBACKS[name]), name)
    if name == "preset":  # cost tiers: chaos_callbacks.presets
        return importlib.import_module("chaos_callbacks.presets").preset
    raise AttributeError(f"module 'chaos_callbacks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_CALLBACKS, "preset"])
