"""Symmetric alpha-stable fits: chaos_callbacks.dynamics.tails vs scipy.stats.levy_stable.fit.

For each alpha, draws n samples of S(alpha, 0, scale, 0) (scipy's sampler, fixed seed) and times
  * our McCulloch quantile fit on all n samples (median of --repeats runs), with its reported
    standard error of alpha (delta method),
  * our maximum-likelihood fit on all n samples (median of --mle-repeats runs, each from a cold
    density-table cache, so table construction is included), with its standard error (observed
    information),
  * our maximum-likelihood Student t fit (the finite-variance alternative of the Vuong test),
  * scipy.stats.levy_stable.fit with beta fixed at 0 on the first --scipy-n samples (one run in a
    worker process, abandoned after --scipy-timeout seconds; --skip-scipy leaves it out),
and prints |alpha_hat - alpha| of each, our MLE's error on the same --scipy-n subsample, and the
time ratios scipy / ours.

    python -m benchmarks.bench_tail_fit [--n 5000] [--scipy-n 200] [--scipy-timeout 600]
(from the repository root). scipy's fit takes 20-50 s per 200 points; --skip-scipy prints only our columns.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from collections.abc import Callable

import numpy as np
from scipy import stats

from chaos_callbacks.dynamics import tails


def median_seconds(fn: Callable[[], object], repeats: int, before: Callable[[], object]) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs, calling ``before`` untimed each time."""
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def scipy_fit_alpha(x: np.ndarray) -> tuple[float, float]:
    """(alpha_hat, seconds) of scipy's MLE with beta fixed at 0."""
    start = time.perf_counter()
    alpha_hat = stats.levy_stable.fit(x, f1=0.0)[0]
    return float(alpha_hat), time.perf_counter() - start


def scipy_fit_with_timeout(x: np.ndarray, timeout: float) -> tuple[float, float] | None:
    """``scipy_fit_alpha`` in a worker process; None when it runs past ``timeout`` seconds."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        pending = pool.apply_async(scipy_fit_alpha, (x,))
        try:
            return pending.get(timeout)
        except multiprocessing.TimeoutError:
            return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--alphas", type=float, nargs="+", default=[1.1, 1.5, 1.9])
    parser.add_argument("--n", type=int, default=5000, help="samples per fit (ours)")
    parser.add_argument("--scale", type=float, default=1e-3, help="scale of the samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=21, help="timing repeats, quantile fit")
    parser.add_argument("--mle-repeats", type=int, default=5, help="timing repeats, MLE fit")
    parser.add_argument("--scipy-n", type=int, default=200, help="subsample for scipy's fit")
    parser.add_argument("--scipy-timeout", type=float, default=600.0, help="seconds per fit")
    parser.add_argument("--skip-scipy", action="store_true", help="leave scipy's fit out")
    args = parser.parse_args()

    clear_tables = tails._log_density_table.cache_clear
    header = (
        f"{'alpha':>5} | {'quant ms':>8} {'|err|':>6} {'stderr':>6} | {'mle ms':>7} {'|err|':>6} {'stderr':>6} | {'t fit ms':>8} | "
        f"{'scipy n':>7} {'scipy s':>8} {'|err|':>6} {'mle@n |err|':>11} | "
        f"{'scipy/quant':>11} {'scipy/mle':>9}"
    )
    print(f"n = {args.n}, scale = {args.scale:g}, seed = {args.seed}")
    print(header)
    print("-" * len(header))
    for alpha in args.alphas:
        x = stats.levy_stable.rvs(alpha, 0.0, scale=args.scale, size=args.n, random_state=args.seed)
        quantile = tails.fit_symmetric_stable(x)
        t_quantile = median_seconds(lambda: tails.fit_symmetric_stable(x), args.repeats, int)
        mle = tails.fit_symmetric_stable(x, method="mle")
        t_mle = median_seconds(
            lambda: tails.fit_symmetric_stable(x, method="mle"), args.mle_repeats, clear_tables
        )
        t_student = median_seconds(lambda: tails.fit_student_t(x), args.repeats, int)
        row = (
            f"{alpha:5.2f} | {t_quantile * 1e3:8.3f} {abs(quantile.alpha - alpha):6.3f} {quantile.alpha_stderr:6.3f} | "
            f"{t_mle * 1e3:7.1f} {abs(mle.alpha - alpha):6.3f} {mle.alpha_stderr:6.3f} | {t_student * 1e3:8.2f} | "
        )
        subsample = x[: args.scipy_n]
        mle_sub = tails.fit_symmetric_stable(subsample, method="mle")
        result = None if args.skip_scipy else scipy_fit_with_timeout(subsample, args.scipy_timeout)
        if result is None:
            skipped = "skipped" if args.skip_scipy else f">{args.scipy_timeout:g}"
            row += f"{args.scipy_n:7d} {skipped:>8} {'-':>6} {abs(mle_sub.alpha - alpha):11.3f} |"
        else:
            alpha_scipy, t_scipy = result
            row += (
                f"{args.scipy_n:7d} {t_scipy:8.2f} {abs(alpha_scipy - alpha):6.3f} "
                f"{abs(mle_sub.alpha - alpha):11.3f} | "
                f"{t_scipy / t_quantile:11.0f} {t_scipy / t_mle:9.0f}"
            )
        print(row, flush=True)


if __name__ == "__main__":
    main()
