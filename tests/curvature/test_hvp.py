import pytest
import torch
from torch import nn

from chaos_callbacks.curvature import HessianOperator, NoTrainableParametersError
from tests.helpers import bn_cnn, ce_closure, exact_hessian, tanh_mlp


def _data(shape, n=16, classes=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("kind", ["mlp", "bn_cnn", "frozen"])
def test_hvp_equals_dense_hessian_columns(kind):
    if kind == "bn_cnn":
        model, (x, y) = bn_cnn(), _data((1, 6, 6))
    else:
        model, (x, y) = tanh_mlp(), _data((6,))
    if kind == "frozen":
        model[0].weight.requires_grad_(False)
    model = model.double().train()
    H = exact_hessian(model, x, y)
    op = HessianOperator(list(model.parameters()), [ce_closure(model, x.double(), y)])
    assert op.dim == H.shape[0]
    Q = torch.randn(op.dim, 5, dtype=torch.float64)
    HQ = torch.stack([op.matvec(q) for q in Q.T], dim=1)
    torch.testing.assert_close(HQ, H @ Q, rtol=1e-9, atol=1e-10)
    assert op.num_matvecs == 5


def test_weighted_batches_equal_union():
    model = tanh_mlp().double()
    x, y = _data((6,), n=20)
    x = x.double()
    whole = HessianOperator(list(model.parameters()), [ce_closure(model, x, y)])
    parts = HessianOperator(
        list(model.parameters()), [ce_closure(model, x[:10], y[:10]), ce_closure(model, x[10:], y[10:])]
    )
    v = torch.randn(whole.dim, dtype=torch.float64)
    torch.testing.assert_close(parts.matvec(v), whole.matvec(v))
    torch.testing.assert_close(parts.gradient, whole.gradient)
    assert parts.loss == pytest.approx(whole.loss)


def test_no_trainable_parameters_raises():
    model = tanh_mlp().requires_grad_(False)
    x, y = _data((6,))
    with pytest.raises(NoTrainableParametersError):
        HessianOperator(list(model.parameters()), [ce_closure(model, x, y)])


def test_hvp_does_not_touch_grad():
    model = tanh_mlp()
    x, y = _data((6,))
    op = HessianOperator(list(model.parameters()), [ce_closure(model, x, y)])
    op.matvec(torch.ones(op.dim))
    assert all(p.grad is None for p in model.parameters())
