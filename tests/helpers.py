"""Small models and exact (dense, float64) Hessians shared by the tests."""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn
from torch.func import functional_call, hessian


def tanh_mlp(in_dim: int = 6, hidden: int = 8, out_dim: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))


def bn_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 3)
    )


class PlainBatchNorm(nn.Module):
    """Train-mode batch norm written with elementary ops (an independent reference).

    ``torch.func`` forward-over-reverse through ``aten.native_batch_norm`` gave a wrong Hessian
    entry (−0.109 where the exact value is 0: the loss does not depend on a conv bias that feeds
    a batch norm), so the reference Hessian avoids that kernel.
    """

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = bn.weight, bn.bias, bn.eps

    def forward(self, x: Tensor) -> Tensor:
        dims = [0] + list(range(2, x.ndim))
        shape = [1, -1] + [1] * (x.ndim - 2)
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight.view(shape) + self.bias.view(shape)


def without_running_stats(model: nn.Module) -> nn.Module:
    """A copy whose BatchNorm layers compute train-mode batch norm from elementary ops, without buffers."""
    model = copy.deepcopy(model)
    for name, m in list(model.named_modules()):
        for child_name, child in list(m.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(m, child_name, PlainBatchNorm(child))
    return model


def exact_hessian(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Dense float64 Hessian of the cross-entropy loss w.r.t. the parameters that require grad."""
    model = without_running_stats(model).double()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = {n: p.detach() for n, p in model.named_parameters()}
    sizes = [params[n].numel() for n in names]

    def loss(flat: Tensor) -> Tensor:
        chunks = torch.split(flat, sizes)
        p = dict(params)
        p.update({n: c.view_as(params[n]) for n, c in zip(names, chunks)})
        return nn.functional.cross_entropy(functional_call(model, p, (x.double(),)), y)

    flat = torch.cat([params[n].reshape(-1) for n in names])
    return hessian(loss)(flat)


def ce_closure(model: nn.Module, x: Tensor, y: Tensor):
    return lambda: nn.functional.cross_entropy(model(x), y)


def dense_ggn(model: nn.Module, x: Tensor, y: Tensor, loss) -> Tensor:
    """Dense float64 Gauss–Newton matrix ``Jᵀ H_out J`` of ``loss(model(x), y)`` over the trainable
    parameters: ``J`` from ``torch.autograd.functional.jacobian`` of the flat parameters, ``H_out`` from
    ``torch.autograd.functional.hessian`` of the loss in the outputs."""
    from torch.autograd.functional import hessian as dense_hessian
    from torch.autograd.functional import jacobian

    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    flat = torch.cat([params[n].detach().double().reshape(-1) for n in names])
    x = x.double()

    def outputs(theta: Tensor) -> Tensor:
        chunks = torch.split(theta, [s.numel() for s in shapes])
        return functional_call(model, {n: c.view(s) for n, c, s in zip(names, chunks, shapes)}, (x,))

    z = outputs(flat).detach()
    J = jacobian(outputs, flat).reshape(z.numel(), -1)
    H_out = dense_hessian(lambda zz: loss(zz.view_as(z), y), z.reshape(-1))
    return J.T @ H_out @ J
