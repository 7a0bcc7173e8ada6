"""Comparison reports of ablation grids, built from run directories alone.

Public entry points: ``reports.build.build_report`` (a grid directory) and
``reports.build.write_report`` (prepared ``GridData``). Imported lazily so that
``import reports.cli`` stays cheap for the twinflow-lab command line.
"""

from __future__ import annotations

__all__ = ["build_report", "write_report", "GridData", "load_grid", "prepare"]


def __getattr__(name: str):
    if name in ("build_report", "write_report"):
        from . import build  # lazy: matplotlib, pandas; 'import reports.cli' stays cheap

        return getattr(build, name)
    if name in ("GridData", "load_grid", "prepare"):
        from . import data  # lazy: pandas; 'import reports.cli' stays cheap

        return getattr(data, name)
    raise AttributeError(f"module 'reports' has no attribute {name!r}")
