"""Shared helpers of the paper reproductions: where their outputs go and how a report is written.

Not part of the package. Every reproduction imports its helpers from here (``reproductions.common``)
and runs from the repository root as ``python -m reproductions.<paper>``. The generic helpers
(data root, quiet Lightning, Markdown tables) are those of the benchmarks, re-exported.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import DEFAULT_DATA_ROOT, add_common_args, emit, markdown_table, quiet_lightning

__all__ = [
    "DEFAULT_DATA_ROOT",
    "RESULTS",
    "add_common_args",
    "emit",
    "finish_report",
    "markdown_table",
    "open_outputs",
    "quiet_lightning",
    "save_figure",
]

#: Each reproduction writes to ``RESULTS / <paper>`` by default (git-ignored).
RESULTS = Path(__file__).resolve().parent / "results"


def open_outputs(out: Path) -> float:
    """Create the output folder ``out`` and return the start time for :func:`finish_report`."""
    out.mkdir(parents=True, exist_ok=True)
    return time.perf_counter()


def finish_report(out: Path, report: list[str], start: float, figures: Sequence[Path] = ()) -> Path:
    """Append the saved figures and the run time to ``report``, print it and write ``out/report.md``."""
    report += [f"\nsaved {path}" for path in figures]
    report.append(f"\nTotal run time {time.perf_counter() - start:.0f} s.")
    text = "\n".join(report) + "\n"
    print(text, flush=True)
    path = out / "report.md"
    path.write_text(text)
    return path


def save_figure(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as a PNG (tight layout, 120 dpi) and return its path."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path
