import pytest
import torch

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


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_view_is_the_principal_submatrix_in_its_own_order(seed):
    model = tanh_mlp(seed=seed).double()
    x, y = _data((6,), seed=seed)
    x = x.double()
    H = exact_hessian(model, x, y)
    params = list(model.parameters())
    op = HessianOperator(params, [ce_closure(model, x, y)])
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    for order in ([3, 0, 2], [1], [0, 1, 2, 3]):
        view = op.view([params[i] for i in order])
        index = torch.cat([torch.arange(offsets[i], offsets[i + 1]) for i in order])
        assert view.dim == len(index) and view.native == (order == [0, 1, 2, 3])
        Q = torch.randn(view.dim, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        HQ = torch.stack([view(q) for q in Q.T], dim=1)
        torch.testing.assert_close(HQ, H[index][:, index] @ Q, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(view.gradient, op.gradient[index], rtol=0, atol=0)
        assert view.num_matvecs == 3 and view.loss == op.loss
    assert op.num_matvecs == 9  # the operator counts every view's products


def test_a_view_has_the_bits_of_an_operator_on_its_parameters():
    model = tanh_mlp().double()
    x, y = _data((6,))
    x = x.double()
    params = list(model.parameters())
    sub = [params[2], params[0]]
    v = torch.randn(sum(p.numel() for p in sub), dtype=torch.float64)
    alone = HessianOperator(sub, [ce_closure(model, x, y)])
    view = HessianOperator(params, [ce_closure(model, x, y)]).view(sub)
    assert torch.equal(view(v), alone(v)) and torch.equal(view.gradient, alone.gradient)


def test_a_native_view_passes_vectors_without_a_copy():
    model = tanh_mlp()
    x, y = _data((6,))
    op = HessianOperator(list(model.parameters()), [ce_closure(model, x, y)])
    view = op.view(list(model.parameters()))
    v = torch.randn(op.dim)
    assert view.native and view.extend(v) is v and view.restrict(v) is v and view.gradient is op.gradient


def test_a_view_of_a_foreign_parameter_raises():
    model = tanh_mlp()
    x, y = _data((6,))
    op = HessianOperator(list(model[0].parameters()), [ce_closure(model, x, y)])
    with pytest.raises(ValueError, match="among the operator's"):
        op.view([model[2].weight])
    with pytest.raises(NoTrainableParametersError):
        op.view([])
