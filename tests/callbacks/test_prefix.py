"""``prefix``: two instances of one callback side by side, each under its own tags; colliding tags refused."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from chaos_callbacks import (
    ChaosSummary,
    CurvatureLRScheduler,
    DiffusionTracker,
    GradientTailFitter,
    HessianSpectrumMonitor,
    LyapunovTwinRun,
)
from tests.lightning_helpers import TinyNet, loader, random_classification

FACTORIES = {
    "hessian": lambda **kw: HessianSpectrumMonitor(every_n_steps=2, **kw),
    "lyapunov": lambda **kw: LyapunovTwinRun(renormalize_every=2, **kw),
    "diffusion": lambda **kw: DiffusionTracker(window=4, dim=64, lags=3, **kw),
    "grad_tail": lambda **kw: GradientTailFitter(every_n_steps=2, num_samples=60, **kw),
    "curvature_lr": lambda **kw: CurvatureLRScheduler(every_n_steps=2, **kw),
}


def fit(callbacks, tmp_path=None, steps=4):
    pl.seed_everything(0, verbose=False)
    logger = CSVLogger(tmp_path) if tmp_path is not None else False
    trainer = pl.Trainer(max_steps=steps, callbacks=callbacks, logger=logger, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(TinyNet(), loader(random_classification(n=64)))
    return trainer


@pytest.mark.parametrize("area", ["hessian", "lyapunov", "diffusion", "grad_tail"])
def test_two_prefixed_instances_log_the_same_numbers_under_their_own_tags(area):
    """Identical settings under two prefixes: the same values (monitors do no harm, so each sees the
    same run), each under ``<prefix><area>/...``, and nothing under the bare area (product counts
    excepted: the shared engine lets the second instance reuse the first one's products)."""
    a, b = FACTORIES[area](prefix="probe_a/"), FACTORIES[area](prefix="probe_b/")
    alone = FACTORIES[area]()
    metrics = fit([a, b]).callback_metrics
    reference = fit([alone]).callback_metrics
    ours = {k: v for k, v in reference.items() if k.startswith(f"{area}/")}
    assert ours, f"no {area}/ tag logged"
    for tag, value in ours.items():
        if tag.endswith("/hvps"):  # the second instance reuses products of the first (the shared engine)
            assert f"probe_a/{tag}" in metrics and f"probe_b/{tag}" in metrics
            continue
        assert torch.equal(metrics[f"probe_a/{tag}"], value) and torch.equal(metrics[f"probe_b/{tag}"], value)
    assert not any(k.startswith(f"{area}/") for k in metrics)


SETTINGS = {"hessian": {"top_k": 2}, "lyapunov": {"n_twins": 2}, "diffusion": {"seed": 1}, "grad_tail": {"target": "noise"},
            "curvature_lr": {"probe": 32}}


@pytest.mark.parametrize("area", list(FACTORIES))
def test_two_instances_with_one_prefix_are_refused_before_the_first_step(area):
    """Different settings, one prefix: refused at fit start naming the callback and ``prefix``.
    Identical instances are refused earlier by Lightning itself, when the Trainer is built (their
    checkpoint ``state_key`` would collide)."""
    name = type(FACTORIES[area]()).__name__
    for prefix in ("x/", ""):
        expected = rf"{name}: prefix='{prefix}' .* same '{prefix}{area}/\.\.\.' tags"
        if area == "curvature_lr":  # two schedulers of one optimizer are refused whatever their prefixes
            expected = "holds two CurvatureLRSchedulers"
        with pytest.raises(ValueError, match=expected):
            fit([FACTORIES[area](prefix=prefix), FACTORIES[area](prefix=prefix, **SETTINGS[area])])
    with pytest.raises(RuntimeError, match="state_key` must be unique"):
        fit([FACTORIES[area](prefix="x/"), FACTORIES[area](prefix="x/")])


@pytest.mark.parametrize("bad", [1, None, "/a", "a//b", "a b", "é/"])
@pytest.mark.parametrize("area", list(FACTORIES))
def test_bad_prefixes_are_refused_at_construction(area, bad):
    name = type(FACTORIES[area]()).__name__
    with pytest.raises(ValueError, match=rf"{name}: prefix must be"):
        FACTORIES[area](prefix=bad)


def test_state_keys_carry_the_prefix_and_an_empty_prefix_keeps_the_old_key():
    plain, prefixed = HessianSpectrumMonitor(), HessianSpectrumMonitor(prefix="a/")
    assert "prefix" not in plain.state_key and "'prefix': 'a/'" in prefixed.state_key
    assert plain.state_key != prefixed.state_key


def test_summary_and_csv_show_prefixed_headlines(tmp_path, capsys):
    summary = ChaosSummary()
    trainer = fit([HessianSpectrumMonitor(every_n_steps=2, prefix="a/"), HessianSpectrumMonitor(every_n_steps=2, prefix="b/"), summary], tmp_path)
    text = summary.summary(trainer)
    assert "a/hessian/lambda_max" in text and "b/hessian/lambda_max" in text
    header = (tmp_path / "lightning_logs" / "version_0" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"a/hessian/lambda_max", "b/hessian/lambda_max", "a/hessian/hvps"} <= set(header)


def test_prefixed_instances_resume_each_from_its_own_state(tmp_path):
    """Two prefixed monitors with different settings and two prefixed diffusion trackers: a run resumed from a
    mid-run checkpoint logs, under every prefixed tag, exactly what the uninterrupted run logged."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    def run(ckpt_path=None, save=False):
        pl.seed_everything(0, verbose=False)
        cbs = [HessianSpectrumMonitor(every_n_steps=2, prefix="a/"), HessianSpectrumMonitor(every_n_steps=2, top_k=2, prefix="b/"),
               DiffusionTracker(window=6, dim=64, lags=3, prefix="a/"), DiffusionTracker(window=6, dim=64, lags=3, seed=1, prefix="b/")]
        if save:
            cbs.append(ModelCheckpoint(dirpath=tmp_path, save_top_k=-1, every_n_epochs=1, filename="{epoch}"))
        t = pl.Trainer(max_epochs=4, callbacks=cbs, logger=False, enable_checkpointing=save, enable_progress_bar=False,
                       enable_model_summary=False, accelerator="cpu")
        t.fit(TinyNet(), loader(random_classification(n=64), shuffle=False), ckpt_path=ckpt_path)
        return {k: v for k, v in t.callback_metrics.items() if k.startswith(("a/", "b/"))}

    full = run(save=True)
    resumed = run(ckpt_path=str(tmp_path / "epoch=1.ckpt"))
    assert {"a/hessian/lambda_max", "b/hessian/eig_2", "a/diffusion/exponent", "b/diffusion/exponent"} <= full.keys()
    assert full.keys() == resumed.keys()
    for tag in full:
        assert torch.equal(full[tag], resumed[tag]), tag
