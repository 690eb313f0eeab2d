"""Experiments behind the paper's figures and tables: cached, manifest-stamped tables for the notebooks.

Each figure notebook builds a :class:`FigureContext` from its papermill parameters and calls one
experiment function per table; plotting lives in :mod:`cleansight_analysis.plotting`.
"""

from .context import SMOKE_SAMPLES, FigureContext, fmt_pct

__all__ = ["FigureContext", "SMOKE_SAMPLES", "fmt_pct"]
