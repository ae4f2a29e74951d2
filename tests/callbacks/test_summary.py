"""ChaosSummary (report, skipped counts and reasons, stale values, tidy table) and the per-step
gathering of logged scalars (one CSV row per step, TensorBoard values unchanged)."""

from __future__ import annotations

import csv
import json
import math
import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

import chaos_callbacks.callbacks._plumbing as plumb
from chaos_callbacks import (
    ChaosSummary,
    CurvatureLRScheduler,
    DiffusionTracker,
    GradientTailFitter,
    HessianSpectrumMonitor,
    LyapunovTwinRun,
)
from chaos_callbacks.callbacks.summary import CUSTOM_SCALARS_LAYOUT, TABLE_CSV, TABLE_JSON
from tests.lightning_helpers import MemoryLogger, TinyNet, loader, random_classification

pytestmark = pytest.mark.filterwarnings("ignore")


def _instruments() -> list[Callback]:
    """Five callbacks logging from four hooks: batch start (Hessian, curvature lr), before the
    optimizer step (tails), batch end (diffusion at the step, the twin at the next step)."""
    return [
        HessianSpectrumMonitor(every_n_steps=2, top_k=2),
        LyapunovTwinRun(renormalize_every=2),
        DiffusionTracker(window=4, dim=16),
        GradientTailFitter(every_n_steps=3, num_samples=100),
        CurvatureLRScheduler(every_n_steps=2, warmup_steps=2),
    ]


def _fit(callbacks: list[Callback], loggers, *, steps: int = 12, accumulate: int = 1, seed: int = 0, root: Path | None = None) -> pl.Trainer:
    pl.seed_everything(seed, verbose=False)
    trainer = pl.Trainer(
        callbacks=callbacks, logger=loggers, max_steps=steps, max_epochs=None, log_every_n_steps=1, accumulate_grad_batches=accumulate,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
        default_root_dir=root,
    )
    trainer.fit(TinyNet(), loader(random_classification(n=64, seed=seed), batch_size=8))
    return trainer


@pytest.fixture
def spy(monkeypatch):
    """Every ``log_scalars`` call as the callbacks made it: ``[(step, {prefixed tag: value})]``."""
    calls: list[tuple[int, dict[str, float]]] = []
    original = plumb.log_scalars

    def recording(trainer, pl_module, metrics, step, prog_bar=(), prefix=""):
        calls.append((step, {prefix + k: float(v) for k, v in metrics.items() if v is not None}))
        return original(trainer, pl_module, metrics, step, prog_bar=prog_bar, prefix=prefix)

    monkeypatch.setattr(plumb, "log_scalars", recording)
    return calls


def _expected(calls: list[tuple[int, dict[str, float]]]) -> dict[int, dict[str, float]]:
    """Per step, every tag's last value (a tag written twice at one step keeps its last write)."""
    out: dict[int, dict[str, float]] = {}
    for step, metrics in calls:
        out.setdefault(step, {}).update(metrics)
    return {s: m for s, m in out.items() if m}


def _is_ours(tag: str) -> bool:
    return tag.split("/")[0] in {"hessian", "lyapunov", "diffusion", "grad_tail", "curvature_lr"}


@pytest.mark.parametrize("seed, accumulate", [(0, 1), (1, 1), (2, 2)])
def test_csv_gets_one_row_per_step_with_every_value(tmp_path, spy, seed, accumulate):
    csv_logger, memory = CSVLogger(tmp_path, name="csv", version=0), MemoryLogger()
    trainer = _fit(_instruments(), [csv_logger, memory], seed=seed, accumulate=accumulate)
    expected = _expected(spy)
    assert len(expected) >= 10 and any(len({t.split("/")[0] for t in m}) >= 3 for m in expected.values())
    with open(Path(csv_logger.log_dir) / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if any(v != "" and _is_ours(k) for k, v in r.items())]
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(expected) and len(set(steps)) == len(steps)  # one row per step, increasing
    for row in rows:
        ours = {k: float(v) for k, v in row.items() if v != "" and _is_ours(k)}
        assert ours == expected[int(row["step"])]  # exact: CSV keeps the repr of each float
    # every other logger gets the same single call per step, in order
    calls = [(s, m) for s, m in memory.rows if any(_is_ours(k) for k in m)]
    assert calls == sorted(expected.items())
    assert trainer.callback_metrics["hessian/lambda_max"] == pytest.approx(expected[max(s for s in expected if "hessian/lambda_max" in expected[s])]["hessian/lambda_max"])


def test_tensorboard_values_unchanged_at_their_steps(tmp_path, spy):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _fit(_instruments(), TensorBoardLogger(tmp_path, name="tb", version=0))
    expected = _expected(spy)
    acc = EventAccumulator(str(tmp_path / "tb" / "version_0"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = {tag for m in expected.values() for tag in m}
    assert tags <= set(acc.Tags()["scalars"])
    for tag in tags:
        want = [(s, m[tag]) for s, m in sorted(expected.items()) if tag in m]
        got = [(e.step, e.value) for e in acc.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in want], tag
        for (_, a), (_, b) in zip(got, want):
            assert a == pytest.approx(b, rel=1e-6, abs=1e-30) or (math.isnan(a) and math.isnan(b)), tag


def test_outside_fit_values_are_written_at_once():
    memory = MemoryLogger()
    trainer = pl.Trainer(logger=memory, accelerator="cpu", enable_progress_bar=False, enable_model_summary=False)
    plumb.log_scalars(trainer, TinyNet(), {"hessian/trace": 3.0}, step=7, prefix="p/")
    assert memory.rows == [(7, {"p/hessian/trace": 3.0})]
    assert plumb.logged_values(trainer)["p/hessian/trace"] == plumb.Logged(3.0, 7, 7)


def test_warn_once_counts_kinds_and_keeps_last_messages():
    warn = plumb.WarnOnce("X")
    with pytest.warns(UserWarning):
        warn("a", "first a")
    warn("a", "second a")
    warn("b", "only b")
    assert warn.count == 3 and warn.kinds == {"a": 2, "b": 1} and warn.messages == {"a": "second a", "b": "only b"}


class _Clock(Callback):
    """Exposes the step being trained (list it before the callbacks whose ``loss_fn`` reads it)."""

    def __init__(self) -> None:
        self.step = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = trainer.global_step


def _failing_from(clock: _Clock, first: int):
    """A loss function that raises from step ``first`` on."""

    def loss_fn(module, batch):
        if clock.step >= first:
            raise RuntimeError("probe loss unavailable")
        x, y = batch
        return torch.nn.functional.cross_entropy(module(x), y)

    return loss_fn


def _table(folder: Path) -> tuple[list[dict[str, str]], dict]:
    with open(folder / TABLE_CSV) as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads((folder / TABLE_JSON).read_text())


def test_every_estimate_skipped_shows_counts_reasons_and_no_empty_table(tmp_path, capsys):
    clock = _Clock()
    monitor = HessianSpectrumMonitor(every_n_steps=2, loss_fn=_failing_from(clock, 0))
    csv_logger = CSVLogger(tmp_path, name="csv", version=0)
    _fit([clock, ChaosSummary(), monitor], csv_logger, steps=6)
    out = capsys.readouterr().out
    assert "chaos_callbacks summary after 6 steps" in out
    assert "no headline value was logged" in out
    assert "hessian/skipped = 3" in out  # steps 0, 2, 4
    assert re.search(r"RuntimeError x3: .*probe loss unavailable", out)
    assert f"CSVLogger: {Path(csv_logger.log_dir) / 'metrics.csv'}" in out
    rows, data = _table(Path(csv_logger.log_dir))
    assert [(r["tag"], float(r["value"]), r["step"], r["certification"]) for r in rows] == [("hessian/skipped", 3.0, "4", "exact")]
    assert data["rows"][0]["tag"] == "hessian/skipped" and data["global_step"] == 6


@pytest.mark.parametrize("prefix", ["", "probe_a/"])
def test_values_older_than_a_later_skip_are_marked_stale(tmp_path, capsys, prefix):
    clock = _Clock()
    monitor = HessianSpectrumMonitor(every_n_steps=2, top_k=1, trace=False, loss_fn=_failing_from(clock, 10**9), prefix=prefix)
    summary = ChaosSummary()
    trainer = _fit([clock, summary, monitor, GradientTailFitter(every_n_steps=2, num_samples=100, prefix=prefix)],
                   TensorBoardLogger(tmp_path, name="tb", version=0), steps=8)
    rows = {r.tag: r for r in summary.rows(trainer)}
    assert not rows[f"{prefix}hessian/lambda_max"].stale and not rows[f"{prefix}grad_tail/alpha"].stale
    capsys.readouterr()

    clock = _Clock()
    failing = HessianSpectrumMonitor(every_n_steps=2, top_k=1, trace=False, loss_fn=_failing_from(clock, 4), prefix=prefix)
    summary = ChaosSummary()
    trainer = _fit([clock, summary, failing, GradientTailFitter(every_n_steps=2, num_samples=100, prefix=prefix)],
                   TensorBoardLogger(tmp_path, name="tb", version=1), steps=8)
    rows = {r.tag: r for r in summary.rows(trainer)}
    lam = rows[f"{prefix}hessian/lambda_max"]
    assert lam.step == 2 and lam.stale and f"{prefix}hessian skipped at step 6" in lam.note  # steps 4 and 6 failed
    assert lam.uncertainty_kind == "error" and lam.certification == "certified" and lam.uncertainty is not None
    alpha = rows[f"{prefix}grad_tail/alpha"]
    assert not alpha.stale and alpha.step == 6 and alpha.uncertainty_kind == "stderr" and alpha.certification == "statistical"
    assert rows[f"{prefix}hessian/skipped"].value == 2.0 and not rows[f"{prefix}hessian/skipped"].stale
    out = capsys.readouterr().out
    assert re.search(rf"{re.escape(prefix)}hessian/lambda_max .* stale: {re.escape(prefix)}hessian skipped at step 6", out)
    assert f"{prefix}hessian/skipped = 2" in out and f"{prefix}grad_tail/skipped = 0" in out
    assert "tensorboard --logdir" in out
    table, data = _table(Path(trainer.loggers[0].log_dir))
    assert len(table) == len(data["rows"]) == len(rows)
    row = next(r for r in table if r["tag"] == f"{prefix}hessian/lambda_max")
    assert row["stale"] == "True" and float(row["value"]) == lam.value and float(row["uncertainty"]) == lam.uncertainty


class _PoisonWeights(Callback):
    """Makes the weights NaN at the end of training (after the last estimate)."""

    def on_train_end(self, trainer, pl_module):
        with torch.no_grad():
            next(pl_module.parameters()).fill_(float("nan"))


def test_non_finite_weights_at_the_end_mark_every_value_stale(tmp_path, capsys):
    summary = ChaosSummary()
    trainer = _fit([summary, HessianSpectrumMonitor(every_n_steps=2, top_k=1), _PoisonWeights()], False, steps=4, root=tmp_path)
    rows = summary.rows(trainer)
    assert rows and all(r.stale == (not r.tag.endswith(("/hvps", "/skipped"))) for r in rows)
    assert "non-finite weights at the end of fit" in capsys.readouterr().out
    assert (tmp_path / TABLE_CSV).exists() and (tmp_path / TABLE_JSON).exists()  # no logger: default_root_dir


def test_sharpness_carries_the_scaled_certificate(tmp_path):
    summary = ChaosSummary()
    trainer = _fit([summary, HessianSpectrumMonitor(every_n_steps=2, top_k=1)], False, steps=4, root=tmp_path)
    rows = {r.tag: r for r in summary.rows(trainer)}
    lam, sharp = rows["hessian/lambda_max"], rows["hessian/sharpness_lr"]
    lr = sharp.value / lam.value
    assert lr == pytest.approx(0.1) and sharp.uncertainty == pytest.approx(lr * lam.uncertainty, rel=1e-12)
    assert rows["hessian/hvps"].certification == "exact" and "hessian/lambda_max_error" not in rows


def test_layout_charts_hold_one_quantity_each():
    """TensorBoard colours custom-scalar lines by run: one anchored pattern per chart, so no chart
    mixes quantities (or units), and no companion joins a chart."""
    tags = [
        "hessian/lambda_max", "hessian/eig_1", "hessian/eig_2", "hessian/lambda_min", "hessian/sharpness_lr", "hessian/trace",
        "hessian/grad_curvature", "hessian/batch_sharpness", "hessian/preconditioned_lambda_max", "hessian/preconditioned_sharpness_ratio", "lyapunov/mle", "lyapunov/ftle", "lyapunov/local_exponent", "lyapunov/log_distance",
        "lyapunov/twin_loss", "curvature_lr/lr", "curvature_lr/lambda", "diffusion/exponent", "diffusion/exponent_short",
        "diffusion/exponent_long", "diffusion/crossover", "diffusion/hurst", "diffusion/fractal_dim", "diffusion/temperature",
        "grad_tail/alpha", "grad_tail/blocks.0/alpha", "grad_tail/llr_gauss", "grad_tail/llr_student_t", "grad_tail/vuong_p",
        "grad_tail/vuong_p_student_t", "grad_tail/zero_fraction", "grad_tail/blocks.0/zero_fraction",
        "hessian/fc1/lambda_max", "hessian/fc1/lambda_min", "hessian/fc1/trace",
        "gradient_noise/b_simple", "gradient_noise/b_simple_over_batch", "gradient_noise/trace_cov", "gradient_noise/grad_norm_sq",
    ]
    tags += [t.replace("hessian/", "ggn/", 1) for t in tags if t.startswith("hessian/")]  # curvature="ggn"
    charts = [(area, title, spec) for area, group in CUSTOM_SCALARS_LAYOUT.items() for title, spec in group.items()]
    for area, title, (kind, patterns) in charts:
        assert kind == "Multiline" and len(patterns) == 1 and patterns[0].endswith("$"), title
        matched = [t for t in tags if re.search(patterns[0], t)]
        assert matched and all(t.startswith(area + "/") for t in matched), title
        assert len({re.sub(r"_\d+$", "", t.rsplit("/", 1)[-1]) for t in matched}) == 1, (title, matched)  # one quantity
        for t in matched:
            assert not re.search(patterns[0], t + "_error") and not re.search(patterns[0], t + "_stderr")
    for tag in tags:  # every tag in exactly one chart
        assert sum(bool(re.search(spec[1][0], tag)) for _, _, spec in charts) == 1, tag


def test_layout_follows_the_attached_instruments_and_prefixes():
    from chaos_callbacks.callbacks.summary import custom_scalars_layout

    layout = custom_scalars_layout([HessianSpectrumMonitor(trace=False, prefix="a/"), HessianSpectrumMonitor(lambda_min=True, prefix="b/"),
                                    LyapunovTwinRun(renormalize_every=None)])
    assert set(layout) == {"a/hessian", "b/hessian", "lyapunov"}
    a = [spec[1][0] for spec in layout["a/hessian"].values()]
    b = [spec[1][0] for spec in layout["b/hessian"].values()]
    assert not any("trace" in p or "lambda_min" in p for p in a) and any("lambda_min" in p for p in b)
    assert re.search(a[0], "a/hessian/lambda_max") and not re.search(a[0], "b/hessian/lambda_max")
    lyapunov = [spec[1][0] for spec in layout["lyapunov"].values()]
    assert any("local_exponent" in p for p in lyapunov) and not any("ftle" in p for p in lyapunov)
    assert custom_scalars_layout([]) == CUSTOM_SCALARS_LAYOUT


def test_adam_charts_only_when_the_optimizer_is_adam():
    from chaos_callbacks.callbacks.summary import custom_scalars_layout

    p = [torch.nn.Parameter(torch.zeros(2))]
    monitors = [HessianSpectrumMonitor(), HessianSpectrumMonitor(curvature="ggn")]
    for optimizer, shown in ((torch.optim.SGD(p, lr=0.1), False), (torch.optim.AdamW(p), True), (None, True)):
        layout = custom_scalars_layout(monitors, None if optimizer is None else [optimizer])
        for area in ("hessian", "ggn"):
            adam = [title for title in layout[area] if title.startswith("Adam")]
            assert bool(adam) == shown, (optimizer, area, adam)
    assert not any("Hg" in title for title in layout["ggn"])  # the Gauss-Newton charts say G


def test_headlines_include_each_optimizers_rate_and_prefixed_tags():
    """Regression: with several optimizers the scheduler logs curvature_lr/optimizer_<i>/lr, which the headline
    list (curvature_lr/lr) did not match, so the report showed no learning rate at all."""
    from types import SimpleNamespace

    from chaos_callbacks.callbacks.summary import Row, _headline_lines

    tags = ["curvature_lr/optimizer_0/lr", "curvature_lr/optimizer_1/lr", "probe_a/curvature_lr/lr",
            "curvature_lr/optimizer_0/lambda", "hessian/block_a/lambda_max", "xcurvature_lr/lr"]
    rows = {t: Row(t, 0.5, None, "", "exact", 3, False, "") for t in tags}
    lines = _headline_lines(SimpleNamespace(callback_metrics={}), rows)
    listed = [line.split()[0] for line in lines[2:]]
    assert listed == ["curvature_lr/optimizer_0/lr", "curvature_lr/optimizer_1/lr", "probe_a/curvature_lr/lr"]
