"""λ_max by the Lyapunov map (Sasdelli et al., OpenReview 37Fh1MiR5Ze) vs Lanczos, on exact spectra.

For each closed-form spectrum and seed, runs to the same relative tolerance

* ``lanczos(k=1, want_min=False)``: the same question as the map (λ_max only);
* ``lanczos(k=1, want_min=True, min_tol=1e-2)``: what ``HessianSpectrumMonitor`` runs by default;
* ``lyapunov_map_lambda_max`` with its default (adaptive) ascent rate;

under the monitor's default budget (100 products) and a large one, and prints the products used
by converged runs (median and max), the worst relative error ``|λ̂ − λ_max| / |λ_max|`` over all
runs and over converged runs, and how many converged runs kept their claim (error ≤ tol · |λ_max|).

Operators are ``diag(λ)``: the random Gaussian start vector is rotation invariant, so a diagonal
operator behaves in distribution exactly as ``Q diag(λ) Qᵀ`` for any orthogonal ``Q`` (the tests
use conjugated matrices). Spectra, ``n`` = ``--n`` unless stated:

* gap 10→9: ``[10, 9]`` above a bulk uniform on ``[−1, 5]`` — easy for both;
* negative −50: ``[1, 0.9, −50]`` and a bulk uniform on ``[−1, 0.8]``: any ascent rate under which
  λ_max's multiplier dominates is ≲ 1/50, so the map's rate is ≈ (50 + 0.9)/(50 + 1) per product;
* negative −50, n = 7: the filed spectrum ``[−50, −1, 0.1, 0.2, 0.3, 0.9, 1]``;
* clustered top: ``[10, 9.99, 9.98, 9.97, 9.96]`` above a bulk uniform on ``[0, 5]``: a top cluster
  wider than ``tol · λ_max`` (1e-3 · 10), whose lower members either method may certify;
* flat bulk: ``linspace(0, 1, n)`` — no gap at the top.

    python -m benchmarks.bench_lyapunov_map [--n 1000] [--seeds 5] [--tol 1e-3] [--budget 3000]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable

import torch

from chaos_callbacks.curvature import lanczos, lyapunov_map_lambda_max

Spectrum = Callable[[int, torch.Generator], torch.Tensor]
Solver = Callable[[Callable, int, float, int, torch.Generator], tuple[float, int, bool]]


def _uniform(n: int, low: float, high: float, g: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=g, dtype=torch.float64)


def _with(top: list[float], bulk: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.tensor(top, dtype=torch.float64), bulk])


SPECTRA: dict[str, tuple[Spectrum, int | None]] = {
    "gap 10→9": (lambda n, g: _with([10.0, 9.0], _uniform(n - 2, -1.0, 5.0, g)), None),
    "negative −50": (lambda n, g: _with([1.0, 0.9, -50.0], _uniform(n - 3, -1.0, 0.8, g)), None),
    "negative −50 (filed, n=7)": (lambda n, g: torch.tensor([-50.0, -1, 0.1, 0.2, 0.3, 0.9, 1]).double(), 7),
    "clustered top": (lambda n, g: _with([10.0, 9.99, 9.98, 9.97, 9.96], _uniform(n - 5, 0.0, 5.0, g)), None),
    "flat bulk": (lambda n, g: torch.linspace(0.0, 1.0, n, dtype=torch.float64), None),
}


def _lanczos(want_min: bool) -> Solver:
    def solve(matvec, n, tol, budget, g):
        r = lanczos(matvec, n, k=1, want_min=want_min, tol=tol, min_tol=1e-2, max_matvecs=budget,
                    dtype=torch.float64, generator=g)  # fmt: skip
        return float(r.eigenvalues[0]), r.num_matvecs, r.converged

    return solve


def _lyapunov(matvec, n, tol, budget, g):
    r = lyapunov_map_lambda_max(matvec, n, tol=tol, max_matvecs=budget, dtype=torch.float64, generator=g)
    return r.lambda_max, r.num_matvecs, r.converged


SOLVERS: dict[str, Solver] = {
    "Lanczos (λ_max only)": _lanczos(False),
    "Lanczos (+ λ_min, monitor default)": _lanczos(True),
    "Lyapunov map": _lyapunov,
}


def _row(spectrum: str, solver: str, budget: int, tol: float, runs: list[tuple[float, int, bool]]) -> list[str]:
    converged = [(err, hv) for err, hv, ok in runs if ok]
    hvps = [hv for _, hv in converged]
    kept = sum(err <= tol for err, _ in converged)
    return [
        spectrum,
        solver,
        str(budget),
        f"{len(converged)}/{len(runs)}",
        f"{statistics.median(hvps):.0f} ({max(hvps)})" if hvps else "–",
        f"{max(err for err, _, _ in runs):.1e}",
        f"{max(err for err, _ in converged):.1e}" if converged else "–",
        f"{kept}/{len(converged)}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1000, help="dimension of the spectra")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-3, help="relative tolerance of every solver")
    parser.add_argument("--budget", type=int, default=3000, help="the large budget (the other is 100)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    headers = ["spectrum", "method", "budget", "converged", "HVPs to tol: median (max)",
               "worst rel. error", "worst rel. error, converged", "claim kept (err ≤ tol)"]  # fmt: skip
    rows = []
    for name, (spectrum, fixed_n) in SPECTRA.items():
        n = fixed_n or args.n
        for solver_name, solve in SOLVERS.items():
            for budget in (100, args.budget):
                runs = []
                for seed in range(args.seeds):
                    evals = spectrum(n, torch.Generator().manual_seed(1000 + seed))
                    lam = float(evals.max())
                    est, hvps, ok = solve(lambda v: evals * v, n, args.tol, budget, torch.Generator().manual_seed(seed))
                    runs.append((abs(est - lam) / abs(lam), hvps, ok))
                rows.append(_row(name, solver_name, budget, args.tol, runs))
    print(f"λ_max to rel. tol {args.tol}, n = {args.n}, {args.seeds} seeds (float64)\n")
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("---" for _ in headers) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
