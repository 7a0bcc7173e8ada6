"""First stage of a report: every number, no words.

``compute(data, ...)`` reduces a grid's telemetry to the tables the report shows and writes (per run, per arm,
differences against the baseline, each arm against the arm it extends, the teacher line, the claims' judgement).
``reports.document`` turns them into sections of words and figures; ``reports.publish`` writes the files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import pandas as pd

from .data import GridData
from .plots import BANDS, Band
from .stats import (
    MetricSpec,
    arm_table,
    compare,
    compare_all,
    metric_specs,
    resolve_primary_nfe,
    run_table,
    teacher_spread,
    teacher_values,
)
from .verdict import grid_claims, judge, verdict_csv

if TYPE_CHECKING:
    import optuna

    from harness.claims import Claim
    from harness.verdicts import Judgement


@dataclass(frozen=True, slots=True)
class Comparison:
    """One arm against the arm it extends (``GridData.predecessor``): ``stats.compare``'s rows."""

    arm: str
    ref: str
    table: pd.DataFrame


@dataclass(frozen=True, slots=True)
class ReportNumbers:
    """Everything a report says, as numbers and tables (no sentences): the output of ``compute``."""

    data: GridData
    """The grid's telemetry and statuses (the curves and sample grids are drawn from them)."""
    baseline: str | None
    """The arm the differences are taken against; None for a search's trials unless one was asked for."""
    nfe: tuple[int, ...]
    primary_nfe: int | None
    specs: tuple[MetricSpec, ...]
    runs: pd.DataFrame
    """``stats.run_table``: one row per run (runs.csv)."""
    summary: pd.DataFrame
    """``stats.arm_table``: one row per arm (summary.csv)."""
    diffs: pd.DataFrame
    """``stats.compare_all``: each arm minus the baseline, per metric (differences.csv); empty without a baseline."""
    comparisons: tuple[Comparison, ...]
    """Each arm against the arm it extends (the findings)."""
    teacher: dict[str, float]
    """The teacher line's metrics (mean over runs)."""
    teacher_spread: dict[str, float]
    """Max - min of each teacher metric over runs (non-zero: the runs did not share one teacher)."""
    judgement: "Judgement"
    """The claims' verdicts (``harness.verdicts``)."""
    judged_how: str
    """How the claims were judged: one look with every seed, or the grid's recorded looks."""
    claims_source: str
    """Where the claims came from."""
    studies: tuple["optuna.Study", ...]
    """Optuna studies of the grid (a search's study)."""
    band: Band
    max_points: int
    sample_seed: int | None

    @property
    def arms(self) -> tuple[str, ...]:
        return self.data.arms

    @property
    def is_search(self) -> bool:
        return self.data.is_search

    def csv_tables(self) -> dict[str, tuple[pd.DataFrame, bool]]:
        """File name -> (table, whether its index is written): the numbers at full precision."""
        return {"summary.csv": (self.summary, True), "runs.csv": (self.runs, True),
                "differences.csv": (self.diffs, False), "verdicts.csv": (verdict_csv(self.judgement), False)}


def compute(data: GridData, *, baseline: str | None = None, band: Band = "minmax", max_points: int = 400,
            primary_nfe: int | None = None, sample_seed: int | None = None,
            studies: Sequence["optuna.Study"] = (), claims: Sequence["Claim"] | None = None,
            claims_source: str = "") -> ReportNumbers:
    """The numbers of ``data``'s report. ``baseline``: default the first arm of a matrix's grid, none for a
    search's trials (they are ranked by the study, not compared with trial 0). ``claims``: None takes them
    from the matrix the grid was run from."""
    if band not in BANDS:
        raise ValueError(f"band must be one of {BANDS} (got {band!r})")
    if max_points < 10:
        raise ValueError(f"max_points must be >= 10 (got {max_points})")
    arms = data.arms
    if baseline is None and not data.is_search:
        baseline = arms[0]
    if baseline is not None and baseline not in arms:
        raise ValueError(f"baseline arm {baseline!r} is not in the grid; arms: {list(arms)}")
    nfe = data.nfe
    primary = resolve_primary_nfe(nfe, primary_nfe)
    specs = tuple(metric_specs(nfe, primary))
    runs = run_table(data)
    summary = arm_table(runs, arms, specs)
    diffs = compare_all(runs, arms=arms, baseline=baseline, specs=specs) if baseline is not None else pd.DataFrame()
    comparisons = []
    if not data.is_search:  # a search's trial groups extend nothing: the study ranks them
        for arm in arms:
            prev = data.predecessor(arm)
            if prev is not None:
                comparisons.append(Comparison(arm, prev, compare(runs, arm=arm, ref=prev, specs=specs)))
    if claims is None:
        claims, claims_source = grid_claims(data.grid_dir)
    judgement, how = judge(data, claims)
    return ReportNumbers(data=data, baseline=baseline, nfe=nfe, primary_nfe=primary, specs=specs, runs=runs,
                         summary=summary, diffs=diffs, comparisons=tuple(comparisons), teacher=teacher_values(data),
                         teacher_spread=teacher_spread(data), judgement=judgement, judged_how=how,
                         claims_source=claims_source, studies=tuple(studies), band=band, max_points=max_points,
                         sample_seed=sample_seed)
