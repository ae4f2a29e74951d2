"""``ChaosSummary``: a TensorBoard custom-scalars layout, an end-of-fit report on stdout and a tidy
table of every logged tag (CSV and JSON) next to the logs."""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import asdict, dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from chaos_callbacks.callbacks._plumbing import Logged, WarnOnce, logged_values, tag_prefix, tensorboard_loggers
from chaos_callbacks.curvature.lr_rules import is_adam

#: One TensorBoard "Custom Scalars" category per instrument. TensorBoard colours the lines of a
#: custom-scalars chart by *run*, not by tag, so all tags of one run share a colour: each chart holds
#: one quantity in one unit (a family such as the top-k eigenvalues, ordered by construction, or
#: the per-layer exponents, told apart by hovering, at most). Anchored regexes keep the
#: ``<tag>_error``/``<tag>_stderr`` companions out of their tag's chart.
CUSTOM_SCALARS_LAYOUT: dict[str, dict[str, list]] = {
    "hessian": {
        "lambda_max (largest Hessian eigenvalue)": ["Multiline", [r"hessian/lambda_max$"]],
        "top-k eigenvalues eig_1 > eig_2 > ...": ["Multiline", [r"hessian/eig_\d+$"]],
        "lambda_min (most negative eigenvalue, opt-in)": ["Multiline", [r"hessian/lambda_min$"]],
        "lr x lambda_max (2 = edge of stability)": ["Multiline", [r"hessian/sharpness_lr$"]],
        "trace": ["Multiline", [r"hessian/trace$"]],
        "gradient-weighted curvature |Hg|/|g|": ["Multiline", [r"hessian/grad_curvature$"]],
        "batch sharpness g'Hg/|g|^2 (SGD holds it at 2/lr)": ["Multiline", [r"hessian/batch_sharpness$"]],
        "Adam: preconditioned lambda_max": ["Multiline", [r"hessian/preconditioned_lambda_max$"]],
        "Adam: lr x preconditioned lambda_max / threshold (1 = edge of stability)": ["Multiline", [r"hessian/preconditioned_sharpness_ratio$"]],
        "lambda_max per block (hover for the block)": ["Multiline", [r"hessian/[^/]+/lambda_max$"]],
        "lambda_min per block (opt-in)": ["Multiline", [r"hessian/[^/]+/lambda_min$"]],
        "trace per block": ["Multiline", [r"hessian/[^/]+/trace$"]],
    },
    "lyapunov": {
        "maximal exponent (ln per step)": ["Multiline", [r"lyapunov/mle$"]],
        "finite-time exponent (ln per step)": ["Multiline", [r"lyapunov/ftle$"]],
        "local exponent of the free evolution (ln per step)": ["Multiline", [r"lyapunov/local_exponent$"]],
        "ln d(t), main vs twin weights": ["Multiline", [r"lyapunov/log_distance$"]],
        "twin's training loss": ["Multiline", [r"lyapunov/twin_loss$"]],
    },
    "curvature_lr": {
        "learning rate": ["Multiline", [r"curvature_lr/(optimizer_\d+/)?lr$"]],
        "curvature in use": ["Multiline", [r"curvature_lr/(optimizer_\d+/)?lambda$"]],
    },
    "diffusion": {
        "MSD exponent alpha (one point per window; Images: diffusion/exponents)": ["Multiline", [r"diffusion/exponent$"]],
        "short-lag exponent alpha_s": ["Multiline", [r"diffusion/exponent_short$"]],
        "long-lag exponent alpha_l": ["Multiline", [r"diffusion/exponent_long$"]],
        "crossover lag (steps)": ["Multiline", [r"diffusion/crossover$"]],
        "Hurst exponent H": ["Multiline", [r"diffusion/hurst$"]],
        "fractal dimension d_f": ["Multiline", [r"diffusion/fractal_dim$"]],
        "SGD temperature lr/2B": ["Multiline", [r"diffusion/temperature$"]],
    },
    "grad_tail": {
        "alpha (all entries; 2 = Gaussian)": ["Multiline", [r"grad_tail/alpha$"]],
        "alpha per layer (hover for the layer)": ["Multiline", [r"grad_tail/.+/alpha$"]],
        "stable vs Gaussian (mean log-likelihood ratio)": ["Multiline", [r"grad_tail/llr_gauss$"]],
        "stable vs Student t (mean log-likelihood ratio)": ["Multiline", [r"grad_tail/llr_student_t$"]],
        "Vuong p-value vs Gaussian": ["Multiline", [r"grad_tail/vuong_p$"]],
        "Vuong p-value vs Student t": ["Multiline", [r"grad_tail/vuong_p_student_t$"]],
        "fraction of exactly-zero gradient entries": ["Multiline", [r"grad_tail/(.+/)?zero_fraction$"]],
    },
    "gradient_noise": {
        "B_simple = tr(Sigma)/|G|^2 (examples)": ["Multiline", [r"gradient_noise/b_simple$"]],
        "B_simple / global batch size": ["Multiline", [r"gradient_noise/b_simple_over_batch$"]],
        "tr(Sigma), per-example gradient covariance": ["Multiline", [r"gradient_noise/trace_cov$"]],
        "|G|^2, squared true-gradient norm": ["Multiline", [r"gradient_noise/grad_norm_sq$"]],
    },
}


#: Charts drawn only when the instrument is set to log them: ``(area, pattern) -> predicate(callback,
#: optimizers)`` (``optimizers``: the Trainer's, or ``None`` when unknown).
OPT_IN_CHARTS: dict[tuple[str, str], Any] = {
    ("hessian", r"hessian/lambda_min$"): lambda cb, _: getattr(cb, "lambda_min", True),
    ("hessian", r"hessian/trace$"): lambda cb, _: getattr(cb, "trace", True),
    ("hessian", r"hessian/preconditioned_lambda_max$"): lambda cb, opts: getattr(cb, "preconditioned", True) and _adam_first(opts),
    ("hessian", r"hessian/preconditioned_sharpness_ratio$"): lambda cb, opts: getattr(cb, "preconditioned", True) and _adam_first(opts),
    ("hessian", r"hessian/[^/]+/lambda_max$"): lambda cb, _: bool(getattr(cb, "blocks", True)),
    ("hessian", r"hessian/[^/]+/lambda_min$"): lambda cb, _: bool(getattr(cb, "blocks", True)) and getattr(cb, "lambda_min", True),
    ("hessian", r"hessian/[^/]+/trace$"): lambda cb, _: bool(getattr(cb, "blocks", True)) and getattr(cb, "trace", True),
    ("lyapunov", r"lyapunov/local_exponent$"): lambda cb, _: getattr(cb, "mode", "twin") == "twin" and getattr(cb, "renormalize_every", None) is None,
    ("lyapunov", r"lyapunov/ftle$"): lambda cb, _: getattr(cb, "renormalize_every", 1) is not None,
    ("grad_tail", r"grad_tail/.+/alpha$"): lambda cb, _: getattr(cb, "per_layer", True),
}


def _adam_first(optimizers: list[Any] | None) -> bool:
    """Adam's charts: the first optimizer is Adam/AdamW (or the optimizers are not known yet)."""
    return optimizers is None or (bool(optimizers) and is_adam(optimizers[0]))


def custom_scalars_layout(callbacks: list[Callback], optimizers: list[Any] | None = None) -> dict[str, dict[str, list]]:
    """The layout for the attached instruments: one category per instrument and tag prefix
    (``probe_a/hessian``, ``val/hessian`` for a validation-split monitor), its patterns anchored at the prefix so that two instances never share a
    chart, and opt-in charts (``OPT_IN_CHARTS``) only when enabled. Without instruments: the full
    :data:`CUSTOM_SCALARS_LAYOUT`."""
    instruments = [cb for cb in callbacks if getattr(cb, "AREA", None) in CUSTOM_SCALARS_LAYOUT]
    if not instruments:
        return CUSTOM_SCALARS_LAYOUT
    layout: dict[str, dict[str, list]] = {}
    for cb in instruments:
        prefix = tag_prefix(cb)
        charts = {}
        for title, (kind, patterns) in CUSTOM_SCALARS_LAYOUT[cb.AREA].items():
            if all(OPT_IN_CHARTS.get((cb.AREA, p), lambda *_: True)(cb, optimizers) for p in patterns):
                charts[title] = [kind, ["^" + re.escape(prefix) + p for p in patterns]]
        layout[prefix + cb.AREA] = charts
    return layout


#: Headline quantities printed at the end of fit, in this order (also under a callback's ``prefix``, and
#: per optimizer: ``curvature_lr/optimizer_<i>/lr``).
HEADLINES: tuple[str, ...] = (
    "hessian/lambda_max",
    "hessian/sharpness_lr",
    "ggn/lambda_max",
    "lyapunov/mle",
    "lyapunov/local_exponent",
    "curvature_lr/lr",
    "diffusion/exponent",
    "diffusion/crossover",
    "grad_tail/alpha",
    "grad_tail/vuong_p",
    "gradient_noise/b_simple",
    "val/acc",
    "val/loss",
)

#: Quantities (last part of a tag) measured without estimation error: counters, the rate in use,
#: distances and losses of two actual runs, exact products (README, "What each chart means").
EXACT_QUANTITIES = frozenset({
    "hvps", "skipped", "reseeds", "distance", "log_distance", "twin_loss", "function_distance",
    "grad_curvature", "lr", "temperature", "saturated", "batch_sharpness",
})
#: Statistics without a standard error of their own (p-values of tests).
STATISTICS = frozenset({"vuong_p", "vuong_p_student_t", "crossover_pvalue"})
COMPANIONS = ("_error", "_stderr")

#: File names of the tidy table, written next to the logs.
TABLE_CSV, TABLE_JSON = "chaos_summary.csv", "chaos_summary.json"


@dataclass
class Row:
    """One tag of the tidy table."""

    tag: str
    value: float
    uncertainty: float | None  # the `<tag>_error` or `<tag>_stderr` logged at the same step
    uncertainty_kind: str  # "error", "stderr" or ""
    certification: str  # "certified", "statistical", "exact" or "heuristic"
    step: int | None
    stale: bool
    note: str


class ChaosSummary(Callback):
    """Writes the custom-scalars layout to TensorBoard at fit start; at fit end prints a report to
    stdout (rank zero) and writes a tidy table of the run next to the logs.

    The report lists the headline values (``HEADLINES``, also under a callback's ``prefix``) with
    their uncertainty, its kind and the step they were logged at; every instrument's skipped count
    with the reasons (each kind's count and last message); and where every logger writes.

    **Stale values.** A value is marked stale when it does not describe the end of the run:
    (a) its instrument (same ``prefix`` and area) skipped an estimate at a step *after* the value's
    step — ``<area>/skipped`` rose later — so the value is the last *successful* estimate, not the
    last attempted one; or (b) the module's weights are non-finite at the end of fit, so every value
    describes earlier weights.

    The tidy table ``chaos_summary.csv``/``.json`` (in the first logger's ``log_dir``, else
    ``trainer.default_root_dir``) has one row per logged tag: ``tag, value, uncertainty,
    uncertainty_kind`` (``error``: certified bound, ``stderr``: standard error), ``certification``
    (``certified``, ``statistical``, ``exact`` or ``heuristic``: no uncertainty attached),
    ``step, stale, note``. Values are those logged during this ``fit`` (after a resume: since it).
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        tbs = tensorboard_loggers(trainer)
        if tbs:
            layout = custom_scalars_layout(trainer.callbacks, trainer.optimizers)
            for tb in tbs:
                tb.experiment.add_custom_scalars(layout)

    # ------------------------------------------------------------------ table
    def rows(self, trainer: Trainer, pl_module: LightningModule | None = None) -> list[Row]:
        """One :class:`Row` per tag logged through this package (companions fold into their tag's row)."""
        ledger = logged_values(trainer)
        module = pl_module if pl_module is not None else trainer.lightning_module
        diverged = module is not None and not _finite_weights(module)
        areas = _area_keys(trainer)
        rows = []
        for tag in sorted(ledger):
            if tag.endswith(COMPANIONS) and tag.rsplit("_", 1)[0] in ledger:
                continue
            rows.append(_row(tag, ledger, areas, diverged))
        return rows

    def table_dir(self, trainer: Trainer) -> str:
        """The first logger's ``log_dir`` (else its ``save_dir``), else ``trainer.default_root_dir``."""
        folder = _folder(trainer.loggers[0]) if trainer.loggers else None
        return str(folder or trainer.default_root_dir)

    def write_table(self, trainer: Trainer, rows: list[Row]) -> tuple[str, str]:
        folder = self.table_dir(trainer)
        os.makedirs(folder, exist_ok=True)
        csv_path, json_path = os.path.join(folder, TABLE_CSV), os.path.join(folder, TABLE_JSON)
        fields = list(Row.__dataclass_fields__)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(asdict(r) for r in rows)
        with open(json_path, "w") as f:
            json.dump({"global_step": trainer.global_step, "rows": [asdict(r) for r in rows]}, f, indent=1, allow_nan=True)
            f.write("\n")
        return csv_path, json_path

    # ------------------------------------------------------------------ report
    def summary(self, trainer: Trainer, pl_module: LightningModule | None = None, table: tuple[str, str] | None = None,
                rows: list[Row] | None = None) -> str:
        """The report (``rows``: those of :meth:`rows`, when already computed)."""
        rows = {r.tag: r for r in (self.rows(trainer, pl_module) if rows is None else rows)}
        lines = [f"chaos_callbacks summary after {trainer.global_step} steps", ""]
        lines += _headline_lines(trainer, rows)
        lines += ["", "skipped estimates (kind x count: last message)"]
        lines += _skip_lines(trainer) or ["  (no chaos_callbacks instrument attached)"]
        lines += ["", "logs"]
        lines += _logger_lines(trainer) or ["  (no logger attached: values are in trainer.callback_metrics only)"]
        if table is not None:
            lines.append(f"  tidy table of all {len(rows)} tags: {table[0]}  and  {table[1]}")
        return "\n".join(lines)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        rows = self.rows(trainer, pl_module)
        table = self.write_table(trainer, rows)
        print("\n" + self.summary(trainer, pl_module, table, rows), flush=True)


# ---------------------------------------------------------------------- helpers
def _attribute(obj: Any, name: str) -> Any:
    """``getattr`` that tolerates properties raising (a logger without a local folder)."""
    try:
        return getattr(obj, name, None)
    except Exception:
        return None


def _folder(logger: Any) -> Any:
    """Where a logger writes locally: its ``log_dir``, else its ``save_dir`` (``None`` if neither)."""
    return _attribute(logger, "log_dir") or _attribute(logger, "save_dir")


def _finite_weights(module: LightningModule) -> bool:
    with torch.no_grad():
        return all(bool(torch.isfinite(p).all()) for p in module.parameters())


def _area_keys(trainer: Trainer) -> dict[str, Callback]:
    """``<prefix>[val/]<area>`` → the instrument writing those tags."""
    return {tag_prefix(cb) + cb.AREA: cb for cb in trainer.callbacks if isinstance(getattr(cb, "AREA", None), str)}


def _area_of(tag: str, areas: dict[str, Any]) -> str | None:
    """The longest ``<prefix><area>`` that ``tag`` lies under."""
    matches = [key for key in areas if tag.startswith(key + "/")]
    return max(matches, key=len) if matches else None


def _skip_counter(callback: Any) -> WarnOnce | None:
    counter = getattr(callback, "_warn", None) or getattr(callback, "_skip_warn", None)
    return counter if isinstance(counter, WarnOnce) else None


def _certification(tag: str, kind: str) -> str:
    quantity = tag.rsplit("/", 1)[-1]
    if kind:
        return "certified" if kind == "error" else "statistical"
    if quantity in EXACT_QUANTITIES:
        return "exact"
    return "statistical" if quantity in STATISTICS else "heuristic"


def _companion(tag: str, ledger: dict[str, Logged]) -> tuple[float | None, str]:
    """The uncertainty logged with ``tag`` at its step: ``<tag>_error`` or ``<tag>_stderr``; for
    ``sharpness_lr`` (lr × lambda_max) the bound lr × ``lambda_max_error``."""
    entry = ledger[tag]
    for suffix in COMPANIONS:
        other = ledger.get(tag + suffix)
        if other is not None and other.step == entry.step:
            return other.value, suffix[1:]
    if tag.endswith(("hessian/sharpness_lr", "ggn/sharpness_lr")):
        base = tag[: -len("sharpness_lr")]
        lam, err = ledger.get(base + "lambda_max"), ledger.get(base + "lambda_max_error")
        if lam is not None and err is not None and lam.step == err.step == entry.step and lam.value != 0:
            return abs(entry.value / lam.value) * err.value, "error"
    return None, ""


def _row(tag: str, ledger: dict[str, Logged], areas: dict[str, Any], diverged: bool) -> Row:
    entry = ledger[tag]
    uncertainty, kind = _companion(tag, ledger)
    notes = []
    area = _area_of(tag, areas)
    if area is not None and not tag.endswith("/skipped"):
        skipped = ledger.get(area + "/skipped")
        counter = _skip_counter(areas[area])
        skipped_this_run = counter is not None and bool(counter.kinds)
        if skipped is not None and skipped_this_run and skipped.value > 0 and skipped.changed > entry.step:
            notes.append(f"stale: {area} skipped at step {skipped.changed}, after this value")
    if diverged and not tag.endswith(("/skipped", "/reseeds", "/hvps")):
        notes.append("stale: non-finite weights at the end of fit")
    return Row(tag, entry.value, uncertainty, kind, _certification(tag, kind), entry.step, bool(notes), "; ".join(notes))


def _headline_lines(trainer: Trainer, rows: dict[str, Row]) -> list[str]:
    table: list[tuple[str, str, str, str, str, str]] = []
    metrics = trainer.callback_metrics
    for name in HEADLINES:
        area, quantity = name.rsplit("/", 1)
        # under a prefix, and per optimizer (curvature_lr/optimizer_<i>/lr, grad_tail/optimizer_<i>/alpha)
        headline = re.compile(rf"(^|.*/){re.escape(area)}/(optimizer_\d+/)?{re.escape(quantity)}$")
        for tag in sorted(set(rows) | set(metrics)):
            if not headline.match(tag):
                continue
            row = rows.get(tag)
            if row is None:  # the user's own metric (val/acc): value only
                table.append((tag, f"{float(metrics[tag]):.6g}", "", "", "", ""))
                continue
            pm = "" if row.uncertainty is None else f"± {row.uncertainty:.2g} ({row.uncertainty_kind})"
            table.append((tag, f"{row.value:.6g}", pm, row.certification, str(row.step), row.note))
    if not table:
        return ["no headline value was logged: every estimate was skipped or none was due (see skipped estimates)"]
    header = ("quantity", "value", "uncertainty", "kind", "step", "note")
    widths = [max(len(r[i]) for r in [header, *table]) for i in range(len(header))]
    out = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths)).rstrip()]
    out.append("  ".join("-" * w for w in widths[:-1]) + "  ----")
    out += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    return out


def _short(message: str, limit: int = 160) -> str:
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _skip_lines(trainer: Trainer) -> list[str]:
    lines = []
    for key, callback in sorted(_area_keys(trainer).items()):
        counter = _skip_counter(callback)
        count = 0 if counter is None else counter.count
        lines.append(f"  {key}/skipped = {count}")
        for attribute, warn in sorted(vars(callback).items()):
            if not isinstance(warn, WarnOnce):
                continue
            label = "" if warn is counter else f"[{attribute.strip('_').replace('warn', '').strip('_')}] "
            if warn is not counter and warn.count:
                lines.append(f"    {label}{warn.count} in all")
            for kind, n in warn.kinds.items():
                lines.append(f"    {label}{kind} x{n}: {_short(warn.messages[kind])}")
        if counter is not None and counter.count > sum(counter.kinds.values()):
            lines.append(f"    {counter.count - sum(counter.kinds.values())} before the run resumed (reasons not kept)")
    return lines


def _logger_lines(trainer: Trainer) -> list[str]:
    lines = []
    for logger in trainer.loggers:
        name = type(logger).__name__
        folder = _folder(logger)
        if isinstance(logger, CSVLogger) and folder:
            lines.append(f"  {name}: {os.path.join(folder, 'metrics.csv')}")
        elif isinstance(logger, TensorBoardLogger) and folder:
            lines.append(f"  {name}: {folder}   (tensorboard --logdir {folder})")
        elif folder:
            lines.append(f"  {name}: {folder}")
        else:
            lines.append(f"  {name}: no local folder (see the service it writes to)")
    return lines


def _gauss_newton_area() -> None:
    """A ``HessianSpectrumMonitor(curvature="ggn")`` writes the ``hessian`` quantities of the Gauss–Newton
    matrix under ``ggn/``: its category has the same charts, opt-in on the same settings."""
    rename = lambda pattern: pattern.replace("hessian/", "ggn/", 1)  # noqa: E731
    CUSTOM_SCALARS_LAYOUT["ggn"] = {
        title.replace("Hessian", "Gauss-Newton").replace("Hg", "Gg"): [kind, [rename(p) for p in patterns]]
        for title, (kind, patterns) in CUSTOM_SCALARS_LAYOUT["hessian"].items()
    }
    OPT_IN_CHARTS.update({("ggn", rename(p)): enabled for (area, p), enabled in list(OPT_IN_CHARTS.items()) if area == "hessian"})


_gauss_newton_area()
