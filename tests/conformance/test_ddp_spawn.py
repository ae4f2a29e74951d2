"""``strategy="ddp_spawn"`` (2 CPU processes, gloo) with every monitoring callback.

Spawned workers receive the module and callbacks by pickling, and on machines that refuse to share
file descriptors between processes PyTorch needs ``set_sharing_strategy("file_system")`` (this
machine is one). The monitors must survive the trip, estimate on both ranks, and leave the weights
that come back to the main process bit-identical to a plain ``ddp_spawn`` run.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import pytest
import torch
import torch.multiprocessing

from chaos_callbacks import DiffusionTracker, GradientTailFitter, HessianSpectrumMonitor, LyapunovTwinRun
from tests.lightning_helpers import TinyNet, loader


def _fit(callbacks: list[pl.Callback]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    pl.seed_everything(0, verbose=False)
    model = TinyNet()
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=4, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks,
    )
    trainer.fit(model, loader(shuffle=False))
    return {k: v.clone() for k, v in model.state_dict().items()}, {k: float(v) for k, v in trainer.callback_metrics.items()}


@pytest.mark.ddp
def test_monitors_under_ddp_spawn_with_file_system_sharing() -> None:
    previous = torch.multiprocessing.get_sharing_strategy()
    torch.multiprocessing.set_sharing_strategy("file_system")
    try:
        plain_state, _ = _fit([])
        monitors = [
            HessianSpectrumMonitor(every_n_steps=2),
            LyapunovTwinRun(renormalize_every=2),
            DiffusionTracker(window=4, dim=16, lags=3),
            GradientTailFitter(every_n_steps=2, num_samples=100),
        ]
        state, metrics = _fit(monitors)
    finally:
        torch.multiprocessing.set_sharing_strategy(previous)
    assert state.keys() == plain_state.keys()
    assert all(torch.equal(state[k], plain_state[k]) for k in state)
    for tag in ("hessian/lambda_max", "hessian/lambda_max_error", "lyapunov/mle", "diffusion/exponent", "grad_tail/alpha"):
        assert tag in metrics and metrics[tag] == metrics[tag], tag  # came back from rank zero, finite
