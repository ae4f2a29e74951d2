"""Does noisy gradient descent on a fractal 2-D landscape diffuse super → sub and find the global minimum?

Chen, Qu & Gong, "Anomalous diffusion dynamics of learning in deep neural networks" (arXiv
2009.10588) find that SGD on deep networks is superdiffusive early in training and subdiffusive
late, attribute this to fractal-like regions of the loss landscape, and "further develop a simple
model to demonstrate the mechanistic role of the fractal-like loss landscape in enabling the SGD to
effectively find global minima" (abstract). The simple model is a walker on a 2-D landscape,

    x_{t+1} = x_t − η ∇L(x_t) + σ ξ_t,   ξ_t ~ N(0, I₂),   η = 0.02,  σ = 0.01,

with L a diamond-square (random midpoint displacement) fractal, compared with controls.

Only the abstract of the paper could be read here, so the model's details come from the authors'
released code (github.com/ifgovh/Anomalous-diffusion-dynamics-of-SGD, ``post_analysis/
toy_fractal_model.m``, ``simplified_SGD_model.m``, ``fractal_landscape_generator.m``), which states:

* η = 0.02, σ = 0.01, 1000 steps, every walker starting at the corner (−1, −1) of [−1, 1]²;
* a (2¹⁰ + 1)² diamond-square grid (``--levels 10``), corners 0, uniform displacements
  (u − ½)·3 whose amplitude halves at every level, i.e. Hurst exponent H = 1 (``--hurst 1``;
  displacement std ∝ 2^{−H·level}); the first level's std 3/√12 ≈ 0.866 is ``--amplitude``;
* heights below −0.1 set to −0.1 (``--plateau``: a flat high-loss plateau, about 45 % of the area);
* L = 10 − z, linearly (bilinearly) interpolated; steps that leave the square are redrawn;
* controls: a Gaussian well 10 − 10·exp(−|x|²/2) ("convex") and a shuffled, Gaussian-smoothed copy
  of the fractal.

Choices made here: Gaussian rather than uniform displacements (same std); L = max z − z, so every
global minimum is 0 (a constant shift of the authors' 10 − z); the gradient is the exact gradient of
the bilinear interpolant; steps leaving the square are reflected at its edges (redrawing the noise is
undefined when the drift alone leaves the square); the generator's cosmetic clamp of the border to
≤ 0 is left out; ``--landscapes 8`` independent fractals (the authors drew one of a stored set per
walker) with the walkers dealt round-robin; 256 walkers. The controls follow this project's brief:
"smooth" is the same clipped height field Gaussian-smoothed with ``--smooth-sigma 32`` grid cells
and "convex" a quadratic bowl R·|x|²/2, both rescaled to each fractal's loss range R.

Measured with ``chaos_callbacks.dynamics.diffusion``, per landscape: the ensemble mean of the
time-averaged MSD(τ) (lags up to a quarter of the window) in an early and a late window
(``--window`` steps each) and over the whole run, its exponent α and two-regime fit (α_s, α_l,
crossover τ₀); the fraction of walkers whose own early-window MSD has α > 1 (the authors showed
single trajectories); the median over walkers of the path Hurst exponent from MSL(Δr) ∝ Δr^{2H}
and of the path fractal dimension d_f; the landscape's own Hurst exponent from its structure
function; the fraction of walkers ending within ``--radius`` of the global minimum and with a
final loss within ``--loss-tol`` of the range above it; and the final mean loss over the range.

Outputs in ``--out`` (default ``reproductions/results/fractal_landscape/``): ``fractal_landscape.md``
(the printed table), ``fractal_landscape.csv`` (all fits), ``fractal_landscape_msd.csv`` (the MSD
curves), ``landscapes.png`` and ``msd.png``.

Run from the repository root: ``.venv/bin/python -m reproductions.fractal_landscape``
(26 s wall, 19 s of it in ``main``, with the defaults on one thread of a shared 2-core CPU).

Result with the defaults (seeds 0 and 1, and with ``--hurst 0.5`` and/or ``--plateau=-inf``): the
fractal walkers are subdiffusive early and late (ensemble α ≈ 0.25–0.85, at most 10 % of walkers
with an early α > 1) and end within 0.1 of the global minimum no more often than on the smooth
control (0–20 % against 12–25 %); super → sub appears in the bowl (ballistic descent, then
confinement) every time and on the smooth control once (seed 1), never on the fractal.
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402

from chaos_callbacks.dynamics.diffusion import (  # noqa: E402
    fit_diffusion_exponent,
    fit_two_regime,
    log_spaced_lags,
    mean_squared_loss_vs_distance,
    time_averaged_msd,
    trajectory_fractal_dimension,
)
from reproductions.common import RESULTS, emit, markdown_table  # noqa: E402

LR = 0.02
NOISE = 0.01
AUTHORS_AMPLITUDE = 3.0 / math.sqrt(12.0)
DEFAULT_OUT = RESULTS / "fractal_landscape"
NUM_LAGS = 20
WINDOWS = ("early", "late", "whole")


# ----------------------------------------------------------------------------- landscapes
def _neighbour_mean(z: np.ndarray, rows: np.ndarray, cols: np.ndarray, half: int) -> np.ndarray:
    """Mean of the up/down/left/right neighbours at distance ``half`` of the points rows × cols,
    over those inside the grid (3 on the border, 4 inside)."""
    padded = np.pad(z, half, constant_values=np.nan)
    shifts = ((-half, 0), (half, 0), (0, -half), (0, half))
    values = [padded[np.ix_(rows + half + dr, cols + half + dc)] for dr, dc in shifts]
    return np.nanmean(values, axis=0)


def diamond_square(n_levels: int, hurst: float, seed: int | Sequence[int]) -> np.ndarray:
    """A (2^n + 1)² diamond-square height field with corners 0 (Fournier, Fussell & Carpenter 1982).

    At level ℓ = 0 … n − 1 the squares have side s = 2^{n−ℓ}; the diamond step sets each square's
    centre to the mean of its 4 corners plus a displacement, the square step each edge midpoint to
    the mean of its 3–4 neighbours at distance s/2 plus a displacement. Displacements are
    N(0, σ_ℓ²) with σ_ℓ = 2^{−H·ℓ}, so the structure function E[(z(x + r) − z(x))²] grows as
    r^{2H} (fractional-Brownian-like surface of fractal dimension 3 − H for 0 < H < 1).
    """
    rng = np.random.default_rng(seed)
    size = 2**n_levels + 1
    z = np.zeros((size, size))
    for level in range(n_levels):
        step = 2 ** (n_levels - level)
        half = step // 2
        sd = 2.0 ** (-hurst * level)
        corners = z[:-1:step, :-1:step] + z[step::step, :-1:step] + z[:-1:step, step::step] + z[step::step, step::step]
        z[half::step, half::step] = corners / 4 + sd * rng.standard_normal(corners.shape)
        on, off = np.arange(0, size, step), np.arange(half, size, step)
        across, down = _neighbour_mean(z, on, off, half), _neighbour_mean(z, off, on, half)
        z[np.ix_(on, off)] = across + sd * rng.standard_normal(across.shape)
        z[np.ix_(off, on)] = down + sd * rng.standard_normal(down.shape)
    return z


def structure_function(field: np.ndarray, lags: Sequence[int]) -> np.ndarray:
    """S(r) = ½ (mean (z[i + r, j] − z[i, j])² + mean (z[i, j + r] − z[i, j])²) per lag r (cells)."""
    return np.array([(np.mean((field[r:] - field[:-r]) ** 2) + np.mean((field[:, r:] - field[:, :-r]) ** 2)) / 2 for r in lags])


def field_hurst(field: np.ndarray) -> float:
    """Hurst exponent of a height field: half the log-log slope of S(r) over r = 2, 4, …, size/8."""
    lags = 2 ** np.arange(1, max(int(math.log2(field.shape[0] - 1)) - 2, 3))
    return fit_diffusion_exponent(lags, structure_function(field, lags)) / 2


@dataclass(frozen=True)
class Landscape:
    """Loss grids on [−1, 1]², one per instance, each with global minimum 0.

    ``grids[k, i, j]`` is L_k(−1 + i·h, −1 + j·h), h = 2 / (size − 1); walker w lives on instance
    ``which[w]``. Between nodes L is the bilinear interpolant.
    """

    name: str
    grids: np.ndarray

    @property
    def spacing(self) -> float:
        return 2.0 / (self.grids.shape[-1] - 1)

    @property
    def ranges(self) -> np.ndarray:
        """max L per instance (its minimum is 0)."""
        return self.grids.max(axis=(1, 2))

    def minima(self) -> np.ndarray:
        """[instances, 2] positions of each instance's global minimum (its lowest node)."""
        size = self.grids.shape[-1]
        flat = self.grids.reshape(len(self.grids), -1).argmin(axis=1)
        return np.stack(np.unravel_index(flat, (size, size)), axis=1) * self.spacing - 1.0

    def evaluate(self, pos: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bilinear loss and its exact gradient at positions ``pos`` [W, 2] on instances ``which`` [W].

        With cell (i, j), fractions (f, g) ∈ [0, 1)² and corner values v_ab = L[i + a, j + b]:
            L = (1−f)(1−g) v00 + f(1−g) v10 + (1−f) g v01 + f g v11,
            ∂L/∂x = ((1−g)(v10 − v00) + g(v11 − v01)) / h,  ∂L/∂y = ((1−f)(v01 − v00) + f(v11 − v10)) / h.
        """
        h = self.spacing
        u = (pos + 1.0) / h
        cell = np.clip(np.floor(u).astype(np.int64), 0, self.grids.shape[-1] - 2)
        f, g = (u - cell).T
        i, j = cell.T
        v00, v10 = self.grids[which, i, j], self.grids[which, i + 1, j]
        v01, v11 = self.grids[which, i, j + 1], self.grids[which, i + 1, j + 1]
        loss = (1 - f) * (1 - g) * v00 + f * (1 - g) * v10 + (1 - f) * g * v01 + f * g * v11
        grad_x = ((1 - g) * (v10 - v00) + g * (v11 - v01)) / h
        grad_y = ((1 - f) * (v01 - v00) + f * (v11 - v10)) / h
        return loss, np.stack([grad_x, grad_y], axis=1)


def _loss_from_heights(heights: np.ndarray, ranges: np.ndarray | None = None) -> np.ndarray:
    """L = max z − z per instance (global minimum 0), rescaled to ``ranges`` when given."""
    loss = heights.max(axis=(1, 2), keepdims=True) - heights
    if ranges is None:
        return loss
    return loss * (ranges / loss.max(axis=(1, 2)))[:, None, None]


def fractal_heights(levels: int, hurst: float, amplitude: float, plateau: float, count: int, seed: int) -> np.ndarray:
    """``count`` diamond-square fields ·``amplitude``, clipped from below at ``plateau`` (a flat
    high-loss plateau, as in the authors' generator)."""
    fields = np.stack([diamond_square(levels, hurst, [seed, k]) for k in range(count)])
    return np.maximum(amplitude * fields, plateau)


def bowl_grids(ranges: np.ndarray, size: int) -> np.ndarray:
    """Quadratic bowls L_k = R_k (x² + y²) / 2 on the grid: range R_k (at the corners), minimum 0 at 0."""
    u = np.linspace(-1.0, 1.0, size)
    return ranges[:, None, None] * ((u[:, None] ** 2 + u[None, :] ** 2) / 2)[None]


def build_landscapes(heights: np.ndarray, smooth_sigma: float) -> list[Landscape]:
    """The fractal, its Gaussian-smoothed copy and the bowl, all with the fractal's loss ranges."""
    fractal = _loss_from_heights(heights)
    ranges = fractal.max(axis=(1, 2))
    smoothed = np.stack([gaussian_filter(z, smooth_sigma) for z in heights])
    return [
        Landscape("fractal", fractal),
        Landscape("smooth", _loss_from_heights(smoothed, ranges)),
        Landscape("convex", bowl_grids(ranges, heights.shape[-1])),
    ]


# ----------------------------------------------------------------------------- dynamics
def reflect(pos: np.ndarray) -> np.ndarray:
    """Fold positions back into [−1, 1] by mirror reflection at the edges (any overshoot)."""
    folded = np.mod(pos + 1.0, 4.0)
    return np.where(folded > 2.0, 4.0 - folded, folded) - 1.0


def simulate(
    landscape: Landscape,
    start: Sequence[float],
    steps: int,
    walkers: int,
    rng: np.random.Generator,
    lr: float = LR,
    noise: float = NOISE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Run x ← reflect(x − η ∇L(x) + σ ξ), ξ ~ N(0, I₂), for all walkers at once.

    Walker w lives on instance w mod (number of instances). Returns positions [steps + 1, W, 2],
    losses [steps + 1, W] and the instance of each walker [W].
    """
    which = np.arange(walkers) % len(landscape.grids)
    positions = np.empty((steps + 1, walkers, 2))
    losses = np.empty((steps + 1, walkers))
    positions[0] = np.asarray(start, dtype=np.float64)
    for t in range(steps):
        losses[t], grad = landscape.evaluate(positions[t], which)
        positions[t + 1] = reflect(positions[t] - lr * grad + noise * rng.standard_normal((walkers, 2)))
    losses[steps] = landscape.evaluate(positions[steps], which)[0]
    return positions, losses, which


# ----------------------------------------------------------------------------- analysis
@dataclass(frozen=True)
class WindowFit:
    """Ensemble-mean time-averaged MSD of one window and its power-law fits."""

    lags: np.ndarray
    msd: np.ndarray
    alpha: float
    alpha_short: float
    alpha_long: float
    crossover: float


def ensemble_msd(positions: np.ndarray, num_lags: int = NUM_LAGS) -> WindowFit:
    """Mean over walkers of the time-averaged MSD of a window [T, W, 2], lags 1 … T/4.

    The walkers are stacked as the columns of one [T, 2W] trajectory, so
    ``time_averaged_msd`` sums ||Δx||² over all walkers; dividing by W gives the ensemble mean.
    """
    steps, walkers, _ = positions.shape
    lags = log_spaced_lags(max(steps // 4, 3) + 1, num_lags)
    msd = time_averaged_msd(positions.reshape(steps, -1), lags) / walkers
    return WindowFit(lags, msd, fit_diffusion_exponent(lags, msd), *fit_two_regime(lags, msd))


def window_bounds(total: int, window: int) -> dict[str, tuple[int, int]]:
    """Index ranges of the early, late and whole windows of ``total`` recorded positions."""
    return {"early": (0, window), "late": (total - window, total), "whole": (0, total)}


def path_statistics(positions: np.ndarray, losses: np.ndarray, lags: np.ndarray, seed: int) -> tuple[float, float]:
    """Median over walkers of the path Hurst exponent (MSL ∝ Δr^{2H}) and fractal dimension d_f."""
    hurst = [mean_squared_loss_vs_distance(positions[:, w], losses[:, w], rng=seed)[2] for w in range(positions.shape[1])]
    dims = [trajectory_fractal_dimension(positions[:, w], lags) for w in range(positions.shape[1])]
    return float(np.nanmedian(hurst)), float(np.median(dims))


def walker_exponents(positions: np.ndarray, lags: np.ndarray) -> np.ndarray:
    """MSD exponent α of each walker's own time-averaged MSD over a window [T, W, 2]."""
    return np.array([fit_diffusion_exponent(lags, time_averaged_msd(positions[:, w], lags)) for w in range(positions.shape[1])])


def trend(early: float, late: float) -> str:
    """'super → sub' etc.: the diffusion regime (α > 1 super, α < 1 sub) early and late."""
    return " → ".join("super" if a > 1 else "sub" for a in (early, late))


@dataclass(frozen=True)
class Summary:
    """Everything reported for one landscape."""

    name: str
    fits: dict[str, WindowFit]
    field_hurst: float
    path_hurst: float
    fractal_dim: float
    super_early: float
    near_minimum: float
    low_loss: float
    start_loss: float
    final_loss: float


def summarise(landscape: Landscape, positions: np.ndarray, losses: np.ndarray, which: np.ndarray, args: argparse.Namespace) -> Summary:
    """Diffusion fits per window, path statistics and success at the global minimum."""
    bounds = window_bounds(len(positions), args.window)
    fits = {name: ensemble_msd(positions[lo:hi]) for name, (lo, hi) in bounds.items()}
    path_hurst, fractal_dim = path_statistics(positions, losses, fits["whole"].lags, args.seed)
    ranges = landscape.ranges[which]
    distance = np.linalg.norm(positions[-1] - landscape.minima()[which], axis=1)
    return Summary(
        name=landscape.name,
        fits=fits,
        field_hurst=float(np.median([field_hurst(g) for g in landscape.grids])),
        path_hurst=path_hurst,
        fractal_dim=fractal_dim,
        super_early=float(np.mean(walker_exponents(positions[: args.window], fits["early"].lags) > 1)),
        near_minimum=float(np.mean(distance < args.radius)),
        low_loss=float(np.mean(losses[-1] < args.loss_tol * ranges)),
        start_loss=float(np.mean(losses[0] / ranges)),
        final_loss=float(np.mean(losses[-1] / ranges)),
    )


# ----------------------------------------------------------------------------- reporting
TABLE_HEADERS = [
    "landscape", "H field", "H path (MSL)", "α early", "α late", "over training", "walkers α early > 1", "α_s whole", "α_l whole", "τ₀",
    "d_f", "ends at global min", "final L < tol", "L/R start", "L/R final",
]


def table_row(s: Summary) -> list[object]:
    early, late, whole = (s.fits[w] for w in WINDOWS)
    return [
        s.name, s.field_hurst, s.path_hurst if s.path_hurst <= 1 else f"{s.path_hurst:.2f} (> 1: not a Hurst exponent)", early.alpha, late.alpha, trend(early.alpha, late.alpha), s.super_early,
        whole.alpha_short, whole.alpha_long, whole.crossover, s.fractal_dim, s.near_minimum, s.low_loss,
        s.start_loss, s.final_loss,
    ]


def write_csv(summaries: list[Summary], out: Path) -> None:
    """``fractal_landscape.csv`` (one row per landscape, all fits) and ``fractal_landscape_msd.csv``."""
    fields = ["alpha", "alpha_short", "alpha_long", "crossover"]
    with open(out / "fractal_landscape.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(
            ["landscape", "field_hurst", "path_hurst", "fractal_dim", "super_early", "near_minimum", "low_loss", "start_loss", "final_loss"]
            + [f"{w}_{f}" for w in WINDOWS for f in fields]
        )
        for s in summaries:
            writer.writerow(
                [s.name, s.field_hurst, s.path_hurst, s.fractal_dim, s.super_early, s.near_minimum, s.low_loss, s.start_loss, s.final_loss]
                + [getattr(s.fits[w], f) for w in WINDOWS for f in fields]
            )
    with open(out / "fractal_landscape_msd.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["landscape", "window", "lag", "msd"])
        for s in summaries:
            for w in WINDOWS:
                writer.writerows([s.name, w, int(lag), m] for lag, m in zip(s.fits[w].lags, s.fits[w].msd))


def plot_landscapes(landscapes: list[Landscape], runs: list[np.ndarray], start: Sequence[float], shown: int, out: Path) -> None:
    """Instance 0 of each landscape with ``shown`` of its walkers' trajectories."""
    fig, axes = plt.subplots(1, len(landscapes), figsize=(5 * len(landscapes), 4.6))
    for ax, landscape, positions in zip(axes, landscapes, runs):
        image = ax.imshow(landscape.grids[0].T, origin="lower", extent=(-1, 1, -1, 1), cmap="viridis")
        fig.colorbar(image, ax=ax, fraction=0.046, label="loss")
        step = len(landscape.grids)
        for w in range(0, min(shown * step, positions.shape[1]), step):
            ax.plot(*positions[:, w].T, lw=0.6)
            ax.plot(*positions[-1, w], "o", ms=3, color="white", mec="black")
        ax.plot(*start, "rx", ms=8, label="start")
        ax.plot(*landscape.minima()[0], "r*", ms=12, label="global min")
        ax.set_title(landscape.name)
        ax.set_xlabel("x")
        ax.set_ylabel("y")
    axes[0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "landscapes.png", dpi=120)
    plt.close(fig)


def plot_msd(summaries: list[Summary], out: Path) -> None:
    """MSD(τ) log-log per landscape and window, with a slope-1 (Brownian) reference line."""
    fig, axes = plt.subplots(1, len(summaries), figsize=(5 * len(summaries), 4.2), sharey=True)
    for ax, s in zip(axes, summaries):
        for w in WINDOWS:
            fit = s.fits[w]
            ax.loglog(fit.lags, fit.msd, "o-", ms=3, label=f"{w} (α = {fit.alpha:.2f})")
        whole = s.fits["whole"]
        ax.loglog(whole.lags, whole.msd[0] * whole.lags / whole.lags[0], "k--", lw=0.8, label="slope 1")
        ax.set_title(s.name)
        ax.set_xlabel("lag τ (steps)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("MSD(τ)")
    fig.tight_layout()
    fig.savefig(out / "msd.png", dpi=120)
    plt.close(fig)


# ----------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="steps per walker (authors: 1000)")
    parser.add_argument("--walkers", type=int, default=256)
    parser.add_argument("--landscapes", type=int, default=8, help="independent fractal instances")
    parser.add_argument("--levels", type=int, default=10, help="grid (2^levels + 1)² (authors: 10)")
    parser.add_argument("--hurst", type=float, default=1.0, help="displacement std ∝ 2^(−H·level) (authors: 1)")
    parser.add_argument("--amplitude", type=float, default=AUTHORS_AMPLITUDE, help="first displacement std")
    parser.add_argument("--plateau", type=float, default=-0.1, help="heights below are clipped (authors: −0.1; '--plateau=-inf' disables)")
    parser.add_argument("--smooth-sigma", type=float, default=32.0, help="Gaussian smoothing of the control, grid cells")
    parser.add_argument("--lr", type=float, default=LR)
    parser.add_argument("--noise", type=float, default=NOISE)
    parser.add_argument("--start", type=float, nargs=2, default=[-1.0, -1.0], help="start of every walker (authors: −1 −1)")
    parser.add_argument("--window", type=int, default=None, help="steps in the early/late windows (default steps/4)")
    parser.add_argument("--radius", type=float, default=0.1, help="'at the global minimum' distance")
    parser.add_argument("--loss-tol", type=float, default=0.05, help="'low loss' threshold, fraction of the range")
    parser.add_argument("--shown", type=int, default=5, help="trajectories drawn per landscape")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    args.window = args.window or max((args.steps + 1) // 4, 12)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    heights = fractal_heights(args.levels, args.hurst, args.amplitude, args.plateau, args.landscapes, args.seed)
    landscapes = build_landscapes(heights, args.smooth_sigma)
    streams = np.random.SeedSequence(args.seed).spawn(len(landscapes))
    runs, summaries = [], []
    for landscape, stream in zip(landscapes, streams):
        positions, losses, which = simulate(
            landscape, args.start, args.steps, args.walkers, np.random.default_rng(stream), args.lr, args.noise
        )
        runs.append(positions)
        summaries.append(summarise(landscape, positions, losses, which, args))
    plot_landscapes(landscapes, runs, args.start, args.shown, args.out)
    plot_msd(summaries, args.out)
    write_csv(summaries, args.out)
    lines: list[str] = []
    emit(
        f"x ← x − {args.lr}·∇L + {args.noise}·ξ, {args.walkers} walkers × {args.steps} steps from {tuple(args.start)}, "
        f"{args.landscapes} landscapes of {2**args.levels + 1}² (H = {args.hurst}, amplitude {args.amplitude:.3g}, "
        f"plateau {args.plateau}), smooth σ = {args.smooth_sigma} cells, windows of {args.window} steps, seed {args.seed}\n",
        lines,
    )
    emit(markdown_table(TABLE_HEADERS, [table_row(s) for s in summaries]), lines)
    emit(
        f"\nα: MSD exponent over lags ≤ window/4; α_s, α_l, τ₀: two-regime fit over the whole run; 'ends at global min': "
        f"final distance < {args.radius}; 'final L < tol': final loss < {args.loss_tol} of the range R; "
        f"{time.perf_counter() - started:.1f} s",
        lines,
    )
    (args.out / "fractal_landscape.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
