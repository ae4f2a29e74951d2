"""GGNOperator against the dense float64 ``Jᵀ H_out J`` built from torch.autograd.functional."""

import pytest
import torch
from torch import nn

from chaos_callbacks.curvature import GGNOperator, HessianOperator, lanczos
from tests.helpers import dense_ggn, tanh_mlp


def _losses():
    return {
        "mse": lambda z, y: ((z - y) ** 2).mean(),
        "ce": lambda z, y: nn.functional.cross_entropy(z, y),
    }


def _data(kind: str, n: int, seed: int, in_dim: int = 6, out_dim: int = 3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, in_dim, generator=g, dtype=torch.float64)
    y = torch.randn(n, out_dim, generator=g, dtype=torch.float64) if kind == "mse" else torch.randint(0, out_dim, (n,), generator=g)
    return x, y


def ggn_closure(model, loss, x, y):
    def run():
        z = model(x)
        return z, loss(z, y)

    return run


def ggn_operator(model, batches, loss) -> GGNOperator:
    return GGNOperator(list(model.parameters()), [ggn_closure(model, loss, x, y) for x, y in batches])


@pytest.mark.parametrize("kind", ["mse", "ce"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_products_equal_dense_ggn_and_spectrum_is_certified(kind, seed):
    model = tanh_mlp(seed=seed).double()
    x, y = _data(kind, 12, seed)
    loss = _losses()[kind]
    G = dense_ggn(model, x, y, loss)
    evals = torch.linalg.eigvalsh(G)
    scale = float(evals.abs().max())
    assert float(evals[0]) >= -1e-12 * scale  # positive semi-definite (both losses are convex in z)
    op = ggn_operator(model, [(x, y)], loss)
    Q = torch.randn(op.dim, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(torch.stack([op.matvec(q) for q in Q.T], dim=1), G @ Q, rtol=1e-10, atol=1e-12 * scale)
    res = lanczos(op, op.dim, k=2, want_min=True, tol=1e-8, min_tol=1e-6, max_matvecs=op.dim + 50,
                  generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    assert res.converged and res.lambda_min_converged
    for i in range(2):
        assert abs(float(res.eigenvalues[i]) - float(evals[-1 - i])) <= float(res.error_bounds[i]) + 1e-12 * scale
        assert float(res.error_bounds[i]) <= 1e-8 * scale
    assert res.lambda_min >= -res.lambda_min_error - 1e-12 * scale  # PSD: λ_min ≥ 0 within its bound
    assert res.lambda_min - res.lambda_min_error <= float(evals[0]) + 1e-12 * scale <= res.lambda_min + 1e-12 * scale + res.lambda_min_error
    loss_value = loss(model(x), y)
    grads = torch.autograd.grad(loss_value, list(model.parameters()))
    torch.testing.assert_close(op.gradient, torch.cat([g.reshape(-1) for g in grads]))
    assert op.loss == pytest.approx(float(loss_value.detach()), rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linear_model_with_mse_ggn_equals_hessian(seed):
    torch.manual_seed(seed)
    model = nn.Linear(5, 2).double()
    x, y = _data("mse", 10, seed, in_dim=5, out_dim=2)
    loss = _losses()["mse"]
    ggn = ggn_operator(model, [(x, y)], loss)
    hess = HessianOperator(list(model.parameters()), [lambda: loss(model(x), y)])
    eye = torch.eye(ggn.dim, dtype=torch.float64)
    G = torch.stack([ggn.matvec(e) for e in eye])
    H = torch.stack([hess.matvec(e) for e in eye])
    torch.testing.assert_close(G, H, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(G, dense_ggn(model, x, y, loss), rtol=1e-12, atol=1e-14)


def test_ggn_differs_from_hessian_of_a_nonlinear_model():
    model = tanh_mlp(seed=3).double()
    x, y = _data("mse", 12, 3)
    loss = _losses()["mse"]
    G = dense_ggn(model, x, y, loss)
    ggn = ggn_operator(model, [(x, y)], loss)
    hess = HessianOperator(list(model.parameters()), [lambda: loss(model(x), y)])
    v = torch.randn(ggn.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ggn.matvec(v), G @ v)
    assert (hess.matvec(v) - G @ v).norm() > 1e-3 * (G @ v).norm()  # the residual term is not negligible here


@pytest.mark.parametrize("seed", [0, 1])
def test_weighted_batches_views_and_frozen_parameters(seed):
    model = tanh_mlp(seed=seed).double()
    model[0].bias.requires_grad_(False)
    x, y = _data("ce", 16, seed)
    loss = _losses()["ce"]
    G = dense_ggn(model, x, y, loss)  # over the trainable parameters
    op = GGNOperator(list(model.parameters()), [ggn_closure(model, loss, x[:8], y[:8]), ggn_closure(model, loss, x[8:], y[8:])])
    v = torch.randn(op.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    torch.testing.assert_close(op.matvec(v), G @ v, rtol=1e-10, atol=1e-12)
    block = [model[2].weight, model[0].weight]  # a reordered subset: the diagonal block G_SS
    view = op.view(block)
    index = {"0.weight": range(0, 48), "2.weight": range(48, 72)}  # flat order of the trainable parameters
    rows = torch.tensor([*index["2.weight"], *index["0.weight"]])
    u = torch.randn(view.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed + 10))
    torch.testing.assert_close(view.matvec(u), G[rows][:, rows] @ u, rtol=1e-10, atol=1e-12)
    assert view.num_matvecs == 1 and op.num_matvecs == 2


def test_outputs_must_depend_on_the_parameters_and_feed_the_loss():
    model = tanh_mlp().double()
    x, y = _data("mse", 4, 0)
    with pytest.raises(ValueError, match="do not depend"):
        GGNOperator(list(model.parameters()), [lambda: (x * 1.0, ((model(x) - y) ** 2).mean())])
    with pytest.raises(ValueError, match="not computed from the outputs"):
        GGNOperator(list(model.parameters()), [lambda: (model(x), ((model(x) - y) ** 2).mean())])
