"""Cost tiers: ``chaos_callbacks.preset`` and the ``configs/preset_<tier>.yaml`` files that mirror it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import chaos_callbacks
from chaos_callbacks.presets import TIERS, tier_arguments
from chaos_callbacks.recipes.cli import run

ROOT = Path(__file__).resolve().parents[1]


def _names(callbacks: list) -> list[str]:
    return [type(cb).__name__ for cb in callbacks]


def test_each_tier_adds_to_the_one_below():
    economy, business, full = (set(tier_arguments(t)) for t in TIERS)
    assert economy < business < full
    assert _names(chaos_callbacks.preset("economy")) == ["GradientNoiseScale", "GradientTailFitter", "ChaosSummary"]
    assert "LyapunovTwinRun" in _names(chaos_callbacks.preset("full")) and "LyapunovTwinRun" not in business


def test_the_cadence_and_the_overrides_reach_the_callbacks():
    cbs = {type(cb).__name__: cb for cb in chaos_callbacks.preset(
        "business", every_n_steps=50, HessianSpectrumMonitor={"top_k": 2}, DiffusionTracker=None,
        LyapunovTwinRun={"renormalize_every": 5})}
    assert cbs["GradientNoiseScale"].every_n_steps == 50 and cbs["GradientTailFitter"].every_n_steps == 400
    monitor = cbs["HessianSpectrumMonitor"]
    assert (monitor.every_n_steps, monitor.top_k, monitor.lambda_min) == (1600, 2, False)
    assert "DiffusionTracker" not in cbs and cbs["LyapunovTwinRun"].renormalize_every == 5
    assert list(cbs)[-1] == "ChaosSummary"  # the summary stays last when an override adds a callback


@pytest.mark.parametrize("call, message", [
    (lambda: chaos_callbacks.preset("premium"), "preset: tier must be one of"),
    (lambda: chaos_callbacks.preset("full", every_n_steps=0), "preset: every_n_steps"),
    (lambda: chaos_callbacks.preset("full", every_n_steps=True), "preset: every_n_steps"),
    (lambda: chaos_callbacks.preset("full", Hessian={"top_k": 2}), "unknown callback 'Hessian'"),
    (lambda: chaos_callbacks.preset("full", HessianSpectrumMonitor=3), "must be a dict"),
    (lambda: chaos_callbacks.preset("full", HessianSpectrumMonitor={"top_k": 0}), "HessianSpectrumMonitor: top_k"),
])
def test_bad_presets_are_refused_with_a_named_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@pytest.mark.parametrize("tier", TIERS)
def test_the_yaml_tier_is_the_python_tier(tier):
    config = yaml.safe_load((ROOT / "configs" / f"preset_{tier}.yaml").read_text())
    from_yaml = {cb["class_path"].removeprefix("chaos_callbacks."): cb.get("init_args", {}) for cb in config["trainer"]["callbacks"]}
    assert list(from_yaml.items()) == list(tier_arguments(tier, 16).items())


def test_the_economy_config_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cli = run(["fit", "--config", str(ROOT / "configs" / "preset_economy.yaml"), "--trainer.max_steps", "100",
               "--trainer.logger", "false", "--trainer.enable_checkpointing", "false", "--trainer.enable_progress_bar", "false"])
    noise = next(cb for cb in cli.trainer.callbacks if type(cb).__name__ == "GradientNoiseScale")
    assert cli.trainer.global_step == 100 and noise.last_estimate["gradient_noise/b_simple"] > 0
