"""Memory-bounded projections of a model's parameter vector.

Recording the weight trajectory θ_t ∈ R^n of a network for anomalous-diffusion statistics
(Chen, Gong et al., "Anomalous diffusion dynamics of learning in deep neural networks",
arXiv 2009.10588) needs every step's vector. A projection P: R^n → R^d with d ≪ n keeps a
window of W steps in 8·W·d bytes instead of 8·W·n, as long as it preserves squared distances
||P(a) − P(b)||² ≈ ||a − b||², the only quantity the statistics use.

Three projectors share the :class:`ParameterProjector` protocol:

* :class:`StridedSignSketch` — the default: coordinate i goes to bucket i mod p (p prime) with
  a random sign; a CountSketch whose bucket hash is a stride, so one step is a few dense BLAS
  calls (4 bytes per parameter, about 4x faster than :class:`CountSketch` on one CPU thread).
* :class:`CountSketch` — a sparse Johnson–Lindenstrauss map (Charikar, Chen, Farach-Colton,
  "Finding frequent items in data streams", ICALP 2002; Thorup & Zhang, "Tabulation-based
  5-independent hashing with applications to linear probing and second moment estimation",
  SIAM J. Comput. 2012), kept so that checkpoints written with it resume with the same map.
* :class:`ExactProjection` — the identity, for small models, with a cap on ``num_params``.

Each is deterministic from a few integers (its :meth:`state_dict`).
"""

from __future__ import annotations

import math
from typing import Any, Protocol, Sequence

import torch
from torch import Tensor

__all__ = [
    "CountSketch",
    "ExactProjection",
    "ParameterProjector",
    "StridedSignSketch",
    "largest_prime_at_most",
    "projector_from_state_dict",
]

_CHUNK_ELEMENTS = 1 << 22
"""Largest slice of one parameter tensor converted to float64 at a time (32 MiB)."""


class ParameterProjector(Protocol):
    """What a window recorder needs from a projection of the parameter list."""

    num_params: int
    dim: int

    def project(self, params: Sequence[Tensor]) -> Tensor:
        """Map the parameter tensors (in a fixed order) to a float64 vector of length ``dim``."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The few integers that rebuild this projector exactly."""
        ...

    def to(self, device: torch.device | str) -> "ParameterProjector":
        """Move any lookup tables to ``device``; returns ``self``."""
        ...

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ParameterProjector":
        """Rebuild the identical projector from :meth:`state_dict`."""
        ...


def _check_positive_int(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")


def _checked(params: Sequence[Tensor], num_params: int) -> list[Tensor]:
    """The parameter tensors as a list, refused when empty or not ``num_params`` elements in all."""
    params = list(params)
    if not params:
        raise ValueError("params must be a non-empty sequence of tensors")
    total = sum(p.numel() for p in params)
    if total != num_params:
        raise ValueError(
            f"the parameter tensors hold {total} elements in total; this projector was built "
            f"for num_params={num_params}"
        )
    return params


def largest_prime_at_most(n: int) -> int:
    """The largest prime p ≤ ``n`` (``n`` ≥ 2), by trial division (O(sqrt(n)) per candidate)."""
    _check_positive_int("n", n)
    if n < 2:
        raise ValueError(f"there is no prime <= {n}")
    return next(p for p in range(n, 1, -1) if _is_prime(p))


def _is_prime(n: int) -> bool:
    if n < 4:
        return n >= 2
    if n % 2 == 0:
        return False
    return all(n % k for k in range(3, math.isqrt(n) + 1, 2))


class _SeededSketch:
    """Checkpoint state of a sketch that is a pure function of ``(num_params, dim, seed)``:
    those three integers and the class's ``KIND``."""

    KIND: str
    num_params: int
    dim: int
    seed: int

    def state_dict(self) -> dict[str, Any]:
        """``{"kind": KIND, "num_params", "dim", "seed"}``."""
        return {"kind": self.KIND, "num_params": self.num_params, "dim": self.dim, "seed": self.seed}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Any:
        """Rebuild the identical sketch from :meth:`state_dict` (on the CPU)."""
        if state.get("kind") != cls.KIND:
            raise ValueError(f"expected a state with kind {cls.KIND!r}; got {state.get('kind')!r}")
        return cls(int(state["num_params"]), int(state["dim"]), int(state["seed"]))


class StridedSignSketch(_SeededSketch):
    """Strided-bucket sign sketch of a parameter list: y_j = Σ_{i ≡ j (mod p)} s_i x_i.

    Coordinate i of the concatenated flattened parameters (in the given order) goes to bucket
    i mod p, p = ``dim`` a prime, with an independent uniform sign s_i ∈ {±1}:

        y_j = Σ_{i : i mod p = j} s_i x_i,         j = 0, …, p − 1.

    This is a CountSketch (Charikar, Chen, Farach-Colton, ICALP 2002) whose bucket hash is
    the fixed stride i ↦ i mod p instead of a random one. Over the random signs, with the
    buckets fixed and B_j = Σ_{i ≡ j} x_i² the mass of bucket j,

        E ||S x||² = ||x||²,
        Var ||S x||² = 2 Σ_j (B_j² − Σ_{i ≡ j} x_i⁴),

    (y_j are independent, E y_j⁴ = 3 B_j² − 2 Σ_{i ≡ j} x_i⁴). When the masses are even,
    B_j = ||x||² / p, this is 2 ||x||⁴ / p − 2 Σ_i x_i⁴ ≤ (2 / p)(||x||⁴ − Σ_i x_i⁴), at most
    the variance of a CountSketch with random buckets: the relative error of a squared
    distance is about sqrt(2 / p) in standard deviation.

    **Why a prime, and why a sign per coordinate.** Weight displacements are structured: a
    gradient step of a linear layer is a rank-one u vᵀ, and on images the input v is
    non-negative, so every flattened row of the (R, C) matrix is the pattern v scaled by u_r.
    Element (r, c) goes to bucket (r·C + c) mod p. If p divided the row length C (p = 1024
    and C = 1024, say) a whole column would land in one bucket, B_j ∝ v_j², and the error
    would be that of sketching v alone: O(1) for a v concentrated on a few pixels. With p
    prime no row length but a multiple of p aligns a column, consecutive rows are shifted by
    C mod p ≠ 0, and the masses mix rows and columns. The signs must be per coordinate: with
    one sign per row of p elements, the correlated rows of u vᵀ (v ≥ 0) add coherently within
    a bucket, and the relative error of ||S x||² is O(1) instead of about sqrt(2 / p).

    **Exactness.** Products s_i x_i are exact sign flips and are accumulated in float64: for float32 weights of comparable magnitudes the sums are
    exact, so S(a) − S(b) equals S(a − b) even when a and b differ by a few ulps.

    **Cost.** The signs are one float32 vector of length ``num_params`` (4 bytes per
    parameter), drawn with a CPU ``torch.Generator`` seeded by ``seed``: the map is a pure
    function of ``(num_params, dim, seed)`` on every device and only those three integers go
    into a checkpoint. ``project`` streams the parameter tensors, never concatenating them,
    through a reused float64 buffer of ``_ROWS`` rows of p: chunk c holds the signed products
    s_i x_i of the global indices c·``_ROWS``·p … (c + 1)·``_ROWS``·p − 1 (one multiplication
    per tensor piece, written straight into the buffer, so a chunk may span several tensors
    and a tensor several chunks), and a full chunk is summed row-wise into y by one float64
    matrix-vector product with ones (BLAS); the last chunk's partial row is padded with
    zeros. A list and its concatenation therefore give bit-identical sketches. The only
    temporaries are that buffer (``_ROWS`` · p float64) and a vector of ones.

    Args:
        num_params: total number of elements n over the parameter tensors.
        dim: sketch dimension p, a prime (see :func:`largest_prime_at_most`).
        seed: seed of the signs.
    """

    KIND = "strided_sign"

    _ROWS = 32
    """Rows of p elements per chunk (fastest measured on one CPU thread at 1e7 parameters)."""

    def __init__(self, num_params: int, dim: int, seed: int = 0) -> None:
        _check_positive_int("num_params", num_params)
        _check_positive_int("dim", dim)
        if not _is_prime(dim):
            raise ValueError(
                f"dim must be a prime; got {dim} (the largest prime below is "
                f"{largest_prime_at_most(dim) if dim >= 2 else 'none'})"
            )
        _check_seed(seed)
        self.num_params = num_params
        self.dim = dim
        self.seed = seed
        generator = torch.Generator(device="cpu").manual_seed(seed)
        signs = torch.randint(0, 2, (num_params,), generator=generator, dtype=torch.float32)
        self._signs = signs.mul_(-2.0).add_(1.0)  # {0, 1} -> {+1, -1}
        self._buffer: Tensor | None = None  # chunk of _ROWS x dim products, float64
        self._ones: Tensor | None = None

    @property
    def device(self) -> torch.device:
        """Device of the sign table (follows the parameters passed to ``project``)."""
        return self._signs.device

    def to(self, device: torch.device | str) -> "StridedSignSketch":
        """Move the sign table to ``device``; returns ``self``."""
        self._signs = self._signs.to(device)
        self._buffer = self._ones = None
        return self

    @torch.no_grad()
    def project(self, params: Sequence[Tensor]) -> Tensor:
        """Sketch the concatenation of the flattened ``params`` (in the given order).

        The i-th element overall (tensor offsets accumulate along the list) goes to bucket
        i mod ``dim`` with sign i, exactly as if the tensors were concatenated. The sign table
        moves to the parameters' device on first use.

        Returns:
            float64 tensor of shape ``(dim,)`` on the parameters' device.
        """
        params = _checked(params, self.num_params)
        device = params[0].device
        if self._signs.device != device:
            self.to(device)
        if self._buffer is None:
            self._buffer = torch.empty(self._ROWS * self.dim, dtype=torch.float64, device=device)
            self._ones = torch.ones(self._ROWS, dtype=torch.float64, device=device)
        out = torch.zeros(self.dim, dtype=torch.float64, device=device)
        filled, offset = 0, 0  # products in the buffer, global index of the next tensor
        for p in params:
            if p.device != device:
                raise ValueError(
                    f"all parameter tensors must be on one device; got {device} and {p.device}"
                )
            filled = self._stream(out, p.detach().reshape(-1), offset, filled)
            offset += p.numel()
        if filled:  # the last, partial chunk: pad its last row with zeros
            rows = -(-filled // self.dim)
            self._buffer[filled : rows * self.dim].zero_()
            self._add_rows(out, rows)
        return out

    def _stream(self, out: Tensor, flat: Tensor, offset: int, filled: int) -> int:
        """Write s_i x_i of ``flat`` (global indices from ``offset``) after the buffer's first
        ``filled`` products, summing each full chunk into ``out``; returns the new fill."""
        capacity, signs = self._buffer.numel(), self._signs[offset : offset + flat.numel()]
        start = 0
        while start < flat.numel():
            stop = min(start + capacity - filled, flat.numel())
            chunk = self._buffer[filled : filled + stop - start]
            torch.mul(flat[start:stop], signs[start:stop], out=chunk)  # exact: a sign flip
            filled += stop - start
            start = stop
            if filled == capacity:
                self._add_rows(out, self._ROWS)
                filled = 0
        return filled

    def _add_rows(self, out: Tensor, rows: int) -> None:
        """``out += chunkᵀ · 1``: the sum of the buffer's first ``rows`` rows of p, in float64."""
        chunk = self._buffer[: rows * self.dim].view(rows, self.dim)
        out.addmv_(chunk.t(), self._ones[:rows])


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int; got {seed!r}")


class CountSketch(_SeededSketch):
    """Sparse Johnson–Lindenstrauss projection (CountSketch) of a parameter list.

    Kept only to restore checkpoints written with it (state kind ``"count_sketch"``):
    :class:`StridedSignSketch` is the default of ``DiffusionTracker`` (same error, about 4x
    faster, half the memory). A resumed run keeps the sketch it started with.

    With a bucket hash h: [n] → [d] and a sign hash s: [n] → {±1}, both drawn uniformly and
    independently per coordinate,

        y_j = Σ_{i : h(i) = j} s_i x_i,         j = 0, …, d − 1.

    The squared norm is unbiased and its variance is known (Thorup & Zhang 2012, §1.2):

        E ||S x||² = ||x||²,
        Var ||S x||² = (2 / d) (||x||⁴ − Σ_i x_i⁴),

    so the relative error of a squared distance ||S(a − b)||² is at most sqrt(2 / d) in
    standard deviation, and ≈ sqrt(2 / d) when a − b is spread over many coordinates.

    The hashes are drawn with a CPU ``torch.Generator`` seeded by ``seed``, so the map is a
    pure function of ``(num_params, dim, seed)`` on every device and only those three
    integers go into a checkpoint. The table stores the bucket and sign of each coordinate in
    one int64 code ``h(i) + d·[s_i < 0]`` (8 bytes per parameter); ``project`` scatter-adds
    each parameter slice into 2d float64 bins and returns the first half minus the second,
    so the per-step cost is O(n) with no sign multiplication and no concatenated copy of the
    parameters. On CUDA the scatter order, hence the last bits of the float64 sums, may vary.

    Args:
        num_params: total number of elements n over the parameter tensors.
        dim: sketch dimension d.
        seed: seed of the hash functions.
    """

    KIND = "count_sketch"

    def __init__(self, num_params: int, dim: int, seed: int = 0) -> None:
        _check_positive_int("num_params", num_params)
        _check_positive_int("dim", dim)
        _check_seed(seed)
        self.num_params = num_params
        self.dim = dim
        self.seed = seed
        generator = torch.Generator(device="cpu").manual_seed(seed)
        buckets = torch.randint(0, dim, (num_params,), generator=generator, dtype=torch.int64)
        negative = torch.randint(0, 2, (num_params,), generator=generator, dtype=torch.int64)
        self._codes = buckets.add_(negative.mul_(dim))

    @property
    def device(self) -> torch.device:
        """Device of the hash table (follows the parameters passed to ``project``)."""
        return self._codes.device

    def to(self, device: torch.device | str) -> "CountSketch":
        """Move the hash table to ``device``; returns ``self``."""
        self._codes = self._codes.to(device)
        return self

    @torch.no_grad()
    def project(self, params: Sequence[Tensor]) -> Tensor:
        """Sketch the concatenation of the flattened ``params`` (in the given order).

        The i-th element overall (tensor offsets accumulate along the list) uses hash entry
        i, exactly as if the tensors were concatenated. The hash table moves to the
        parameters' device on first use.

        Returns:
            float64 tensor of shape ``(dim,)`` on the parameters' device.
        """
        params = _checked(params, self.num_params)
        device = params[0].device
        if self._codes.device != device:
            self.to(device)
        bins = torch.zeros(2 * self.dim, dtype=torch.float64, device=device)
        offset = 0
        for p in params:
            if p.device != device:
                raise ValueError(
                    f"all parameter tensors must be on one device; got {device} and {p.device}"
                )
            flat = p.detach().reshape(-1)
            for start in range(0, flat.numel(), _CHUNK_ELEMENTS):
                piece = flat[start : start + _CHUNK_ELEMENTS]
                codes = self._codes[offset + start : offset + start + piece.numel()]
                bins.scatter_add_(0, codes, piece.to(torch.float64))
            offset += flat.numel()
        return bins[: self.dim] - bins[self.dim :]


class ExactProjection:
    """Identity "sketch": the flattened parameters themselves, in float64.

    For small models the exact trajectory is affordable: a window of W steps costs
    8·W·num_params bytes. ``max_params`` caps that cost; beyond it use :class:`StridedSignSketch`.

    Args:
        num_params: total number of elements over the parameter tensors.
        max_params: largest ``num_params`` accepted (default 2**20, i.e. 8 MiB per step).
    """

    def __init__(self, num_params: int, max_params: int = 1 << 20) -> None:
        _check_positive_int("num_params", num_params)
        _check_positive_int("max_params", max_params)
        if num_params > max_params:
            raise ValueError(
                f"ExactProjection stores all num_params={num_params} float64 values per step, "
                f"above the cap max_params={max_params}; raise max_params or use a sketch"
            )
        self.num_params = num_params
        self.dim = num_params
        self.max_params = max_params

    def to(self, device: torch.device | str) -> "ExactProjection":
        """No tables to move; returns ``self``."""
        return self

    @torch.no_grad()
    def project(self, params: Sequence[Tensor]) -> Tensor:
        """The flattened ``params`` concatenated in order, as float64 of shape ``(dim,)``."""
        params = _checked(params, self.num_params)
        out = torch.empty(self.dim, dtype=torch.float64, device=params[0].device)
        offset = 0
        for p in params:
            out[offset : offset + p.numel()] = p.detach().reshape(-1)
            offset += p.numel()
        return out

    def state_dict(self) -> dict[str, Any]:
        """``{"kind": "exact", "num_params", "max_params"}``."""
        return {"kind": "exact", "num_params": self.num_params, "max_params": self.max_params}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> "ExactProjection":
        """Rebuild from :meth:`state_dict`."""
        if state.get("kind") != "exact":
            raise ValueError(f"expected a state with kind 'exact'; got {state.get('kind')!r}")
        return cls(int(state["num_params"]), int(state["max_params"]))


def projector_from_state_dict(
    state: dict[str, Any],
) -> StridedSignSketch | CountSketch | ExactProjection:
    """Rebuild whichever projector wrote ``state`` (dispatch on ``state["kind"]``)."""
    kinds = {
        "strided_sign": StridedSignSketch,
        "count_sketch": CountSketch,
        "exact": ExactProjection,
    }
    kind = state.get("kind")
    if kind not in kinds:
        raise ValueError(f"state['kind'] must be one of {sorted(kinds)}; got {kind!r}")
    return kinds[kind].from_state_dict(state)
