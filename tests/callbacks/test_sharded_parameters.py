"""Sharded (DTensor) parameters are refused at fit start by the callbacks that differentiate with
``torch.autograd.grad`` (docs/fsdp.md), with a ValueError naming the callback."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor

from chaos_callbacks import CurvatureLRScheduler, HessianSpectrumMonitor, LyapunovTwinRun
from tests.lightning_helpers import TinyNet, loader, trainer


@pytest.fixture
def one_process_mesh() -> Iterator[object]:
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    # an in-process store: no port, no environment variables left behind for later DDP tests
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "callback",
    [lambda: HessianSpectrumMonitor(every_n_steps=1), lambda: CurvatureLRScheduler(), lambda: LyapunovTwinRun()],
    ids=["HessianSpectrumMonitor", "CurvatureLRScheduler", "LyapunovTwinRun"],
)
def test_sharded_parameters_are_refused_before_the_first_step(one_process_mesh, callback) -> None:
    model = TinyNet()
    first = model.net[0]
    first.weight = nn.Parameter(distribute_tensor(first.weight.detach(), one_process_mesh, [Shard(0)]))
    instance = callback()
    t = trainer(callbacks=[instance], max_steps=1)
    with pytest.raises(ValueError, match=rf"{type(instance).__name__}: the module's parameters are sharded"):
        t.fit(model, loader())
    assert t.global_step == 0
    assert isinstance(first.weight, torch.distributed.tensor.DTensor)
