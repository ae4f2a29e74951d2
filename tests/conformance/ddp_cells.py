"""DDP scenarios of the conformance zoo: 2 CPU processes (gloo), run as
``python -m tests.conformance.ddp_cells OUT_DIR SCENARIO...``.

Each scenario trains the list-collecting classifier on its rank's shard. All scenarios run one
after the other in the same two processes (process start-up and imports cost more than the tiny
fits), each from ``seed_everything(0)``; every rank writes ``OUT_DIR/rank<R>.json`` holding, per
scenario, its :class:`~tests.conformance.contracts.RunRecord` (the comparable part, pickled and
base64 encoded). Lightning's process launcher re-runs this command line for rank 1, hence the
``__main__`` guard. The scenario functions also fit ``tests.ddp_runner``'s interface.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from chaos_callbacks import (
    CurvatureLRScheduler,
    DiffusionTracker,
    GradientTailFitter,
    HessianSpectrumMonitor,
    LyapunovTwinRun,
)
from tests.conformance.contracts import NO_HARM_FIELDS, MemoryLogger, Observer, RunRecord, record_run, trainer_kwargs
from tests.conformance.zoo_modules import ZOO

STEPS = 6
SHIPPED = (*NO_HARM_FIELDS, "tags", "callback_metrics", "progress_bar")


def encode(record: RunRecord) -> str:
    buffer = io.BytesIO()
    torch.save({name: getattr(record, name) for name in SHIPPED}, buffer)
    return base64.b64encode(buffer.getvalue()).decode()


def decode(text: str) -> dict[str, Any]:
    return torch.load(io.BytesIO(base64.b64decode(text)), weights_only=False)


def _scenario(callbacks: list[Callback]) -> tuple[Any, ...]:
    species = ZOO["collecting"]
    module = species.make()
    observer, memory = Observer(), MemoryLogger()

    def collect(trainer: Trainer, model: LightningModule, _: Any) -> dict[str, Any]:
        return {"rank": trainer.global_rank, "record": encode(record_run(trainer, model, observer, memory))}

    kwargs = trainer_kwargs([memory], STEPS)
    del kwargs["accelerator"], kwargs["devices"]  # the runner's
    return module, species.train(), [*callbacks, observer], collect, kwargs


def plain(devices: int) -> tuple[Any, ...]:
    return _scenario([])


def monitors(devices: int) -> tuple[Any, ...]:
    return _scenario([
        HessianSpectrumMonitor(every_n_steps=2),
        LyapunovTwinRun(renormalize_every=2),
        DiffusionTracker(window=4, dim=64, lags=3),
        GradientTailFitter(every_n_steps=2),
    ])


def curvature_lr(devices: int) -> tuple[Any, ...]:
    return _scenario([CurvatureLRScheduler(every_n_steps=2)])


SCENARIOS = {"plain": plain, "monitors": monitors, "curvature_lr": curvature_lr}


def run(scenarios: list[str], out_dir: Path, timeout: float = 600) -> dict[str, list[dict[str, Any]]]:
    """Run ``scenarios`` under 2-process DDP; per scenario, each rank's decoded record (by rank)."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.conformance.ddp_cells", str(out_dir), *scenarios],
        cwd=root, env=env, capture_output=True, text=True, timeout=timeout,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    return {name: [decode(rank[name]) for rank in ranks] for name in scenarios}


def main() -> None:
    out_dir, scenarios = Path(sys.argv[1]), sys.argv[2:]
    results: dict[str, str] = {}
    rank = 0
    for name in scenarios:
        pl.seed_everything(0, verbose=False)
        model, loader, callbacks, collect, kwargs = SCENARIOS[name](2)
        trainer = pl.Trainer(callbacks=callbacks, accelerator="cpu", devices=2, strategy="ddp", **kwargs)
        trainer.fit(model, loader)
        results[name] = collect(trainer, model, callbacks)["record"]
        rank = trainer.global_rank
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
