"""Hessian-vector products and spectral solvers (torch only, no Lightning)."""

from chaos_callbacks.curvature.density import SpectralDensity, spectral_density
from chaos_callbacks.curvature.drift import (
    SplitCurvature,
    gradient_curvatures,
    gradient_weighted_curvature,
    principal_flow_coefficients,
    split_gradient_curvature,
    stability_regime,
)
from chaos_callbacks.curvature.ggn import GGNOperator
from chaos_callbacks.curvature.hvp import HessianOperator, NoTrainableParametersError, flatten, unflatten
from chaos_callbacks.curvature.lanczos import LanczosResult, PowerResult, lanczos, power_iteration, random_start_failure_bound
from chaos_callbacks.curvature.lyapunov_map import LyapunovMapResult, lyapunov_map_lambda_max
from chaos_callbacks.curvature.trace import TraceEstimate, hutchinson_trace

__all__ = [
    "GGNOperator",
    "HessianOperator",
    "LanczosResult",
    "LyapunovMapResult",
    "NoTrainableParametersError",
    "PowerResult",
    "SpectralDensity",
    "SplitCurvature",
    "TraceEstimate",
    "flatten",
    "gradient_curvatures",
    "gradient_weighted_curvature",
    "hutchinson_trace",
    "lanczos",
    "lyapunov_map_lambda_max",
    "power_iteration",
    "principal_flow_coefficients",
    "random_start_failure_bound",
    "spectral_density",
    "split_gradient_curvature",
    "stability_regime",
    "unflatten",
]
