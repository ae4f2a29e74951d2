"""Certified extremal eigenvalues of a symmetric operator: restarted Lanczos with locking, power iteration.

**Krylov–Schur Lanczos (the top ``k``).** An orthonormal basis ``U`` of a Krylov space, a small
symmetric ``T = UᵀHU`` and a unit vector ``q ⊥ U`` satisfy ``H U = U T + q bᵀ`` (Stewart, SIAM J.
Matrix Anal. Appl. 23, 2001). Each step appends ``q`` and one product ``Hq``, orthogonalised against the
basis by classical Gram–Schmidt with the Daniel–Gragg–Kaufman–Stewart criterion (a second pass only
when the first removed more than ``1 − 1/√2`` of the norm; Math. Comp. 30, 1976), one matrix–vector
product per block of stored vectors. With ``T = S Θ Sᵀ`` the Ritz pairs ``(θ_i, U s_i)`` have *exact*
residuals ``r_i = ‖H U s_i − θ_i U s_i‖ = |(Sᵀb)_i|``. When the basis reaches ``max_basis`` vectors it
is restarted in place on its top Ritz vectors (thick restart, Wu & Simon 2000).

**Memory, in vectors of ``n``.** The basis is stored in blocks of four rows allocated as it grows, so a
run that stops after ``m`` products holds about ``m`` vectors. At most ``max_basis`` vectors are held
by the solver at any time — the basis, or the locked vectors and basis of a deflation check — plus the
product being orthogonalised, one temporary of a restart, and what the operator allocates for a
product. The ``λ_min`` run holds three. Nothing is up-cast to float64.

**What is rigorous and what is probabilistic.**

* Rigorous for any start (up to the rounding of the products): the residuals above; Cauchy
  interlacing — the ``i``-th largest Ritz value from any subspace is ``θ_i ≤ λ_i`` and the smallest
  is ``θ_min ≥ λ_min``; Krylov–Weinstein — *some* eigenvalue lies within ``r_i`` of ``θ_i``; and every
  Rayleigh quotient of a vector orthogonal to a set of locked vectors bounds the top of the deflated
  operator from below.
* Probabilistic (the *index*): that the eigenvalue near ``θ_i`` is the ``i``-th largest. A Krylov
  space from a start with a random component finds the extreme distinct eigenvalues first; it can
  still miss one whose component in the start is tiny, and a single start vector never sees a
  multiplicity. Kuczyński & Woźniakowski (SIAM J. Matrix Anal. Appl. 13, 1992, Thm 4.2) bound the
  failure over a uniformly random start: after ``m`` products
  ``P[λ_1 − θ_1 ≥ ε (λ_1 − λ_n)] ≤ 1.648 √n e^{−(2m−1)√ε}`` (:func:`random_start_failure_bound`).
  It is a worst case over spectra, vacuous at ``ε = 10⁻³`` for practical ``m`` (``n = 10⁶``,
  ``m = 30``: ``≥ 1``) but not for coarse misses: ``P[λ_1 > θ_1 + 0.1 (λ_1 − λ_n)] ≤ 1.3·10⁻⁵`` at
  ``m = 30``. A warm start ``û + w g`` keeps a random part ``g`` of weight ``w = 1``
  (:func:`start_vector`): by Anderson's inequality the start's component along the top eigenvector
  is stochastically larger than that of ``w g/(1 + w)``, so the bound holds with its constant doubled.
  A few-product warm refresh rests on the warm vectors more than on that bound (SGD on an MNIST MLP:
  a refresh certified to ``tol = 10⁻²`` after 4 products reported ``λ_2`` when the top eigenvector had
  turned; at the default ``10⁻³`` the same refresh took 8 products and found ``λ_1``).
* A *cold* top run (no warm vectors) and every deflation check, whose starts are uniformly random, do
  not stop before :func:`cold_start_matvecs` products — the fewest that make a coarse miss
  (``λ_1 − θ_1 ≥ 0.1 (λ_1 − λ_n)``) at most 1 % likely by the bound above: 17 at ``n = 2·10⁴``, 22 at
  ``10⁷`` — unless the space became invariant first (a random start then holds every distinct
  eigenvalue almost surely). Without it a cold run at ``tol = 10⁻²`` certified ``λ_2`` as ``λ_1`` after
  4–5 products for 1 % of random starts on a spectrum with two outliers, and once on an MNIST MLP.
  The bound is for an unrestarted space; a thick restart keeps the top Ritz vectors, so the top Ritz
  value only grows, but the restarted space is not the full Krylov space the bound speaks of.

**Certificates.**

* ``λ_max`` for ``k = 1`` (one Krylov space): Weinstein's ``e = r``, given the index assumption that
  the eigenvalue within ``r`` of ``θ`` is ``λ_1``; with ``θ ≤ λ_1`` this gives ``λ_1 ∈ [θ, θ + r]``.
  Kato–Temple's ``r²/δ`` is not used from one space: ``δ`` would be measured to the next Ritz interval,
  and a single space may not have resolved an eigenvalue inside it (a tight cluster at the top: the
  next Ritz value converges to the value below the cluster first).
* Top ``k ≥ 2`` (*deflation check*, ``check_index``): once the top ``k`` are certified they are locked,
  and Lanczos runs on the deflated operator (the compression ``C`` of ``H`` to their orthogonal
  complement) from a fresh random vector until its top value ``ρ`` is certified; ``λ_1(C) ≤ μ = ρ + r``
  is the index assumption for ``C``, accepted only when ``μ`` is not below a rigorous lower bound of
  ``λ_1(C)`` — the next Ritz value of the run that found the locked vectors (its Ritz vector is
  orthogonal to them). If something lies at or above the ``k``-th value it is locked too and the check
  repeats. Given ``μ``: ``λ_{p+1}(H) ≤ λ_1(C) ≤ μ`` for ``p`` locked vectors (interlacing), and for the
  locked values, grouped bottom-up into clusters ``c`` of values not separated from the bound ``γ_c``
  on what lies below them, Li & Li (Linear Algebra Appl. 395, 2005) give
  ``|λ_i − θ_i| ≤ 2ρ²/(η + √(η² + 4ρ²))`` — at most both Weinstein's ``ρ`` and Kato–Temple's ``ρ²/η``,
  the quadratic bound with a *located* gap — with ``ρ = ‖R_c‖₂`` (the cluster's residual block) and
  ``η = min_c θ − γ_c``, or Weyl's ``max(0, γ_c − θ_i) + ρ`` when ``η ≤ 0``. The first run converges to
  half the tolerance by Weinstein before the check: stopping it at the quadratic bound it expects would
  leave the locked residuals too large whenever the check finds a smaller gap, and a check can lock
  more vectors but not refine the locked ones (tried: a flat spectrum then spent its budget locking).
* ``λ_min`` (:func:`_min_certificate`): a separate three-vector Lanczos run on ``−H`` from a uniformly
  random start, bounded by Kuczyński–Woźniakowski itself — ``λ_min ∈ [value − error, value]`` with
  probability ``≥ 1 − min_failure`` (default ``10⁻³``), given ``λ_max ≤ θ_1 + e_1`` — so it needs no
  index assumption and no residual, but about ``(ln(1.648 √n / p)/√ε + 1)/2`` products for a width
  ``ε (λ_max − λ_min)``: ~70 at ``n = 2·10⁵``, ``min_tol = 10⁻²``, ~90 at ``n = 10⁹``. It replaces a
  Weinstein bound plus a deflation check on ``−H``, which both rest on residuals, and residuals are
  blind to the near-null space of a network's Hessian: with a tolerance relative to ``λ_max``, a
  vector in that space has a Ritz value ``≈ 0`` and a residual below the tolerance after two products.
  In SGD training of an MNIST ReLU MLP that certificate was violated at every warm estimate
  (reported ``λ_min`` off by ``2·10⁻³ λ_max`` with a bound of ``3·10⁻⁴ λ_max``; once ``≈ 0`` for a true
  ``−0.13``, ``0.019 λ_max`` off with ``min_tol = 10⁻²``).
* Power iteration: Weinstein's ``r = ‖Hv − ρv‖`` of the returned Rayleigh quotient (no extra product).

**Rounding floor.** Products in a floating-point type are exact only to about ``u ‖H‖`` per entry,
so residuals stall near ``~10 u ‖H‖`` (float32: ``~10⁻⁶ λ_max``). A run whose remaining residuals sit
below ``64 u ‖H‖`` (:func:`rounding_floor`) and have not halved in ``8`` products stops, unconverged,
with ``stop_reason="stagnated"`` instead of spending its budget.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]
DGKS = 1 / math.sqrt(2)
STALL_STEPS = 8
FLOOR_ULPS = 64
SMALL_N = 1024  # the λ_min run keeps (and reorthogonalises against) its basis up to this dimension
COARSE_MISS, COLD_INDEX_FAILURE = 0.1, 1e-2  # a cold top run: P[missing λ_1 by 10 % of the spread] ≤ 1 %


# ============================================================================ results
@dataclass(frozen=True)
class LanczosResult:
    """Certified extremal eigenvalues.

    Attributes:
        eigenvalues: the ``k`` largest Ritz values, descending (float64).
        eigenvectors: their Ritz vectors, shape ``[k, n]``.
        error_bounds: ``|λ_i − θ_i| ≤ error_bounds[i]`` given the index assumption (module
            docstring); ``θ_i ≤ λ_i`` always.
        lambda_min: an upper bound of ``λ_min`` (a Rayleigh quotient: ``≥ λ_min`` always), or ``None``
            if not requested.
        min_vector: ``None`` (kept for compatibility: the ``λ_min`` certificate needs no vector).
        lambda_min_error: ``λ_min ≥ lambda_min − lambda_min_error`` with probability ``≥ 1 − min_failure``
            (``inf`` if the top was not certified, which the bound needs).
        num_matvecs: operator products used.
        converged: every top-``k`` bound is within ``tol`` (relative to ``|θ_1|``).
        lambda_min_converged: the ``λ_min`` bound is within ``min_tol`` (``None`` if not requested).
        stop_reason: ``"converged"`` (everything requested is certified), ``"budget"``
            (``max_matvecs`` spent first) or ``"stagnated"`` (residuals stalled at the rounding floor
            of ``dtype`` above the tolerance).
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    error_bounds: Tensor
    lambda_min: float | None
    min_vector: Tensor | None
    lambda_min_error: float | None
    num_matvecs: int
    converged: bool
    lambda_min_converged: bool | None
    stop_reason: str = "converged"


def random_start_failure_bound(n: int, matvecs: int, rel_gap: float, random_weight: float | None = None) -> float:
    """Kuczyński–Woźniakowski (1992, Thm 4.2) bound on ``P[λ_1 − θ_1 ≥ rel_gap · (λ_1 − λ_n)]``.

    For Lanczos from a start uniformly distributed on the unit sphere of ``R^n`` after ``matvecs``
    products (shift-invariance turns their relative error for positive definite matrices into a
    fraction of the spread ``λ_1 − λ_n``): ``min(1, 1.648 √n e^{−(2k−1)√ε})``. For a warm start
    ``û + w g`` with a random unit ``g`` of weight ``random_weight = w`` the constant is multiplied
    by ``(1 + w)/w`` (module docstring).
    """
    if matvecs < 1 or rel_gap <= 0:
        return 1.0
    factor = 1.0 if random_weight is None else (1.0 + random_weight) / random_weight
    return min(1.0, factor * 1.648 * math.sqrt(n) * math.exp(-(2 * matvecs - 1) * math.sqrt(min(rel_gap, 1.0))))


def cold_start_matvecs(n: int, rel_gap: float = COARSE_MISS, failure: float = COLD_INDEX_FAILURE) -> int:
    """Products a run from a uniformly random start takes before it may stop: the fewest ``m`` with
    :func:`random_start_failure_bound` ``(n, m, rel_gap) ≤ failure`` (``n`` when the space is spanned
    first). Defaults: ``λ_1`` missed by ``0.1 (λ_1 − λ_n)`` with probability ``≤ 1 %`` — 18 products at
    ``n = 10⁵``, 22 at ``10⁷``, 25 at ``10⁹``."""
    m = math.ceil((math.log(1.648 * math.sqrt(n) / failure) / math.sqrt(rel_gap) + 1) / 2)
    return max(1, min(n, m))


def rounding_floor(dtype: torch.dtype) -> float:
    """Relative residual below which products in ``dtype`` stop being informative: ``64 u`` (float32:
    ``7.6·10⁻⁶``). Tolerances below it cannot be certified in that type."""
    return FLOOR_ULPS * torch.finfo(dtype).eps


# ============================================================================ vectors
class Rows:
    """Vectors of length ``n`` stored as the rows of blocks of at most ``BLOCK`` rows, allocated as needed.

    ``dots`` and ``subtract`` are one matrix–vector product per block (each stored vector is read once
    per pass), ``rotate`` replaces the rows by ``Sᵀ U`` in place, column chunk by column chunk, with
    one vector's worth of temporary.
    """

    BLOCK = 4

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, limit: int | None = None) -> None:
        self.n, self.dtype, self.device, self.limit = n, dtype, device, limit
        self._blocks: list[Tensor] = []
        self.size = 0

    @classmethod
    def wrap(cls, rows: Tensor) -> Rows:
        """An existing ``[p, n]`` tensor as one full block (not copied)."""
        out = cls(rows.shape[1], rows.dtype, rows.device)
        if rows.shape[0]:
            out._blocks, out.size = [rows], rows.shape[0]
        return out

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> Tensor:
        if not -self.size <= i < self.size:
            raise IndexError(i)
        return self._row(i % self.size)

    def _row(self, i: int) -> Tensor:
        for block in self._blocks:
            if i < block.shape[0]:
                return block[i]
            i -= block.shape[0]
        raise IndexError(i)

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(self.size))

    def _filled(self) -> Iterator[tuple[Tensor, int]]:
        """``(rows, first index)`` of every block holding rows."""
        start = 0
        for block in self._blocks:
            rows = min(block.shape[0], self.size - start)
            if rows <= 0:
                return
            yield block[:rows], start
            start += rows

    def append(self, v: Tensor) -> Tensor:
        """Copy ``v`` into the next row (allocating a block if full) and return that row."""
        capacity = sum(b.shape[0] for b in self._blocks)
        if self.size == capacity:
            room = self.BLOCK if self.limit is None else max(1, min(self.BLOCK, self.limit - capacity))
            self._blocks.append(torch.empty(room, self.n, dtype=self.dtype, device=self.device))
        row = self._row(self.size)
        row.copy_(v)
        self.size += 1
        return row

    def dots(self, w: Tensor) -> Tensor:
        """``U w`` (in the rows' type, on their device)."""
        return torch.cat([rows @ w for rows, _ in self._filled()])

    def subtract(self, w: Tensor, c: Tensor) -> None:
        """``w ← w − Uᵀ c`` in place."""
        for rows, start in self._filled():
            w.addmv_(rows.T, c[start : start + rows.shape[0]], alpha=-1.0)

    def rotate(self, S: Tensor) -> None:
        """Rows ``← Sᵀ U`` for ``S`` ``[size, p]`` (float64): keeps ``p`` rows, frees unneeded blocks."""
        m, p = S.shape
        if m != self.size:
            raise ValueError(f"rotation of {m} rows applied to {self.size}")
        S = S.to(dtype=self.dtype, device=self.device)
        filled = list(self._filled())
        width = max(1, -(-self.n // max(p, 1)))
        for c0 in range(0, self.n, width):
            c1 = min(self.n, c0 + width)
            acc = None
            for rows, start in filled:
                part = S[start : start + rows.shape[0]].T
                acc = part @ rows[:, c0:c1] if acc is None else acc.addmm_(part, rows[:, c0:c1])
            for rows, start in filled:
                if start < p:
                    r = min(rows.shape[0], p - start)
                    rows[:r, c0:c1].copy_(acc[start : start + r])
        self.size = p
        kept, total = [], 0
        for block in self._blocks:
            if total >= max(p, 1):
                break
            kept.append(block)
            total += block.shape[0]
        self._blocks = kept

    def take(self) -> Tensor:
        """The rows as one ``[size, n]`` tensor (the block itself when it holds exactly them); empties
        ``self``, freeing each block once copied."""
        if len(self._blocks) == 1 and self._blocks[0].shape[0] == self.size:
            out = self._blocks[0]
        else:
            out = torch.empty(self.size, self.n, dtype=self.dtype, device=self.device)
            start = 0
            while self._blocks:
                block = self._blocks.pop(0)
                rows = min(block.shape[0], self.size - start)
                if rows > 0:
                    out[start : start + rows].copy_(block[:rows])
                start += rows
                del block
        self._blocks, self.size = [], 0
        return out


def orthogonalize(w: Tensor, *bases: Rows) -> tuple[Tensor, float]:
    """Remove from ``w`` (in place) its components along the orthonormal rows of ``bases``.

    First a local pass against the two newest rows of the last basis — in a Lanczos recurrence
    ``Hq`` lies along them up to what the rounding and a restart left elsewhere — then classical
    Gram–Schmidt over every row, with a second pass when one left less than ``1/√2`` of ``‖w‖``
    (DGKS, measured from the local pass on). After the local pass the full pass removes only small
    components, so the second pass, which doubles the solver's reads of the basis, is rarely due.
    Returns the coefficients (all passes summed, float64 on the CPU) and the final norm.
    """
    bases = tuple(b for b in bases if len(b))
    if not bases:
        return torch.zeros(0, dtype=torch.float64), float(w.norm())
    total = torch.zeros(sum(len(b) for b in bases), dtype=torch.float64)
    last = bases[-1]
    for i in range(len(last) - min(2, len(last)), len(last)):
        c = float(last[i] @ w)
        w.add_(last[i], alpha=-c)
        total[len(total) - len(last) + i] += c
    norm = float(w.norm())
    for _ in range(2):
        cs = [b.dots(w) for b in bases]
        for b, c in zip(bases, cs):
            b.subtract(w, c)
        total += torch.cat(cs).to(device="cpu", dtype=torch.float64)
        new = float(w.norm())
        if new >= DGKS * norm:
            break
        norm = new
    return total, new


def _random_unit(n: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    where = device if generator is None else generator.device
    g = torch.randn(n, generator=generator, dtype=dtype, device=where).to(device)
    return g.div_(g.norm())


def start_vector(
    n: int,
    init: Tensor | Sequence[Tensor] | None,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    """Unit start vector: random, or ``normalise(û ± g)`` with ``û`` the normalised sum of the normalised
    rows of ``init`` (previous Ritz vectors: a ``[j, n]`` tensor, one vector or a list of them) and ``g``
    a random unit vector of equal weight, its sign chosen so that ``gᵀû ≥ 0`` (the two never cancel)."""
    v = _random_unit(n, generator, dtype, device)
    parts = [] if init is None else [init] if isinstance(init, Tensor) else list(init)
    if parts:
        warm = torch.zeros(n, dtype=dtype, device=device)
        for r in (row.to(device=device, dtype=dtype) for part in parts for row in part.reshape(-1, n)):
            warm.add_(r, alpha=1.0 / max(float(r.norm()), torch.finfo(dtype).tiny))
        norm = float(warm.norm())
        if norm > 1e-6:
            sign = 1.0 if float(torch.dot(v, warm)) >= 0 else -1.0
            v = warm.div_(norm).add_(v, alpha=sign)
    return v.div_(v.norm())


# ============================================================================ bounds
def _li_li(rho: float, eta: float) -> float:
    """Li & Li (2005): eigenvalues of ``[[A, E], [Eᵀ, C]]`` move from those of ``diag(A, C)`` by at most
    ``2ρ²/(η + √(η² + 4ρ²))`` for ``ρ = ‖E‖₂`` and a gap ``η`` between the spectra of ``A`` and ``C``."""
    if rho == 0.0:
        return 0.0
    if math.isinf(eta):
        return 0.0
    return 2.0 * rho * rho / (eta + math.sqrt(eta * eta + 4.0 * rho * rho))


def locked_bounds(theta: Tensor, gram: Tensor, mu: float) -> Tensor:
    """Bounds of locked Ritz values ``θ`` (descending) given ``λ_1(C) ≤ mu`` for the deflated operator ``C``.

    ``gram = RᵀR`` of their residual vectors ``R = (I − YYᵀ) H Y`` (``YᵀHY = diag θ``). Bottom-up, each
    value starts a cluster; it joins the cluster below when not above that cluster's upper bound.
    A cluster ``c`` over a compression whose top is ``≤ γ`` gets the Li–Li bound with
    ``ρ = ‖R_c‖₂`` and ``η = min θ_c − γ``, or Weyl's ``max(0, γ − θ_i) + ρ`` when ``η ≤ 0``; the
    cluster's top value plus its bound bounds the compression above it (module docstring).
    """
    p = theta.numel()
    bounds = torch.zeros(p, dtype=torch.float64)
    clusters: list[tuple[int, int, float]] = []  # (first, last, γ below), bottom-up
    for i in reversed(range(p)):
        gamma = mu if not clusters else float(theta[clusters[-1][0]] + bounds[clusters[-1][0]])
        last = i
        if clusters and float(theta[i]) <= gamma:
            _, last, gamma = clusters.pop()
        block = gram[i : last + 1, i : last + 1]
        rho = math.sqrt(max(float(torch.linalg.eigvalsh(block)[-1]), 0.0))
        eta = float(theta[last]) - gamma
        for j in range(i, last + 1):
            bounds[j] = _li_li(rho, eta) if eta > 0 else max(0.0, gamma - float(theta[j])) + rho
        clusters.append((i, last, gamma))
    return bounds


# ============================================================================ Krylov–Schur run
class _Budget:
    """Counts operator products against ``max_matvecs``."""

    def __init__(self, matvec: MatVec, limit: int, dtype: torch.dtype) -> None:
        self._matvec, self.limit, self.used, self._dtype = matvec, limit, 0, dtype

    @property
    def left(self) -> int:
        return self.limit - self.used

    def __call__(self, v: Tensor) -> Tensor:
        self.used += 1
        return self._matvec(v).to(self._dtype)


class KrylovSchur:
    """``H U = U T + q bᵀ`` on the orthogonal complement of ``locked`` (the deflated operator).

    Args:
        matvec: the operator.
        start: unit start vector (re-orthogonalised against ``locked``; not kept).
        locked: orthonormal vectors deflated out of every product (never modified).
        n: dimension.
        generator: random continuation after an invariant subspace.
        limit: basis size at which the caller restarts (sizes the blocks; not enforced here).
    """

    def __init__(
        self,
        matvec: MatVec,
        start: Tensor,
        locked: Sequence[Rows],
        n: int,
        generator: torch.Generator | None,
        limit: int | None = None,
    ) -> None:
        self.matvec, self.locked, self.n, self.generator = matvec, [r for r in locked if len(r)], n, generator
        self.U = Rows(n, start.dtype, start.device, limit)
        self.T = torch.zeros(0, 0, dtype=torch.float64)
        self.b = torch.zeros(0, dtype=torch.float64)
        self.dropped = 0.0  # sum of couplings set to zero at invariant subspaces (a backward error)
        self.scale = 0.0  # max ‖Hu‖ seen: a lower bound of ‖H‖
        self.eps = torch.finfo(start.dtype).eps
        self.products = 0  # since the start, restarts included
        self.invariant = False  # an invariant subspace was reached (its Ritz values are eigenvalues)
        self.q: Tensor | None = self._fresh(start)

    @property
    def slack(self) -> float:
        """Added to every bound: the dropped couplings plus a rounding allowance ``16 ε ‖H‖``."""
        return self.dropped + 16 * self.eps * self.scale

    @property
    def exhausted(self) -> bool:
        """The basis and the locked vectors span the whole space: every Ritz value is exact."""
        return self.q is None

    @property
    def deflated(self) -> int:
        """Dimensions deflated out by the locked vectors."""
        return sum(len(r) for r in self.locked)

    @property
    def _spanned(self) -> int:
        return self.deflated + len(self.U)

    def _fresh(self, v: Tensor) -> Tensor | None:
        """``v`` orthonormalised against the locked vectors and the basis; ``None`` if they span everything.

        A vector (almost) inside their span — a warm start on converged vectors — is replaced by a
        random one, whose expected remaining norm is ``√(1 − d/n)`` for ``d`` spanned dimensions.
        """
        for _ in range(4):
            spanned = self._spanned
            if spanned >= self.n:
                return None
            v = v.clone()
            _, norm = orthogonalize(v, *self.locked, self.U)
            if norm > 0.1 * math.sqrt(1 - spanned / self.n):
                return v.div_(norm)
            v = _random_unit(self.n, self.generator, v.dtype, v.device)
        return None

    def extend(self) -> None:
        """One product: append ``q`` to the basis."""
        u = self.U.append(self.q)
        self.q = None
        w = self.matvec(u)
        self.products += 1
        self.scale = max(self.scale, float(w.norm()))
        coeffs, beta = orthogonalize(w, *self.locked, self.U)
        coeffs = coeffs[sum(len(r) for r in self.locked) :]
        m = len(self.U) - 1
        T = torch.zeros(m + 1, m + 1, dtype=torch.float64)
        T[:m, :m] = self.T
        T[:m, m] = T[m, :m] = coeffs[:m]
        T[m, m] = coeffs[m]
        self.T = T
        self.b = torch.zeros(m + 1, dtype=torch.float64)
        if self._spanned >= self.n or beta <= 10 * self.eps * self.scale:
            self.dropped += beta
            self.invariant = True
            del w
            self.q = self._fresh(_random_unit(self.n, self.generator, u.dtype, u.device))
        else:
            self.b[m] = beta
            self.q = w.div_(beta)

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), eigenvectors of ``T`` and the signed residual couplings ``Sᵀb``."""
        theta, S = torch.linalg.eigh(self.T)
        return theta, S, S.T @ self.b

    def restart(self, S: Tensor, keep: list[int]) -> None:
        """Keep the Ritz vectors ``U S[:, keep]`` (thick restart): ``T = diag θ_keep``, ``b = (Sᵀb)_keep``."""
        theta = torch.diagonal(S.T @ self.T @ S)
        coupling = S.T @ self.b
        self.U.rotate(S[:, keep])
        self.T = torch.diag(theta[keep])
        self.b = coupling[keep]


class _Stall:
    """Detects residuals stuck at the rounding floor: every unmet residual is below ``64 u ‖H‖`` and the
    largest has not halved over the last ``STALL_STEPS`` products."""

    def __init__(self) -> None:
        self.history: list[float] = []

    def __call__(self, unmet: list[float], run: KrylovSchur) -> bool:
        worst = max(unmet) if unmet else 0.0
        self.history.append(worst)
        if not unmet or worst > FLOOR_ULPS * run.eps * run.scale or len(self.history) <= STALL_STEPS:
            return False
        return worst > 0.5 * self.history[-1 - STALL_STEPS]


# ============================================================================ locked set
class _Locked:
    """Locked Ritz vectors from successive runs; group ``g``: ``Ĥ_g Y_g = Y_g Θ_g + q_g b_gᵀ``.

    ``Ĥ_g`` is ``H`` deflated against the groups before ``g`` (its compression), so
    ``YᵀHY`` couples group ``g`` to a later group ``h`` by ``b_g (q_gᵀ Y_h)`` and the residual of
    ``Y`` is ``R = Σ_g (I − YYᵀ) q_g b_gᵀ`` (columns of group ``g``). The first group's rows are the
    caller's tensor (not copied): an accepted check rotates them in place.
    """

    def __init__(self, vectors: Tensor, values: Tensor, q: Tensor | None, b: Tensor) -> None:
        self.rows = Rows.wrap(vectors)
        self.values: list[float] = values.tolist()
        self.groups: list[tuple[int, Tensor | None, Tensor]] = [(0, q, b.to(torch.float64))]  # (first index, q_g, b_g)

    def add(self, vectors: Tensor, values: Tensor, q: Tensor | None, b: Tensor) -> None:
        self.groups.append((len(self.rows), q, b.to(torch.float64)))
        for v in vectors:
            self.rows.append(v)
        self.values += values.tolist()

    def rayleigh_ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """``YᵀHY = S diag(θ) Sᵀ`` (θ descending) and the Gram matrix of the rotated residuals ``R S``."""
        p = len(self.rows)
        A = torch.diag(torch.tensor(self.values, dtype=torch.float64))
        qs = [(start, q, b) for start, q, b in self.groups if q is not None]
        Yq = torch.stack([self.rows.dots(q).to(device="cpu", dtype=torch.float64) for _, q, _ in qs], dim=1) if qs else torch.zeros(p, 0, dtype=torch.float64)
        M = torch.zeros(len(qs), p, dtype=torch.float64)  # R = Σ_g (P q_g) M[g]
        for g, (start, q, b) in enumerate(qs):
            cols = slice(start, start + b.numel())
            M[g, cols] = b
            later = torch.arange(p) >= start + b.numel()
            coupling = torch.outer(b, Yq[later, g])  # b_g (q_gᵀ Y_h) for later h
            A[cols, later] = coupling
            A[later, cols] = coupling.T
        qq = torch.tensor([[float(torch.dot(qa, qb)) for _, qb, _ in qs] for _, qa, _ in qs], dtype=torch.float64).reshape(len(qs), len(qs))
        Pqq = qq - Yq.T @ Yq  # (P q_g)ᵀ(P q_h)
        gram = M.T @ Pqq @ M
        theta, S = torch.linalg.eigh(A)
        S = S.flip(1)
        return theta.flip(0), S, S.T @ gram @ S


# ============================================================================ λ_min
def _min_certificate(
    budget: _Budget,
    n: int,
    top: float,
    top_bound: float,
    upper: float,
    min_tol: float,
    failure: float,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[float, float, bool]:
    """``λ_min ∈ [value − error, value]`` with probability ``≥ 1 − failure``: Lanczos on ``−H`` from a
    uniformly random start, three-term recurrence (three vectors, no basis; for ``n ≤ 1024`` the basis is
    kept and fully reorthogonalised, so the run becomes exact after at most ``n`` products).

    After ``m`` products the top Ritz value ``ρ`` of ``−H`` satisfies, by Kuczyński–Woźniakowski applied
    to the positive semidefinite ``−H + λ_max I`` (Lanczos is shift invariant),
    ``λ_1(−H) − ρ ≤ ε_m (λ_1(−H) + λ_max)`` except with probability ``failure``, where
    ``ε_m = (ln(1.648 √n / failure) / (2m − 1))²``; with ``λ_max ≤ top_bound`` this gives
    ``−λ_min = λ_1(−H) ≤ μ = (ρ + ε_m top_bound)/(1 − ε_m)``. ``value = min(upper, −ρ)`` is a Rayleigh
    quotient (``λ_min ≤ value`` always) and ``error = value + μ`` plus a rounding allowance. The run
    stops once ``error ≤ min_tol · max(|top|, |value|)``; an invariant Krylov space (``β ≈ 0``) holds every eigenvalue the
    start touches — all of them, for a random start — and certifies ``ρ`` exactly. Without
    reorthogonalisation the top Ritz value converges no slower than in exact arithmetic (Greenbaum,
    Linear Algebra Appl. 113, 1989; Musco, Musco & Sidford, SODA 2018) and stays within ``O(m ε ‖H‖)``
    of the spectrum (Paige 1980), the allowance added to ``error``.
    """
    q = _random_unit(n, generator, dtype, device)
    q_prev: Tensor | None = None
    small = Rows(n, dtype, device) if n <= SMALL_N else None
    alphas: list[float] = []
    betas: list[float] = []
    log_term = math.log(1.648 * math.sqrt(n) / failure)
    eps, scale, value, error = torch.finfo(dtype).eps, 0.0, upper, math.inf
    while budget.left > 0:
        w = budget(q).neg_()  # (−H) q − β q_prev − α q: five passes over n per product
        if q_prev is not None:
            w.add_(q_prev, alpha=-betas[-1])
        alpha = float(torch.dot(q, w))
        w.add_(q, alpha=-alpha)
        beta = float(w.norm())
        if small is not None:  # full reorthogonalisation: after n products the space is all of R^n, exactly
            small.append(q)
            coeffs, beta = orthogonalize(w, small)
            alpha += float(coeffs[-1])
        elif q_prev is not None and beta <= 1e-6 * abs(alpha):  # near an invariant space: confirm by local reorthogonalisation
            for u in (q, q_prev):
                c = float(torch.dot(u, w))
                w.add_(u, alpha=-c)
                alpha += c if u is q else 0.0
            beta = float(w.norm())
        alphas.append(alpha)
        scale = max(scale, math.sqrt(alpha**2 + beta**2 + (betas[-1] ** 2 if betas else 0.0)))  # = ‖Hq‖ in exact arithmetic
        m = len(alphas)
        eps_m = (log_term / (2 * min(m, n) - 1)) ** 2
        rho = float(torch.linalg.eigvalsh(tridiagonal(alphas, betas))[-1])  # ≤ 0.4 ms at m = 100
        slack = 4 * m * eps * scale  # Paige: Ritz values of the computed T lie within O(m ε ‖H‖) of the spectrum's hull
        value = min(upper, -rho)
        invariant = beta <= 10 * eps * scale
        if invariant:
            error = max(0.0, value + rho) + slack
        elif eps_m < 1:
            error = value + (rho + eps_m * top_bound) / (1 - eps_m) + slack
        tol_abs = min_tol * max(abs(top), abs(value))
        if error <= tol_abs or invariant:
            break
        betas.append(beta)
        q_prev, q = q, w.div_(beta)
    return value, error, error <= min_tol * max(abs(top), abs(value))


# ============================================================================ driver
def _keep_for_restart(m: int, k: int, max_basis: int) -> list[int]:
    """Ritz indices (ascending order of θ) kept at a thick restart: the top ``max(k + 1, max_basis / 2)``."""
    keep = max(k + 1, max_basis // 2)
    return list(range(max(0, m - keep), m))


def default_max_basis(k: int) -> int:
    """``max(12, 2k + 8)``. Thick restarts keep half the basis, so the products depend little on its size
    (cold ``λ_max`` at 10⁶ parameters, random data: MLP 34–36 products for 10 to 20 vectors; the harder
    GPT-shaped LM 107/100/94/89 for 10/12/16/20), while memory and each Gram–Schmidt pass grow with it."""
    return max(12, 2 * k + 8)


def lanczos(
    matvec: MatVec,
    n: int,
    k: int = 1,
    *,
    want_min: bool = True,
    tol: float = 1e-3,
    min_tol: float | None = None,
    max_matvecs: int = 100,
    min_max_matvecs: int | None = None,
    min_failure: float = 1e-3,
    max_basis: int | None = None,
    check_index: bool | None = None,
    init: Tensor | Sequence[Tensor] | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LanczosResult:
    """Certified top-``k`` and smallest eigenvalues of a symmetric operator (module docstring).

    Args:
        matvec: ``v ↦ H v`` on flat vectors of length ``n``.
        n: dimension.
        k: number of largest (algebraic) eigenvalues wanted. For ``k ≥ 2`` a deflation check
            certifies the index (multiplicities, missed values).
        want_min: also certify the smallest eigenvalue (:func:`_min_certificate`: a separate run from a
            random start, bounded with probability ``≥ 1 − min_failure``).
        tol: the top-``k`` bounds must be ``≤ tol · |θ_1|`` (or ``tol · 10⁻³ max|θ|`` if larger).
        min_tol: the ``λ_min`` bound must be ``≤ min_tol · max(|θ_1|, |λ_min|)`` (default ``tol``).
        max_matvecs: budget of products of the top ``k`` (and of ``λ_min`` unless ``min_max_matvecs``);
            the result says what converged within it.
        min_max_matvecs: a separate budget of the ``λ_min`` run (default: what the top left of
            ``max_matvecs``).
        min_failure: probability that the ``λ_min`` bound fails (Kuczyński–Woźniakowski).
        max_basis: vectors of ``n`` the solver holds at most (basis, locked vectors and the top vectors;
            module docstring). Default :func:`default_max_basis`.
        check_index: run the deflation check of the top ``k``. Default: for ``k ≥ 2`` (a single start
            vector cannot see multiplicities); ``True`` also re-certifies ``λ_max`` for ``k = 1`` from a
            second random start.
        init: previous Ritz vectors (a ``[j, n]`` tensor, one vector, or a list of them) to warm-start
            the top from; a random part of equal weight is always added (the index guarantee needs it).
            The reference is dropped once the start vector is built, so a caller that passes its only
            reference frees those vectors before the first product.
        generator: of the random starts.
        dtype, device: of the Krylov vectors (products are cast to ``dtype``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0 < tol < 1 or (min_tol is not None and not 0 < min_tol < 1):
        raise ValueError(f"tol and min_tol must be in (0, 1), got {tol}, {min_tol}")
    if max_matvecs < k + 1:
        raise ValueError(f"max_matvecs must be at least k + 1 = {k + 1}, got {max_matvecs}")
    if not 0 < min_failure < 1:
        raise ValueError(f"min_failure must be in (0, 1), got {min_failure}")
    max_basis = default_max_basis(k) if max_basis is None else max_basis
    if max_basis < 2 * (k + 2):
        raise ValueError(f"max_basis must be at least 2 (k + 2) = {2 * (k + 2)}, got {max_basis}")
    check_top = k >= 2 if check_index is None else check_index
    min_tol = tol if min_tol is None else min_tol
    device = torch.device(device)
    budget = _Budget(matvec, max_matvecs, dtype)
    cold_min = cold_start_matvecs(n) if init is None else 1
    start = start_vector(n, init, generator, dtype, device)
    init = None  # noqa: F841  (frees the caller's warm vectors if this was the last reference)
    run = KrylovSchur(budget, start, [], n, generator, limit=max_basis)
    del start
    # before a check the first run aims at half the tolerance: a cluster found by the check adds residuals
    top_target = tol / 2 if check_top else tol
    top_ok, stall, reason = False, _Stall(), "budget"
    while not run.exhausted and budget.left > 0:
        run.extend()
        theta, S, coupling = run.ritz()
        m = theta.numel()
        top_scale = max(abs(float(theta[-1])), 1e-3 * float(theta.abs().max()))
        enough = (m >= min(k + 1, n) and (run.products >= cold_min or run.invariant)) or run.exhausted
        top_err = coupling[list(range(m - 1, m - 1 - min(k, m), -1))].abs() + run.slack
        within = m >= k and bool((top_err <= top_target * top_scale).all())
        top_ok = enough and within
        if top_ok:
            reason = "converged"
            break
        if not within and stall([float(top_err.max())], run):  # not: waiting for cold_start_matvecs
            reason = "stagnated"
            break
        if len(run.U) >= max_basis and not run.exhausted:
            run.restart(S, _keep_for_restart(m, k, max_basis))
    theta, S, coupling = run.ritz()
    m = theta.numel()
    kk = min(k, m)
    top_idx = list(range(m - 1, m - 1 - kk, -1))
    values, bounds = theta[top_idx], coupling[top_idx].abs() + run.slack
    top_tol_abs = tol * max(abs(float(theta[-1])), 1e-3 * float(theta.abs().max()))
    # a rigorous lower bound of the top of the deflated operator: the next Ritz value (orthogonal Ritz vector)
    top_lower = float(theta[m - 1 - kk]) if m > kk else -math.inf
    lowest, lowest_err = float(theta[0]), float(coupling[0].abs()) + run.slack
    q, exhausted, slack = run.q, run.exhausted, run.slack
    run.U.rotate(S[:, top_idx])
    vectors = run.U.take()  # the top k; an accepted check rotates them in place
    del run
    converged = top_ok and kk == k
    if converged and check_top and not exhausted:
        locked = _Locked(vectors, values, q, coupling[top_idx])
        verdict = _deflation_check(budget, budget, locked, k, top_tol_abs, slack, top_lower, n=n, generator=generator,
                                   dtype=dtype, device=device, limit=max_basis - 1)
        converged = verdict is not None
        if converged:
            values, bounds = verdict
        del locked
    del q
    lam_min = min_err = min_ok = None
    if want_min:
        lam_min, min_err, min_ok = lowest, math.inf, False
        if exhausted:  # the basis spanned the space: its Ritz values are the eigenvalues
            min_err, min_ok = lowest_err, lowest_err <= min_tol * max(abs(float(values[0])), abs(lowest))
        elif converged:
            if min_max_matvecs is not None:
                budget.limit = budget.used + min_max_matvecs
            top_bound = float(values[0] + bounds[0])
            lam_min, min_err, min_ok = _min_certificate(budget, n, float(values[0]), top_bound, lowest, min_tol, min_failure,
                                                        generator, dtype, device)
    if converged and (min_ok or not want_min):
        reason = "converged"
    elif reason == "converged":  # the top was certified; a check or λ_min ran out of products
        reason = "budget"
    return LanczosResult(
        eigenvalues=values,
        eigenvectors=vectors,
        error_bounds=bounds,
        lambda_min=lam_min,
        min_vector=None,
        lambda_min_error=min_err,
        num_matvecs=budget.used,
        converged=converged,
        lambda_min_converged=min_ok,
        stop_reason=reason,
    )


def _deflation_check(
    budget: _Budget,
    matvec: MatVec,
    locked: _Locked,
    k: int,
    tol_abs: float,
    dropped: float,
    lower: float,
    *,
    n: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
    limit: int,
) -> tuple[Tensor, Tensor] | None:
    """Certify the index of the locked top ``k`` by Lanczos on the deflated operator from random starts.

    Returns the certified ``(values, bounds)`` — the certified vectors are then the first ``k`` locked
    rows, rotated in place — or ``None`` when the budget ran out first. Each check runs until its top
    Ritz value ``ρ`` has a residual ``r ≤ tol_abs`` and ``μ = ρ + r`` is not below ``lower`` (a rigorous
    lower bound of ``λ_1(C)``), giving ``λ_1(C) ≤ μ`` (the index assumption for ``C``), and the locked
    values are certified by :func:`locked_bounds`. If that fails, the check's top vector is locked once
    its residual is within ``tol_abs / 2`` (it lies near or above the ``k``-th value: a multiplicity or a
    missed eigenvalue) and a new check starts, with the check's next Ritz value as its lower bound.
    ``limit`` caps the basis plus the locked rows.
    """
    while True:
        theta_l, S_l, gram = locked.rayleigh_ritz()
        basis = max(4, limit - len(locked.rows))
        run = KrylovSchur(matvec, _random_unit(n, generator, dtype, device), [locked.rows], n, generator, limit=basis)
        verdict = _check_round(run, budget, theta_l, gram, k, tol_abs, dropped, lower, basis)
        if verdict == "accept":
            bounds = locked_bounds(theta_l, gram, _check_mu(run, tol_abs, lower))[:k] + dropped + run.slack
            del run
            locked.rows.rotate(S_l[:, :k])
            return theta_l[:k], bounds
        if verdict == "fail":
            return None
        theta, S, coupling = run.ritz()
        top = theta.numel() - 1
        lower = float(theta[top - 1]) if top >= 1 else -math.inf
        b = torch.zeros(1, dtype=torch.float64) if run.exhausted else coupling[top : top + 1]
        q = run.q
        dropped += run.slack
        run.U.rotate(S[:, [top]])
        vector = run.U.take()
        del run
        locked.add(vector, theta[top : top + 1], q, b)


def _check_mu(run: KrylovSchur, tol_abs: float, lower: float) -> float:
    """``μ ≥ λ_1(C)`` from a check run: its top Ritz value plus bound (given the index assumption),
    ``−∞`` for an empty complement, ``+∞`` while the top value is not certified to ``tol_abs`` or
    ``μ`` is below the rigorous lower bound ``lower`` of ``λ_1(C)`` (the run has not reached the top) or
    the run (from a random start) has taken fewer than :func:`cold_start_matvecs` products."""
    if not len(run.U):
        return -math.inf if run.exhausted else math.inf
    theta, _, coupling = run.ritz()
    e = float(coupling[-1].abs()) + run.slack
    mu = float(theta[-1]) + e
    if run.exhausted:
        return mu
    if theta.numel() >= 2 and e <= tol_abs and mu >= lower and (run.invariant or run.products >= cold_start_matvecs(run.n - run.deflated)):
        return mu
    return math.inf


def _check_round(
    run: KrylovSchur,
    budget: _Budget,
    theta_l: Tensor,
    gram: Tensor,
    k: int,
    tol_abs: float,
    dropped: float,
    lower: float,
    max_basis: int,
) -> str:
    """Run one check until a verdict: ``"accept"`` (the locked top ``k`` are certified), ``"lock"``
    (lock the check's top vector) or ``"fail"`` (budget spent, stagnation, or nothing left to lock)."""
    stall = _Stall()
    while True:
        mu = _check_mu(run, tol_abs, lower)
        if mu < math.inf:
            bounds = locked_bounds(theta_l, gram, mu)[:k] + dropped + run.slack
            if bool((bounds <= tol_abs).all()):
                return "accept"
            if run.exhausted:
                return "lock" if len(run.U) else "fail"
            if abs(float(run.ritz()[2][-1])) <= tol_abs / 2:
                return "lock"
        if len(run.U):
            theta, S, coupling = run.ritz()
            if stall([float(coupling[-1].abs())], run):
                return "fail"
        if budget.left == 0 or run.exhausted:
            return "fail"
        if len(run.U) >= max_basis:
            theta, S, _ = run.ritz()
            run.restart(S, _keep_for_restart(theta.numel(), 1, max_basis))
        run.extend()


# ============================================================================ power iteration
@dataclass(frozen=True)
class PowerResult:
    """Dominant (largest-magnitude) eigenpair: ``eigenvalue`` may be negative.

    ``error_bound`` is the residual ``‖Hv − ρv‖`` of the returned pair: an eigenvalue lies within it
    of ``eigenvalue`` (Weinstein); that it is the dominant one rests on the random start.
    """

    eigenvalue: float
    eigenvector: Tensor
    num_matvecs: int
    converged: bool
    error_bound: float


def power_iteration(
    matvec: MatVec,
    n: int,
    *,
    tol: float = 1e-3,
    max_matvecs: int = 100,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> PowerResult:
    """Power iteration ``v ← Hv/‖Hv‖`` with Rayleigh quotient ``ρ = vᵀHv``.

    Converges to the eigenvalue of largest **magnitude** (von Mises 1929), at rate
    ``|λ_2/λ_1|`` per product; it is a baseline, not an estimator of the top eigenvalue.
    Stops when ``ρ`` changes by less than ``tol`` relative; returns ``ρ`` with its own vector and
    residual (no extra product: ``Hv`` is at hand).
    """
    if max_matvecs < 1:
        raise ValueError(f"max_matvecs must be >= 1, got {max_matvecs}")
    v = start_vector(n, init, generator, dtype, torch.device(device))
    previous = float("nan")
    for i in range(max_matvecs):
        w = matvec(v).to(dtype)
        rayleigh = float(torch.dot(w, v))
        residual = float((w - rayleigh * v).norm())
        converged = abs(rayleigh - previous) <= tol * abs(rayleigh) or residual == 0.0
        if converged or i == max_matvecs - 1:
            break
        previous = rayleigh
        v = w / w.norm()
    return PowerResult(rayleigh, v, i + 1, converged, residual)


def tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    """The symmetric tridiagonal ``T`` with diagonal ``alphas`` and off-diagonal ``betas`` (float64)."""
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas[: len(alphas) - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return T
