"""Known answers for the parameter projections: the strided sign sketch (default),
CountSketch (kept to restore old checkpoints) and the exact identity."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from chaos_callbacks.dynamics.diffusion import fit_diffusion_exponent, time_averaged_msd
from chaos_callbacks.dynamics.sketch import (
    CountSketch,
    ExactProjection,
    StridedSignSketch,
    largest_prime_at_most,
    projector_from_state_dict,
)


def split_like(flat: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
    """Cut a flat vector into tensors of ``shapes`` (a model's parameter list)."""
    sizes = [math.prod(s) for s in shapes]
    return [piece.reshape(s) for piece, s in zip(torch.split(flat, sizes), shapes)]


SHAPES = [(16, 8, 3, 3), (16,), (32, 16, 3, 3), (32,), (10, 32), (10,)]
NUM = sum(math.prod(s) for s in SHAPES)

# ---------------------------------------------------------------- StridedSignSketch

# (p, shapes): offsets not multiples of p, tensors shorter than p, one tensor whose length is
# exactly a multiple of p, one starting on a multiple of p, more rows than one chunk (32 rows)
LAYOUTS = [
    (13, [(3,), (13,), (5, 4), (2, 13), (1,), (40,), (2, 3)]),
    (7, [(2,), (3,), (1,), (7,), (50, 7), (6, 5), (4,), (3, 3, 3)]),
    (31, [(5,), (40, 33), (31,), (2,), (29,)]),
    (2, [(1,), (3,), (4, 5)]),
]


def dense_matrix(sketch: StridedSignSketch, shapes: list[tuple[int, ...]]) -> torch.Tensor:
    """S, dim x n, column i = the sketch of the i-th unit vector laid out as ``shapes``."""
    eye = torch.eye(sketch.num_params, dtype=torch.float64)
    return torch.stack([sketch.project(split_like(e, shapes)) for e in eye], dim=1)


@pytest.mark.parametrize("p, shapes", LAYOUTS)
def test_strided_sketch_is_the_dense_sign_matrix_times_x(p: int, shapes: list) -> None:
    n = sum(math.prod(s) for s in shapes)
    sketch = StridedSignSketch(n, p, seed=p)
    S = dense_matrix(sketch, shapes)
    assert S.shape == (p, n)
    cols, rows = torch.nonzero(S.T, as_tuple=True)  # one entry per column i, in row i mod p
    assert torch.equal(cols, torch.arange(n)) and torch.equal(rows, torch.arange(n) % p)
    signs = S[rows, cols]
    assert set(signs.tolist()) == {-1.0, 1.0}  # both signs occur, nothing else
    for seed, dtype in ((0, torch.float64), (1, torch.float32)):
        x = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        y = sketch.project(split_like(x, shapes))
        assert y.dtype == torch.float64
        expected = S @ x.double()
        assert (y - expected).abs().max() <= 1e-12 * expected.abs().max()
        assert torch.equal(y, sketch.project([x]))  # a list and its concatenation


def test_strided_sketch_rebuilt_from_state_is_bit_exact_and_seeds_differ() -> None:
    params = split_like(torch.randn(NUM), SHAPES)
    sketch = StridedSignSketch(NUM, 127, seed=7)
    state = sketch.state_dict()
    assert state == {"kind": "strided_sign", "num_params": NUM, "dim": 127, "seed": 7}
    rebuilt = projector_from_state_dict(state)
    assert isinstance(rebuilt, StridedSignSketch)
    assert torch.equal(rebuilt.project(params), sketch.project(params))
    assert not torch.equal(StridedSignSketch(NUM, 127, seed=8).project(params), sketch.project(params))
    assert sketch.to("cpu") is sketch and sketch.device == torch.device("cpu")
    assert sketch._signs.dtype == torch.float32 and sketch._signs.numel() == NUM  # 4 bytes/param


def test_float64_accumulation_makes_differences_of_nearby_weights_exact() -> None:
    # float32 weights a and b a few ulps apart (a step of a small learning rate): the float64
    # sums of float32 products are exact, so S(a) − S(b) = S(a − b) with a − b taken in float64
    n, p = 200_000, 1021
    gen = torch.Generator().manual_seed(11)
    a = torch.randn(n, generator=gen)
    b = a.clone()
    for _ in range(3):  # up to 3 ulps in random directions
        moved = torch.rand(n, generator=gen) < 0.5
        b[moved] = torch.nextafter(b[moved], torch.where(torch.rand(int(moved.sum()), generator=gen) < 0.5, -1e9, 1e9))
    sketch = StridedSignSketch(n, p, seed=3)
    shapes = [(123,), (999, 100), (n - 123 - 99_900,)]
    diff = sketch.project(split_like(a, shapes)) - sketch.project(split_like(b, shapes))
    reference = sketch.project([a.double() - b.double()])
    assert (diff - reference).abs().max() <= 1e-12 * reference.abs().max()
    # the same sums in float32 would lose the difference: why float64 is used
    signs, buckets = sketch._signs, torch.arange(n) % p
    single = lambda v: torch.zeros(p).index_add_(0, buckets, v * signs)  # noqa: E731
    lost = (single(a) - single(b)).double() - reference
    assert lost.abs().max() > 1e-3 * reference.abs().max()


def bucket_mass_variance(x: torch.Tensor, p: int) -> float:
    """Exact Var ||Sx||² over the signs, buckets i mod p: 2 Σ_j (B_j² − Σ_{i≡j} x_i⁴)."""
    buckets = torch.arange(x.numel()) % p
    mass = torch.zeros(p, dtype=torch.float64).index_add_(0, buckets, x.square())
    fourth = torch.zeros(p, dtype=torch.float64).index_add_(0, buckets, x.pow(4))
    return 2 * (mass.square() - fourth).sum().item()


def norms_over_seeds(x: torch.Tensor, p: int, seeds: int, shapes=None) -> np.ndarray:
    parts = [x] if shapes is None else split_like(x, shapes)
    return np.array(
        [StridedSignSketch(x.numel(), p, seed=s).project(parts).square().sum().item() for s in range(seeds)]
    )


def test_squared_norm_is_unbiased_with_the_bucket_mass_variance() -> None:
    # uneven bucket masses (scale grows with i mod p): the general formula, not the even one
    n, p, seeds = 3000, 31, 600
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * (1 + 9 * ((torch.arange(n) % p) / p) ** 2).double()
    sq = x.square().sum().item()
    variance = bucket_mass_variance(x, p)
    even = 2 * sq**2 / p - 2 * x.pow(4).sum().item()
    assert variance > 1.5 * even  # the masses are far from even: the test tells the formulas apart
    norms = norms_over_seeds(x, p, seeds, shapes=[(17,), (1000, 2), (983,)])
    assert abs(norms.mean() - sq) < 4 * math.sqrt(variance / seeds)
    assert norms.var(ddof=1) == pytest.approx(variance, rel=0.2)


def test_even_bucket_masses_give_the_closed_form_variance() -> None:
    # x_i = f(i // p) g_i with |g_i| = 1: every bucket holds the same magnitudes, B_j = ||x||²/p,
    # and Var ||Sx||² = 2||x||⁴/p − 2 Σ x_i⁴ ≤ (2/p)(||x||⁴ − Σ x_i⁴) (CountSketch's)
    p, rows, seeds = 31, 100, 600
    gen = torch.Generator().manual_seed(1)
    f = torch.rand(rows, generator=gen, dtype=torch.float64) + 0.5
    g = torch.randint(0, 2, (rows * p,), generator=gen).double() * 2 - 1
    x = f.repeat_interleave(p) * g
    sq, fourth = x.square().sum().item(), x.pow(4).sum().item()
    closed = 2 * sq**2 / p - 2 * fourth
    assert bucket_mass_variance(x, p) == pytest.approx(closed, rel=1e-12)
    assert closed <= 2 / p * (sq**2 - fourth)
    norms = norms_over_seeds(x, p, seeds)
    assert abs(norms.mean() - sq) < 4 * math.sqrt(closed / seeds)
    assert norms.var(ddof=1) == pytest.approx(closed, rel=0.2)


def test_rank_one_displacement_of_a_wide_layer_keeps_the_jl_error() -> None:
    # d = u vᵀ on a (64, 1024) weight, v ≥ 0 (a first-layer step on images): the flattened rows
    # are all the same pattern v. With p = 1021 the relative error of ||Sd||² is ≈ sqrt(2/p),
    # as for a CountSketch of the same dimension; the exact formulas show what p = 1024 (columns
    # aligned with buckets) and one sign per row of p elements would give instead.
    R, C, p, seeds = 64, 1024, 1021, 300
    gen = torch.Generator().manual_seed(2)
    u = torch.randn(R, generator=gen, dtype=torch.float64)
    v = torch.rand(C, generator=gen, dtype=torch.float64) * (torch.rand(C, generator=gen) < 0.3)
    d = torch.outer(u, v)
    x = d.reshape(-1)
    sq = x.square().sum().item()
    predicted = math.sqrt(bucket_mass_variance(x, p)) / sq
    assert predicted < 1.1 * math.sqrt(2 / p)
    strided = norms_over_seeds(x, p, seeds, shapes=[(R, C)]) / sq - 1
    count = np.array([CountSketch(R * C, p, seed=s).project([d]).square().sum().item() for s in range(seeds)]) / sq - 1
    assert abs(strided.mean()) < 4 * predicted / math.sqrt(seeds)
    assert np.sqrt(np.mean(strided**2)) == pytest.approx(predicted, rel=0.2)
    assert np.sqrt(np.mean(count**2)) == pytest.approx(math.sqrt(2 / p), rel=0.2)
    assert np.sqrt(np.mean(strided**2)) < 1.25 * np.sqrt(np.mean(count**2))
    aligned = math.sqrt(bucket_mass_variance(x, 1024)) / sq  # a column per bucket: v's error
    assert aligned > 1.2 * predicted
    # one sign per row of p elements: Var = 2 Σ_{r≠r'} ⟨x_r, x_r'⟩² over the chunks x_r
    chunks = torch.nn.functional.pad(x, (0, -x.numel() % p)).view(-1, p)
    gram = chunks @ chunks.T
    row_signs = math.sqrt(2 * (gram.square().sum() - gram.diag().square().sum()).item()) / sq
    assert row_signs > 0.2 > 4 * predicted


def test_largest_prime_at_most() -> None:
    sieve = np.ones(2001, dtype=bool)
    sieve[:2] = False
    for k in range(2, 45):
        sieve[k * k :: k] = False
    primes = np.flatnonzero(sieve)
    for n in range(2, 2001):
        assert largest_prime_at_most(n) == primes[primes <= n].max()
    assert largest_prime_at_most(1024) == 1021 and largest_prime_at_most(7919) == 7919
    with pytest.raises(ValueError):
        largest_prime_at_most(1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_strided_sketch_on_cuda_matches_the_cpu() -> None:
    params = split_like(torch.randn(NUM), SHAPES)
    cpu = StridedSignSketch(NUM, 127, seed=4).project(params)
    gpu = StridedSignSketch(NUM, 127, seed=4).project([q.cuda() for q in params])
    assert gpu.device.type == "cuda"
    assert (gpu.cpu() - cpu).abs().max() <= 1e-12 * cpu.abs().max()


# ---------------------------------------------------------------- CountSketch, exact


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


@pytest.mark.parametrize("kind, d", [(CountSketch, 256), (StridedSignSketch, 251)])
def test_pairwise_distance_error_matches_the_jl_scale(kind: type, d: int) -> None:
    # relative error of ||S(a − b)||² over 300 pairs: RMS ≈ sqrt(2/d), none beyond 5 sqrt(2/d)
    n = 20000
    gen = torch.Generator().manual_seed(1)
    sketch = kind(n, d, seed=3)
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
    n, d, steps = 20000, 1021, 200
    param = torch.nn.Parameter(torch.zeros(n))
    opt = torch.optim.SGD([param], lr=0.01)
    gen = torch.Generator().manual_seed(4)
    sketch, exact = StridedSignSketch(n, d, seed=5), ExactProjection(n)
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


@pytest.mark.parametrize("projector", [StridedSignSketch(NUM, 17), CountSketch(NUM, 16), ExactProjection(NUM)])
def test_wrong_parameter_count_is_rejected(projector) -> None:
    with pytest.raises(ValueError, match=f"num_params={NUM}"):
        projector.project([torch.zeros(NUM + 1)])
    with pytest.raises(ValueError, match="non-empty"):
        projector.project([])


BAD = [
    {"num_params": 0, "dim": 5},
    {"num_params": 10, "dim": 0},
    {"num_params": 10, "dim": 5, "seed": -1},
    {"num_params": 10, "dim": 5, "seed": True},
    {"num_params": 10.0, "dim": 5},
]


@pytest.mark.parametrize("kind", [CountSketch, StridedSignSketch])
@pytest.mark.parametrize("kwargs", BAD)
def test_bad_sketch_arguments_raise(kind: type, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        kind(**kwargs)


@pytest.mark.parametrize("dim", [1, 4, 1024, 5.0])
def test_strided_sketch_dimension_must_be_a_prime(dim) -> None:
    with pytest.raises(ValueError, match="dim must be"):
        StridedSignSketch(10, dim)


def test_unknown_state_kind_is_rejected() -> None:
    with pytest.raises(ValueError, match="strided_sign"):
        projector_from_state_dict({"kind": "gaussian"})
    with pytest.raises(ValueError, match="strided_sign"):
        StridedSignSketch.from_state_dict(CountSketch(10, 4).state_dict())
