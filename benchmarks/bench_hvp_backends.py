"""Hessian-vector product backends: time per product and agreement.

Backends, on the same model and batch:

* ours — ``HessianOperator``: one forward and ``∇L`` with ``create_graph=True`` at construction,
  then each product is one backward pass of ``∇L · v`` through the cached graph;
* reverse-over-reverse recomputed per product (forward, ``∇L`` with ``create_graph``, backward),
  which is what PyHessian's dataloader mode and hessian-eigenthings do;
* ``torch.autograd.functional.hvp`` (double-backward trick) and ``.vhp``;
* ``torch.func``: ``jvp(grad(f))`` (forward-over-reverse) and ``vjp(grad(f))`` via
  ``functional_call``; ``jvp(jacrev(f))``, the formulation curvlinops uses; and curvlinops'
  ``HessianLinearOperator`` itself.

``torch.func`` cannot run a train-mode BatchNorm with running statistics (its in-place running-stat
update is refused inside a transform), so those backends get ``replace_all_batch_norm_modules_`` on a
copy (same train-mode function, no buffers). Agreement is measured in float64 against our operator,
which is itself checked against an independent model whose batch norm is written with elementary
ops. Timing is float32 process CPU time (robust on a shared machine), interleaved rounds, median.

Run:  .venv/bin/python -m benchmarks.bench_hvp_backends  [--products 10 --repeats 5]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, jvp, vjp

from benchmarks.common import (
    REPO,
    add_common_args,
    bn_cnn,
    ce_closure,
    cpu_clock,
    emit,
    markdown_table,
    median,
    mnist_tensors,
    save_report,
    tanh_mlp,
)
from chaos_callbacks.curvature import HessianOperator, flatten, unflatten
from tests.helpers import without_running_stats  # train-mode BN from elementary ops (the tests' oracle)

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")

HVP = Callable[[Tensor], Tensor]  # flat v -> flat Hv


def functional_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    torch.func.replace_all_batch_norm_modules_(m)
    return m


def backends(model: nn.Module, x: Tensor, y: Tensor) -> dict[str, tuple[Callable[[], HVP], str]]:
    """name -> (setup() -> hvp, note). ``setup`` does the per-estimate work (ours builds its graph)."""
    params = [p for p in model.parameters() if p.requires_grad]
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    fmodel = functional_copy(model) if has_bn else model
    names = [n for n, p in fmodel.named_parameters() if p.requires_grad]
    fparams = tuple(p.detach() for n, p in fmodel.named_parameters() if p.requires_grad)
    argnums = tuple(range(len(fparams)))

    def f(*ps: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(fmodel, dict(zip(names, ps)), (x,)), y)

    def ours() -> HVP:
        op = HessianOperator(params, [ce_closure(model, x, y)])
        return op.matvec

    def recompute() -> HVP:
        def hvp(v: Tensor) -> Tensor:
            g = torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params, create_graph=True)
            return flatten(torch.autograd.grad(g, params, grad_outputs=unflatten(v, params)))

        return hvp

    def autograd_functional(kind: str) -> Callable[[], HVP]:
        fn = getattr(torch.autograd.functional, kind)
        base = tuple(p.detach() for p in params)
        mnames = [n for n, p in model.named_parameters() if p.requires_grad]
        buffers = dict(model.named_buffers())

        def g(*ps: Tensor) -> Tensor:
            return nn.functional.cross_entropy(functional_call(model, {**dict(zip(mnames, ps)), **buffers}, (x,)), y)

        def setup() -> HVP:
            return lambda v: flatten(fn(g, base, tuple(unflatten(v, params)))[1])

        return setup

    def func_jvp_grad() -> HVP:
        return lambda v: flatten(jvp(grad(f, argnums=argnums), fparams, tuple(unflatten(v, fparams)))[1])

    def func_jvp_jacrev() -> HVP:
        return lambda v: flatten(jvp(jacrev(f, argnums=argnums), fparams, tuple(unflatten(v, fparams)))[1])

    def func_vjp_grad() -> HVP:
        def hvp(v: Tensor) -> Tensor:
            _, pullback = vjp(grad(f, argnums=argnums), *fparams)
            return flatten(pullback(tuple(unflatten(v, fparams))))

        return hvp

    def curvlinops() -> HVP:
        from curvlinops import HessianLinearOperator

        A = HessianLinearOperator(fmodel, nn.CrossEntropyLoss(), [p for p in fmodel.parameters() if p.requires_grad], [(x, y)], check_deterministic=False)
        return lambda v: A @ v

    note = " (replace_all_batch_norm_modules_ copy)" if has_bn else ""
    return {
        "ours: cached double backward (HessianOperator)": (ours, ""),
        "reverse-over-reverse, graph recomputed per product": (recompute, ""),
        "torch.autograd.functional.hvp": (autograd_functional("hvp"), ""),
        "torch.autograd.functional.vhp": (autograd_functional("vhp"), ""),
        "torch.func jvp(grad(f)) forward-over-reverse" + note: (func_jvp_grad, ""),
        "torch.func vjp(grad(f)) reverse-over-reverse" + note: (func_vjp_grad, ""),
        "torch.func jvp(jacrev(f)) (curvlinops' formulation)" + note: (func_jvp_jacrev, ""),
        "curvlinops HessianLinearOperator @ v" + note: (curvlinops, ""),
    }


def agreement(model: nn.Module, x: Tensor, y: Tensor, num_vectors: int) -> tuple[dict[str, tuple[float, str]], float | None, int]:
    """float64: max |Hv − Hv_ours| / max |Hv_ours| per backend, and the parameter block where it is worst."""
    m64 = copy.deepcopy(model).double().train()
    x64 = x.double()
    params = [p for p in m64.parameters() if p.requires_grad]
    names = [n for n, p in m64.named_parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    V = torch.randn(num_vectors, sum(p.numel() for p in params), generator=g, dtype=torch.float64)
    ref_hvp = HessianOperator(params, [ce_closure(m64, x64, y)]).matvec
    ref = torch.stack([ref_hvp(v) for v in V])
    scale = float(ref.abs().max())
    out: dict[str, tuple[float, str]] = {}
    for name, (setup, _) in backends(m64, x64, y).items():
        try:
            hvp = setup()
            got = torch.stack([hvp(v).double() for v in V])
        except Exception as exc:
            out[name] = (float("nan"), f"raised {type(exc).__name__}")
            continue
        diff = (got - ref).abs().max(dim=0).values
        blocks = [float(b.max()) for b in unflatten(diff, params)]
        worst = max(range(len(blocks)), key=blocks.__getitem__)
        out[name] = (float(diff.max()) / scale, f"{names[worst]} ({blocks[worst] / scale:.1e})")
    plain = None
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in m64.modules()):
        mp = without_running_stats(m64)
        pparams = [p for p in mp.parameters() if p.requires_grad]
        op = HessianOperator(pparams, [ce_closure(mp, x64, y)])
        plain = float(torch.stack([op.matvec(v) for v in V]).sub(ref).abs().max()) / scale
    return out, plain, V.shape[1]


def bn_as_shipped_error(model: nn.Module, x: Tensor, y: Tensor) -> str | None:
    """What torch.func says about a train-mode BN model that still has running statistics."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    m = copy.deepcopy(model).train()
    names = [n for n, _ in m.named_parameters()]
    ps = tuple(p.detach() for p in m.parameters())

    def f(*p: Tensor) -> Tensor:
        return nn.functional.cross_entropy(functional_call(m, dict(zip(names, p)), (x,)), y)

    try:
        jvp(grad(f, argnums=tuple(range(len(ps)))), ps, ps)
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return "ran"


def dense_check(root, n: int = 32) -> list[list[object]]:
    """Dense float64 Hessians of a tiny BN CNN by torch.func vs double backward (elementary-op BN)."""
    from torch.func import hessian, jacfwd

    x, y = mnist_tensors(root, n, pool=2)
    model = bn_cnn(c1=2, c2=4).double().train()
    x = x.double()
    plain = without_running_stats(model)
    pp = [p for p in plain.parameters()]
    op = HessianOperator(pp, [ce_closure(plain, x, y)])
    eye = torch.eye(op.dim, dtype=torch.float64)
    exact = torch.stack([op.matvec(e) for e in eye], dim=1)
    fmodel = functional_copy(model)
    names = [nm for nm, _ in fmodel.named_parameters()]
    shapes = [p.shape for p in fmodel.parameters()]
    sizes = [p.numel() for p in fmodel.parameters()]
    labels = [f"{nm}[{i}]" for nm, sz in zip(names, sizes) for i in range(sz)]

    def f(flat: Tensor) -> Tensor:
        chunks = [c.view(sh) for c, sh in zip(torch.split(flat, sizes), shapes)]
        return nn.functional.cross_entropy(functional_call(fmodel, dict(zip(names, chunks)), (x,)), y)

    flat = torch.cat([p.detach().reshape(-1) for p in fmodel.parameters()])
    rows = []
    ours = HessianOperator(list(model.parameters()), [ce_closure(model, x, y)])
    ours_dense = torch.stack([ours.matvec(e) for e in eye], dim=1)
    for label, H in [("ours (double backward through aten batch norm)", ours_dense),
                     ("torch.func.hessian = jacfwd(jacrev(f))", hessian(f)(flat)),
                     ("torch.func jacfwd(grad(f))", jacfwd(grad(f))(flat)),
                     ("torch.func jacrev(grad(f))", jacrev(grad(f))(flat))]:
        d = (H - exact).abs()
        i, j = divmod(int(d.argmax()), d.shape[1])
        rows.append([label, float(d.max()), f"H[{labels[i]}, {labels[j]}]" if float(d.max()) > 1e-10 else "–",
                     float(exact[i, j]) if float(d.max()) > 1e-10 else None, float(H[i, j]) if float(d.max()) > 1e-10 else None,
                     float((H - H.T).abs().max())])
    return rows


def timings(model: nn.Module, x: Tensor, y: Tensor, products: int, repeats: int) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds per product (after setup) and of the setup of each backend; interleaved rounds."""
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    g = torch.Generator().manual_seed(1)
    V = torch.randn(products, n, generator=g)
    bk = backends(model, x, y)
    per: dict[str, list[float]] = {k: [] for k in bk}
    setup_s: dict[str, list[float]] = {k: [] for k in bk}
    for r in range(repeats + 1):  # round 0 is a warm-up
        for name, (setup, _) in bk.items():
            t0 = cpu_clock()
            hvp = setup()
            t1 = cpu_clock()
            for v in V:
                hvp(v)
            t2 = cpu_clock()
            if r:
                per[name].append((t2 - t1) / products)
                setup_s[name].append(t1 - t0)
    return {k: median(v) for k, v in per.items()}, {k: median(v) for k, v in setup_s.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--mlp-n", type=int, default=512)
    parser.add_argument("--cnn-n", type=int, default=128)
    parser.add_argument("--products", type=int, default=10, help="products per timing sample (one setup each)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved timing rounds")
    parser.add_argument("--vectors", type=int, default=3, help="random vectors for the agreement check")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out: list[str] = []
    emit(f"## bench_hvp_backends (torch {torch.__version__}, {args.threads} thread(s); time in float32, agreement in float64)", out)
    problems = [
        (f"tanh MLP 784-64-10, {args.mlp_n} images", tanh_mlp(), *mnist_tensors(args.data_root, args.mlp_n)),
        (f"BN CNN (conv-BN-ReLU ×2, GAP, fc), {args.cnn_n} images, train mode", bn_cnn(), *mnist_tensors(args.data_root, args.cnn_n)),
    ]
    for title, model, x, y in problems:
        model.train()
        t0 = time.perf_counter()
        agree, plain, dim = agreement(model, x, y, args.vectors)
        per, setup = timings(model, x, y, args.products, args.repeats)
        ours_name = next(k for k in per if k.startswith("ours"))
        base = per[ours_name]
        est_ours = setup[ours_name] + base * args.products
        emit(f"\n### {title} — {dim} parameters\n", out)
        rows = []
        for name in per:
            rel_err, worst = agree[name]
            est = (setup[name] + per[name] * args.products) / est_ours
            rows.append([name, per[name] * 1e3, per[name] / base, est, rel_err, worst if rel_err > 1e-10 else "–"])
        emit(markdown_table(
            ["backend", "CPU ms / HVP", "time / ours (per HVP)", f"time / ours for setup + {args.products} HVPs", "max rel. diff vs ours (float64)", "worst block (its rel. diff)"], rows), out)
        notes = [f"ours' setup (forward + create_graph gradient) = {setup[ours_name] / base:.2f} of its HVPs"]
        if plain is not None:
            notes.append(f"ours vs an independent elementary-op batch norm (double backward): max rel. diff {plain:.1e}")
            notes.append(f"torch.func on the module with running stats: {bn_as_shipped_error(model, x, y)}")
        emit("\n" + "; ".join(notes) + f". ({time.perf_counter() - t0:.0f} s)", out)
    emit("\n### Dense check: tiny BN CNN (conv2-BN-conv4-BN-GAP-fc, 158 parameters, 32 images 14×14, train mode), float64\n", out)
    emit("Reference: double backward through an elementary-op batch norm (no aten batch-norm kernel).\n", out)
    emit(markdown_table(["Hessian by", "max abs error", "where", "exact value", "computed", "asymmetry max abs(H − Hᵀ)"], dense_check(args.data_root)), out)
    path = save_report("bench_hvp_backends", out)
    print(f"\nwritten to {path.relative_to(REPO)}", file=sys.stderr)


if __name__ == "__main__":
    main()
