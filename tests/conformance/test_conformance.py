"""The conformance zoo: zoo module × Trainer setting × callback(s), one cell per row of the table
in ``tests/conformance/README.md``.

Every cell asserts the product's promise on a real Lightning run:

- it runs to the end and the callbacks logged their headline tags, with no hook failure
  swallowed on the way — or, for set-ups a callback documents as unsupported, it raises a
  ``ValueError`` naming the callback before the first step;
- no harm (monitoring callbacks): the run is bit for bit the run without them in everything the
  user sees (:func:`~tests.conformance.contracts.assert_no_harm`); for ``CurvatureLRScheduler``,
  which changes the learning rate on purpose, the same course (steps, RNG, the user's Python
  state up to values);
- plausible numbers where an exact answer is cheap (dense float64 Hessians, closed forms, the
  exact separation of a linear map).

Cells that are known to fail until the fixes of the other issue branches land are written as
they should pass (not xfailed).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from lightning.pytorch import Callback
from torch import Tensor
from torch.func import functional_call
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from chaos_callbacks import (
    CurvatureLRScheduler,
    DiffusionTracker,
    GradientNoiseScale,
    GradientTailFitter,
    HessianSpectrumMonitor,
    LyapunovTwinRun,
)
from tests.conformance import ddp_cells
from tests.conformance import zoo_modules as zoo
from tests.conformance.contracts import (
    RunRecord,
    Setting,
    assert_contained,
    assert_headline,
    assert_no_harm,
    assert_same,
    fit,
)

SETTINGS: dict[str, Setting] = {
    "default": Setting(),
    "accumulate": Setting(trainer={"accumulate_grad_batches": 2}),
    "clip_norm": Setting(trainer={"gradient_clip_val": 0.5, "gradient_clip_algorithm": "norm"}),
    "clip_value": Setting(trainer={"gradient_clip_val": 0.01, "gradient_clip_algorithm": "value"}),
    "bf16": Setting(trainer={"precision": "bf16-mixed"}),
    "f64": Setting(trainer={"precision": "64-true"}),
    "compile": Setting(compile_backend="aot_eager"),
    "inductor": Setting(compile_backend="inductor"),
    "frozen_groups": Setting(module={"frozen": True}),
    "plateau": Setting(module={"scheduler": "plateau"}, validation=True),
    "validation": Setting(validation=True),
    "fast_dev_run": Setting(trainer={"fast_dev_run": 5}),
    "diverging": Setting(module={"lr": 1e3}),
}

# the callbacks at a cadence that fits a handful of steps; their headline tags (the first also goes
# to the progress bar)
CALLBACKS: dict[str, tuple[Callable[..., Callback], tuple[str, ...]]] = {
    "H": (lambda **kw: HessianSpectrumMonitor(**{"every_n_steps": 2, "lambda_min_every_n_steps": kw.get("every_n_steps", 2), **kw}), ("hessian/lambda_max",)),
    "T": (lambda **kw: LyapunovTwinRun(**{"renormalize_every": 2, **kw}), ("lyapunov/mle", "lyapunov/log_distance")),
    "C": (lambda **kw: CurvatureLRScheduler(**{"every_n_steps": 2, **kw}), ("curvature_lr/lr", "curvature_lr/lambda")),
    "D": (lambda **kw: DiffusionTracker(**{"window": 4, "dim": 64, "lags": 3, **kw}), ("diffusion/exponent",)),
    "G": (lambda **kw: GradientTailFitter(**{"every_n_steps": 2, **kw}), ("grad_tail/alpha",)),
    "N": (lambda **kw: GradientNoiseScale(**{"every_n_steps": 1, **kw}), ("gradient_noise/b_simple",)),
    "K": (lambda **kw: HessianSpectrumMonitor(**{"every_n_steps": 2, "curvature": "ggn", "blocks": {"weights": r"weight$"}, **kw}),
          ("ggn/lambda_max",)),
}
MONITORS = ("H", "T", "D", "G", "N", "K")


@dataclass(frozen=True)
class Cell:
    """One zoo module under one Trainer setting with one or more callbacks (keys of ``CALLBACKS``)."""

    module: str
    setting: str
    callbacks: tuple[str, ...]
    checks: str  # what the cell checks beyond the common contracts (README column)
    options: dict[str, dict[str, Any]] = field(default_factory=dict)  # constructor overrides per callback
    module_kwargs: dict[str, Any] = field(default_factory=dict)
    trainer_kwargs: dict[str, Any] = field(default_factory=dict)  # on top of the setting's
    steps: int = 6
    refused: str | None = None  # regex of the documented ValueError
    exact: Callable[[RunRecord], None] | None = None
    capture: tuple[int, ...] = ()
    extra: Callable[[list[Callback]], list[Callback]] | None = None  # passive helpers for exact checks
    slow: bool = False
    tags: tuple[str, ...] | None = None  # headline tags, where they differ from the callbacks' usual ones

    @property
    def id(self) -> str:
        return f"{self.module}-{self.setting}-{'+'.join(self.callbacks)}"

    def make_callbacks(self) -> list[Callback]:
        callbacks = [CALLBACKS[k][0](**self.options.get(k, {})) for k in self.callbacks]
        return callbacks + (self.extra(callbacks) if self.extra else [])

    @property
    def headline(self) -> list[str]:
        return list(self.tags) if self.tags else [t for k in self.callbacks for t in CALLBACKS[k][1]]

    @property
    def progress_bar(self) -> list[str]:
        return list(self.tags[:1]) if self.tags else [CALLBACKS[k][1][0] for k in self.callbacks]


# ------------------------------------------------------------------------------ references
def dense_hessian(loss: Callable[[list[Tensor]], Tensor], params: Sequence[Tensor]) -> Tensor:
    """Dense float64 Hessian of ``loss(params)``, row by row by double backward (math attention kernel).

    Not ``torch.func.hessian``: through ``nn.LayerNorm`` (torch 2.14) it gets cross entries wrong —
    on the encoder LM it gave λ_max = 0.62669 where this and central finite differences along the
    top eigenvector agree on 0.62779 (largest error 0.032, norm2.weight × norm1.bias).
    """
    params = [p.detach().double().requires_grad_() for p in params]
    with sdpa_kernel([SDPBackend.MATH]):
        grads = torch.autograd.grad(loss(params), params, create_graph=True)
        flat = torch.cat([g.reshape(-1) for g in grads])
        rows = []
        for i in range(flat.numel()):
            row = torch.autograd.grad(flat[i], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(r if r is not None else torch.zeros_like(p)).reshape(-1) for r, p in zip(row, params)]))
    h = torch.stack(rows).detach()
    return (h + h.T) / 2


def finite_difference_curvature(loss: Callable[[list[Tensor]], Tensor], params: Sequence[Tensor], v: Tensor, h: float = 1e-4) -> float:
    """vᵀHv by central differences of the float64 loss along the unit vector ``v`` (certifies the reference)."""
    params = [p.detach().double() for p in params]
    steps = torch.split(v, [p.numel() for p in params])

    def at(t: float) -> float:
        with torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
            return float(loss([p + t * d.view_as(p) for p, d in zip(params, steps)]))

    return (at(h) - 2 * at(0.0) + at(-h)) / h**2


def _reference_module(record: RunRecord, **kwargs: Any) -> torch.nn.Module:
    module = type(record.module)(**kwargs).double()
    module.log = lambda *a, **k: None  # type: ignore[method-assign]
    return module


def _functional_loss(module: torch.nn.Module, names: Sequence[str], fixed: dict[str, Tensor], loss_of_output: Callable[[Tensor], Tensor], *inputs: Any) -> Callable[[list[Tensor]], Tensor]:
    def loss(tensors: list[Tensor]) -> Tensor:
        params = {**fixed, **dict(zip(names, tensors))}
        return loss_of_output(functional_call(module, params, inputs))

    return loss


def check_boring_lambda_max(record: RunRecord) -> None:
    """BoringModel: mse(Wx + b, 1) over 2 outputs of one example x: H = blockdiag(x̃x̃ᵀ, x̃x̃ᵀ),
    x̃ = (x, 1), so λ_max = ‖x‖² + 1 exactly; λ_min = 0."""
    for step, seen in record.captures.items():
        x = seen["batch"].double()
        exact = float(x.square().sum()) + 1.0
        assert record.at("hessian/lambda_max", step) == pytest.approx(exact, rel=1e-4), step
        assert abs(record.at("hessian/lambda_min", step)) <= 1e-3 * exact


def check_zero_hessian(record: RunRecord) -> None:
    """DemoModel: sum(relu(Wx + b)) is piecewise linear in (W, b): every Hessian-vector product is
    exactly zero, so the spectrum is {0}."""
    assert record.values("hessian/lambda_max"), record.tags
    assert all(v == 0.0 for v in record.values("hessian/lambda_max")), record.tags["hessian/lambda_max"]
    assert all(v == 0.0 for v in record.values("hessian/lambda_min")), record.tags.get("hessian/lambda_min")


def check_encoder_lm_lambda_max(record: RunRecord) -> None:
    """EncoderLM: λ_max (and λ_min) at step 0 vs a dense float64 Hessian of the same loss — on the
    fixed probe set (eval mode) or on the step's batch (dropout 0) — itself certified by central
    finite differences along its top eigenvector."""
    monitor = record.callbacks[0]
    probe = monitor.state_dict()["probe_batches"] or [record.captures[0]["batch"]]
    x, y = torch.cat([b[0] for b in probe]), torch.cat([b[1] for b in probe])  # equal-sized batches: one mean
    module = _reference_module(record, **{**record.module.hparams, "dropout": 0.0})  # = eval mode, no fast path
    params = record.captures[0]["params"]
    names = list(params)
    loss = _functional_loss(module, names, {}, lambda out: F.cross_entropy(out.flatten(0, 1), y.flatten()), x)
    tensors = [params[n] for n in names]
    exact, vectors = torch.linalg.eigh(dense_hessian(loss, tensors))
    assert finite_difference_curvature(loss, tensors, vectors[:, -1]) == pytest.approx(float(exact[-1]), rel=1e-6)
    assert record.at("hessian/lambda_max", 0) == pytest.approx(float(exact[-1]), rel=1e-4)
    assert record.at("hessian/lambda_min", 0) == pytest.approx(float(exact[0]), abs=1e-2 * float(exact.abs().max()))


def _collecting_reference(record: RunRecord, step: int) -> tuple[torch.nn.Module, dict[str, Tensor], Tensor, Tensor]:
    """CollectingClassifier's module in float64 and its noisy inputs, as ``training_step`` saw them at ``step``."""
    seen = record.captures[step]
    x, y = seen["batch"]
    generator = torch.Generator()
    generator.set_state(seen["user_state"]["noise_generator"])
    x = x.double() + record.module.hparams.noise * torch.randn(x.shape, generator=generator).double()
    return _reference_module(record, **record.module.hparams).train(), seen["params"], x, y


def check_collecting_lambda_max(record: RunRecord) -> None:
    """CollectingClassifier (dropout 0): λ_max at step 0 vs the dense float64 Hessian of the same
    noisy batch (the module's own noise generator replayed)."""
    module, params, x, y = _collecting_reference(record, 0)
    names = list(params)
    loss = _functional_loss(module, names, {}, lambda out: F.cross_entropy(out, y), x)
    exact = torch.linalg.eigvalsh(dense_hessian(loss, [params[n] for n in names]))
    assert record.at("hessian/lambda_max", 0) == pytest.approx(float(exact[-1]), rel=1e-4)


def check_groups_curvature_lr(record: RunRecord) -> None:
    """Frozen first layer, head at 1/5 of the base rate: the curvature is λ_max(R^½ H R^½) over the
    trainable parameters, R = diag(1, 1/5) by group, and the rate is m/λ (quasi-Newton, scale 1; m = 1 − β the
    momentum factor of the module's SGD)."""
    module, params, x, y = _collecting_reference(record, 0)
    names = [n for n, p in record.module.named_parameters() if p.requires_grad]
    fixed = {n: p.double() for n, p in params.items() if n not in names}
    loss = _functional_loss(module, names, fixed, lambda out: F.cross_entropy(out, y), x)
    h = dense_hessian(loss, [params[n] for n in names])
    hp = record.module.hparams
    r = torch.cat([torch.full((params[n].numel(),), (hp.head_lr if n.startswith("head") else hp.lr) / hp.lr) for n in names]).double()
    exact = float(torch.linalg.eigvalsh(r.sqrt()[:, None] * h * r.sqrt()[None, :])[-1])
    assert record.at("curvature_lr/lambda", 0) == pytest.approx(exact, rel=1e-4)
    m = 1 - record.module.optimizers().optimizer.param_groups[0]["momentum"]
    assert record.at("curvature_lr/lr", 0) == pytest.approx(m / exact, rel=1e-4)
    assert record.captures[1]["lrs"] == pytest.approx([m / exact, m * hp.head_lr / hp.lr / exact], rel=1e-4)


def _linear_hessian(record: RunRecord, fraction: float = 1.0) -> tuple[np.ndarray, float]:
    """LinearRegression: H = (2/N) ZᵀZ with Z = [X, 1] over the first ⌈fraction · B⌉ of the B examples of
    the batch, in the order (weight, bias); and the lr."""
    x, _ = record.captures[0]["batch"]
    x = x[: math.ceil(fraction * len(x))]
    z = np.concatenate([x.double().numpy(), np.ones((len(x), 1))], axis=1)
    return 2.0 / len(x) * z.T @ z, record.module.lr


def check_linear_spectrum(record: RunRecord) -> None:
    """Quadratic loss: the Hessian is (2/N)ZᵀZ at every step; λ_max and λ_min are its extreme eigenvalues."""
    h, _ = _linear_hessian(record)
    eig = np.linalg.eigvalsh(h)
    for step in (0, 2, 4):
        assert record.at("hessian/lambda_max", step) == pytest.approx(eig[-1], rel=1e-6)
        assert record.at("hessian/lambda_min", step) == pytest.approx(eig[0], rel=1e-6)


#: The scheduler's quasi-Newton rule in its plain form (rate 1/λ_max, no smoothing, the cadence only), for exact
#: checks; on its default probe, the first half of the step's batch.
PLAIN_RATE = {"tol": 1e-5, "scale": 1.0, "ema": 0.0, "early_estimates": False}


def check_linear_curvature_lr(record: RunRecord) -> None:
    """Quadratic loss: the quasi-Newton rate is 1/λ_max(H) at every estimate, H the Hessian of the first half
    of the batch (the default ``batch_fraction``), and the optimizer uses it."""
    h, _ = _linear_hessian(record, fraction=0.5)
    lam = float(np.linalg.eigvalsh(h)[-1])
    for step in (0, 2, 4):
        assert record.at("curvature_lr/lambda", step) == pytest.approx(lam, rel=1e-6)
        assert record.at("curvature_lr/lr", step) == pytest.approx(1 / lam, rel=1e-6)
    assert record.captures[1]["lrs"] == pytest.approx([1 / lam], rel=1e-6)


class TwinStart(Callback):
    """Keeps the twin's initial perturbation θ'_0 − θ_0 (from the twin's public ``state_dict``)."""

    def __init__(self, twin: LyapunovTwinRun) -> None:
        self.twin = twin
        self.delta: list[Tensor] | None = None

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self.clipping = (float(trainer.gradient_clip_val or 0.0), "value" if trainer.gradient_clip_algorithm == "value" else "norm")
        state = self.twin.state_dict()
        self.delta = [t - p.detach().cpu() for t, p in zip(state["twins"][0]["params"], pl_module.parameters())]


def check_linear_twin(record: RunRecord) -> None:
    """SGD on a quadratic is linear: δ_{t+1} = (I − ηH) δ_t exactly, so ln d(t), the finite-time
    exponents of each Benettin interval and the running MLE follow from the initial δ."""
    (start,) = [c for c in record.callbacks if isinstance(c, TwinStart)]
    twin = next(c for c in record.callbacks if isinstance(c, LyapunovTwinRun))
    h, lr = _linear_hessian(record)
    a = np.eye(len(h)) - lr * h
    delta = np.concatenate([d.double().reshape(-1).numpy() for d in start.delta])
    eps, k = float(np.linalg.norm(delta)), twin.renormalize_every
    growths = []  # ln(d_end / d_start) of each Benettin interval
    for step in range(1, record.global_step + 1):
        delta = a @ delta
        d = float(np.linalg.norm(delta))
        assert record.at("lyapunov/log_distance", step) == pytest.approx(math.log(d), abs=1e-6), step
        if step % k == 0:
            growths.append(math.log(d / eps))
            assert record.at("lyapunov/ftle", step) == pytest.approx(growths[-1] / k, abs=1e-6), step
            assert record.at("lyapunov/mle", step) == pytest.approx(sum(growths) / step, abs=1e-6), step
            delta *= eps / d
    # and the exponent is heading for the top one, max_i ln|1 − ηλ_i|
    assert twin.mle <= float(np.log(np.abs(np.linalg.eigvalsh(a))).max()) + 1e-6


def _clip(g: np.ndarray, c: float, algorithm: str) -> np.ndarray:
    return np.clip(g, -c, c) if algorithm == "value" else g * min(1.0, c / (float(np.linalg.norm(g)) + 1e-6))


def check_linear_twin_clipping(record: RunRecord) -> None:
    """Gradient clipping on a quadratic: main and twin both take θ ← θ − η clip(∇L(θ)) (value: clamp
    to [−c, c]; norm: torch's g·min(1, c/(‖g‖+1e-6))), simulated exactly in float64 from θ₀ and the
    twin's δ₀; ln d(t) must follow (a twin clipping the other way is off by orders of magnitude)."""
    (start,) = [c for c in record.callbacks if isinstance(c, TwinStart)]
    x, y = record.captures[0]["batch"]
    z = np.concatenate([x.double().numpy(), np.ones((len(x), 1))], axis=1)
    y = y.double().numpy().reshape(-1)
    lr, (c, algorithm) = record.module.lr, start.clipping
    params = record.captures[0]["params"]
    theta = np.concatenate([params["linear.weight"].double().reshape(-1).numpy(), params["linear.bias"].double().numpy()])
    delta = np.concatenate([d.double().reshape(-1).numpy() for d in start.delta])
    twin, eps, k = theta + delta, float(np.linalg.norm(delta)), record.callbacks[0].renormalize_every
    clipped = 0
    for step in range(1, record.global_step + 1):
        raw = [2.0 / len(y) * z.T @ (z @ t - y) for t in (theta, twin)]
        grads = [_clip(g, c, algorithm) for g in raw]
        clipped += int((grads[0] != raw[0]).sum())
        theta, twin = theta - lr * grads[0], twin - lr * grads[1]
        d = float(np.linalg.norm(twin - theta))
        assert record.at("lyapunov/log_distance", step) == pytest.approx(math.log(d), abs=1e-6), step
        if step % k == 0:  # Benettin: pulled back to ε along the separation
            twin = theta + (twin - theta) * eps / d
    assert clipped > 0


def check_diverged(record: RunRecord) -> None:
    """SGD at lr 1e3 overflows: the main run's weights end non-finite, and the twin said so by
    re-seeding (a counter), never by a crash."""
    assert not all(torch.isfinite(p).all() for p in record.params.values())
    assert record.values("lyapunov/reseeds") or record.values("lyapunov/skipped"), record.tags


def _twin_with_start(callbacks: list[Callback]) -> list[Callback]:
    return [TwinStart(callbacks[0])]


# ------------------------------------------------------------------------------ the matrix
EXACT_H = {"tol": 1e-5, "max_hvps": 200, "lambda_min": True}  # float32 residuals floor near 1e-6·λ_max; the values are far closer (error ≈ r²/gap)
TINY_LM = {"d_model": 4, "layers": 1}  # 670 parameters: a dense Hessian in ~2 s

CELLS: list[Cell] = [
    # Lightning's demo classes
    Cell("boring", "default", ("H",), "λ_max = ‖x‖²+1 (closed form) at every estimate; no harm incl. StepLR state; "
         "training_step returns a dict", options={"H": EXACT_H}, capture=(0, 2, 4), exact=check_boring_lambda_max),
    Cell("boring", "default", ("C",), "the curvature rate composed with the user's StepLR (its factor multiplies the rate)"),
    Cell("demo", "default", ("H",), "zero Hessian (piecewise-linear loss): λ_max = λ_min = 0 exactly logged, Adam",
         exact=check_zero_hessian),
    Cell("demo", "fast_dev_run", ("H", "T", "D", "G"), "fast_dev_run=5 (no loggers): headline tags reach callback_metrics"),
    Cell("lightning_transformer", "accumulate", ("H", "D"), "nn.Transformer demo (dropout, cached masks as attributes) "
         "under accumulate_grad_batches=2", steps=4),
    Cell("lightning_transformer", "accumulate", ("C",), "curvature rate under accumulation: same course", steps=4),
    Cell("lightning_transformer", "clip_norm", ("T", "G"), "twin mirrors norm clipping"),
    Cell("lightning_transformer", "accumulate", ("N",), "gradient noise scale from the accumulation micro-batches", steps=6),
    Cell("lightning_transformer", "default", ("K",), "Gauss–Newton of nn.Transformer at forward's output, with a block"),
    # stock nn.TransformerEncoder language model, AdamW decay/no-decay groups
    Cell("encoder_lm", "default", ("H",), "nn.TransformerEncoderLayer (SDPA) × Hessian, train mode with dropout"),
    Cell("encoder_lm", "validation", ("H",), "eval-mode λ_max/λ_min on a fixed probe set vs dense float64 Hessian; "
         "validation loop logs untouched", options={"H": {**EXACT_H, "hessian_mode": "eval", "probe": 8, "every_n_steps": 4}},
         module_kwargs=TINY_LM, capture=(0,), exact=check_encoder_lm_lambda_max),
    Cell("encoder_lm", "compile", ("H",), "torch.compile(aot_eager) × Hessian: λ_max vs dense float64 Hessian (dropout 0)",
         options={"H": EXACT_H}, module_kwargs={**TINY_LM, "dropout": 0.0}, capture=(0,), exact=check_encoder_lm_lambda_max),
    Cell("encoder_lm", "bf16", ("T",), "twin under bf16-mixed"),
    Cell("encoder_lm", "frozen_groups", ("T", "G"), "frozen embedding inside the optimizer, two param groups"),
    # torchvision
    Cell("resnet", "default", ("G",), "ResNet-18: batch norm buffers, torchmetrics state, >50% exact-zero gradient entries",
         steps=4),
    Cell("resnet", "default", ("H",), "ResNet-18 Hessian (11M parameters, ~30 s)", steps=2, slow=True),
    # HuggingFace
    Cell("hf_gpt2", "default", ("H",), "HuggingFace GPT-2 (SDPA attention) on dict batches"),
    Cell("hf_gpt2", "accumulate", ("T", "D", "G"), "HuggingFace GPT-2 under accumulation", steps=4),
    # manual optimization
    Cell("gan", "default", ("T",), "manual-optimization GAN, twin with loss_fn", options={"T": {"loss_fn": zoo.gan_discriminator_loss}}),
    Cell("gan", "default", ("H",), "manual-optimization GAN, Hessian of a loss_fn", options={"H": {"loss_fn": zoo.gan_discriminator_loss}}),
    Cell("gan", "default", ("G",), "manual-optimization GAN: two optimizer steps per batch; each optimizer's gradients "
         "fitted at its own due steps, tags grad_tail/optimizer_<i>/...", tags=("grad_tail/optimizer_0/alpha", "grad_tail/optimizer_1/alpha")),
    Cell("gan", "default", ("D",), "manual-optimization GAN: loss from g_loss/d_loss logs or outputs", steps=8),
    Cell("gan", "default", ("N",), "manual-optimization GAN, gradient noise of a loss_fn (two optimizer steps per batch)",
         options={"N": {"loss_fn": zoo.gan_discriminator_loss}}, steps=12),
    Cell("gan", "default", ("C",), "manual-optimization GAN: one curvature rate per optimizer, from the generator's and "
         "the discriminator's losses", options={"C": {"loss_fn": [zoo.gan_generator_loss, zoo.gan_discriminator_loss]}},
         tags=("curvature_lr/optimizer_0/lr", "curvature_lr/optimizer_1/lr")),
    # the list-collecting module (re-running training_step must not touch its lists, counter, generator)
    Cell("collecting", "default", ("H",), "training_step_outputs list, counter, torch.Generator untouched"),
    Cell("collecting", "default", ("T",), "training_step_outputs list, counter, torch.Generator untouched"),
    Cell("collecting", "default", ("C",), "same course as without it: steps, RNG, list lengths, generator state"),
    Cell("collecting", "clip_value", ("T",), "twin mirrors value clipping"),
    Cell("collecting", "bf16", ("H", "D", "G"), "bf16-mixed: curvature, weights and gradients in float32"),
    Cell("collecting", "bf16", ("N",), "gradient noise scale under bf16-mixed; lists, counter and generator untouched"),
    Cell("linear", "clip_value", ("T",), "64-true, clip 0.5: ln d(t) = exact float64 simulation of clamped main and twin steps",
         options={"T": {"renormalize_every": 4}}, trainer_kwargs={"precision": "64-true", "gradient_clip_val": 0.5},
         steps=8, capture=(0,), extra=_twin_with_start, exact=check_linear_twin_clipping),
    Cell("linear", "clip_norm", ("T",), "64-true, clip 0.5: ln d(t) = exact float64 simulation of norm-clipped main and twin steps",
         options={"T": {"renormalize_every": 4}}, trainer_kwargs={"precision": "64-true", "gradient_clip_val": 0.5},
         steps=8, capture=(0,), extra=_twin_with_start, exact=check_linear_twin_clipping),
    Cell("collecting", "frozen_groups", ("C",), "λ_max(R^½HR^½) vs dense float64 Hessian, lr = 1/λ per group ratio",
         options={"C": PLAIN_RATE | {"max_hvps": 200, "batch_fraction": 1.0}}, module_kwargs={"dropout": 0.0}, capture=(0, 1),
         exact=check_groups_curvature_lr),
    Cell("collecting", "plateau", ("H", "T", "G"), "ReduceLROnPlateau on val_loss: scheduler state and validation logs untouched",
         steps=8),
    Cell("collecting", "plateau", ("C",), "the curvature rate composed with ReduceLROnPlateau on val_loss", steps=8),
    Cell("collecting", "compile", ("H",), "torch.compile(aot_eager) of a module with torchmetrics, lists, a generator "
         "(~30 s of compilation)", slow=True),
    Cell("collecting", "inductor", ("H",), "torch.compile(inductor)", slow=True),
    # dict batches, training_step returning a dict or None
    Cell("skipping", "default", ("H", "T", "D", "G"), "every third training_step returns None (optimizer step skipped)",
         steps=8),
    # a quadratic: exact answers
    Cell("linear", "f64", ("T",), "64-true, explicit ε (absolute): ln d(t), ftle, mle = exact linear-map recursion "
         "from the twin's δ₀ (±1e-6)", options={"T": {"renormalize_every": 4, "epsilon": 1e-6}}, steps=8, capture=(0,), extra=_twin_with_start, exact=check_linear_twin),
    Cell("linear", "f64", ("H",), "64-true: λ_max, λ_min = extreme eigenvalues of (2/N)ZᵀZ (rel 1e-6)",
         options={"H": EXACT_H}, capture=(0,), exact=check_linear_spectrum),
    Cell("linear", "f64", ("C",), "quasi-Newton rate = 1/λ_max(H) of the half batch exactly (quadratic), and the optimizer uses it",
         options={"C": PLAIN_RATE}, capture=(0, 1), exact=check_linear_curvature_lr),
    Cell("linear", "compile", ("T",), "torch.compile(aot_eager), 64-true, explicit ε: exact linear-map recursion of the twin",
         options={"T": {"renormalize_every": 4, "epsilon": 1e-6}}, trainer_kwargs={"precision": "64-true"}, steps=8, capture=(0,),
         extra=_twin_with_start, exact=check_linear_twin),
    Cell("linear", "compile", ("C",), "torch.compile(aot_eager) × curvature rate: 1/λ_max(H) exactly",
         options={"C": PLAIN_RATE}, capture=(0, 1), exact=check_linear_curvature_lr),
    Cell("linear", "diverging", ("T",), "SGD lr 1e3 overflows to inf/NaN: no crash, reseeds counted, NaN-identical main run",
         steps=12, exact=check_diverged),
]


def _cell_params() -> list[Any]:
    return [pytest.param(c, id=c.id, marks=[pytest.mark.slow] if c.slow else []) for c in CELLS]


_BASELINES: dict[tuple[Any, ...], RunRecord] = {}


def baseline(cell: Cell, root: Path) -> RunRecord:
    """The same cell without callbacks (cached: several cells share one)."""
    key = (cell.module, cell.setting, cell.steps, repr(cell.module_kwargs), repr(cell.trainer_kwargs))
    if key not in _BASELINES:
        _BASELINES[key] = fit(cell.module, SETTINGS[cell.setting], [], root, max_steps=cell.steps,
                              module_kwargs=cell.module_kwargs, trainer_overrides=cell.trainer_kwargs)
    return _BASELINES[key]


def _structure(value: Any) -> Any:
    """``value`` with tensors replaced by (dtype, shape) and floats by their type (generator states kept)."""
    if isinstance(value, Tensor):
        return value if value.dtype == torch.uint8 else (value.dtype, tuple(value.shape))
    if isinstance(value, dict):
        return {k: _structure(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_structure(v) for v in value)
    return float if isinstance(value, float) else value


def assert_same_course(record: RunRecord, plain: RunRecord) -> None:
    """A callback that changes the learning rate on purpose still leaves the run's course alone:
    the same steps and batches, the same global RNG draws, the user's state up to values."""
    for name in ("global_step", "batch_starts", "final_rng", "requires_grad", "modes"):
        assert_same(getattr(record, name), getattr(plain, name), name)
    assert_same(_structure(record.user_state), _structure(plain.user_state), "user_state")


class Watch(Callback):
    """Counts training batches (a refusal must come before the first)."""

    def __init__(self) -> None:
        self.batches = 0

    def on_train_batch_start(self, *args: Any) -> None:
        self.batches += 1


@pytest.mark.parametrize("cell", _cell_params())
def test_cell(cell: Cell, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    if cell.module == "hf_gpt2":
        pytest.importorskip("transformers")
    setting = SETTINGS[cell.setting]
    if cell.refused is not None:
        watch = Watch()
        with pytest.raises(ValueError, match=cell.refused):
            fit(cell.module, setting, [*cell.make_callbacks(), watch], tmp_path, max_steps=cell.steps,
                module_kwargs=cell.module_kwargs, trainer_overrides=cell.trainer_kwargs)
        assert watch.batches == 0, "refused only after a training step"
        return
    record = fit(cell.module, setting, cell.make_callbacks(), tmp_path, max_steps=cell.steps, capture_steps=cell.capture,
                 module_kwargs=cell.module_kwargs, trainer_overrides=cell.trainer_kwargs)
    assert_contained(record)
    assert_headline(record, cell.headline)
    assert set(cell.progress_bar) <= set(record.progress_bar), record.progress_bar
    plain = baseline(cell, tmp_path_factory.mktemp(cell.id))
    if all(k in MONITORS for k in cell.callbacks):
        assert_no_harm(record, plain)
    else:
        assert_same_course(record, plain)
    if cell.exact is not None:
        cell.exact(record)


DDP_CELLS = {
    "collecting-ddp-H+T+D+G": ("monitors", ("H", "T", "D", "G"), "2 processes: headline values identical on both ranks; each rank's run "
                            "bit-identical to its run without the monitors"),
    "collecting-ddp-C": ("curvature_lr", ("C",), "2 processes: the same rate on both ranks; same course as without it"),
}
_DDP_RUNS: dict[str, list[SimpleNamespace]] = {}


@pytest.mark.ddp
@pytest.mark.parametrize("cell", list(DDP_CELLS))
def test_ddp_cell(cell: str, tmp_path: Path) -> None:
    """One launch of 2 processes runs the plain, monitored and curvature-rate fits (see ddp_cells)."""
    if not _DDP_RUNS:
        runs = ddp_cells.run(["plain", "monitors", "curvature_lr"], tmp_path)
        _DDP_RUNS.update({name: [SimpleNamespace(**r) for r in ranks] for name, ranks in runs.items()})
    scenario, callbacks, _ = DDP_CELLS[cell]
    ranks, plain = _DDP_RUNS[scenario], _DDP_RUNS["plain"]
    headline = [t for k in callbacks for t in CALLBACKS[k][1]]
    for record, plain_record in zip(ranks, plain):
        assert_headline(record, headline)
        if scenario == "monitors":
            assert_no_harm(record, plain_record)
        else:
            assert_same_course(record, plain_record)
    for tag in headline:  # every rank made the same estimate
        assert ranks[0].callback_metrics[tag] == ranks[1].callback_metrics[tag], tag


def test_every_module_setting_and_callback_appears() -> None:
    assert set(zoo.ZOO) <= {c.module for c in CELLS}
    assert set(SETTINGS) <= {c.setting for c in CELLS}
    assert set(CALLBACKS) <= {k for c in CELLS for k in c.callbacks}


def test_readme_table_lists_every_cell() -> None:
    readme = (Path(__file__).parent / "README.md").read_text()
    missing = [i for i in [c.id for c in CELLS] + list(DDP_CELLS) if f"`{i}`" not in readme]
    assert not missing, f"cells missing from tests/conformance/README.md: {missing}"
