"""Run a zoo module under a Trainer setting and check the product's contracts on the run.

- :func:`fit` trains one cell and returns a :class:`RunRecord`: everything a run leaves behind
  that the user can see — weights, all buffers, gradients, train/eval flags, torchmetrics states,
  optimizer and scheduler state, the user's logged values (``callback_metrics`` after every
  batch and validation, the rows a ``CSVLogger`` and an in-memory logger received), the user's
  Python state (``module.user_state()``), the global RNG streams after every batch and at the
  end — plus what the callbacks logged and warned.
- :func:`assert_no_harm` compares two records bit for bit (NaN-aware: a diverged run must
  diverge identically), leaving out only the callbacks' own tags.
- :func:`assert_headline` checks that the callbacks produced their headline tags;
  :func:`assert_contained` that no hook failure was swallowed on the way.
"""

from __future__ import annotations

import copy
import csv
import math
import random
import re
import struct
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor
from torchmetrics import Metric

from tests.conformance.zoo_modules import ZOO, user_state
from tests.lightning_helpers import MemoryLogger

AREAS = ("hessian/", "ggn/", "lyapunov/", "curvature_lr/", "diffusion/", "grad_tail/", "gradient_noise/")
CALLBACK_NAMES = ("HessianSpectrumMonitor", "LyapunovTwinRun", "CurvatureLRScheduler", "DiffusionTracker", "GradientTailFitter")


def is_callback_tag(name: str) -> bool:
    return name.startswith(AREAS)


# ------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Setting:
    """A Trainer setting: Trainer arguments, module arguments, compilation, validation data."""

    trainer: dict[str, Any] = field(default_factory=dict)
    module: dict[str, Any] = field(default_factory=dict)
    compile_backend: str | None = None
    validation: bool = False


# ------------------------------------------------------------------------------- recording
def _rng_state() -> tuple[Tensor, Any, Any]:
    return torch.get_rng_state(), np.random.get_state(), random.getstate()


def _user_metrics(trainer: pl.Trainer) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in trainer.callback_metrics.items() if not is_callback_tag(k)}


class Observer(Callback):
    """Records what the user sees after every training batch and validation epoch (passive)."""

    def __init__(self) -> None:
        self.batch_starts = 0
        self.steps: list[dict[str, Any]] = []
        self.validations: list[dict[str, Tensor]] = []

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.batch_starts += 1

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps.append({
            "global_step": trainer.global_step,
            "metrics": _user_metrics(trainer),
            "rng": _rng_state(),
            "modes": [m.training for m in pl_module.modules()],
            "user_state": copy.deepcopy(user_state(pl_module)),
        })

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.validations.append(_user_metrics(trainer))


class StepCapture(Callback):
    """Keeps, at the start of the given optimizer steps, the weights, the batch and the user state
    (for exact reference computations at the weights an estimate saw)."""

    def __init__(self, steps: Sequence[int]) -> None:
        self.wanted = set(steps)
        self.seen: dict[int, dict[str, Any]] = {}

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if step in self.wanted and step not in self.seen:
            self.seen[step] = {
                "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
                "batch": copy.deepcopy(batch),
                "batch_idx": batch_idx,
                "user_state": copy.deepcopy(user_state(pl_module)),
                "lrs": [g["lr"] for g in trainer.optimizers[0].param_groups],
            }


@dataclass
class RunRecord:
    """Everything one run produced (see the module docstring)."""

    params: dict[str, Tensor]
    grads: dict[str, Tensor | None]
    requires_grad: dict[str, bool]
    buffers: dict[str, Tensor]
    modes: list[bool]
    metric_states: list[dict[str, Any]]
    optimizers: list[dict[str, Any]]
    schedulers: list[dict[str, Any]]
    steps: list[dict[str, Any]]
    validations: list[dict[str, Tensor]]
    final_metrics: dict[str, Tensor]
    csv_rows: list[dict[str, str]] | None
    logger_rows: list[tuple[int | None, dict[str, float]]] | None
    user_state: Any
    final_rng: tuple[Tensor, Any, Any]
    global_step: int
    batch_starts: int
    # the callbacks' side
    tags: dict[str, list[tuple[int | None, float]]]
    callback_metrics: dict[str, float]  # the callbacks' latest values in trainer.callback_metrics
    progress_bar: list[str]  # the callbacks' tags in trainer.progress_bar_metrics
    warnings: list[str] = field(default_factory=list)
    callbacks: list[Callback] = field(default_factory=list)
    captures: dict[int, dict[str, Any]] = field(default_factory=dict)
    module: pl.LightningModule | None = None

    def values(self, tag: str) -> list[float]:
        return [v for _, v in self.tags.get(tag, [])]

    def at(self, tag: str, step: int) -> float:
        matches = [v for s, v in self.tags.get(tag, []) if s == step]
        assert matches, f"{tag} was not logged at step {step}: {self.tags.get(tag)}"
        return matches[-1]


def _csv_rows(logger: CSVLogger) -> list[dict[str, str]]:
    path = Path(logger.log_dir) / "metrics.csv"
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    user = []
    for row in rows:
        kept = {k: v for k, v in row.items() if not is_callback_tag(k) and v != ""}
        if set(kept) - {"step", "epoch"}:
            user.append(kept)
    return user


def _metric_states(module: pl.LightningModule) -> list[dict[str, Any]]:
    states = []
    for m in module.modules():
        if isinstance(m, Metric):
            state = {name: copy.deepcopy(getattr(m, name)) for name in m._defaults}
            state["_update_count"] = m._update_count
            states.append(state)
    return states


def _tags(trainer: pl.Trainer, memory: MemoryLogger | None) -> dict[str, list[tuple[int | None, float]]]:
    tags: dict[str, list[tuple[int | None, float]]] = {}
    if memory is not None:
        for step, metrics in memory.rows:
            for k, v in metrics.items():
                if is_callback_tag(k):
                    tags.setdefault(k, []).append((step, v))
    for k, v in trainer.callback_metrics.items():  # without loggers (fast_dev_run) or off rank zero
        if is_callback_tag(k) and k not in tags:
            tags[k] = [(None, float(v))]
    return tags


def trainer_kwargs(loggers: Any, max_steps: int) -> dict[str, Any]:
    """The Trainer arguments every cell starts from (CPU, quiet, log every step)."""
    return dict(
        accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=None, logger=loggers, log_every_n_steps=1,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )


def fit(
    species_name: str,
    setting: Setting,
    callbacks: Sequence[Callback],
    root: Path | None,
    *,
    max_steps: int = 6,
    capture_steps: Sequence[int] = (),
    module_kwargs: dict[str, Any] | None = None,
    trainer_overrides: dict[str, Any] | None = None,
    seed: int = 0,
) -> RunRecord:
    """Build the zoo module ``species_name`` from ``seed`` and train it under ``setting``.

    ``root``: folder of the CSV logs (``None``: no loggers). The callbacks are the cell's; an
    :class:`Observer` (and a :class:`StepCapture` for ``capture_steps``) are added last.
    """
    species = ZOO[species_name]
    pl.seed_everything(seed, verbose=False)
    module = species.make(**{**setting.module, **(module_kwargs or {})})
    train = species.train()
    val = species.val() if setting.validation and species.val is not None else None
    observer, capture = Observer(), StepCapture(capture_steps)
    csv_logger = CSVLogger(root, name="csv", version=0) if root is not None else None
    memory = MemoryLogger() if root is not None else None
    kwargs = trainer_kwargs([csv_logger, memory] if root is not None else False, max_steps)
    if not setting.validation and species.val is not None:
        kwargs["limit_val_batches"] = 0
    kwargs.update(setting.trainer)
    kwargs.update(trainer_overrides or {})
    trainer = pl.Trainer(callbacks=[*callbacks, capture, observer], **kwargs)
    model = torch.compile(module, backend=setting.compile_backend) if setting.compile_backend else module
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, train_dataloaders=train, val_dataloaders=val)
    if csv_logger is not None:
        csv_logger.save()
    record = record_run(trainer, module, observer, memory, csv_logger)
    record.warnings = [str(w.message) for w in caught if str(w.message).startswith(CALLBACK_NAMES)]
    record.callbacks = list(callbacks)
    record.captures = capture.seen
    return record


def record_run(
    trainer: pl.Trainer,
    module: pl.LightningModule,
    observer: Observer,
    memory: MemoryLogger | None,
    csv_logger: CSVLogger | None = None,
) -> RunRecord:
    """Everything a finished run left behind (see :class:`RunRecord`)."""
    return RunRecord(
        params={n: p.detach().clone() for n, p in module.named_parameters()},
        grads={n: None if p.grad is None else p.grad.detach().clone() for n, p in module.named_parameters()},
        requires_grad={n: p.requires_grad for n, p in module.named_parameters()},
        buffers={n: b.detach().clone() for n, b in module.named_buffers()},
        modes=[m.training for m in module.modules()],
        metric_states=_metric_states(module),
        optimizers=[copy.deepcopy(o.state_dict()) for o in trainer.optimizers],
        schedulers=[copy.deepcopy(c.scheduler.state_dict()) for c in trainer.lr_scheduler_configs],
        steps=observer.steps,
        validations=observer.validations,
        final_metrics=_user_metrics(trainer),
        csv_rows=None if csv_logger is None else _csv_rows(csv_logger),
        logger_rows=None if memory is None else [
            (s, {k: v for k, v in m.items() if not is_callback_tag(k)}) for s, m in memory.rows
            if any(not is_callback_tag(k) for k in m)
        ],
        user_state=copy.deepcopy(user_state(module)),
        final_rng=_rng_state(),
        global_step=trainer.global_step,
        batch_starts=observer.batch_starts,
        tags=_tags(trainer, memory),
        callback_metrics={k: float(v) for k, v in trainer.callback_metrics.items() if is_callback_tag(k)},
        progress_bar=sorted(k for k in trainer.progress_bar_metrics if is_callback_tag(k)),
        module=module,
    )


# ------------------------------------------------------------------------------- comparisons
def _bits(t: Tensor) -> Tensor:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: Any, b: Any, path: str = "run") -> None:
    """``a`` and ``b`` are the same bit for bit (NaN equals NaN with the same payload), recursively."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        assert isinstance(a, Tensor) and isinstance(b, Tensor), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert a.dtype == b.dtype and a.shape == b.shape, f"{path}: {a.dtype}{tuple(a.shape)} vs {b.dtype}{tuple(b.shape)}"
        if not torch.equal(_bits(a), _bits(b)):
            diff = (a.double() - b.double()).abs().nan_to_num(math.inf).max() if a.is_floating_point() else "-"
            raise AssertionError(f"{path}: values differ (max |Δ| = {diff})")
    elif isinstance(a, dict):
        assert isinstance(b, dict), f"{path}: dict vs {type(b).__name__}"
        assert list(a) == list(b), f"{path}: keys {sorted(map(str, a))} vs {sorted(map(str, b))}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b), f"{path}: {type(a).__name__} vs {type(b).__name__}"
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert isinstance(b, float) and struct.pack("<d", a) == struct.pack("<d", b), f"{path}: {a!r} vs {b!r}"
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes(), f"{path}: arrays differ"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


NO_HARM_FIELDS = (
    "params", "grads", "requires_grad", "buffers", "modes", "metric_states", "optimizers", "schedulers", "steps",
    "validations", "final_metrics", "csv_rows", "logger_rows", "user_state", "final_rng", "global_step", "batch_starts",
)


def assert_no_harm(monitored: RunRecord, plain: RunRecord) -> None:
    """The run with the monitors is the run without them, bit for bit, in everything the user sees."""
    for name in NO_HARM_FIELDS:
        assert_same(getattr(monitored, name), getattr(plain, name), name)


def assert_headline(record: RunRecord, tags: Sequence[str]) -> None:
    """Every tag was logged, with at least one finite value."""
    missing = [t for t in tags if t not in record.tags]
    assert not missing, f"missing tags {missing}; logged {sorted(record.tags)}; warnings {getattr(record, 'warnings', [])}"
    for t in tags:
        assert any(math.isfinite(v) for _, v in record.tags[t]), f"{t} has no finite value: {record.tags[t]}"


_CONTAINED = re.compile(r"\bon_\w+ failed at step \d+ with \w+")


def assert_contained(record: RunRecord) -> None:
    """No hook raised: ``contain_failures`` turns an exception into a warning ("<hook> failed at step N with <Error>")."""
    failures = [m for m in record.warnings if _CONTAINED.search(m)]
    assert not failures, f"hook failures were contained (bugs): {failures}"
