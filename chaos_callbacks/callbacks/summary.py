"""``ChaosSummary``: a TensorBoard custom-scalars layout and an end-of-fit table of headline numbers."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from chaos_callbacks.callbacks._plumbing import tensorboard_loggers

#: One TensorBoard "Custom Scalars" category per instrument; anchored regexes select the charts (so that
#: ``<tag>_error``/``<tag>_stderr`` companions do not join their tag's chart).
CUSTOM_SCALARS_LAYOUT: dict[str, dict[str, list]] = {
    "hessian": {
        "top eigenvalues and most negative": ["Multiline", [r"hessian/eig_\d+$", "hessian/lambda_min$"]],
        "lr x lambda_max (2 = edge of stability)": ["Multiline", ["hessian/sharpness_lr$"]],
        "trace": ["Multiline", ["hessian/trace$"]],
        "gradient-weighted curvature |Hg|/|g|": ["Multiline", ["hessian/grad_curvature$"]],
    },
    "lyapunov": {
        "exponents (ln per step)": ["Multiline", ["lyapunov/mle$", "lyapunov/ftle$", "lyapunov/local_exponent$"]],
        "ln d(t)": ["Multiline", ["lyapunov/log_distance$"]],
        "twin loss": ["Multiline", ["lyapunov/twin_loss$", "train/loss_step$", "train/loss$"]],
    },
    "curvature_lr": {
        "learning rate": ["Multiline", ["curvature_lr/lr$"]],
        "curvature in use": ["Multiline", ["curvature_lr/lambda$"]],
    },
    "diffusion": {
        "MSD exponents": ["Multiline", ["diffusion/exponent$", "diffusion/exponent_short$", "diffusion/exponent_long$"]],
        "crossover lag": ["Multiline", ["diffusion/crossover$"]],
        "Hurst and fractal dimension": ["Multiline", ["diffusion/hurst$", "diffusion/fractal_dim$"]],
        "SGD temperature lr/2B": ["Multiline", ["diffusion/temperature$"]],
    },
    "grad_tail": {
        "alpha (global and per layer)": ["Multiline", [r"grad_tail/(.+/)?alpha$"]],
        "stable vs Gaussian and vs Student t (mean log-likelihood ratio)": [
            "Multiline", ["grad_tail/llr_gauss$", "grad_tail/llr_student_t$"]
        ],
        "Vuong p-values": ["Multiline", ["grad_tail/vuong_p$", "grad_tail/vuong_p_student_t$"]],
        "fraction of exactly-zero gradient entries": ["Multiline", [r"grad_tail/(.+/)?zero_fraction$"]],
    },
}


#: Headline quantities printed at the end of fit, in this order.
HEADLINES: tuple[str, ...] = (
    "hessian/lambda_max",
    "hessian/sharpness_lr",
    "lyapunov/mle",
    "lyapunov/local_exponent",
    "curvature_lr/lr",
    "diffusion/exponent",
    "diffusion/crossover",
    "grad_tail/alpha",
    "grad_tail/vuong_p",
    "val/acc",
    "val/loss",
)


class ChaosSummary(Callback):
    """Writes the custom-scalars layout to TensorBoard at fit start and prints a summary at fit end."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for tb in tensorboard_loggers(trainer):
            tb.experiment.add_custom_scalars(CUSTOM_SCALARS_LAYOUT)

    def summary(self, trainer: Trainer) -> str:
        metrics = trainer.callback_metrics
        # each headline as logged, also under a callback's ``prefix`` (``probe_a/hessian/lambda_max``)
        rows = [(tag, float(metrics[tag])) for name in HEADLINES for tag in sorted(metrics) if tag == name or tag.endswith("/" + name)]
        width = max([len(n) for n, _ in rows] + [10])
        lines = [f"{'quantity':<{width}}  value", f"{'-' * width}  ----------"]
        lines += [f"{name:<{width}}  {value:.6g}" for name, value in rows]
        log_dirs = sorted({tb.log_dir for tb in tensorboard_loggers(trainer)})
        if log_dirs:
            lines.append("")
            lines += [f"TensorBoard logs: {d}   (tensorboard --logdir {d})" for d in log_dirs]
        return "\n".join(lines)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rank_zero_info("\nchaos_callbacks summary after %d steps\n%s" % (trainer.global_step, self.summary(trainer)))
