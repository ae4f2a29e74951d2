"""chaos_callbacks: chaos-theory and statistical-physics instruments for PyTorch Lightning."""

from chaos_callbacks.callbacks import HessianSpectrumMonitor

__all__ = ["HessianSpectrumMonitor"]
__version__ = "0.1.0"
