"""``loss_landscape`` against closed forms (a quadratic) and finite differences (a real MLP)."""

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

from chaos_callbacks.curvature.landscape import loss_along, loss_landscape, offsets
from tests.helpers import exact_hessian, tanh_mlp


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quadratic_loss_equals_its_closed_form(seed):
    g = torch.Generator().manual_seed(seed)
    n = 7
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    A, b, theta = M + M.T, torch.randn(n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)

    def loss_at(delta):
        x = theta + delta
        return float(0.5 * x @ A @ x + b @ x)

    evals, evecs = torch.linalg.eigh(A)
    vectors, lams = evecs[:, [-1, -2]].T.contiguous(), [float(evals[-1]), float(evals[-2])]
    grad, loss0 = A @ theta + b, loss_at(torch.zeros(n, dtype=torch.float64))
    slopes = (vectors @ grad).tolist()
    land = loss_landscape(loss_at, vectors, lams, loss0, slopes, points=9, radius=1.5)
    half = 1.5 * math.sqrt(2 * abs(loss0) / abs(lams[0]))
    assert land.t[0] == pytest.approx(-half) and land.t[-1] == pytest.approx(half) and land.t[4] == 0
    closed = loss0 + land.t * slopes[0] + 0.5 * lams[0] * land.t**2
    assert torch.allclose(land.line, closed, rtol=1e-12, atol=1e-12 * abs(loss0))
    assert torch.allclose(land.line_model, closed, rtol=1e-12, atol=1e-12 * abs(loss0))
    a, c = torch.meshgrid(land.t, land.s, indexing="ij")
    closed_plane = loss0 + a * slopes[0] + c * slopes[1] + 0.5 * (lams[0] * a**2 + lams[1] * c**2)
    assert torch.allclose(land.plane, closed_plane, rtol=1e-12, atol=1e-11 * closed_plane.abs().max())
    assert torch.allclose(land.plane_model, closed_plane, rtol=1e-12, atol=1e-11 * closed_plane.abs().max())
    one = loss_landscape(loss_at, vectors[:1], lams[:1], loss0, slopes[:1], points=5)
    assert one.plane is None and one.s is None and torch.allclose(one.line, one.line_model, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_second_difference_at_zero_is_lambda_max_on_an_mlp(seed):
    model = tanh_mlp(seed=seed).double()
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(20, 6, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    names = [n for n, _ in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_at(delta):
        chunks = torch.split(flat + delta, [p.numel() for p in model.parameters()])
        params = {n: c.view_as(p) for n, c, p in zip(names, chunks, model.parameters())}
        return float(nn.functional.cross_entropy(functional_call(model, params, (x,)), y))

    evals, evecs = torch.linalg.eigh(exact_hessian(model, x, y))
    h = 1e-3
    line = loss_along(loss_at, evecs[:, -1][None], torch.tensor([[-h], [0.0], [h]], dtype=torch.float64))
    second = float(line[0] - 2 * line[1] + line[2]) / h**2
    assert second == pytest.approx(float(evals[-1]), rel=1e-5)  # O(h²) truncation, O(u/h²) rounding


@pytest.mark.parametrize("loss0, lam", [(0.0, 1.0), (1.0, 0.0), (float("nan"), 1.0)])
def test_degenerate_range_is_refused(loss0, lam):
    with pytest.raises(ValueError):
        offsets(loss0, lam, 2.0, 5)
