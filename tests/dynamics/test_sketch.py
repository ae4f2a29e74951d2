"""Known answers for the parameter projections: CountSketch and the exact identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chaos_callbacks.dynamics.diffusion import fit_diffusion_exponent, time_averaged_msd
from chaos_callbacks.dynamics.sketch import CountSketch, ExactProjection, projector_from_state_dict


def split_like(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Cut a flat vector into tensors of ``shapes`` (a model's parameter list)."""
    sizes = [math.prod(s) for s in shapes]
    return [piece.reshape(s) for piece, s in zip(torch.split(flat, sizes), shapes)]


SHAPES = [(16, 8, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 32), (10,)]
NUM = sum(math.prod(s) for s in SHAPES)


def test_each_coordinate_lands_in_one_bucket_with_sign_plus_or_minus_one() -> None:
    sketch = CountSketch(50, 8, seed=1)
    columns = torch.stack([sketch.project([e]) for e in torch.eye(50)], dim=1)  # S, 8 x 50
    assert columns.dtype == torch.float64 and columns.shape == (8, 50)
    assert torch.all((columns != 0).sum(dim=0) == 1)
    assert set(columns[columns != 0].tolist()) <= {-1.0, 1.0}
    x = torch.randn(50, dtype=torch.float64)
    torch.testing.assert_close(sketch.project([x]), columns @ x)  # y_j = Σ_{h(i)=j} s_i x_i


def test_tensor_list_is_hashed_as_its_concatenation() -> None:
    sketch = CountSketch(NUM, 64, seed=2)
    flat = torch.randn(NUM)
    torch.testing.assert_close(sketch.project(split_like(flat, SHAPES)), sketch.project([flat]))


def test_rebuilt_from_state_gives_identical_output_and_seeds_differ() -> None:
    params = split_like(torch.randn(NUM), SHAPES)
    sketch = CountSketch(NUM, 128, seed=7)
    state = sketch.state_dict()
    assert set(state) == {"kind", "num_params", "dim", "seed"}
    rebuilt = projector_from_state_dict(state)
    assert isinstance(rebuilt, CountSketch)
    torch.testing.assert_close(rebuilt.project(params), sketch.project(params), rtol=0, atol=0)
    assert not torch.equal(CountSketch(NUM, 128, seed=8).project(params), sketch.project(params))
    assert sketch.to("cpu") is sketch and sketch.device == torch.device("cpu")


def test_squared_norm_is_unbiased_with_the_documented_variance() -> None:
    # E||Sx||² = ||x||², Var = (2/d)(||x||⁴ − Σx⁴); over 600 seeds the mean is within
    # 4 standard errors and the variance within 20 %.
    n, d, seeds = 3000, 32, 600
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * torch.linspace(0.1, 2.0, n).double()
    norms = np.array(
        [CountSketch(n, d, seed=s).project([x]).square().sum().item() for s in range(seeds)]
    )
    sq = x.square().sum().item()
    variance = 2 / d * (sq**2 - x.pow(4).sum().item())
    assert abs(norms.mean() - sq) < 4 * math.sqrt(variance / seeds)
    assert norms.var(ddof=1) == pytest.approx(variance, rel=0.2)


def test_pairwise_distance_error_matches_the_jl_scale() -> None:
    # relative error of ||S(a − b)||² over 300 pairs: RMS ≈ sqrt(2/d), none beyond 5 sqrt(2/d)
    n, d = 20000, 256
    gen = torch.Generator().manual_seed(1)
    sketch = CountSketch(n, d, seed=3)
    a = torch.randn(300, n, generator=gen)
    b = torch.randn(300, n, generator=gen)
    exact = (a.double() - b.double()).square().sum(dim=1)
    sketched = torch.stack(
        [(sketch.project([p]) - sketch.project([q])).square().sum() for p, q in zip(a, b)]
    )
    rel = (sketched / exact - 1).numpy()
    scale = math.sqrt(2 / d)
    assert np.sqrt(np.mean(rel**2)) == pytest.approx(scale, rel=0.2)
    assert np.max(np.abs(rel)) < 5 * scale


def test_sketched_msd_agrees_with_exact_msd() -> None:
    # Brownian weights from torch.optim.SGD with noise gradients; one sketch, all steps
    n, d, steps = 20000, 1024, 200
    param = torch.nn.Parameter(torch.zeros(n))
    opt = torch.optim.SGD([param], lr=0.01)
    gen = torch.Generator().manual_seed(4)
    sketch, exact = CountSketch(n, d, seed=5), ExactProjection(n)
    sketched_path, exact_path = [], []
    for _ in range(steps):
        sketched_path.append(sketch.project([param]).numpy())
        exact_path.append(exact.project([param]).numpy())
        param.grad = torch.randn(n, generator=gen)
        opt.step()
    lags = np.array([1, 2, 5, 10, 20, 50, 100])
    msd_exact = time_averaged_msd(np.array(exact_path), lags)
    msd_sketch = time_averaged_msd(np.array(sketched_path), lags)
    np.testing.assert_allclose(msd_sketch, msd_exact, rtol=3 * math.sqrt(2 / d))
    gap = fit_diffusion_exponent(lags, msd_sketch) - fit_diffusion_exponent(lags, msd_exact)
    assert abs(gap) < 0.05


def test_exact_projection_is_the_float64_concatenation_with_a_cap() -> None:
    params = split_like(torch.randn(NUM), SHAPES)
    exact = ExactProjection(NUM)
    out = exact.project(params)
    torch.testing.assert_close(out, torch.cat([p.flatten() for p in params]).double())
    assert exact.dim == NUM
    rebuilt = projector_from_state_dict(exact.state_dict())
    assert isinstance(rebuilt, ExactProjection) and rebuilt.max_params == exact.max_params
    with pytest.raises(ValueError, match="max_params=1000"):
        ExactProjection(1001, max_params=1000)


@pytest.mark.parametrize("projector", [CountSketch(NUM, 16), ExactProjection(NUM)])
def test_wrong_parameter_count_is_rejected(projector: CountSketch | ExactProjection) -> None:
    with pytest.raises(ValueError, match=f"num_params={NUM}"):
        projector.project([torch.zeros(NUM + 1)])
    with pytest.raises(ValueError, match="non-empty"):
        projector.project([])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_params": 0, "dim": 4},
        {"num_params": 10, "dim": 0},
        {"num_params": 10, "dim": 4, "seed": -1},
        {"num_params": 10.0, "dim": 4},
    ],
)
def test_bad_sketch_arguments_raise(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        CountSketch(**kwargs)


def test_unknown_state_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="count_sketch"):
        projector_from_state_dict({"kind": "gaussian"})
