"""Matplotlib (Agg) figures for TensorBoard, one module per instrument; imported lazily by the
callbacks so that matplotlib is loaded only when a TensorBoard logger is attached."""

import matplotlib

matplotlib.use("Agg")
