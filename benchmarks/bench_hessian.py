"""Hessian spectrum estimators side by side: chaos_callbacks vs PyHessian, hessian-eigenthings, curvlinops.

Same models, same batch, one process. For each model:

* ground truth in float64: a converged Lanczos (tol 1e-10) on our operator, cross-checked with
  scipy ``eigsh`` (tanh MLP), or the dense Hessian built column by column and ``eigvalsh`` (BN CNN);
  the exact trace from the closed-form Hessian diagonal (one-hidden-layer tanh MLP) or the dense
  Hessian (CNN);
* λ_max to 1e-3 relative error: HVPs and time ratio (vs our cold Lanczos with the monitor's default
  settings). Tools with a tolerance are run at tol=1e-3 and, if that is not accurate enough, swept
  to tighter tolerances; tools without one are swept over their iteration count;
* top-5: error, and whether a negative eigenvalue (not among the five largest) was returned;
* trace: relative error vs HVPs; spectral density: HVPs and quality (CNN: Wasserstein-1 to the
  true spectrum);
* warm start: our Lanczos refreshed from the previous Ritz vectors after a few SGD steps;
* whether each tool changed model state (params, BN buffers, .grad, train/eval mode, global RNG).

Everything runs in float32 on the CPU (as the monitor does); time ratios are of process CPU time
(robust on a shared machine), medians of interleaved repeats. Run:  .venv/bin/python -m benchmarks.bench_hessian  [--models mlp,cnn] [--seeds 3] ...
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from benchmarks.common import (
    REPO,
    RESULTS,
    Counter,
    add_common_args,
    bn_cnn,
    ce_closure,
    cpu_clock,
    emit,
    markdown_table,
    median,
    mnist_tensors,
    restore,
    save_report,
    snapshot,
    state_changes,
    tanh_mlp,
)
from chaos_callbacks.curvature import (
    HessianOperator,
    hutchinson_trace,
    lanczos,
    lyapunov_map_lambda_max,
    power_iteration,
    spectral_density,
)

TARGET = 1e-3

warnings.filterwarnings("ignore", message=".*torch.jit.script.*")
warnings.filterwarnings("ignore", message=".*create_graph=True.*")  # PyHessian's loss.backward(create_graph=True)
warnings.filterwarnings("ignore", category=FutureWarning)


# ============================================================================ problems
@dataclass
class Problem:
    name: str
    model: nn.Module  # float32, train mode: every tool runs on this object
    x: Tensor
    y: Tensor
    x2: Tensor  # another batch (the monitor's default probe is the current training batch)
    y2: Tensor
    has_bn: bool
    truth: dict[str, Any] = field(default_factory=dict)


def params_of(model: nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def our_operator(model: nn.Module, x: Tensor, y: Tensor) -> HessianOperator:
    return HessianOperator(params_of(model), [ce_closure(model, x, y)])


def _digest(*tensors: Tensor) -> str:
    h = hashlib.sha1()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _cached(key: str, compute: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    path = RESULTS / "cache" / f"{key}.pt"
    if path.exists():
        return torch.load(path)
    out = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, path)
    return out


def mlp_hessian_diagonal(model: nn.Sequential, x: Tensor, y: Tensor) -> Tensor:
    """Exact diagonal of the mean cross-entropy Hessian of ``Flatten→Linear→tanh→Linear``.

    With ``z = W1 x + b1``, ``a = tanh z``, ``p = softmax(W2 a + b2)``, ``S = diag p − p pᵀ``:
    ``∂²L/∂W2[c,j]² = mean p_c(1−p_c) a_j²``, ``∂²L/∂W1[j,k]² = mean x_k² [w_jᵀ S w_j (1−a_j²)²
    − 2 a_j (1−a_j²) w_jᵀ(p − e_y)]`` with ``w_j = W2[:, j]`` (biases: ``x_k = 1``).
    """
    _, l1, _, l2 = model
    X = x.flatten(1)
    a = torch.tanh(X @ l1.weight.T + l1.bias)  # [N, h]
    p = torch.softmax(a @ l2.weight.T + l2.bias, dim=1)  # [N, c]
    N = X.shape[0]
    pp = p * (1 - p)
    d_w2 = (pp.T @ a**2) / N
    d_b2 = pp.mean(0)
    W2 = l2.weight  # [c, h]
    # w_j^T S_n w_j = Σ_c p_c w_cj² − (Σ_c p_c w_cj)²
    quad = p @ W2**2 - (p @ W2) ** 2  # [N, h]
    resid = (p - nn.functional.one_hot(y, p.shape[1]).to(p.dtype)) @ W2  # [N, h]
    d1 = 1 - a**2
    coeff = quad * d1**2 - 2 * a * d1 * resid  # [N, h]
    d_w1 = (coeff.T @ X**2) / N
    d_b1 = coeff.mean(0)
    return torch.cat([d_w1.reshape(-1), d_b1, d_w2.reshape(-1), d_b2])


def dense_hessian(op: HessianOperator) -> Tensor:
    H = torch.empty(op.dim, op.dim, dtype=op.dtype)
    e = torch.zeros(op.dim, dtype=op.dtype)
    for i in range(op.dim):
        e[i] = 1.0
        H[:, i] = op.matvec(e)
        e[i] = 0.0
    return H


def reference(model: nn.Module, x: Tensor, y: Tensor, kind: str, eval_mode: bool = False) -> dict[str, Any]:
    """Float64 ground truth of the Hessian of ``model`` on ``(x, y)`` (cached on disk)."""
    m64 = copy.deepcopy(model).double().train(not eval_mode)
    x64 = x.double()
    key = f"ref_{kind}_{'eval' if eval_mode else 'train'}_{_digest(*[p.double() for p in m64.parameters()], x64, y)}"

    def compute() -> dict[str, Any]:
        op = our_operator(m64, x64, y)
        out: dict[str, Any] = {"dim": op.dim}
        res = lanczos(op, op.dim, k=5, want_min=True, tol=1e-10, max_matvecs=min(op.dim, 500),
                      generator=torch.Generator().manual_seed(123), dtype=torch.float64)
        out["lanczos_top5"] = res.eigenvalues.clone()
        out["lanczos_min"] = res.lambda_min
        out["lanczos_converged"] = res.converged
        out["lanczos_hvps"] = res.num_matvecs
        if kind == "dense":
            H = dense_hessian(op)
            out["asym"] = float((H - H.T).abs().max() / H.abs().max())
            H = (H + H.T) / 2
            ev = torch.linalg.eigvalsh(H)
            out["spectrum"] = ev
            out["top5"] = ev.flip(0)[:5].clone()
            out["lambda_min"] = float(ev[0])
            out["trace"] = float(torch.diagonal(H).sum())
        else:
            from scipy.sparse.linalg import LinearOperator, eigsh

            lin = LinearOperator((op.dim, op.dim), matvec=lambda v: op.matvec(torch.from_numpy(np.ascontiguousarray(v).reshape(-1))).numpy(), dtype=np.float64)
            top = np.sort(eigsh(lin, k=5, which="LA", tol=1e-10, return_eigenvectors=False))[::-1]
            bottom = eigsh(lin, k=1, which="SA", tol=1e-10, return_eigenvectors=False)
            out["eigsh_top5"] = torch.tensor(top.copy())
            out["eigsh_min"] = float(bottom[0])
            out["top5"] = out["lanczos_top5"]
            out["lambda_min"] = out["lanczos_min"]
            if kind == "mlp":
                diag = mlp_hessian_diagonal(m64, x64, y)
                g = torch.Generator().manual_seed(7)
                idx = torch.randint(0, op.dim, (8,), generator=g)
                e = torch.zeros(op.dim, dtype=torch.float64)
                worst = 0.0
                for i in idx.tolist():
                    e[i] = 1.0
                    worst = max(worst, abs(float(op.matvec(e)[i].detach()) - float(diag[i])) / max(abs(float(diag[i])), 1e-12))
                    e[i] = 0.0
                out["diag_check"] = worst
                out["trace"] = float(diag.sum())
        return out

    return _cached(key, compute)


def lambda_only_reference(model: nn.Module, x: Tensor, y: Tensor, eval_mode: bool = False) -> dict[str, Any]:
    m64 = copy.deepcopy(model).double().train(not eval_mode)
    x64 = x.double()
    key = f"lam_{'eval' if eval_mode else 'train'}_{_digest(*[p.double() for p in m64.parameters()], x64, y)}"

    def compute() -> dict[str, Any]:
        op = our_operator(m64, x64, y)
        res = lanczos(op, op.dim, k=1, want_min=eval_mode, tol=1e-9, max_matvecs=min(op.dim, 500),
                      generator=torch.Generator().manual_seed(123), dtype=torch.float64)
        return {"top5": res.eigenvalues.clone(), "lambda_min": res.lambda_min, "converged": res.converged}

    return _cached(key, compute)


def make_problems(args: argparse.Namespace) -> list[Problem]:
    probs = []
    for name in args.models.split(","):
        if name == "mlp":
            x, y = mnist_tensors(args.data_root, args.mlp_n)
            x2, y2 = mnist_tensors(args.data_root, args.mlp_n, offset=args.mlp_n)
            model = tanh_mlp(784, args.mlp_hidden, 10, seed=0).train()
            probs.append(Problem(f"tanh MLP 784-{args.mlp_hidden}-10, {args.mlp_n} images", model, x, y, x2, y2, False))
        elif name == "cnn":
            x, y = mnist_tensors(args.data_root, args.cnn_n)
            x2, y2 = mnist_tensors(args.data_root, args.cnn_n, offset=args.cnn_n)
            model = bn_cnn(seed=0).train()
            probs.append(Problem(f"BN CNN (conv8-BN-conv16-BN-GAP-fc), {args.cnn_n} images, train mode", model, x, y, x2, y2, True))
        else:
            raise SystemExit(f"unknown model {name!r} (choose mlp, cnn)")
    return probs


# ============================================================================ peer adapters
class KeepTrain(nn.Module):
    """Wrapper whose ``eval()`` is a no-op, so PyHessian (which calls ``model.eval()``) sees the
    train-mode (batch-statistics) Hessian that the optimizer sees."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def train(self, mode: bool = True) -> KeepTrain:
        return self


@contextlib.contextmanager
def pyhessian_counter(counter: Counter):
    import sys

    import pyhessian  # noqa: F401  (the package re-exports the class ``hessian`` over its module)

    ph = sys.modules["pyhessian.hessian"]
    original = ph.hessian_vector_product

    def counted(gradsH, params, v):
        counter.n += 1
        return original(gradsH, params, v)

    ph.hessian_vector_product = counted
    try:
        yield
    finally:
        ph.hessian_vector_product = original


@contextlib.contextmanager
def torch_eig_shim():
    """``torch.eig`` was removed in torch 2; PyHessian's density() still calls it."""
    original = torch.eig

    def eig(T: Tensor, eigenvectors: bool = False):
        w, v = torch.linalg.eigh(T)
        return torch.stack([w, torch.zeros_like(w)], dim=1), v

    torch.eig = eig
    try:
        yield
    finally:
        torch.eig = original


def pyhessian_obj(model: nn.Module, x: Tensor, y: Tensor, keep_train: bool):
    from pyhessian import hessian

    return hessian(KeepTrain(model) if keep_train else model, nn.CrossEntropyLoss(), data=(x, y), cuda=False)


def eigenthings_op(model: nn.Module, x: Tensor, y: Tensor, counter: Counter):
    import hessian_eigenthings as het

    op = het.HessianOperator(model, [(x, y)], het.supervised_loss(nn.functional.cross_entropy))
    op.matvec = counter.wrap(op.matvec)
    return op


def curvlinops_op(model: nn.Module, x: Tensor, y: Tensor, counter: Counter, bn_workaround: bool):
    from curvlinops import HessianLinearOperator

    net = model
    if bn_workaround:
        net = copy.deepcopy(model)
        torch.func.replace_all_batch_norm_modules_(net)
    A = HessianLinearOperator(net, nn.CrossEntropyLoss(), params_of(net), [(x, y)], check_deterministic=False)
    original = A._matmat_batch

    def counted(X, y_, M):
        counter.n += M[0].shape[-1]
        return original(X, y_, M)

    A._matmat_batch = counted
    return A


def eigsh_run(A, k: int, which: str, tol: float, v0: np.ndarray | None) -> np.ndarray:
    from scipy.sparse.linalg import eigsh

    vals = eigsh(A.to_scipy(), k=k, which=which, tol=tol, v0=v0, return_eigenvectors=False)
    return np.sort(vals)[::-1]


def v0_for(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(n)


# ============================================================================ λ_max tools
@dataclass
class LamTool:
    name: str
    knob: str
    settings: list[Any]
    run: Callable[[int, Any], tuple[float, int]]  # (seed, setting) -> (λ estimate, HVPs)
    bn_note: str = ""


def lam_tools(P: Problem) -> list[LamTool]:
    m, x, y = P.model, P.x, P.y
    tols = [1e-3, 1e-4, 1e-5, 1e-6, 1e-7]

    def ours_lanczos(want_min: bool):
        def run(seed: int, tol: float) -> tuple[float, int]:
            op = our_operator(m, x, y)
            r = lanczos(op, op.dim, k=1, want_min=want_min, tol=tol, max_matvecs=300, generator=torch.Generator().manual_seed(seed))
            return float(r.eigenvalues[0]), op.num_matvecs

        return run

    def ours_power(seed: int, tol: float) -> tuple[float, int]:
        op = our_operator(m, x, y)
        r = power_iteration(op, op.dim, tol=tol, max_matvecs=300, generator=torch.Generator().manual_seed(seed))
        return r.eigenvalue, op.num_matvecs

    def ours_lyap(seed: int, tol: float) -> tuple[float, int]:
        op = our_operator(m, x, y)
        r = lyapunov_map_lambda_max(op, op.dim, tol=tol, max_matvecs=300, generator=torch.Generator().manual_seed(seed))
        return r.lambda_max, op.num_matvecs

    def pyh(keep_train: bool):
        def run(seed: int, tol: float) -> tuple[float, int]:
            c = Counter()
            torch.manual_seed(seed)
            with pyhessian_counter(c):
                h = pyhessian_obj(m, x, y, keep_train)
                vals, _ = h.eigenvalues(maxIter=300, tol=tol, top_n=1)
            return float(vals[0]), c.n

        return run

    def et_power(seed: int, tol: float) -> tuple[float, int]:
        import hessian_eigenthings as het

        c = Counter()
        lam, *_ = het.power_iteration_one(eigenthings_op(m, x, y, c), max_iter=300, tol=tol, seed=seed)
        return float(lam), c.n

    def et_lanczos(seed: int, max_iter: int) -> tuple[float, int]:
        import hessian_eigenthings as het

        c = Counter()
        r = het.lanczos(eigenthings_op(m, x, y, c), k=1, max_iter=max_iter, which="LA", seed=seed)
        return float(r.eigenvalues[0]), c.n

    def cl_eigsh(workaround: bool):
        def run(seed: int, tol: float) -> tuple[float, int]:
            c = Counter()
            A = curvlinops_op(m, x, y, c, workaround)
            vals = eigsh_run(A, 1, "LA", tol, v0_for(seed, A.shape[1]))
            return float(vals[0]), c.n

        return run

    tools = [
        LamTool("ours Lanczos cold (monitor default: k=1 + λ_min)", "tol", tols, ours_lanczos(True)),
        LamTool("ours Lanczos cold (k=1, no λ_min)", "tol", tols, ours_lanczos(False)),
        LamTool("ours power iteration", "tol", tols, ours_power),
        LamTool("ours Lyapunov map", "tol", tols, ours_lyap),
    ]
    if P.has_bn:
        tools.append(LamTool("PyHessian eigenvalues(top_n=1) as shipped (forces eval mode)", "tol", tols, pyh(False)))
        tools.append(LamTool("PyHessian eigenvalues(top_n=1), train-mode wrapper", "tol", tols, pyh(True)))
    else:
        tools.append(LamTool("PyHessian eigenvalues(top_n=1)", "tol", tols, pyh(False)))
    tools += [
        LamTool("eigenthings power_iteration_one", "tol", tols, et_power),
        LamTool("eigenthings lanczos(k=1, which=LA)", "max_iter", [2, 4, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 70, 100], et_lanczos),
    ]
    if P.has_bn:
        tools.append(LamTool("curvlinops Hessian + scipy eigsh(LA) as shipped", "tol", tols, cl_eigsh(False)))
        tools.append(LamTool("curvlinops (replace_all_batch_norm_modules_ on a copy) + eigsh", "tol", tols, cl_eigsh(True)))
    else:
        tools.append(LamTool("curvlinops Hessian + scipy eigsh(LA)", "tol", tols, cl_eigsh(False)))
    return tools


def rel(a: float, b: float) -> float:
    return abs(a - b) / abs(b)


def checked(model: nn.Module, fn: Callable[[], Any]) -> tuple[Any, float, str]:
    """Run ``fn`` once on ``model``: (result, seconds, what it changed); the model is restored after."""
    base = snapshot(model)
    t0 = cpu_clock()
    try:
        result = fn()
    finally:
        seconds = cpu_clock() - t0
        changes = state_changes(base, model)
        restore(model, base)
    return result, seconds, ", ".join(changes) if changes else "none"


def sweep(tool: LamTool, model: nn.Module, lam_true: float, seeds: list[int]) -> dict[str, Any]:
    """First setting whose estimate is within TARGET for every seed (stops early when stalling).
    The seed-0 run of every setting also records its time and the state it changed."""
    prev = math.inf
    out: dict[str, Any] = {}
    for s in tool.settings:
        runs = []
        try:
            for seed in seeds:
                (value, hv), secs, changed = checked(model, lambda seed=seed: tool.run(seed, s))
                runs.append((value, hv))
                if seed == seeds[0]:
                    first, state = secs, changed
        except Exception as exc:  # a peer that cannot handle the model
            return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:90]}", "state": "(raised)"}
        errs = [rel(v, lam_true) for v, _ in runs]
        out = {"setting": s, "hvps": median([h for _, h in runs]), "err": max(errs), "estimate": runs[0][0],
               "reached": max(errs) <= TARGET, "first_s": first, "state": state}
        if out["reached"]:
            return out
        if max(errs) > 0.9 * prev and max(errs) > 10 * TARGET:
            out["stalled"] = True
            return out
        prev = max(errs)
    return out


def oracle_hvps(P: Problem, lam_true: float, seed: int, budget: int = 60) -> int | None:
    """Fewest products after which our Lanczos' top Ritz value is within TARGET (Rayleigh–Ritz on
    the recorded Krylov basis; the certified stop comes later)."""
    op = our_operator(P.model, P.x, P.y)
    vs, hvs = [], []

    def rec(v: Tensor) -> Tensor:
        hv = op.matvec(v)
        vs.append(v.double())
        hvs.append(hv.double())
        return hv

    lanczos(rec, op.dim, k=1, want_min=False, tol=1e-12, max_matvecs=budget, generator=torch.Generator().manual_seed(seed))
    V, HV = torch.stack(vs), torch.stack(hvs)
    for m in range(1, len(vs) + 1):
        T = V[:m] @ HV[:m].T
        theta = torch.linalg.eigvalsh((T + T.T) / 2)
        if rel(float(theta[-1]), lam_true) <= TARGET:
            return m
    return None


# ============================================================================ state checks
def no_harm_run(P: Problem) -> Callable[[], Any]:
    """Our Lanczos inside the monitor's no-harm context (what HessianSpectrumMonitor runs)."""
    import lightning.pytorch as pl

    from chaos_callbacks.callbacks import _plumbing as plumb

    class Holder(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

    holder = Holder(P.model)

    def run() -> None:
        with plumb.no_harm(holder, train_mode=True):
            op = our_operator(P.model, P.x, P.y)
            lanczos(op, op.dim, k=1, tol=1e-3, generator=torch.Generator().manual_seed(0))
            op.release()

    return run


# ============================================================================ timing
def interleaved_times(
    jobs: dict[str, Callable[[], Any]], model: nn.Module, repeats: int, first: dict[str, float], min_sample_s: float = 0.3
) -> dict[str, float]:
    """Median seconds per call of each job over ``repeats`` rounds that visit the jobs in turn (so
    load drifts hit every job alike). ``first`` holds each job's time from its data run, which
    served as the warm-up; a job that took over a second there is not re-run (its CPU time is
    stable enough), and a short job is repeated within a sample until the sample lasts ``min_sample_s``."""
    base = snapshot(model)
    times: dict[str, list[float]] = {k: ([first[k]] * repeats if first.get(k, 0) >= 1.0 else []) for k in jobs}
    inner = {k: max(1, math.ceil(min_sample_s / max(first.get(k, min_sample_s), 1e-6))) for k in jobs}
    for _ in range(repeats):
        for name, job in jobs.items():
            if len(times[name]) >= repeats:
                continue
            total = 0.0
            for _ in range(inner[name]):
                restore(model, base)
                t0 = cpu_clock()
                job()
                total += cpu_clock() - t0
            times[name].append(total / inner[name])
    restore(model, base)
    return {k: median(v) for k, v in times.items()}


# ============================================================================ sections
def section_lambda_max(P: Problem, args: argparse.Namespace, out: list[str]) -> None:
    t = P.truth
    lam = float(t["top5"][0])
    seeds = list(range(args.seeds))
    tools = lam_tools(P)
    results = {tool.name: sweep(tool, P.model, lam, seeds) for tool in tools}
    baseline = tools[0].name
    # time only the settings that reached the target (a time-to-accuracy ratio needs the accuracy)
    jobs = {tool.name: (lambda tool=tool: tool.run(0, results[tool.name]["setting"])) for tool in tools if results[tool.name].get("reached")}
    times = interleaved_times(jobs, P.model, args.repeats, {k: results[k]["first_s"] for k in jobs})
    rows = []
    for tool in tools:
        r = results[tool.name]
        if "error" in r:
            rows.append([tool.name, "–", "–", "–", "no: " + r["error"], "–", r["state"]])
            continue
        reached = "yes" if r["reached"] else ("no (stalls)" if r.get("stalled") else "no")
        ratio = times.get(tool.name, float("nan")) / times[baseline]
        rows.append([tool.name, f"{tool.knob}={r['setting']:g}", r["hvps"], r["err"], reached, ratio, r["state"]])
    orc = [oracle_hvps(P, lam, s) for s in seeds]
    rows.append(["ours Lanczos, oracle stop (fewest HVPs whose Ritz value is within 1e-3)", "–", median([o for o in orc if o is not None]) if any(orc) else None, None, "yes" if all(orc) else "no", None, "–"])
    rows.append(["ours Lanczos inside the monitor's no_harm context", "tol=0.001", None, None, None, None, checked(P.model, no_harm_run(P))[2]])
    emit(f"\n#### λ_max to 1e-3 relative error (λ_max = {lam:.6g}, λ_2 = {float(t['top5'][1]):.6g}, λ_min = {t['lambda_min']:.6g}; {len(seeds)} seeds: HVPs = median, error = worst seed)\n", out)
    emit(markdown_table(["tool", "setting", "HVPs", "rel. error", "reached 1e-3", "time / ours cold", "changed model state"], rows), out)
    if P.has_bn and "eval_lambda" in t:
        emit(f"\n(Eval-mode Hessian of the same batch: λ_max = {t['eval_lambda']:.6g}, λ_min = {t['eval_lambda_min']:.6g} — what PyHessian as shipped measures.)", out)


def section_top5(P: Problem, args: argparse.Namespace, out: list[str]) -> None:
    t = P.truth
    true5 = t["top5"].double()
    m, x, y = P.model, P.x, P.y

    def ours(seed: int) -> tuple[list[float], int]:
        op = our_operator(m, x, y)
        r = lanczos(op, op.dim, k=5, want_min=True, tol=1e-3, max_matvecs=300, generator=torch.Generator().manual_seed(seed))
        return r.eigenvalues.tolist(), op.num_matvecs

    def pyh(keep_train: bool):
        def run(seed: int) -> tuple[list[float], int]:
            c = Counter()
            torch.manual_seed(seed)
            with pyhessian_counter(c):
                vals, _ = pyhessian_obj(m, x, y, keep_train).eigenvalues(maxIter=100, tol=1e-3, top_n=5)
            return list(vals), c.n

        return run

    def et_lanczos(which: str, max_iter: int | None):
        def run(seed: int) -> tuple[list[float], int]:
            import hessian_eigenthings as het

            c = Counter()
            r = het.lanczos(eigenthings_op(m, x, y, c), k=5, max_iter=max_iter, which=which, seed=seed)
            return r.eigenvalues.tolist(), c.n

        return run

    def et_deflated(seed: int) -> tuple[list[float], int]:
        import hessian_eigenthings as het

        c = Counter()
        r = het.deflated_power_iteration(eigenthings_op(m, x, y, c), k=5, max_iter=100, tol=1e-3, seed=seed)
        return r.eigenvalues.tolist(), c.n

    def cl(workaround: bool):
        def run(seed: int) -> tuple[list[float], int]:
            c = Counter()
            A = curvlinops_op(m, x, y, c, workaround)
            return eigsh_run(A, 5, "LA", 1e-3, v0_for(seed, A.shape[1])).tolist(), c.n

        return run

    tools: list[tuple[str, Callable[[int], tuple[list[float], int]]]] = [("ours lanczos(k=5, tol=1e-3)", ours)]
    if P.has_bn:
        tools += [("PyHessian eigenvalues(top_n=5) as shipped (eval mode)", pyh(False)), ("PyHessian eigenvalues(top_n=5), train-mode wrapper", pyh(True))]
    else:
        tools += [("PyHessian eigenvalues(top_n=5, tol=1e-3)", pyh(False))]
    tools += [
        ("eigenthings lanczos(k=5) defaults (which=LM, max_iter=2k)", et_lanczos("LM", None)),
        ("eigenthings lanczos(k=5, which=LA, max_iter=40)", et_lanczos("LA", 40)),
        ("eigenthings deflated_power_iteration(k=5, tol=1e-3)", et_deflated),
    ]
    tools += [("curvlinops + eigsh(k=5, LA, tol=1e-3)" + (" (BN workaround)" if P.has_bn else ""), cl(P.has_bn))]
    seeds = list(range(args.seeds))
    rows_data, first_s = {}, {}
    for name, fn in tools:
        try:
            runs = []
            for seed in seeds:
                res, secs, changed = checked(P.model, lambda fn=fn, seed=seed: fn(seed))
                runs.append(res)
                if seed == seeds[0]:
                    first_s[name], state = secs, changed
            errs, intr, hv = [], False, []
            for vals, h in runs:
                v = torch.tensor(sorted(vals, reverse=True), dtype=torch.float64)
                errs.append(float(((v - true5).abs() / true5.abs()).max()))
                intr |= bool((v < 0).any()) and bool((true5 > 0).all())
                hv.append(h)
            rows_data[name] = (median(hv), max(errs), intr, runs[0][0], state)
        except Exception as exc:
            rows_data[name] = (None, None, None, f"{type(exc).__name__}", "(raised)")
    jobs = {name: (lambda fn=fn: fn(0)) for name, fn in tools if rows_data[name][0] is not None}
    times = interleaved_times(jobs, P.model, args.repeats, first_s)
    rows = []
    for name, _ in tools:
        hv, err, intr, first, state = rows_data[name]
        ratio = times.get(name, float("nan")) / times[tools[0][0]]
        shown = ", ".join(f"{v:.4g}" for v in sorted(first, reverse=True)) if isinstance(first, list) else first
        rows.append([name, hv, err, intr, ratio, state, shown])
    emit(f"\n#### Top-5 (true: {', '.join(f'{v:.4g}' for v in true5.tolist())}; λ_min = {t['lambda_min']:.4g}; {len(seeds)} seeds: HVPs = median, error = worst seed)\n", out)
    emit(markdown_table(["tool", "HVPs", "max rel. error (top-5)", "negative value not among the 5 largest", "time / ours", "changed model state", "values (seed 0)"], rows), out)


def section_trace(P: Problem, args: argparse.Namespace, out: list[str]) -> None:
    tr = P.truth["trace"]
    m, x, y = P.model, P.x, P.y
    budgets = [int(b) for b in args.trace_budgets.split(",")]
    seeds = list(range(args.seeds))

    def ours_plain(seed: int, B: int) -> tuple[float, int]:
        op = our_operator(m, x, y)
        return hutchinson_trace(op, op.dim, num_samples=B, generator=torch.Generator().manual_seed(seed)).trace, op.num_matvecs

    def ours_deflated(seed: int, B: int) -> tuple[float, int]:
        op = our_operator(m, x, y)
        g = torch.Generator().manual_seed(seed)
        r = lanczos(op, op.dim, k=5, want_min=False, tol=1e-3, max_matvecs=100, generator=g)
        est = hutchinson_trace(op, op.dim, num_samples=B, deflate_vectors=r.eigenvectors, deflate_values=r.eigenvalues, generator=g).trace
        return est, op.num_matvecs

    def pyh(seed: int, B: int) -> tuple[float, int]:
        c = Counter()
        torch.manual_seed(seed)
        with pyhessian_counter(c):
            # tol=-inf: run exactly maxIter probes (its relative-change test divides by the running
            # estimate, which is negative here at times, so even tol=0 can stop after 2 probes)
            vals = pyhessian_obj(m, x, y, P.has_bn).trace(maxIter=B, tol=float("-inf"))
        return float(np.mean(vals)), c.n

    def pyh_default(seed: int, B: int) -> tuple[float, int]:
        c = Counter()
        torch.manual_seed(seed)
        with pyhessian_counter(c):
            vals = pyhessian_obj(m, x, y, P.has_bn).trace()
        return float(np.mean(vals)), c.n

    def et(method: str):
        def run(seed: int, B: int) -> tuple[float, int]:
            import hessian_eigenthings as het

            c = Counter()
            r = het.trace(eigenthings_op(m, x, y, c), num_matvecs=B, method=method, seed=seed)
            return float(r.estimate), c.n

        return run

    def cl(fn_name: str):
        def run(seed: int, B: int) -> tuple[float, int]:
            import curvlinops

            c = Counter()
            A = curvlinops_op(m, x, y, c, P.has_bn)
            torch.manual_seed(seed)
            if fn_name == "hutchpp_trace":
                B = 3 * (B // 3)  # Hutch++ needs a multiple of 3
            return float(getattr(curvlinops, fn_name)(A, num_matvecs=B)), c.n

        return run

    tools = [
        ("ours hutchinson_trace", ours_plain),
        ("ours Lanczos k=5 + deflated hutchinson_trace", ours_deflated),
        ("PyHessian trace(maxIter=B)" + (" (train-mode wrapper)" if P.has_bn else ""), pyh),
        ("eigenthings trace(method=hutchinson)", et("hutchinson")),
        ("eigenthings trace(method=hutch++)", et("hutch++")),
        ("curvlinops hutchinson_trace" + (" (BN workaround)" if P.has_bn else ""), cl("hutchinson_trace")),
        ("curvlinops hutchpp_trace", cl("hutchpp_trace")),
        ("curvlinops xtrace", cl("xtrace")),
    ]
    rows = []
    for name, fn in tools:
        row: list[Any] = [name]
        state = None
        for B in budgets:
            try:
                runs = []
                for seed in seeds:
                    res, _, changed = checked(P.model, lambda fn=fn, seed=seed, B=B: fn(seed, B))
                    runs.append(res)
                    state = state or changed
                errs = [rel(v, tr) for v, _ in runs]
                row.append(f"{median(errs):.2e} @ {median([h for _, h in runs]):g}")
            except Exception as exc:
                row.append(f"{type(exc).__name__}")
                state = state or "(raised)"
        row.append(state)
        rows.append(row)
    runs, states = [], []
    for seed in seeds:
        res, _, changed = checked(P.model, lambda seed=seed: pyh_default(seed, 0))
        runs.append(res)
        states.append(changed)
    label = "PyHessian trace() defaults (maxIter=100, tol=1e-3)" + (" (train-mode wrapper)" if P.has_bn else "")
    rows.append([label, f"{median([rel(v, tr) for v, _ in runs]):.2e} @ {median([h for _, h in runs]):g}"] + [""] * (len(budgets) - 1) + [states[0]])
    spec = P.truth.get("spectrum")
    extra = f", Σ|λ_i| = {float(spec.abs().sum()):.4g}: the trace is a small difference of large positive and negative parts" if spec is not None else ""
    emit(f"\n#### Trace (exact {tr:.6g}{extra}; median |rel. error| over {len(seeds)} seeds @ median HVPs used)\n", out)
    emit(markdown_table(["tool"] + [f"budget {B}" for B in budgets] + ["changed model state"], rows), out)


def w1_distance(points: np.ndarray, weights: np.ndarray, spectrum: np.ndarray) -> float:
    """Wasserstein-1 distance between a weighted point measure and the uniform measure on ``spectrum``."""
    keep = np.isfinite(points) & np.isfinite(weights)
    points, weights = points[keep], np.clip(weights[keep], 0, None)
    weights = weights / weights.sum()
    allx = np.sort(np.concatenate([points, spectrum]))
    order = np.argsort(points)
    cum = np.concatenate([[0.0], np.cumsum(weights[order])])
    # right-continuous step CDFs evaluated on the merged grid
    cdf_a = cum[np.searchsorted(points[order], allx, side="right")]
    cdf_b = np.searchsorted(np.sort(spectrum), allx, side="right") / spectrum.size
    return float(np.sum(np.abs(cdf_a - cdf_b)[:-1] * np.diff(allx)))


def section_density(P: Problem, args: argparse.Namespace, out: list[str]) -> None:
    t = P.truth
    n = t["dim"]
    lam_max, lam_min, tr = float(t["top5"][0]), t["lambda_min"], t["trace"]
    spectrum = t.get("spectrum")
    m, x, y = P.model, P.x, P.y

    def ours() -> tuple[np.ndarray, np.ndarray, int]:
        op = our_operator(m, x, y)
        d = spectral_density(op, op.dim, generator=torch.Generator().manual_seed(0))
        return d.nodes.numpy(), d.weights.numpy(), op.num_matvecs

    # matched budget (ours' default 3 × 90) unless --density-defaults asks for each peer's defaults
    probes, steps = (1, 100) if args.density_defaults else (3, 90)

    def pyh(shim: bool):
        def run() -> tuple[np.ndarray, np.ndarray, int]:
            c = Counter()
            torch.manual_seed(0)
            ctx = torch_eig_shim() if shim else contextlib.nullcontext()
            with pyhessian_counter(c), ctx:
                nodes, weights = pyhessian_obj(m, x, y, P.has_bn).density(iter=steps, n_v=probes)
            return np.array(nodes).ravel(), np.array(weights).ravel() / len(nodes), c.n

        return run

    et_runs, et_steps = (10, 80) if args.density_defaults else (3, 90)

    def et() -> tuple[np.ndarray, np.ndarray, int]:
        import hessian_eigenthings as het

        c = Counter()
        r = het.spectral_density(eigenthings_op(m, x, y, c), num_runs=et_runs, lanczos_steps=et_steps, seed=0)
        return r.raw_eigenvalues.numpy().ravel(), r.raw_weights.numpy().ravel(), c.n

    cl_ncv, cl_rep = (128, 1) if args.density_defaults else (90, 3)

    def cl() -> tuple[np.ndarray, np.ndarray, int]:
        from curvlinops import lanczos_approximate_spectrum

        c = Counter()
        A = curvlinops_op(m, x, y, c, P.has_bn)
        torch.manual_seed(0)
        grid, dens = lanczos_approximate_spectrum(A, ncv=cl_ncv, num_repeats=cl_rep)
        grid, dens = grid.numpy(), dens.numpy()
        return grid, dens * np.gradient(grid), c.n  # a smoothed density on a grid, not quadrature nodes

    bn = " (BN workaround)" if P.has_bn else ""
    wrap = " (train-mode wrapper)" if P.has_bn else ""
    tools = [
        ("ours spectral_density() defaults (3 probes × 90 steps)", ours),
        (f"PyHessian density(iter={steps}, n_v={probes}) as shipped{wrap}", pyh(False)),
        (f"PyHessian density(iter={steps}, n_v={probes}) with a torch.eig shim{wrap}", pyh(True)),
        (f"eigenthings spectral_density(num_runs={et_runs}, lanczos_steps={et_steps})", et),
        (f"curvlinops lanczos_approximate_spectrum(ncv={cl_ncv}, num_repeats={cl_rep}) + eigsh boundaries{bn}", cl),
    ]
    data, secs, states = {}, {}, {}
    for name, fn in tools:
        try:
            data[name], secs[name], states[name] = checked(P.model, fn)
        except Exception as exc:
            data[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
    rows = []
    for name, fn in tools:
        d = data[name]
        if isinstance(d, str):
            rows.append([name, "–", "–", "–", "–", "–", "–", "fails: " + d])
            continue
        pts, w, hv = d
        keep = np.isfinite(pts) & (w > 0)
        wn = w[keep] / w[keep].sum()
        mean = float((pts[keep] * wn).sum())
        w1 = w1_distance(pts, w, spectrum.numpy()) / (lam_max - lam_min) if spectrum is not None else None
        on_grid = name.startswith("curvlinops")
        top_nodes = pts[keep]
        hi = None if on_grid else rel(float(top_nodes.max()), lam_max)
        lo = None if on_grid else rel(float(top_nodes.min()), lam_min)
        rows.append([name, hv, rel(mean * n, tr), hi, lo, w1,
                     secs[name] / secs[tools[0][0]], states[name]])
    emit(f"\n#### Spectral density (n = {n}; rel. errors of the measure's mean × n vs the exact trace and of its extreme nodes vs λ_max / λ_min)\n", out)
    emit(markdown_table(["tool", "HVPs", "trace from density", "top node vs λ_max", "bottom node vs λ_min", "W1 / (λmax−λmin)" if spectrum is not None else "W1 (needs full spectrum)", "time / ours (1 run)", "changed model state"], rows), out)


def sgd_steps(model: nn.Module, args: argparse.Namespace, steps: int, offset: int) -> None:
    if steps == 0:
        return
    xs, ys = mnist_tensors(args.data_root, 128 * steps, offset=offset)
    opt = torch.optim.SGD(model.parameters(), lr=args.warm_lr)
    for i in range(steps):
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(xs[128 * i : 128 * (i + 1)]), ys[128 * i : 128 * (i + 1)]).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


def section_warm(P: Problem, args: argparse.Namespace, out: list[str]) -> None:
    steps_list = [int(s) for s in args.warm_steps.split(",")]
    rows = []
    for steps in steps_list:
        for new_batch in ([False, True] if steps == max(steps_list) else [False]):
            per_seed: dict[str, list[tuple[float, int, bool]]] = {}
            for seed in range(args.seeds):
                model = copy.deepcopy(P.model).train()
                op = our_operator(model, P.x, P.y)
                cold = lanczos(op, op.dim, k=1, want_min=False, tol=1e-3, max_matvecs=100, generator=torch.Generator().manual_seed(seed))
                top = cold.eigenvectors[0].detach()
                op.release()
                sgd_steps(model, args, steps, offset=30000)
                x, y = (P.x2, P.y2) if new_batch else (P.x, P.y)
                ref = lambda_only_reference(model, x, y)
                lam = float(ref["top5"][0])

                def add(name: str, value: float, hv: int, conv: bool = True) -> None:
                    per_seed.setdefault(name, []).append((rel(value, lam), hv, conv))

                for name, init, want_min in [("ours Lanczos warm, λ_min step (init = top Ritz vector, k=1 + λ_min)", top, True),
                                             ("ours Lanczos warm, monitor default (init = top Ritz vector, k=1, no λ_min)", top, False),
                                             ("ours Lanczos cold at the new weights (k=1, no λ_min)", None, False)]:
                    op = our_operator(model, x, y)
                    r = lanczos(op, op.dim, k=1, want_min=want_min, tol=1e-3, max_matvecs=100, init=init, generator=torch.Generator().manual_seed(100 + seed))
                    add(name, float(r.eigenvalues[0]), op.num_matvecs, r.converged)
                op = our_operator(model, x, y)
                r = power_iteration(op, op.dim, tol=1e-3, max_matvecs=300, init=top)
                add("ours power iteration warm (tol=1e-3)", r.eigenvalue, op.num_matvecs, r.converged)
                op = our_operator(model, x, y)
                r = lyapunov_map_lambda_max(op, op.dim, tol=1e-3, max_matvecs=300, init=top)
                add("ours Lyapunov map warm (tol=1e-3)", r.lambda_max, op.num_matvecs, r.converged)
                import hessian_eigenthings as het

                c = Counter()
                lam_e, _, _, _, conv = het.power_iteration_one(eigenthings_op(model, x, y, c), tol=1e-3, max_iter=300, init=top.clone())
                add("eigenthings power_iteration_one warm (init=, tol=1e-3)", lam_e, c.n, conv)
                c = Counter()
                try:
                    A = curvlinops_op(model, x, y, c, P.has_bn)
                    add("curvlinops + eigsh(k=1, LA, tol=1e-3, v0=previous)", float(eigsh_run(A, 1, "LA", 1e-3, top.double().numpy())[0]), c.n)
                except Exception:
                    pass
            label = f"{steps} SGD steps" + (", different probe batch" if new_batch else ", same probe batch")
            for name, vals in per_seed.items():
                rows.append([label, name, median([h for _, h, _ in vals]), max(e for e, _, _ in vals), all(c for _, _, c in vals)])
    emit(f"\n#### Warm start after SGD steps (lr={args.warm_lr}, batch 128; HVPs = median, error = worst of {args.seeds} seeds)\n", out)
    emit(markdown_table(["refresh after", "tool", "HVPs", "rel. error λ_max", "stopped by its own criterion"], rows), out)



# ============================================================================ solver overhead
class TimedOperator:
    """``v ↦ Hv`` that accumulates the process CPU time spent in the products."""

    def __init__(self, op: HessianOperator) -> None:
        self.op, self.seconds, self.dim, self.dtype = op, 0.0, op.dim, op.dtype

    def __call__(self, v: Tensor) -> Tensor:
        t = time.process_time()
        out = self.op(v)
        self.seconds += time.process_time() - t
        return out


def section_solver(args: argparse.Namespace, out: list[str]) -> None:
    """Time outside the products (reorthogonalisation, restarts, Ritz vectors, bounds) per Lanczos run,
    on bench_scale's models (random data, its batch sizes), one thread, process CPU time."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks import bench_scale

    cases = [
        ("cold λ_max (k=1)", dict(k=1, want_min=False), False),
        ("warm λ_max, next batch (k=1, monitor default)", dict(k=1, want_min=False), True),
        ("λ_min step (k=1 + λ_min, warm)", dict(k=1, want_min=True, min_tol=1e-2), True),
        ("top_k=5 with index check", dict(k=5, want_min=False), False),
        ("tol=1e-6: stops at the float32 floor", dict(k=1, want_min=False, tol=1e-6), False),
    ]
    rows = []
    for kind in args.solver_models.split(","):
        for n in [int(float(x)) for x in args.solver_sizes.split(",")]:
            net, batch, desc = bench_scale.build_model(kind, n)
            bs = args.solver_batch or bench_scale.BATCH[kind]
            data = [batch(bs) for _ in range(2)]

            def operator(i: int) -> HessianOperator:
                x, y = data[i]
                def loss() -> Tensor:
                    logits = net(x)
                    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
                return HessianOperator(params_of(net), [loss])

            with sdpa_kernel(SDPBackend.MATH):
                warm = None
                for name, kw, use_warm in cases:
                    if use_warm and warm is None:
                        first = operator(0)
                        warm = lanczos(first, first.dim, k=1, want_min=False, generator=torch.Generator().manual_seed(1)).eigenvectors
                        first.release()
                    op = TimedOperator(operator(1 if use_warm else 0))
                    kw = dict(dict(tol=1e-3, max_matvecs=100, min_max_matvecs=100), **kw)
                    t = time.process_time()
                    res = lanczos(op, op.dim, init=warm if use_warm else None, generator=torch.Generator().manual_seed(0), **kw)
                    total = time.process_time() - t
                    rows.append([desc, f"{op.dim:.2e}", bs, name, op.op.num_matvecs, res.stop_reason, f"{total:.2f}", f"{op.seconds:.2f}",
                                 f"{100 * (total - op.seconds) / total:.1f}%"])
                    op.op.release()
                    print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    emit("\n#### Solver overhead: process CPU time of one Lanczos run outside the Hessian-vector products (1 thread)\n", out)
    emit(markdown_table(["model", "n", "batch", "run", "HVPs", "stop", "total s", "in HVPs s", "outside HVPs"], rows), out)


# ============================================================================ monitor in training
def section_train(args: argparse.Namespace, out: list[str]) -> None:
    """HessianSpectrumMonitor at its defaults in SGD training on MNIST: HVPs of the cold first estimate,
    of the warm λ_max refreshes and of the λ_min estimates, and their average over all later estimates.
    Only the monitor's constructor defaults are used, so the same section measures any checkout."""
    import logging

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from chaos_callbacks import HessianSpectrumMonitor

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")

    class Task(pl.LightningModule):
        def __init__(self, net: nn.Module) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> Tensor:
            return nn.functional.cross_entropy(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=args.train_lr, momentum=0.9)

    xs, ys = mnist_tensors(args.data_root, 60000)
    rows = []
    for model in args.train_models.split(","):
        torch.manual_seed(0)
        hidden = 256 if model == "relu" else 64
        act = nn.ReLU() if model == "relu" else nn.Tanh()
        net = nn.Sequential(nn.Flatten(), nn.Linear(784, hidden), act, nn.Linear(hidden, 10))
        monitor = HessianSpectrumMonitor()
        seen: list[tuple[int, float, bool]] = []

        class Keep(pl.Callback):
            def on_train_batch_end(self, trainer: Any, *rest: Any) -> None:
                if monitor._last_step == trainer.global_step - 1 and monitor.last_estimate:
                    est = monitor.last_estimate
                    seen.append((monitor._last_step, est["hessian/hvps"], "hessian/lambda_min" in est))

        loader = DataLoader(TensorDataset(xs, ys), batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
        pl.seed_everything(0, verbose=False)
        trainer = pl.Trainer(accelerator="cpu", max_steps=args.train_steps, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False, callbacks=[monitor, Keep()])
        t = time.process_time()
        trainer.fit(Task(net), loader)
        secs = time.process_time() - t
        later = [h for step, h, _ in seen if step > 0]
        top_only = [h for step, h, m in seen if step > 0 and not m]
        with_min = [h for step, h, m in seen if step > 0 and m]
        mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
        rows.append([f"MNIST MLP 784-{hidden}-10 {model}", sum(p.numel() for p in net.parameters()), len(seen), seen[0][1] if seen else None,
                     f"{mean(top_only):.2f}", f"{mean(with_min):.1f} ({len(with_min)})", f"{mean(later):.2f}", max(later, default=None),
                     monitor._warn.count, f"{secs:.0f}"])
        print(" | ".join(map(str, rows[-1])), file=sys.stderr, flush=True)
    emit(f"\n#### HessianSpectrumMonitor() in training ({args.train_steps} SGD steps, lr {args.train_lr}, momentum 0.9, batch 128; "
         "HVPs per estimate)\n", out)
    emit(markdown_table(["model", "n", "estimates", "cold (step 0)", "warm, no λ_min", "warm with λ_min (count)", "all warm: mean",
                         "max", "skipped/warned", "CPU s"], rows), out)

# ============================================================================ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--models", default="mlp,cnn", help="comma list of mlp, cnn")
    parser.add_argument("--mlp-n", type=int, default=512, help="images in the MLP probe batch")
    parser.add_argument("--mlp-hidden", type=int, default=64)
    parser.add_argument("--cnn-n", type=int, default=128, help="images in the CNN probe batch")
    parser.add_argument("--seeds", type=int, default=3, help="random start vectors per estimate")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats")
    parser.add_argument("--trace-budgets", default="10,50", help="Hutchinson probe budgets")
    parser.add_argument("--warm-steps", default="5,50", help="SGD steps between the cold and the warm estimate")
    parser.add_argument("--warm-lr", type=float, default=0.05)
    parser.add_argument("--density-defaults", action="store_true",
                        help="run each peer's density at its own defaults (PyHessian 1×100, eigenthings 10×80, curvlinops ncv=128) instead of ours' budget 3×90")
    parser.add_argument("--sections", default="lambda,top5,trace,density,warm",
                        help="comma list of lambda, top5, trace, density, warm, solver (bench_scale's models, random data), "
                             "train (HessianSpectrumMonitor() in MNIST training)")
    parser.add_argument("--solver-sizes", default="1e5,1e6,1e7", help="parameter counts of the solver section")
    parser.add_argument("--train-steps", type=int, default=6000, help="SGD steps of the train section")
    parser.add_argument("--train-lr", type=float, default=0.05)
    parser.add_argument("--train-models", default="relu,tanh", help="train section: MNIST MLPs 784-256-10 relu, 784-64-10 tanh")
    parser.add_argument("--solver-models", default="mlp", help="bench_scale models of the solver section (mlp, cnn, gpt2)")
    parser.add_argument("--solver-batch", type=int, default=None, help="probe batch of the solver section (default: bench_scale's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: list[str] = []
    emit(f"## bench_hessian (torch {torch.__version__}, {args.threads} thread(s), float32 estimates, float64 ground truth)", out)
    sections = args.sections.split(",")
    for name, runner in (("solver", section_solver), ("train", section_train)):
        if name in sections:
            runner(args, out)
            sections.remove(name)
    for P in make_problems(args) if sections else []:
        t0 = time.perf_counter()
        kind = "dense" if P.has_bn else "mlp"
        P.truth = reference(P.model, P.x, P.y, kind)
        if P.has_bn:
            ev = lambda_only_reference(P.model, P.x, P.y, eval_mode=True)
            P.truth["eval_lambda"], P.truth["eval_lambda_min"] = float(ev["top5"][0]), ev["lambda_min"]
        t = P.truth
        emit(f"\n### {P.name} — {t['dim']} parameters", out)
        checks = [f"float64 Lanczos(tol=1e-10) converged={t['lanczos_converged']} in {t['lanczos_hvps']} HVPs"]
        if kind == "dense":
            checks.append(f"dense Hessian asymmetry {t['asym']:.1e}; |Lanczos − eigvalsh| top-5 max {float((t['lanczos_top5'] - t['top5']).abs().max()):.1e}, λ_min {abs(t['lanczos_min'] - t['lambda_min']):.1e}")
        else:
            checks.append(f"|Lanczos − scipy eigsh| top-5 max {float((t['lanczos_top5'] - t['eigsh_top5']).abs().max()):.1e}, λ_min {abs(t['lanczos_min'] - t['eigsh_min']):.1e}")
            checks.append(f"closed-form Hessian diagonal vs HVP columns: max rel. diff {t['diag_check']:.1e}")
        emit("Ground truth: " + "; ".join(checks) + f"; trace {t['trace']:.6g}.", out)
        runners = {"lambda": section_lambda_max, "top5": section_top5, "trace": section_trace, "density": section_density, "warm": section_warm}
        for name in sections:
            t1 = time.perf_counter()
            runners[name](P, args, out)
            print(f"[{name}: {time.perf_counter() - t1:.0f} s]", file=sys.stderr, flush=True)
        emit(f"\n({P.name}: {time.perf_counter() - t0:.0f} s)", out)
    path = save_report("bench_hessian", out)
    print(f"\nwritten to {path.relative_to(REPO)}")


if __name__ == "__main__":
    main()
