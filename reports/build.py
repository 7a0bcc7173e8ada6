"""Build a grid's report: report.html (self-contained), report.md + PNGs, and CSVs of the numbers.

``write_report`` runs the three stages: ``reports.compute`` (numbers), ``reports.document`` (words and figures),
``reports.publish`` (files); ``build_report`` reads a grid directory first.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from tqdm.auto import tqdm

from .compute import compute
from .data import GridData, load_grid
from .document import document
from .plots import Band
from .publish import publish
from .study import find_studies

if TYPE_CHECKING:
    import optuna

    from harness.claims import Claim


def write_report(data: GridData, *, out_dir: str | Path, baseline: str | None = None, band: Band = "minmax",
                 max_points: int = 400, primary_nfe: int | None = None,
                 sample_seed: int | None = None, studies: Sequence["optuna.Study"] = (), title_note: str = "",
                 claims: Sequence["Claim"] | None = None, claims_source: str = "", progress: bool = True) -> Path:
    """The report of ``data`` in ``out_dir``, in three stages: ``compute`` (the numbers), ``document`` (the words and
    figures), ``publish`` (the files); returns the path of report.html.

    ``baseline``: the arm differences are taken against (default: the first arm; none for a search's trials).
    ``claims``: the claims the verdict section judges; None takes them from the matrix file the runs were
    made from (``claims_source`` says where given ones came from).
    """
    t0 = time.perf_counter()
    with tqdm(total=3, desc="report", disable=not progress) as bar:
        numbers = compute(data, baseline=baseline, band=band, max_points=max_points, primary_nfe=primary_nfe,
                          sample_seed=sample_seed, studies=studies, claims=claims, claims_source=claims_source)
        bar.update(1)
        doc = document(numbers, title_note=title_note)
        bar.update(1)
        html_path = publish(doc, out_dir, csvs=numbers.csv_tables())
        bar.update(1)
    if progress:
        print(f"report: {html_path} ({time.perf_counter() - t0:.1f} s)")
    return html_path


def build_report(*, grid_dir: str | Path, out_dir: str | Path | None = None, baseline: str | None = None,
                 arm_order: Sequence[str] | None = None, band: Band = "minmax", max_points: int = 400,
                 primary_nfe: int | None = None,
                 sample_seed: int | None = None, studies: Sequence["optuna.Study"] | None = None,
                 claims: Sequence["Claim"] | None = None, claims_source: str = "",
                 progress: bool = True) -> Path:
    """Report of the grid in ``grid_dir`` (default output: ``grid_dir/report``); returns report.html's path.

    ``studies``: Optuna studies for the study section; None looks for ``*.journal`` in the grid directory.
    ``claims``: the claims the verdict section judges, and ``claims_source`` where they come from (default: the
    claims of the grid's own matrix, from the grid manifest).
    """
    grid_dir = Path(grid_dir)
    data = load_grid(grid_dir=grid_dir, arm_order=arm_order)
    if studies is None:
        studies = find_studies(grid_dir)
    return write_report(data, out_dir=out_dir if out_dir is not None else grid_dir / "report", baseline=baseline,
                        band=band, max_points=max_points,
                        primary_nfe=primary_nfe, sample_seed=sample_seed, studies=studies, claims=claims,
                        claims_source=claims_source, progress=progress)
