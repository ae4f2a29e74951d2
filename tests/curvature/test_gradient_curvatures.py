"""``gradient_curvatures``: ``‖Hg‖/‖g‖`` and the batch sharpness ``gᵀHg/‖g‖²`` against dense float64 Hessians."""

import pytest
import torch
from torch import nn

from chaos_callbacks.curvature import HessianOperator, gradient_curvatures, gradient_weighted_curvature
from tests.helpers import ce_closure, exact_hessian, tanh_mlp


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_batch_sharpness_and_grad_curvature_match_dense_hessian(seed):
    model = tanh_mlp(seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(24, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (24,), generator=g)
    H = exact_hessian(model, x, y)
    op = HessianOperator(list(model.parameters()), [ce_closure(model, x, y)])
    grad = op.gradient
    dense = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), list(model.parameters()))
    assert torch.allclose(grad, torch.cat([d.reshape(-1) for d in dense]), rtol=1e-12, atol=1e-14)
    curvature, sharpness = gradient_curvatures(op, grad)
    assert op.num_matvecs == 1  # both from one product
    assert curvature == pytest.approx(float((H @ grad).norm() / grad.norm()), rel=1e-10)
    assert sharpness == pytest.approx(float(grad @ H @ grad / (grad @ grad)), rel=1e-10)
    assert abs(sharpness) <= curvature * (1 + 1e-12)  # Cauchy–Schwarz
    assert gradient_weighted_curvature(op, grad) == curvature


def test_zero_gradient_gives_none():
    assert gradient_curvatures(lambda v: v, torch.zeros(3)) == (None, None)
