"""Cost of one estimate of every callback, from 1e4 to 1e8 parameters: time in training steps, peak
memory in parameter-sized float32 vectors and checkpoint bytes (issue 14, item 6).

For each model (``mlp``: 256-h-h-10 tanh; ``cnn``: three stride-2 conv-BN-ReLU blocks c-2c-4c on
3×16×16 images, global pooling, linear; ``gpt2``: a GPT-2-shaped causal LM built from
``nn.TransformerEncoder`` — pre-LN, GELU, tied embeddings, no dropout —, GPT-2 small itself,
124M parameters, at the ``1e8`` size) sized to about ``n`` parameters, and for each callback at its
defaults except the cadence, Lightning trains on random data on the CPU (SGD, momentum 0.9) for
``(estimates) × cadence + 1`` steps (one estimate only, at step 0, for the whole-budget and the
density rows). Every Lightning hook the callback overrides is wrapped:

- **time** — CPU time of the main thread (``--threads 1``; wall time otherwise) spent inside the
  callback's hooks at a step where it estimates, divided by the median time of a training step
  without them (the whole step, Lightning's loop included, minus the callback's hooks), both from
  the same run. ``first`` is the estimate at step 0 (cold: no warm start, first-call costs);
  ``min``/``median`` are over the later ones. Callbacks that work at every step
  (``LyapunovTwinRun``, ``DiffusionTracker``) count each step as one estimate.
- **memory** — during each hook, peak resident (``VmHWM`` after resetting it through
  ``/proc/self/clear_refs``, else sampled every ms) and peak virtual size (``VmSize`` of
  ``/proc/self/statm``, sampled every ms) minus their values when the hook started, in units of
  ``4·n`` bytes; the maximum over all estimates. ``setup`` is the same over ``on_fit_start``/
  ``on_train_start`` (what a callback allocates once, e.g. the twin's copy of the weights). The
  script re-executes itself with ``MALLOC_MMAP_THRESHOLD_=65536`` so that glibc maps every tensor
  above 64 KiB on its own and unmaps it when freed: RSS then follows the live tensors instead of
  glibc's cache. Below about 1e6 parameters a vector is smaller than the noise of Python and
  Lightning objects (tens of kB), so read those memory columns as upper bounds.
- **HVPs** — Hessian-vector products made during the estimate (``HessianOperator.num_matvecs``).
- **checkpoint** — ``torch.save(callback.state_dict())`` bytes at the end of the run.

Callbacks (``--callbacks``): ``monitor`` HessianSpectrumMonitor(); ``monitor_budget`` the same with
``tol=lambda_min_tol=1e-9``, which spends the whole ``max_hvps`` budget (worst case of memory);
``monitor_density`` HessianSpectrumMonitor(density=True); ``twin`` LyapunovTwinRun();
``lr`` CurvatureLRScheduler(); ``diffusion`` DiffusionTracker() (per-step record; its window
analysis runs every 1000 steps and does not depend on n); ``tails`` GradientTailFitter().

Run from the repository root (measures this checkout):

    OMP_NUM_THREADS=1 .venv/bin/python -m benchmarks.bench_scale
    ... --sizes 1e4,1e5,1e6,1e7,1e8 --models mlp,cnn,gpt2 --callbacks monitor,lr --estimates 1

The script imports ``chaos_callbacks`` from ``sys.path`` and nothing from ``benchmarks``, so run as a
file it measures any checkout: ``PYTHONPATH=/path/to/checkout python benchmarks/bench_scale.py``.

The default (1e4, 1e5, 1e6 × mlp, cnn, gpt2 × all callbacks) takes about 10-15 min on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "131072"}
CALLBACKS = ("monitor", "monitor_budget", "monitor_density", "twin", "lr", "diffusion", "tails")
MODELS = ("mlp", "cnn", "gpt2")


# ----------------------------------------------------------------------------- process setup
def reexec_with_malloc_env(threads: int) -> None:
    """Re-run this process's command line (``python -m benchmarks.<name> ...`` stays a module run) with
    glibc's mmap threshold fixed (see the module docstring) and ``OMP_NUM_THREADS`` set, unless that
    is already the environment. Call before importing torch."""
    wanted = dict(MALLOC_ENV, OMP_NUM_THREADS=str(threads))
    if all(os.environ.get(k) == v for k, v in wanted.items()):
        return
    os.environ.update(wanted)
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


def import_chaos_callbacks() -> Any:
    """``chaos_callbacks`` from ``sys.path``, imported only after :func:`reexec_with_malloc_env`: this
    checkout under ``python -m`` from the repository root, the one on ``PYTHONPATH`` when run as a file."""
    import chaos_callbacks

    return chaos_callbacks


def quiet() -> None:
    import logging
    import warnings

    for name in ("lightning.pytorch", "lightning.fabric", "lightning"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    for message in (".*does not have many workers.*", ".*GPU available but not used.*", ".*LightningModule.log.*",
                    ".*enable_nested_tensor.*", ".*max_steps.*", ".*treespec.*"):
        warnings.filterwarnings("ignore", message)


# ----------------------------------------------------------------------------- memory
PAGE = os.sysconf("SC_PAGE_SIZE")


def start_process(threads: int) -> tuple[Any, Any, Any]:
    """Re-exec with the fixed malloc environment, then import Lightning, torch and ``chaos_callbacks``
    (from ``sys.path``) with ``threads`` intra-op threads and Lightning's banners silenced."""
    reexec_with_malloc_env(threads)
    import lightning.pytorch as pl
    import torch

    torch.set_num_threads(threads)
    cc = import_chaos_callbacks()
    quiet()
    return pl, torch, cc


def write_report(text: str, out: Path | None) -> None:
    """Write the Markdown report to ``out`` too, when given."""
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


def statm() -> tuple[int, int]:
    """(virtual, resident) bytes of this process."""
    with open("/proc/self/statm") as f:
        size, resident = f.read().split()[:2]
    return int(size) * PAGE, int(resident) * PAGE


def status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux ≥ 4.0); False where not permitted."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass
class Peak:
    resident: int = 0  # peak − start, bytes
    virtual: int = 0


class PeakMemory:
    """Context manager: peak resident and virtual bytes above their values at entry.

    A daemon thread reads ``/proc/self/statm`` every ``interval`` seconds (torch kernels release the
    GIL, so it runs while they compute); the resident peak is also read from ``VmHWM``, reset at
    entry, which catches peaks shorter than the interval.
    """

    def __init__(self, interval: float = 1e-3) -> None:
        self.interval = interval
        self.peak = Peak()

    def _sample(self) -> None:
        while not self._stop.is_set():
            vm, rss = statm()
            self._vm, self._rss = max(self._vm, vm), max(self._rss, rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakMemory:
        self._hwm = reset_peak_rss()
        self._vm0, self._rss0 = statm()
        self._vm, self._rss = self._vm0, self._rss0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        vm, rss = statm()
        rss = max(self._rss, rss, status_kib("VmHWM") if self._hwm else 0)
        self.peak = Peak(resident=rss - self._rss0, virtual=max(self._vm, vm) - self._vm0)


def rss_bytes() -> int:
    return statm()[1]


# ----------------------------------------------------------------------------- models
def mlp_hidden(n: int, d_in: int = 256, classes: int = 10) -> int:
    """Width h of ``d_in-h-h-classes`` with about ``n`` parameters: h² + (d_in + classes + 2)h + classes = n."""
    b = d_in + classes + 2
    return max(1, round((-b + math.sqrt(b * b + 4 * max(n - classes, 1))) / 2))


def cnn_params(c: int, classes: int = 10) -> int:
    convs = [(3, c), (c, 2 * c), (2 * c, 4 * c)]
    return sum(9 * i * o + o + 2 * o for i, o in convs) + 4 * c * classes + classes


GPT_SHAPES = [(4.5, 16, 2, 2, 64), (5.5, 64, 2, 2, 64), (6.5, 128, 4, 4, 64), (7.5, 256, 8, 4, 128)]  # (log10 n ≤, d, layers, heads, ctx)
GPT2_SMALL = dict(vocab=50257, d=768, layers=12, heads=12, ctx=1024)


def gpt_shape(n: int) -> dict[str, int]:
    """GPT-2 small at n ≥ ~3e7, else a smaller (d, layers, heads, ctx) whose vocabulary fills up to ``n``."""
    for top, d, layers, heads, ctx in GPT_SHAPES:
        if math.log10(n) <= top:
            vocab = max(64, round((n - ctx * d - layers * (12 * d * d + 13 * d) - 2 * d) / d))
            return dict(vocab=vocab, d=d, layers=layers, heads=heads, ctx=ctx)
    return dict(GPT2_SMALL)


def build_model(kind: str, n: int, seed: int = 0) -> tuple[Any, Callable[[int], tuple[Any, Any]], str]:
    """(network, ``batch(i) -> (x, y)`` of random data, description) of about ``n`` parameters."""
    import torch
    from torch import nn

    torch.manual_seed(seed)
    if kind == "mlp":
        h = mlp_hidden(n)
        net = nn.Sequential(nn.Linear(256, h), nn.Tanh(), nn.Linear(h, h), nn.Tanh(), nn.Linear(h, 10))
        return net, lambda b: (torch.randn(b, 256), torch.randint(10, (b,))), f"MLP 256-{h}-{h}-10 tanh"
    if kind == "cnn":
        c = min(range(1, 4096), key=lambda c: abs(cnn_params(c) - n))
        blocks = []
        for i, o in [(3, c), (c, 2 * c), (2 * c, 4 * c)]:
            blocks += [nn.Conv2d(i, o, 3, stride=2, padding=1), nn.BatchNorm2d(o), nn.ReLU()]
        net = nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * c, 10))
        return net, lambda b: (torch.randn(b, 3, 16, 16), torch.randint(10, (b,))), f"CNN {c}-{2 * c}-{4 * c} BN, 3×16×16"
    if kind == "gpt2":
        s = gpt_shape(n)
        net = GPT(**s)
        seq = 32
        label = "GPT-2 small" if s == GPT2_SMALL else "GPT-shaped"
        def batch(b: int) -> tuple[Any, Any]:
            tokens = torch.randint(s["vocab"], (b, seq + 1))
            return tokens[:, :-1], tokens[:, 1:]
        return net, batch, f"{label} d{s['d']} L{s['layers']} h{s['heads']} V{s['vocab']}, {seq} tokens"
    raise SystemExit(f"unknown model {kind!r} (choose from {', '.join(MODELS)})")


def _gpt_class() -> type:
    import torch
    from torch import nn

    class GPT(nn.Module):
        """A GPT-2-shaped causal LM: token + learned position embeddings, pre-LN
        ``nn.TransformerEncoder`` blocks (GELU, 4d MLP), final LayerNorm, head tied to the embedding."""

        def __init__(self, vocab: int, d: int, layers: int, heads: int, ctx: int) -> None:
            super().__init__()
            self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
            layer = nn.TransformerEncoderLayer(d, heads, 4 * d, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(d)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            t = idx.shape[1]
            mask = nn.Transformer.generate_square_subsequent_mask(t, device=idx.device)
            h = self.blocks(self.tok(idx) + self.pos(torch.arange(t, device=idx.device)), mask=mask, is_causal=True)
            return self.norm(h) @ self.tok.weight.T

    return GPT


def GPT(**shape: int) -> Any:  # noqa: N802 (a lazily defined class, so importing this module does not import torch)
    return _gpt_class()(**shape)


def lightning_task(net: Any, lr: float = 0.01) -> Any:
    import lightning.pytorch as pl
    import torch
    from torch import nn

    class Task(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            logits = self.net(x)
            return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=lr, momentum=0.9)

    return Task()


def random_loader(batch: Callable[[int], tuple[Any, Any]], batch_size: int, steps: int, seed: int = 0) -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(seed + 1)
    xs, ys = zip(*(batch(batch_size) for _ in range(steps)))
    return DataLoader(TensorDataset(torch.cat(xs), torch.cat(ys)), batch_size=batch_size, shuffle=False)


BATCH = {"mlp": 16, "cnn": 8, "gpt2": 4}


# ----------------------------------------------------------------------------- callbacks
def make_callback(name: str, cadence: int) -> tuple[Any, int]:
    """(callback at its defaults except the cadence, steps between its estimates)."""
    import_chaos_callbacks()
    from chaos_callbacks.callbacks.curvature_lr import CurvatureLRScheduler
    from chaos_callbacks.callbacks.diffusion_tracker import DiffusionTracker
    from chaos_callbacks.callbacks.gradient_tails import GradientTailFitter
    from chaos_callbacks.callbacks.hessian_spectrum import HessianSpectrumMonitor
    from chaos_callbacks.callbacks.lyapunov_twin import LyapunovTwinRun

    makers: dict[str, Callable[[], tuple[Any, int]]] = {
        "monitor": lambda: (HessianSpectrumMonitor(every_n_steps=cadence), cadence),
        "monitor_budget": lambda: (HessianSpectrumMonitor(every_n_steps=cadence, tol=1e-9, lambda_min_tol=1e-9), cadence),
        "monitor_density": lambda: (HessianSpectrumMonitor(every_n_steps=cadence, density=True), cadence),
        "twin": lambda: (LyapunovTwinRun(), 1),
        "lr": lambda: (CurvatureLRScheduler(every_n_steps=cadence), cadence),
        "diffusion": lambda: (DiffusionTracker(), 1),
        "tails": lambda: (GradientTailFitter(every_n_steps=cadence), cadence),
    }
    if name not in makers:
        raise SystemExit(f"unknown callback {name!r} (choose from {', '.join(makers)})")
    return makers[name]()


SINGLE = ("monitor_budget", "monitor_density")  # expensive: measured on one cold estimate only
LABELS = {
    "monitor": "HessianSpectrumMonitor()",
    "monitor_budget": "HessianSpectrumMonitor(tol=1e-9) whole budget",
    "monitor_density": "HessianSpectrumMonitor(density=True)",
    "twin": "LyapunovTwinRun()",
    "lr": "CurvatureLRScheduler()",
    "diffusion": "DiffusionTracker()",
    "tails": "GradientTailFitter()",
}


# ----------------------------------------------------------------------------- instrumentation
SETUP_HOOKS = ("setup", "on_fit_start", "on_train_start")


def clock_for(threads: int) -> Callable[[], float]:
    """Main-thread CPU time with one intra-op thread (robust to other jobs on the machine), else wall time."""
    return time.thread_time if threads == 1 else time.perf_counter


@dataclass
class Usage:
    seconds: float = 0.0
    resident: int = 0
    virtual: int = 0
    hvps: int = 0

    def add(self, seconds: float, peak: Peak, hvps: int) -> None:
        self.seconds += seconds
        self.resident, self.virtual = max(self.resident, peak.resident), max(self.virtual, peak.virtual)
        self.hvps += hvps


@dataclass
class Recorder:
    """Per optimizer step: time, peak memory and HVPs inside the callback's hooks, and the step's total."""

    clock: Callable[[], float]
    step: int | None = None
    hooks: dict[Any, Usage] = field(default_factory=dict)  # step (or "setup") -> usage
    starts: dict[int, float] = field(default_factory=dict)
    end: float = math.nan
    operators: list[Any] = field(default_factory=list)

    def step_totals(self) -> dict[int, float]:
        steps = sorted(self.starts)
        ends = [self.starts[s] for s in steps[1:]] + [self.end]
        return {s: e - self.starts[s] for s, e in zip(steps, ends)}


def count_hessian_operators(recorder: Recorder) -> Callable[[], None]:
    """Record every ``HessianOperator`` made from now on in ``recorder.operators``; returns the undo."""
    from chaos_callbacks.curvature import hvp

    original = hvp.HessianOperator.__init__

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        recorder.operators.append(self)

    hvp.HessianOperator.__init__ = init
    return lambda: setattr(hvp.HessianOperator, "__init__", original)


def instrument(callback: Any, recorder: Recorder, meter: Callable[[], Any] = PeakMemory) -> None:
    """Wrap every Lightning hook ``callback`` overrides so that its cost lands in ``recorder``;
    ``meter()`` is a context manager whose ``peak`` (a :class:`Peak`) is read after the hook."""
    import lightning.pytorch as pl

    hooks = [name for name in dir(pl.Callback) if (name.startswith("on_") or name in ("setup", "teardown"))
             and callable(getattr(pl.Callback, name)) and getattr(type(callback), name) is not getattr(pl.Callback, name)]
    for name in hooks:
        bound = getattr(callback, name)

        def wrapped(*args: Any, _bound: Any = bound, _name: str = name, **kwargs: Any) -> Any:
            key = "setup" if _name in SETUP_HOOKS else recorder.step
            if key is None:  # teardown / end hooks outside a step
                return _bound(*args, **kwargs)
            first_op = len(recorder.operators)
            with meter() as mem:
                t0 = recorder.clock()
                out = _bound(*args, **kwargs)
                seconds = recorder.clock() - t0
            hvps = sum(op.num_matvecs for op in recorder.operators[first_op:])
            recorder.hooks.setdefault(key, Usage()).add(seconds, mem.peak, hvps)
            return out

        setattr(callback, name, wrapped)


def step_clock(recorder: Recorder) -> Any:
    """A callback, first in the list, that marks the start of every step and the end of training."""
    import lightning.pytorch as pl

    class StepClock(pl.Callback):
        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            recorder.step = trainer.global_step
            recorder.starts[trainer.global_step] = recorder.clock()

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            recorder.end = recorder.clock()
            recorder.step = None

    return StepClock()


def checkpoint_bytes(callback: Any) -> int:
    import torch

    buffer = io.BytesIO()
    torch.save(callback.state_dict(), buffer)
    return buffer.getbuffer().nbytes


# ----------------------------------------------------------------------------- one measurement
@dataclass
class Row:
    model: str
    n: int
    step_ms: float
    callback: str
    first: float = math.nan  # estimate time / step time
    later: list[float] = field(default_factory=list)
    hvps_first: int = 0
    hvps_later: list[int] = field(default_factory=list)
    resident: float = math.nan  # parameter vectors
    virtual: float = math.nan
    setup_resident: float = math.nan
    ckpt: int = 0
    notes: str = ""
    headline: str = ""  # the callback's main logged value after the run


HEADLINES = ("hessian/lambda_max", "lyapunov/mle", "lyapunov/ftle", "curvature_lr/lambda", "diffusion/exponent", "grad_tail/alpha")


def headline(callback: Any) -> str:
    """``tag=value`` of the callback's main estimate after the run ("" when it has none yet)."""
    values = {**getattr(callback, "last_estimate", {}), **getattr(callback, "last_metrics", {})}
    for tag in HEADLINES:
        if tag in values:
            return f"{tag}={values[tag]:.4g}"
    return ""


def measure(
    model: str, size: int, callback_name: str, args: argparse.Namespace, *, accelerator: str = "cpu",
    precision: str = "32-true", meter: Callable[[], Any] = PeakMemory, clock: Callable[[], float] | None = None,
    batch_size: int | None = None, vector_bytes: int = 4,
) -> Row:
    """Train ``estimates × cadence + 1`` steps with the callback instrumented; see the module docstring.
    ``meter``/``clock`` measure memory and time of the hooks (a CUDA variant: ``gpu_check.py``)."""
    import warnings

    import lightning.pytorch as pl

    net, batch, _ = build_model(model, size)
    n = sum(p.numel() for p in net.parameters())
    single = callback_name in SINGLE  # one (cold) estimate, at step 0
    callback, cadence = make_callback(callback_name, 10**9 if single else args.cadence)
    steps = (1 if single else args.estimates) * args.cadence + 1
    recorder = Recorder(clock or clock_for(args.threads))
    instrument(callback, recorder, meter)
    undo = count_hessian_operators(recorder)
    trainer = pl.Trainer(
        accelerator=accelerator, devices=1, precision=precision, max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        callbacks=[step_clock(recorder), callback],
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet()
        try:
            trainer.fit(lightning_task(net), random_loader(batch, batch_size or BATCH[model], steps))
            failure = ""
        except Exception as exc:  # noqa: BLE001 (a checkout that cannot run a row reports why)
            failure = f"{type(exc).__name__}: {str(exc)[:120]}"
        finally:
            undo()
    totals = recorder.step_totals()
    base = [t - recorder.hooks.get(s, Usage()).seconds for s, t in totals.items() if s > 0]
    step_s = statistics.median(base) if base else math.nan
    row = Row(model, n, 1e3 * step_s, callback_name)
    due = sorted(s for s in recorder.hooks if s != "setup" and s % cadence == 0)
    vec = vector_bytes * n
    if due:
        first = recorder.hooks[due[0]]
        row.first, row.hvps_first = first.seconds / step_s, first.hvps
        row.later = [recorder.hooks[s].seconds / step_s for s in due[1:]]
        row.hvps_later = [recorder.hooks[s].hvps for s in due[1:]]
        row.resident = max(recorder.hooks[s].resident for s in due) / vec
        row.virtual = max(recorder.hooks[s].virtual for s in due) / vec
    if "setup" in recorder.hooks:
        row.setup_resident = recorder.hooks["setup"].resident / vec
    row.ckpt = checkpoint_bytes(callback)
    row.headline = headline(callback)
    notes = [failure] if failure else []
    for w in caught:
        text = str(w.message).split("\n")[0][:100]
        if w.category is not DeprecationWarning and "chaos_callbacks" in (w.filename or "") + text or "skipped" in text:
            if text not in notes:
                notes.append(text)
    row.notes = "; ".join(notes[:2])
    del trainer, net, callback
    return row


# ----------------------------------------------------------------------------- report
def fmt(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, int):
        return str(x)
    if isinstance(x, float):
        return "0" if x == 0 else (f"{x:.2e}" if abs(x) >= 1e5 or abs(x) < 1e-2 else f"{x:.{digits}g}")
    return str(x)


def markdown(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows])


HEADERS = ["model", "n", "step ms", "callback", "est. first (steps)", "est. min", "est. median", "HVPs first / later",
           "peak resident (vectors)", "peak virtual (vectors)", "setup resident (vectors)", "checkpoint bytes",
           "checkpoint (vectors)", "notes"]


def table_row(r: Row) -> list[Any]:
    later_hvps = "/".join(str(h) for h in r.hvps_later[:3]) if any(r.hvps_later) else ""
    hvps = f"{r.hvps_first} / {later_hvps}" if r.hvps_first or later_hvps else "–"
    return [r.model, f"{r.n:.2e}", r.step_ms, LABELS[r.callback], r.first, min(r.later, default=math.nan),
            statistics.median(r.later) if r.later else math.nan, hvps, r.resident, r.virtual, r.setup_resident,
            r.ckpt, r.ckpt / (4 * r.n), r.notes.replace("|", "/")]


def parse_sizes(text: str) -> list[int]:
    return [int(float(s)) for s in text.split(",") if s]


def warm_up(args: argparse.Namespace) -> None:
    """One throwaway run of every callback on a 1e4-parameter MLP, so that lazy imports and first-call
    allocations (autograd, the shadow module, scipy) do not count as memory of the first row."""
    quick = argparse.Namespace(**{**vars(args), "estimates": 1, "cadence": 1})
    for name in args.callbacks.split(","):
        measure("mlp", 10_000, name, quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="1e4,1e5,1e6", help="parameter counts, e.g. 1e4,1e5,1e6,1e7,1e8")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--callbacks", default=",".join(CALLBACKS))
    parser.add_argument("--estimates", type=int, default=2, help="estimates after the first (none for the whole-budget and density rows)")
    parser.add_argument("--cadence", type=int, default=3, help="every_n_steps of the callbacks that have one")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: CPU-time clock)")
    parser.add_argument("--out", type=Path, default=None, help="also write the Markdown report here")
    args = parser.parse_args()
    pl, torch, cc = start_process(args.threads)
    commit = subprocess.run(["git", "-C", str(Path(cc.__file__).parent), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    header = (f"## bench_scale — chaos_callbacks from {Path(cc.__file__).parent.parent} ({commit or 'no git'}); torch "
              f"{torch.__version__}, Lightning {pl.__version__}, CPU, {args.threads} thread(s), cadence {args.cadence}, "
              f"{args.estimates} later estimates; batch {BATCH}; time in training steps "
              f"({'main-thread CPU' if args.threads == 1 else 'wall'} time), memory in float32 parameter vectors (4·n bytes)\n")
    print(header, flush=True)
    rows: list[Row] = []
    start = time.perf_counter()
    warm_up(args)
    for model in args.models.split(","):
        for size in parse_sizes(args.sizes):
            net, _, description = build_model(model, size)
            print(f"- {model} {size:.0e}: {description}, n = {sum(p.numel() for p in net.parameters()):,}", flush=True)
            del net
            for name in args.callbacks.split(","):
                t0 = time.perf_counter()
                rows.append(measure(model, size, name, args))
                print("  " + " | ".join(fmt(c) for c in table_row(rows[-1])) + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    report = header + "\n" + markdown(HEADERS, [table_row(r) for r in rows]) + f"\n\nTotal {time.perf_counter() - start:.0f} s.\n"
    print("\n" + report, flush=True)
    write_report(report, args.out)


if __name__ == "__main__":
    main()
