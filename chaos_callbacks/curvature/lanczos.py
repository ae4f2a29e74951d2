"""Certified extremal eigenvalues of a symmetric operator: restarted Lanczos with locking, power iteration.

**Krylov–Schur Lanczos.** An orthonormal basis ``U`` of a Krylov space, a small symmetric
``T = UᵀHU`` and a unit vector ``q ⊥ U`` satisfy ``H U = U T + q bᵀ`` (Stewart, SIAM J. Matrix Anal.
Appl. 23, 2001). Each step appends ``q`` and one product ``Hq``, orthogonalised against the basis
twice (modified Gram–Schmidt, "twice is enough", Giraud et al. 2005). With ``T = S Θ Sᵀ`` the Ritz pairs
``(θ_i, U s_i)`` have *exact* residuals ``r_i = ‖H U s_i − θ_i U s_i‖ = |(Sᵀb)_i|``. When the basis
reaches ``max_basis`` vectors it is restarted on its top and bottom Ritz vectors (thick restart,
Wu & Simon 2000), which keeps the relation — memory stays at ``max_basis`` + a few vectors of ``n``,
allocated as needed. An invariant subspace (``‖b‖ = 0``, e.g. a zero Hessian) continues from a
random vector orthogonal to the basis.

**What is rigorous and what is probabilistic.**

* Rigorous for any start (up to the rounding of the products): the residuals above; Cauchy
  interlacing — the ``i``-th largest Ritz value from any subspace is ``θ_i ≤ λ_i`` and the smallest
  is ``θ_min ≥ λ_min``; Krylov–Weinstein — *some* eigenvalue lies within ``r_i`` of ``θ_i``.
* Probabilistic (the *index*): that the eigenvalue near ``θ_i`` is the ``i``-th largest. A Krylov
  space from a start with a random component finds the extreme distinct eigenvalues first; it can
  still miss one whose component in the start is tiny, and a single start vector never sees a
  multiplicity. For the top eigenvalue Kuczyński & Woźniakowski (SIAM J. Matrix Anal. Appl. 13, 1992,
  Thm 4.2) bound the failure over a uniformly random start: after ``k`` products
  ``P[λ_1 − θ_1 ≥ ε (λ_1 − λ_n)] ≤ 1.648 √n e^{−(2k−1)√ε}`` (:func:`random_start_failure_bound`).
  It is a worst case over spectra and vacuous at ``ε = 10⁻³`` for practical ``k``
  (``n = 10⁶``, ``k = 30``: ``≥ 1``), but not for coarse misses: ``P[λ_1 > θ_1 + 0.1 (λ_1 − λ_n)]
  ≤ 1.648·10³·e^{−59·0.316} ≈ 1.3·10⁻⁵``. A warm start keeps a random part of equal weight
  (:func:`start_vector`): the warm part only shifts the start's component along an eigenvector
  away from a centred Gaussian, which by Anderson's inequality cannot make a small component more
  likely, so the guarantee is essentially that of a random start.

**Certificates.** Every bound below is rigorous *given* the index assumption it names.

* One Krylov space (``λ_max`` for ``k = 1``, and ``λ_min``): Weinstein's ``e_i = r_i``. Assumption:
  the eigenvalue within ``r_i`` of ``θ_i`` is ``λ_i``; with ``θ_i ≤ λ_i`` this gives
  ``λ_i ∈ [θ_i, θ_i + r_i]``. Kato–Temple's ``r²/gap`` is not used here: its gap would be measured to
  the next Ritz value, which while unconverged may lie below an eigenvalue the space has not resolved
  (seen in training: ``λ_2`` inside the assumed gap, the bound 2.4× too small).
* Top ``k ≥ 2``, and ``λ_min`` (*deflation check*, ``check_index``): once the top ``k`` are
  certified they are locked, and Lanczos runs on the deflated operator (the compression ``C`` of
  ``H`` to their orthogonal complement) from a fresh random vector until its top value ``ρ`` is
  certified; ``λ_1(C) ≤ μ = ρ + r`` is the assumption (probabilistic as above). If something lies at
  or above the ``k``-th value it is locked too and the check repeats. Given ``μ``:
  ``λ_{p+1}(H) ≤ λ_1(C) ≤ μ`` for ``p`` locked vectors (interlacing), and for the locked values,
  grouped bottom-up into clusters ``c`` of values not separated from the bound ``γ_c`` on what lies
  below them, Li & Li (Linear Algebra Appl. 395, 2005) give ``|λ_i − θ_i| ≤ 2ρ²/(η + √(η² + 4ρ²))``
  with ``ρ = ‖R_c‖₂`` (the cluster's residual block) and ``η = min_c θ − γ_c``, or Weyl's
  ``max(0, γ_c − θ_i) + ρ`` when ``η ≤ 0``. ``λ_min`` gets the same check on ``−H``. The index then
  rests on two independent random starts instead of one.
* Power iteration: Weinstein's ``r = ‖Hv − ρv‖`` of the returned Rayleigh quotient (no extra product).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

MatVec = Callable[[Tensor], Tensor]


# ============================================================================ results
@dataclass(frozen=True)
class LanczosResult:
    """Certified extremal eigenvalues.

    Attributes:
        eigenvalues: the ``k`` largest Ritz values, descending (float64).
        eigenvectors: their Ritz vectors, shape ``[k, n]``.
        error_bounds: ``|λ_i − θ_i| ≤ error_bounds[i]`` given the index assumption (module
            docstring); ``θ_i ≤ λ_i`` always.
        lambda_min: the smallest Ritz value (``≥ λ_min`` always), or ``None`` if not requested.
        min_vector: its Ritz vector.
        lambda_min_error: its bound, like ``error_bounds``.
        num_matvecs: operator products used.
        converged: every top-``k`` bound is within ``tol`` (relative to ``|θ_1|``).
        lambda_min_converged: the ``λ_min`` bound is within ``min_tol`` (``None`` if not requested).
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


def random_start_failure_bound(n: int, matvecs: int, rel_gap: float) -> float:
    """Kuczyński–Woźniakowski (1992, Thm 4.2) bound on ``P[λ_1 − θ_1 ≥ rel_gap · (λ_1 − λ_n)]``.

    For Lanczos from a start uniformly distributed on the unit sphere of ``R^n`` after ``matvecs``
    products (shift-invariance turns their relative error for positive definite matrices into a
    fraction of the spread ``λ_1 − λ_n``): ``min(1, 1.648 √n e^{−(2k−1)√ε})``.
    """
    if matvecs < 1 or rel_gap <= 0:
        return 1.0
    return min(1.0, 1.648 * math.sqrt(n) * math.exp(-(2 * matvecs - 1) * math.sqrt(min(rel_gap, 1.0))))


# ============================================================================ vectors
def orthogonalize(w: Tensor, basis: Sequence[Tensor]) -> Tensor:
    """Remove from ``w`` (in place) its components along orthonormal ``basis``; return the coefficients.

    Modified Gram–Schmidt applied twice, vector by vector (no stacking of the basis); the
    coefficients of both passes are summed in float64.
    """
    if not basis:
        return torch.zeros(0, dtype=torch.float64)
    passes = []
    for _ in range(2):
        cs = []
        for u in basis:
            c = torch.dot(u, w)
            w.addcmul_(u, c, value=-1.0)
            cs.append(c)
        passes.append(torch.stack(cs))
    return (passes[0].double() + passes[1].double()).cpu()


def _rotate(vectors: list[Tensor], S: Tensor) -> list[Tensor]:
    """``vectors @ S`` for ``S`` ``[m, p]`` with orthonormal columns, in place with one temporary vector.

    ``S = QR`` with ``Q = H_1 ⋯ H_p`` (Householder, ``torch.geqrf``) and ``R[:p, :p] = diag(±1)``;
    ``U ← U H_j`` is ``u_i −= τ_j v_{j,i} (U v_j)``. Returns the ``p`` rotated vectors; the rest are dropped.
    """
    m, p = S.shape
    a, tau = torch.geqrf(S.to(torch.float64))
    for j in range(p):
        v = a[:, j].clone()
        v[:j] = 0.0
        v[j] = 1.0
        s = torch.zeros_like(vectors[0])
        for i in range(j, m):
            s.add_(vectors[i], alpha=float(v[i]))
        for i in range(j, m):
            vectors[i].sub_(s, alpha=float(tau[j] * v[i]))
    out = vectors[:p]
    for j in range(p):
        if a[j, j] < 0:
            out[j].neg_()
    del vectors[p:]
    return out


def _random_unit(n: int, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device) -> Tensor:
    g = torch.randn(n, generator=generator, dtype=torch.float64, device="cpu" if generator is None else generator.device)
    return (g / g.norm()).to(device=device, dtype=dtype)


def start_vector(
    n: int, init: Tensor | None, generator: torch.Generator | None, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """Unit start vector: random, or ``normalise(û ± g)`` with ``û`` the normalised sum of the normalised
    rows of ``init`` (previous Ritz vectors) and ``g`` a random unit vector of equal weight, its sign
    chosen so that ``gᵀû ≥ 0`` (the two never cancel)."""
    v = _random_unit(n, generator, dtype, device)
    if init is not None:
        init = init.reshape(-1, n).to(device=device, dtype=dtype)
        warm = (init / init.norm(dim=1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)).sum(dim=0)
        if float(warm.norm()) > 1e-6:
            warm = warm / warm.norm()
            v = warm + (v if float(torch.dot(v, warm)) >= 0 else -v)
    return v / v.norm()


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
        start: unit start vector (re-orthogonalised against ``locked``).
        locked: orthonormal vectors deflated out of every product (never modified).
        n: dimension.
        generator: random continuation after an invariant subspace.
    """

    def __init__(self, matvec: MatVec, start: Tensor, locked: Sequence[Tensor], n: int, generator: torch.Generator | None) -> None:
        self.matvec, self.locked, self.n, self.generator = matvec, list(locked), n, generator
        self.U: list[Tensor] = []
        self.T = torch.zeros(0, 0, dtype=torch.float64)
        self.b = torch.zeros(0, dtype=torch.float64)
        self.dropped = 0.0  # sum of couplings set to zero at invariant subspaces (a backward error)
        self.scale = 0.0  # max ‖Hu‖ seen: a lower bound of ‖H‖
        self.q: Tensor | None = self._fresh(start)

    @property
    def slack(self) -> float:
        """Added to every bound: the dropped couplings plus a rounding allowance ``16 ε ‖H‖``."""
        eps = torch.finfo(self.U[0].dtype).eps if self.U else 0.0
        return self.dropped + 16 * eps * self.scale

    @property
    def exhausted(self) -> bool:
        """The basis and the locked vectors span the whole space: every Ritz value is exact."""
        return self.q is None

    def _fresh(self, v: Tensor) -> Tensor | None:
        """``v`` orthonormalised against the locked vectors and the basis; ``None`` if they span everything.

        A vector (almost) inside their span — a warm start on converged vectors — is replaced by a
        random one, whose expected remaining norm is ``√(1 − d/n)`` for ``d`` spanned dimensions.
        """
        spanned = len(self.locked) + len(self.U)
        for _ in range(4):
            if spanned >= self.n:
                return None
            v = v.clone()
            orthogonalize(v, self.locked + self.U)
            norm = float(v.norm())
            if norm > 0.1 * math.sqrt(1 - spanned / self.n):
                return v / norm
            v = _random_unit(self.n, self.generator, v.dtype, v.device)
        return None

    def extend(self) -> None:
        """One product: append ``q`` to the basis."""
        u = self.q
        w = self.matvec(u)
        self.scale = max(self.scale, float(w.norm()))
        coeffs = orthogonalize(w, self.locked + self.U + [u])[len(self.locked) :]
        m = len(self.U)
        T = torch.zeros(m + 1, m + 1, dtype=torch.float64)
        T[:m, :m] = self.T
        T[:m, m] = T[m, :m] = coeffs[:m]
        T[m, m] = coeffs[m]
        self.T = T
        self.U.append(u)
        beta = float(w.norm())
        self.b = torch.zeros(m + 1, dtype=torch.float64)
        if len(self.locked) + len(self.U) >= self.n or beta <= 10 * torch.finfo(w.dtype).eps * self.scale:
            self.dropped += beta
            self.q = self._fresh(_random_unit(self.n, self.generator, w.dtype, w.device))
        else:
            self.b[m] = beta
            self.q = w / beta

    def ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """Ritz values (ascending), eigenvectors of ``T`` and the signed residual couplings ``Sᵀb``."""
        theta, S = torch.linalg.eigh(self.T)
        return theta, S, S.T @ self.b

    def restart(self, S: Tensor, keep: list[int]) -> None:
        """Keep the Ritz vectors ``U S[:, keep]`` (thick restart): ``T = diag θ_keep``, ``b = (Sᵀb)_keep``."""
        theta = torch.diagonal(S.T @ self.T @ S)
        coupling = S.T @ self.b
        self.U = _rotate(self.U, S[:, keep])
        self.T = torch.diag(theta[keep])
        self.b = coupling[keep]


# ============================================================================ locked set
@dataclass
class _Locked:
    """Locked Ritz vectors from successive runs; group ``g``: ``Ĥ_g Y_g = Y_g Θ_g + q_g b_gᵀ``.

    ``Ĥ_g`` is ``H`` deflated against the groups before ``g`` (its compression), so
    ``YᵀHY`` couples group ``g`` to a later group ``h`` by ``b_g (q_gᵀ Y_h)`` and the residual of
    ``Y`` is ``R = Σ_g (I − YYᵀ) q_g b_gᵀ`` (columns of group ``g``).
    """

    vectors: list[Tensor] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    groups: list[tuple[int, Tensor | None, Tensor]] = field(default_factory=list)  # (first index, q_g, b_g)

    def add(self, vectors: list[Tensor], values: Tensor, q: Tensor | None, b: Tensor) -> None:
        self.groups.append((len(self.vectors), q, b.to(torch.float64)))
        self.vectors += vectors
        self.values += values.tolist()

    def rayleigh_ritz(self) -> tuple[Tensor, Tensor, Tensor]:
        """``YᵀHY = S diag(θ) Sᵀ`` (θ descending) and the Gram matrix of the rotated residuals ``R S``."""
        p = len(self.vectors)
        A = torch.diag(torch.tensor(self.values, dtype=torch.float64))
        qs = [(start, q, b) for start, q, b in self.groups if q is not None]
        # dots of every q_g with the locked vectors and with each other
        Yq = torch.tensor([[float(torch.dot(y, q)) for _, q, _ in qs] for y in self.vectors], dtype=torch.float64).reshape(p, len(qs))
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


# ============================================================================ driver
def _keep_for_restart(m: int, k: int, want_min: bool, max_basis: int) -> list[int]:
    """Ritz indices (ascending order of θ) kept at a thick restart: the top and, if wanted, the bottom."""
    keep = max(k + 1, max_basis // 2)
    bottom = max(1, keep // 3) if want_min else 0
    top = keep - bottom
    return sorted(set(range(bottom)) | set(range(m - top, m)))


def lanczos(
    matvec: MatVec,
    n: int,
    k: int = 1,
    *,
    want_min: bool = True,
    tol: float = 1e-3,
    min_tol: float | None = None,
    max_matvecs: int = 100,
    max_basis: int | None = None,
    check_index: bool | None = None,
    init: Tensor | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> LanczosResult:
    """Certified top-``k`` and smallest eigenpairs of a symmetric operator (module docstring).

    Args:
        matvec: ``v ↦ H v`` on flat vectors of length ``n``.
        n: dimension.
        k: number of largest (algebraic) eigenvalues wanted. For ``k ≥ 2`` a deflation check
            certifies the index (multiplicities, missed values).
        want_min: also certify the smallest eigenvalue.
        tol: the top-``k`` bounds must be ``≤ tol · |θ_1|`` (or ``tol · 10⁻³ max|θ|`` if larger).
        min_tol: the ``λ_min`` bound must be ``≤ min_tol · max|θ|`` (default ``tol``).
        max_matvecs: budget of products; the result says what converged within it.
        max_basis: Krylov vectors kept in memory before a thick restart (default
            ``max(20, 2k + 10)``); peak memory is about ``max_basis + 3`` vectors of ``n`` (plus the
            ``k`` locked ones during a deflation check).
        check_index: run the deflation checks of the top ``k`` and of ``λ_min``. Default: the top
            for ``k ≥ 2`` (a single start vector cannot see multiplicities), ``λ_min`` always (a single
            start misses the bottom of a dense bulk: 11 of 240 estimates in SGD training of a tanh MLP
            were a gap off, up to 2.7× ``min_tol``; none with the check, at ~2.3× the products).
            ``True`` also re-certifies ``λ_max`` for ``k = 1`` from a second random start.
        init: previous Ritz vectors ``[j, n]`` (or one vector) to warm-start from; a random part of
            equal weight is always added (the index guarantee needs it).
        generator: of the random start and deflation checks.
        dtype, device: of the Krylov vectors (products are cast to ``dtype``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if not 0 < tol < 1 or (min_tol is not None and not 0 < min_tol < 1):
        raise ValueError(f"tol and min_tol must be in (0, 1), got {tol}, {min_tol}")
    if max_matvecs < k + 1:
        raise ValueError(f"max_matvecs must be at least k + 1 = {k + 1}, got {max_matvecs}")
    max_basis = max(20, 2 * k + 10) if max_basis is None else max_basis
    if max_basis < 2 * (k + 2):
        raise ValueError(f"max_basis must be at least 2 (k + 2) = {2 * (k + 2)}, got {max_basis}")
    check_top = k >= 2 if check_index is None else check_index
    check_min = want_min and (True if check_index is None else check_index)
    min_tol = tol if min_tol is None else min_tol
    device = torch.device(device)
    budget = _Budget(matvec, max_matvecs, dtype)
    # before a check the first run aims at half the tolerance: a cluster found by the check adds residuals
    top_target = tol / 2 if check_top else tol
    min_target = min_tol / 2 if check_min else min_tol
    run = KrylovSchur(budget, start_vector(n, init, generator, dtype, device), [], n, generator)
    top_ok = min_ok = False
    while not run.exhausted and budget.left > 0:
        run.extend()
        theta, S, coupling = run.ritz()
        m = theta.numel()
        top_scale = max(abs(float(theta[-1])), 1e-3 * float(theta.abs().max()))
        enough = m >= min(k + 1, n) or run.exhausted
        top_ok = enough and m >= k and bool((coupling.flip(0).abs()[:k] + run.slack <= top_target * top_scale).all())
        min_ok = (enough and m >= 2 or run.exhausted) and float(coupling[0].abs()) + run.slack <= min_target * float(theta.abs().max())
        if top_ok and (min_ok or not want_min):
            break
        if len(run.U) >= max_basis and not run.exhausted:
            run.restart(S, _keep_for_restart(m, k, want_min, max_basis))
    theta, S, coupling = run.ritz()
    m = theta.numel()
    kk = min(k, m)
    top_idx = list(range(m - 1, m - 1 - kk, -1))
    values, bounds = theta[top_idx], coupling[top_idx].abs() + run.slack
    top_tol_abs = tol * max(abs(float(theta[-1])), 1e-3 * float(theta.abs().max()))
    min_tol_abs = min_tol * float(theta.abs().max())
    lam_min = min_vec = min_err = None
    if want_min:
        lam_min, min_err = float(theta[0]), float(coupling[0].abs()) + run.slack
    cols = top_idx + ([0] if want_min and 0 not in top_idx else [])
    q, exhausted, slack, min_coupling = run.q, run.exhausted, run.slack, coupling[[0]]
    vectors = _rotate(run.U, S[:, cols])
    del run
    if want_min:
        min_vec = vectors[-1] if 0 not in top_idx else vectors[top_idx.index(0)].clone()
    top_vectors = vectors[:kk]
    converged = top_ok and kk == k
    checks = dict(n=n, generator=generator, dtype=dtype, device=device, max_basis=max_basis)
    if converged and check_top and not exhausted:
        locked = _Locked()
        locked.add(top_vectors, values, q, coupling[top_idx])
        verdict = _deflation_check(budget, budget, locked, k, top_tol_abs, slack, **checks)
        converged = verdict is not None
        if converged:
            values, top_vectors, bounds = verdict
        else:
            top_vectors = locked.vectors[:k]
    if min_ok and check_min and not exhausted and 0 not in top_idx:
        # the same check on −H certifies that nothing lies below λ_min
        locked = _Locked()
        locked.add([min_vec], torch.tensor([-lam_min], dtype=torch.float64), q, -min_coupling)
        verdict = _deflation_check(budget, lambda v: -budget(v), locked, 1, min_tol_abs, slack, **checks)
        min_ok = verdict is not None
        if min_ok:
            lam_min, min_err, min_vec = -float(verdict[0][0]), float(verdict[2][0]), verdict[1][0]
    return LanczosResult(
        eigenvalues=values,
        eigenvectors=torch.stack(top_vectors) if top_vectors else torch.zeros(0, n, dtype=dtype, device=device),
        error_bounds=bounds,
        lambda_min=lam_min,
        min_vector=min_vec,
        lambda_min_error=min_err,
        num_matvecs=budget.used,
        converged=converged,
        lambda_min_converged=min_ok if want_min else None,
    )


def _deflation_check(
    budget: _Budget,
    matvec: MatVec,
    locked: _Locked,
    k: int,
    tol_abs: float,
    dropped: float,
    *,
    n: int,
    generator: torch.Generator | None,
    dtype: torch.dtype,
    device: torch.device,
    max_basis: int,
) -> tuple[Tensor, list[Tensor], Tensor] | None:
    """Certify the index of the locked top ``k`` by Lanczos on the deflated operator from random starts.

    Returns the certified ``(values, vectors, bounds)``, or ``None`` when the budget ran out first.
    Each check runs until its top Ritz value ``ρ`` has a residual ``r ≤ tol_abs``, giving
    ``λ_1(C) ≤ μ = ρ + r`` (the index assumption for ``C``), and the locked values are certified by :func:`locked_bounds`. If that
    fails, the check's top vector is locked once its residual is within ``tol_abs / 2`` (it lies near
    or above the ``k``-th value: a multiplicity or a missed eigenvalue) and a new check starts.
    """
    while True:
        theta_l, S_l, gram = locked.rayleigh_ritz()
        run = KrylovSchur(matvec, _random_unit(n, generator, dtype, device), locked.vectors, n, generator)
        verdict = _check_round(run, budget, theta_l, gram, k, tol_abs, dropped, max_basis)
        if verdict == "accept":
            bounds = locked_bounds(theta_l, gram, _check_mu(run, tol_abs))[:k] + dropped + run.slack
            return theta_l[:k], _rotate(list(locked.vectors), S_l[:, :k]), bounds
        if verdict == "fail":
            return None
        theta, S, coupling = run.ritz()
        top = theta.numel() - 1
        b = torch.zeros(1) if run.exhausted else coupling[top : top + 1]
        q = run.q
        dropped += run.slack
        locked.add(_rotate(run.U, S[:, [top]]), theta[top : top + 1], q, b)


def _check_mu(run: KrylovSchur, tol_abs: float) -> float:
    """``μ ≥ λ_1(C)`` from a check run: its top Ritz value plus bound (given the index assumption),
    ``−∞`` for an empty complement, ``+∞`` while the top value is not certified to ``tol_abs``."""
    if not run.U:
        return -math.inf if run.exhausted else math.inf
    theta, _, coupling = run.ritz()
    e = float(coupling[-1].abs()) + run.slack
    if run.exhausted or (theta.numel() >= 2 and e <= tol_abs):
        return float(theta[-1]) + e
    return math.inf


def _check_round(
    run: KrylovSchur, budget: _Budget, theta_l: Tensor, gram: Tensor, k: int, tol_abs: float, dropped: float, max_basis: int
) -> str:
    """Run one check until a verdict: ``"accept"`` (the locked top ``k`` are certified), ``"lock"``
    (lock the check's top vector) or ``"fail"`` (budget spent, or nothing left to lock)."""
    while True:
        mu = _check_mu(run, tol_abs)
        if mu < math.inf:
            bounds = locked_bounds(theta_l, gram, mu)[:k] + dropped + run.slack
            if bool((bounds <= tol_abs).all()):
                return "accept"
            if run.exhausted:
                return "lock" if run.U else "fail"
            if abs(float(run.ritz()[2][-1])) <= tol_abs / 2:
                return "lock"
        if budget.left == 0:
            return "fail"
        if len(run.U) >= max_basis:
            theta, S, _ = run.ritz()
            run.restart(S, _keep_for_restart(theta.numel(), 1, False, max_basis))
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
