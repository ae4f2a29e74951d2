"""Cost tiers: a configured list of callbacks in one call, ``chaos_callbacks.preset("business")``.

Cockpit (Schneider et al., NeurIPS 2021) groups its quantities into *economy*, *business* and *full*
configurations by cost; these tiers do the same for the instruments here, at a cadence ``every_n_steps``
(default 16, Cockpit's published setting):

* ``"economy"`` — first-order only: :class:`~chaos_callbacks.GradientNoiseScale` every
  ``every_n_steps`` steps and :class:`~chaos_callbacks.GradientTailFitter` (pooled entries) every
  ``8 × every_n_steps``.
* ``"business"`` — economy, plus :class:`~chaos_callbacks.HessianSpectrumMonitor` (``λ_max``, batch
  sharpness, ``‖Hg‖/‖g‖``; no ``λ_min``) every ``32 × every_n_steps`` and
  :class:`~chaos_callbacks.DiffusionTracker` sampling the weights every ``every_n_steps`` (windows of
  20 samples).
* ``"full"`` — every instrument: the noise scale every ``every_n_steps``, per-layer tails every
  ``2 ×``, the monitor every ``4 ×`` with the top 3 eigenvalues and the trace (``λ_min`` every
  ``40 ×``), the tracker at every step (windows of ``10 × every_n_steps``), and
  :class:`~chaos_callbacks.LyapunovTwinRun` (a twin run: about twice the training cost).

The multiples follow what one estimate costs, in training steps of a 10⁶-parameter MLP on one CPU
thread (batch 128): a noise-scale estimate ~2, a pooled tail fit ~7, a certified ``λ_max`` 25–130
(27–55 products on a tanh MLP with random labels, fewer on real data).

Each tier ends with :class:`~chaos_callbacks.ChaosSummary`. ``benchmarks/bench_presets.py`` measures
their overhead; ``configs/preset_<tier>.yaml`` are the same tiers for ``chaos-train``.
"""

from __future__ import annotations

from typing import Any

TIERS = ("economy", "business", "full")


def tier_arguments(tier: str, every_n_steps: int = 16) -> dict[str, dict[str, Any]]:
    """The callbacks of ``tier`` by class name, each with its constructor arguments, in Trainer order."""
    c = every_n_steps
    economy: dict[str, dict[str, Any]] = {
        "GradientNoiseScale": {"every_n_steps": c},
        "GradientTailFitter": {"every_n_steps": 8 * c, "per_layer": False},
    }
    if tier == "economy":
        tiers = economy
    elif tier == "business":
        tiers = {
            **economy,
            "HessianSpectrumMonitor": {"every_n_steps": 32 * c, "lambda_min": False},
            "DiffusionTracker": {"every_n_steps": c, "window": 20},
        }
    else:
        tiers = {
            "GradientNoiseScale": {"every_n_steps": c},
            "GradientTailFitter": {"every_n_steps": 2 * c},
            "HessianSpectrumMonitor": {"every_n_steps": 4 * c, "top_k": 3, "lambda_min": True,
                                       "lambda_min_every_n_steps": 40 * c, "trace": True},
            "DiffusionTracker": {"every_n_steps": 1, "window": 10 * c},
            "LyapunovTwinRun": {},
        }
    return {**tiers, "ChaosSummary": {}}


def preset(tier: str, every_n_steps: int = 16, **overrides: dict[str, Any] | None) -> list[Any]:
    """The callbacks of a cost tier (module docstring), ready for ``Trainer(callbacks=...)``.

    Args:
        tier: ``"economy"``, ``"business"`` or ``"full"``.
        every_n_steps: the tier's cadence (the costlier instruments run at multiples of it, above).
        **overrides: per callback class name, arguments that replace or add to the tier's
            (``HessianSpectrumMonitor={"top_k": 2}``), or ``None`` to leave that callback out
            (``LyapunovTwinRun=None``). A name not in the tier adds that callback.

    Example::

        trainer = Trainer(callbacks=chaos_callbacks.preset("business", every_n_steps=50,
                                                            DiffusionTracker=None))
    """
    import chaos_callbacks
    from chaos_callbacks.callbacks._validation import check_choice, check_int

    check_choice("preset", "tier", tier, TIERS)
    check_int("preset", "every_n_steps", every_n_steps, minimum=1)
    arguments = tier_arguments(tier, every_n_steps)
    for name, change in overrides.items():
        if name not in chaos_callbacks.__all__:
            raise ValueError(f"preset: unknown callback {name!r} in the overrides (choose from {', '.join(chaos_callbacks.__all__)})")
        if change is not None and not isinstance(change, dict):
            raise ValueError(f"preset: the override of {name} must be a dict of its arguments or None, got {change!r}")
        if change is None:
            arguments.pop(name, None)
        else:
            arguments[name] = {**arguments.get(name, {}), **change}
    if "ChaosSummary" in arguments:  # last, after any callback an override added
        arguments["ChaosSummary"] = arguments.pop("ChaosSummary")
    return [getattr(chaos_callbacks, name)(**kwargs) for name, kwargs in arguments.items()]
