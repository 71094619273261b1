"""Shared bits of the PNG + JSON reports every stage writes (each stage draws its own panels)."""
from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: clusters and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from .artifacts import atomic_path, write_json_atomic  # noqa: E402


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure atomically and close it."""
    path = Path(path)
    with atomic_path(path, suffix=path.suffix) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def provenance() -> dict:
    """Versions and host, stamped into every report so numbers can be traced to what made them."""
    import sys

    import numpy

    from . import __version__

    out = {"tokenfold": __version__, "python": platform.python_version(), "numpy": numpy.__version__}
    # versions of the heavy libraries only when the stage already loaded them (importing torch costs seconds)
    for mod in ("torch", "transformers", "esm", "sklearn", "gemmi", "h5py"):
        if mod in sys.modules:
            out[mod] = getattr(sys.modules[mod], "__version__", "?")
    out.update(host=platform.node(), time=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return out


def write_report(path: str | os.PathLike, report: dict) -> Path:
    """JSON report with a provenance block appended."""
    report = dict(report)
    report.setdefault("provenance", provenance())
    write_json_atomic(path, report)
    return Path(path)


def subplots(n: int, ncols: int = 3, size: float = 4.0):
    """A grid of n panels (extra axes hidden)."""
    nrows = (n + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, min(n, ncols), figsize=(size * min(n, ncols), size * 0.8 * nrows), squeeze=False)
    flat = axes.ravel()
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]
