"""Lightning adapters: one callback per module, plus shared plumbing."""

from chaos_callbacks.callbacks.hessian_spectrum import HessianSpectrumMonitor

__all__ = ["HessianSpectrumMonitor"]
