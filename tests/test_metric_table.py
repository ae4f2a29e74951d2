"""The README's metric table names every tag the callbacks write.

One short fit of a TinyNet with every callback, in the configurations that write their optional tags
(several instances side by side under prefixes), logs to TensorBoard; every scalar, image and
histogram tag of ours that the event file holds must appear in the table of "What each chart means",
written as the table writes it: without the run's prefix, without its ``_error``/``_stderr``
companion suffix, and with placeholders for per-layer, per-optimizer and per-eigenvalue parts
(``grad_tail/<layer>/alpha``, ``grad_tail/optimizer_<i>/…``, ``hessian/eig_<i>``, ``<area>/skipped``).
"""

from __future__ import annotations

import re
from pathlib import Path

import lightning.pytorch as pl
import pytest
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.data import DataLoader

from chaos_callbacks import (
    ChaosSummary,
    CurvatureLRScheduler,
    DiffusionTracker,
    GradientNoiseScale,
    GradientTailFitter,
    HessianSpectrumMonitor,
    LyapunovTwinRun,
)
from tests.conformance import zoo_modules as zoo
from tests.lightning_helpers import AREAS, TinyNet, loader, ours, trainer

README = Path(__file__).resolve().parents[1] / "README.md"
PREFIXES = ("power/", "map/", "free/", "tangent/")  # the prefixes of the second instances below
COMPANION = re.compile(r"_(error|stderr)$")


def table_tags(readme: str) -> set[str]:
    """Every backticked name in the metric table (the rows after the ``| metric | meaning |`` header)."""
    lines = readme.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| metric | meaning |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append(line)
    return set(re.findall(r"`([^`]+)`", "\n".join(rows)))


def documented_form(tag: str) -> str:
    """The name under which the table documents ``tag``."""
    for prefix in PREFIXES:
        tag = tag.removeprefix(prefix)
    tag = COMPANION.sub("", tag)
    area, *parts = tag.split("/")
    if area == "val":
        return "val/hessian/…"
    if parts == ["skipped"]:
        return "<area>/skipped"
    if area == "ggn":
        return "ggn/…"
    if len(parts) == 2 and re.fullmatch(r"optimizer_\d+", parts[0]):
        return f"{area}/optimizer_<i>/…"
    if len(parts) == 2:
        part = "<block>" if area == "hessian" else "<layer>"
        return re.sub(r"/eig_\d+$", "/eig_<i>", f"{area}/{part}/{parts[1]}")
    return re.sub(r"/eig_\d+$", "/eig_<i>", tag)


def test_documented_form():
    assert documented_form("power/hessian/lambda_dominant_error") == "hessian/lambda_dominant"
    assert documented_form("hessian/eig_12_error") == "hessian/eig_<i>"
    assert documented_form("grad_tail/net.0/alpha_stderr") == "grad_tail/<layer>/alpha"
    assert documented_form("grad_tail/optimizer_1/vuong_p") == "grad_tail/optimizer_<i>/…"
    assert documented_form("free/lyapunov/skipped") == "<area>/skipped"
    assert documented_form("diffusion/crossover_pvalue") == "diffusion/crossover_pvalue"
    assert documented_form("hessian/first/eig_2_error") == "hessian/<block>/eig_<i>"
    assert documented_form("ggn/first/lambda_max") == "ggn/…" and documented_form("val/hessian/trace") == "val/hessian/…"


def logged_tags(log_dir: Path) -> set[str]:
    """Scalar, image and histogram tags of the TensorBoard event files under ``log_dir``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "histograms": 0})
    events.Reload()
    kinds = events.Tags()
    return {tag for kind in ("scalars", "images", "histograms") for tag in kinds[kind]}


@pytest.fixture(scope="module")
def tags_of_a_run(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    callbacks = [
        HessianSpectrumMonitor(every_n_steps=2, top_k=2, lambda_min=True, trace=True, trace_samples=4, density=True,
                               density_probes=1, density_steps=8, max_hvps=40, blocks={"first": r"^net\.0\."}),
        HessianSpectrumMonitor(every_n_steps=2, curvature="ggn", max_hvps=40, blocks={"last": r"^net\.2\."}),
        HessianSpectrumMonitor(every_n_steps=2, method="power", max_hvps=40, prefix="power/"),
        HessianSpectrumMonitor(every_n_steps=2, method="lyapunov", max_hvps=40, prefix="map/"),
        LyapunovTwinRun(renormalize_every=2, n_twins=2, function_space=True, summary_every_n_steps=4),
        LyapunovTwinRun(renormalize_every=None, n_twins=2, summary_every_n_steps=4, prefix="free/"),
        LyapunovTwinRun(mode="tangent", renormalize_every=2, prefix="tangent/"),
        CurvatureLRScheduler(every_n_steps=2),
        DiffusionTracker(window=6, lags=4, figure_every_n_windows=1, loss_key="train_loss_step"),
        GradientTailFitter(every_n_steps=2, num_samples=60, figure_every_n_estimates=1),
        GradientNoiseScale(every_n_steps=2),
        ChaosSummary(),
    ]  # fmt: skip
    root = tmp_path_factory.mktemp("tb")
    pl.seed_everything(0, verbose=False)
    run = trainer(callbacks=callbacks, logger=TensorBoardLogger(root, name="", version=0), max_epochs=3)
    run.fit(TinyNet(), loader())
    # what only Adam and a validation loader write: preconditioned sharpness, validation-split curvature
    adam = [HessianSpectrumMonitor(every_n_steps=2, top_k=2, max_hvps=40, landscape=True, landscape_points=3),
            HessianSpectrumMonitor(every_n_steps=2, probe=16, split="val", max_hvps=40)]
    pl.seed_everything(0, verbose=False)
    run = trainer(callbacks=adam, logger=TensorBoardLogger(root, name="", version=1), max_epochs=2)
    run.fit(WithValidation(optimizer="adam", lr=0.01), loader(), loader())
    # what only several optimizers write: one curvature rate per optimizer (a manual-optimization GAN)
    gan = [CurvatureLRScheduler(every_n_steps=2, loss_fn=[zoo.gan_generator_loss, zoo.gan_discriminator_loss])]
    pl.seed_everything(0, verbose=False)
    run = trainer(callbacks=gan, logger=TensorBoardLogger(root, name="", version=2), max_steps=8, max_epochs=None)
    run.fit(zoo.GAN(), DataLoader(zoo.gan_data(), batch_size=16))
    return {tag for version in ("version_0", "version_1", "version_2") for tag in logged_tags(root / version) if ours(tag)}


class WithValidation(TinyNet):
    def validation_step(self, batch, batch_idx):
        return None


def test_the_run_wrote_every_area(tags_of_a_run: set[str]):
    """The run is not vacuous: each area's headline tag, the optional ones and the figures are there."""
    for tag in ("hessian/lambda_max", "hessian/trace", "hessian/spectral_density", "power/hessian/lambda_dominant",
                "map/hessian/lambda_max", "lyapunov/mle", "lyapunov/function_distance", "free/lyapunov/local_exponent",
                "free/lyapunov/saturated", "tangent/lyapunov/hvps", "curvature_lr/lr", "diffusion/exponent",
                "diffusion/loss_variance", "diffusion/msd", "grad_tail/alpha", "grad_tail/log10_abs_samples",
                "hessian/first/lambda_max", "ggn/lambda_max", "ggn/last/lambda_max", "hessian/batch_sharpness",
                "hessian/preconditioned_lambda_max", "val/hessian/lambda_max", "gradient_noise/b_simple", "hessian/landscape",
                "curvature_lr/optimizer_1/lambda"):  # fmt: skip
        assert tag in tags_of_a_run
    assert {tag.split("/")[-2] for tag in tags_of_a_run if len(tag.split("/")) == 2} == AREAS


def test_every_logged_tag_is_in_the_readme_metric_table(tags_of_a_run: set[str]):
    documented = table_tags(README.read_text())
    missing = sorted({documented_form(tag) for tag in tags_of_a_run} - documented)
    assert not missing, f"tags logged but not in README.md's metric table: {missing}"
