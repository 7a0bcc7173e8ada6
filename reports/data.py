"""The input of a report: one telemetry table and one status table of a grid.

The tables have the shape of ``harness.collect``: ``collect_grid`` (one row per
metrics record with grid/arm/seed/run_dir/kind/step columns plus the metric keys
of ``docs/run-directory.md``) and ``run_statuses`` (arm, seed, state, reason,
step, wall_s, run_dir). Reports read run directories only through them.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd
from twinflow_train.rundir import NONFINITE_TEXT

METRIC_ID_COLUMNS = ("grid", "arm", "seed", "run_dir", "kind", "step")
STATUS_COLUMNS = ("arm", "seed", "state", "reason", "step", "wall_s", "run_dir")
KINDS = ("train", "val", "teacher")
_NFE_KEY = re.compile(r"^val/fd_nfe(\d+)$")


@dataclass(frozen=True, slots=True)
class GridData:
    """Everything a report is computed from."""

    name: str
    """Grid name (title of the report)."""
    metrics: pd.DataFrame
    """One row per metrics record (``collect_grid`` shape), metric columns numeric."""
    statuses: pd.DataFrame
    """One row per run (``run_statuses`` shape)."""
    arms: tuple[str, ...]
    """Arms in ladder order; the first is the default baseline."""
    grid_dir: Path | None = None
    """Where the runs live (None for in-memory data)."""
    divergence: pd.DataFrame | None = None
    """``divergence_summary`` of the harness, when available (shown per run)."""
    arm_order_source: str = "order given"
    """Where the arm order came from (said in the report)."""

    @property
    def nfe(self) -> tuple[int, ...]:
        """Student step counts with validation sample metrics in the telemetry."""
        found = sorted(int(m.group(1)) for c in self.metrics.columns if (m := _NFE_KEY.match(str(c))))
        return tuple(found)

    def has(self, key: str) -> bool:
        """A metric column exists and holds at least one value."""
        return key in self.metrics.columns and bool(self.metrics[key].notna().any())


def _numeric(df: pd.DataFrame, columns: Sequence[str], *, table: str) -> pd.DataFrame:
    """Metric columns as float. The trainer writes non-finite values as the strings
    'nan'/'inf'/'-inf' (JSON has none); those become float NaN/inf, anything else is an error."""
    out = {}
    for c in columns:
        s = df[c]
        if pd.api.types.is_bool_dtype(s) or pd.api.types.is_numeric_dtype(s):
            out[c] = s.astype(float)
            continue
        try:
            out[c] = pd.to_numeric(s.replace(NONFINITE_TEXT), errors="raise").astype(float)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{table}: column {c!r} holds a non-numeric value ({e})") from None
    return df.assign(**out) if out else df


def prepare(*, name: str, metrics: pd.DataFrame, statuses: pd.DataFrame, arm_order: Sequence[str] | None = None,
            grid_dir: Path | None = None, divergence: pd.DataFrame | None = None) -> GridData:
    """Check the tables, fix dtypes, and resolve the arm order.

    ``arm_order`` given: every listed arm must be in the data and every arm in
    the data must be listed. Not given: the categorical order of ``arm`` if it is
    categorical, else the order in which arms first appear in ``statuses`` (the
    harness lists them in matrix order), then in ``metrics``.
    """
    missing = [c for c in METRIC_ID_COLUMNS if c not in metrics.columns]
    if missing:
        raise ValueError(f"metrics table lacks column(s) {missing}; expected the collect_grid shape "
                         f"({', '.join(METRIC_ID_COLUMNS)} + metric keys)")
    missing = [c for c in STATUS_COLUMNS if c not in statuses.columns]
    if missing:
        raise ValueError(f"status table lacks column(s) {missing}; expected {', '.join(STATUS_COLUMNS)}")
    # unique() first: iterating a million-row string column in Python costs seconds
    bad_kind = sorted({str(k) for k in metrics["kind"].dropna().unique()} - set(KINDS))
    if bad_kind:
        raise ValueError(f"metrics table: unknown kind value(s) {bad_kind}; valid: {', '.join(KINDS)}")
    if metrics["kind"].isna().any():
        raise ValueError(f"metrics table: {int(metrics['kind'].isna().sum())} record(s) without 'kind'")

    seen: list[str] = []
    for frame in (statuses, metrics):
        col = frame["arm"]
        values = list(col.cat.categories) if isinstance(col.dtype, pd.CategoricalDtype) else col.unique()
        for a in values:
            if str(a) not in seen:
                seen.append(str(a))
    present = {str(a) for a in metrics["arm"].unique()} | {str(a) for a in statuses["arm"].unique()}
    if arm_order is not None:
        order = [str(a) for a in arm_order]
        unknown = [a for a in order if a not in present]
        if unknown:
            raise ValueError(f"arm_order names arm(s) {unknown} that are not in the grid; arms: {sorted(present)}")
        if len(set(order)) != len(order):
            raise ValueError(f"arm_order lists an arm twice: {order}")
        left = sorted(present - set(order))
        if left:
            raise ValueError(f"arm_order does not list arm(s) {left} of the grid")
    else:
        order = [a for a in seen if a in present]
    if not order:
        raise ValueError("the grid has no runs (empty metrics and status tables)")

    metric_cols = [c for c in metrics.columns if c not in METRIC_ID_COLUMNS]
    m = _numeric(metrics, metric_cols, table="metrics table")
    cat = pd.CategoricalDtype(order, ordered=True)
    m = m.assign(arm=m["arm"].astype(str).astype(cat), seed=m["seed"].astype(int), kind=m["kind"].astype(str),
                 step=m["step"].astype(np.int64))
    st = _numeric(statuses, ["step", "wall_s"], table="status table")
    st = st.assign(arm=st["arm"].astype(str).astype(cat), seed=st["seed"].astype(int),
                   state=st["state"].astype(str)).sort_values(["arm", "seed"]).reset_index(drop=True)
    dup = st.duplicated(["arm", "seed"])
    if dup.any():
        raise ValueError(f"status table: run(s) listed twice: {st.loc[dup, ['arm', 'seed']].values.tolist()}")
    source = "order given" if arm_order is not None else "order of first appearance in the telemetry tables"
    return GridData(name=name, metrics=m, statuses=st, arms=tuple(order), grid_dir=grid_dir, divergence=divergence,
                    arm_order_source=source)


def load_grid(*, grid_dir: str | Path, arm_order: Sequence[str] | None = None) -> GridData:
    """Read a grid's run directories through the harness's collection functions."""
    grid_dir = Path(grid_dir)
    if not grid_dir.is_dir():
        raise FileNotFoundError(f"grid directory {grid_dir} does not exist")
    from harness import collect

    statuses = collect.run_statuses(grid_dir)
    if statuses.empty:  # checked first: collecting writes the grid's metrics cache
        raise ValueError(f"{grid_dir}: no run directories (<arm>/seed-<k>/) in this grid directory")
    metrics = collect.collect_grid(grid_dir)
    divergence = collect.divergence_summary(metrics) if len(metrics) else None
    source = "order given"
    if arm_order is None:
        arm_order, source = matrix_arm_order(statuses)
    data = prepare(name=grid_dir.resolve().name, metrics=metrics, statuses=statuses, arm_order=arm_order,
                   grid_dir=grid_dir, divergence=divergence)
    return dataclasses.replace(data, arm_order_source=source)


def is_matrix_file(path: Path) -> bool:
    """A file with ``arms`` (an ablation matrix), as opposed to a search spec."""
    from twinflow_train.yamlio import InputError, read_mapping

    try:
        data = read_mapping(path, kind="matrix")
    except InputError:
        return True  # let the matrix loader report what is wrong with it
    return "arms" in data


def run_records(statuses: pd.DataFrame) -> dict[str, list]:
    """Arm -> the ``harness.json`` records of its runs (runs without one are left out)."""
    from harness.store import read_record

    records: dict[str, list] = {}
    for arm, rd in statuses[["arm", "run_dir"]].itertuples(index=False):  # one per run
        rec = read_record(Path(rd)) if isinstance(rd, str) else None
        if rec is not None:
            records.setdefault(str(arm), []).append(rec)
    return records


def matrix_arm_order(statuses: pd.DataFrame) -> tuple[list[str] | None, str]:
    """The ladder order of the arms and where it came from.

    The harness directory layout sorts arms by name, so the order comes from the
    matrix file each run's ``harness.json`` names (its arms in file order). When
    that file is gone or no longer loads, the order in which each arm's first run
    was created is used, and the returned source says why.
    """
    from harness.matrix import MatrixError, load_matrix

    records = run_records(statuses)
    if not records:
        return None, "status table order, as no run has a harness.json"
    created = sorted(records, key=lambda a: (min(r.created for r in records[a]), a))
    created += [str(a) for a in pd.unique(statuses["arm"].astype(str)) if str(a) not in created]
    matrices = sorted({r.matrix for rs in records.values() for r in rs})
    why = ""
    if len(matrices) == 1 and Path(matrices[0]).is_file() and not is_matrix_file(Path(matrices[0])):
        # an Optuna search writes its spec here; its trials were created in trial order
        why = f"runs made from {matrices[0]}, which has no 'arms' (a search spec); "
    elif len(matrices) == 1 and Path(matrices[0]).is_file():
        try:
            names = [a.name for a in load_matrix(matrices[0]).arms]
        except MatrixError as e:
            why = f"matrix file {matrices[0]} no longer loads ({e.problems[0]}); "
        else:
            order = [a for a in names if a in created] + [a for a in created if a not in names]
            return order, f"matrix file {matrices[0]}"
    elif len(matrices) > 1:
        why = f"runs name {len(matrices)} different matrix files; "
    else:
        why = f"matrix file {matrices[0]} is gone; "
    return created, why + "order in which each arm's first run was created"
