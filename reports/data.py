"""The input of a report: one telemetry table and one status table of a grid.

The tables have the shape of ``harness.collect``: ``collect_grid`` (one row per
metrics record with grid/arm/seed/run_dir/kind/step columns plus the metric keys
of ``docs/run-directory.md``) and ``run_statuses`` (arm, seed, state, reason,
step, wall_s, run_dir). Reports read run directories only through them.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
from harness import collect
from twinflow_train.rundir import NONFINITE_TEXT, RunDirError
from twinflow_train.yamlio import InputError

METRIC_ID_COLUMNS = ("grid", "arm", "seed", "run_dir", "kind", "step")
STATUS_COLUMNS = ("arm", "seed", "state", "reason", "step", "wall_s", "run_dir")
KINDS = ("train", "val", "teacher")
_NFE_KEY = re.compile(r"^val/fd_nfe(\d+)$")


class GridDataError(InputError):
    """The grid's data (its tables, sample files or studies) cannot make a report; the message names the problem."""


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
    parents: Mapping[str, str | None] | None = None
    """Arm -> the arm it extends in the matrix (None for a root arm), from the grid manifest; None when unknown."""
    kind: str | None = None
    """What made the runs, from the grid manifest: 'grid' (a matrix's arms) or 'search' (a search's trial groups);
    None when unknown (in-memory data, or no manifest)."""

    @property
    def is_search(self) -> bool:
        """The arms are a search's trial groups: a study, not a ladder of arms that extend each other."""
        return self.kind == "search"

    def predecessor(self, arm: str) -> str | None:
        """The arm ``arm`` is compared with in the findings: the one it extends when the grid records it
        (None for a root arm), else the arm before it in the ladder order."""
        if self.parents is not None and arm in self.parents:
            parent = self.parents[arm]
            return parent if parent in self.arms else None
        i = self.arms.index(arm)
        return self.arms[i - 1] if i > 0 else None

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
            raise GridDataError(f"{table}: column {c!r} holds a non-numeric value ({e})") from None
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
        raise GridDataError(f"metrics table lacks column(s) {missing}; expected the collect_grid shape "
                         f"({', '.join(METRIC_ID_COLUMNS)} + metric keys)")
    missing = [c for c in STATUS_COLUMNS if c not in statuses.columns]
    if missing:
        raise GridDataError(f"status table lacks column(s) {missing}; expected {', '.join(STATUS_COLUMNS)}")
    # unique() first: iterating a million-row string column in Python costs seconds
    bad_kind = sorted({str(k) for k in metrics["kind"].dropna().unique()} - set(KINDS))
    if bad_kind:
        raise GridDataError(f"metrics table: unknown kind value(s) {bad_kind}; valid: {', '.join(KINDS)}")
    if metrics["kind"].isna().any():
        raise GridDataError(f"metrics table: {int(metrics['kind'].isna().sum())} record(s) without 'kind'")

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
            raise GridDataError(f"arm_order names arm(s) {unknown} that are not in the grid; arms: {sorted(present)}")
        if len(set(order)) != len(order):
            raise GridDataError(f"arm_order lists an arm twice: {order}")
        left = sorted(present - set(order))
        if left:
            raise GridDataError(f"arm_order does not list arm(s) {left} of the grid")
    else:
        order = [a for a in seen if a in present]
    if not order:
        raise GridDataError("the grid has no runs (empty metrics and status tables)")

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
        raise GridDataError(f"status table: run(s) listed twice: {st.loc[dup, ['arm', 'seed']].values.tolist()}")
    source = "order given" if arm_order is not None else "order of first appearance in the telemetry tables"
    return GridData(name=name, metrics=m, statuses=st, arms=tuple(order), grid_dir=grid_dir, divergence=divergence,
                    arm_order_source=source)


def load_grid(*, grid_dir: str | Path, arm_order: Sequence[str] | None = None) -> GridData:
    """Read a grid's run directories through the harness's collection functions (``harness.collect``)."""
    grid_dir = Path(grid_dir)
    if not grid_dir.is_dir():
        raise FileNotFoundError(f"grid directory {grid_dir} does not exist")
    statuses = collect.run_statuses(grid_dir)
    if statuses.empty:  # checked first: collecting writes the grid's metrics cache
        raise GridDataError(f"{grid_dir}: no run directories (<arm>/seed-<k>/) in this grid directory")
    metrics = collect.collect_grid(grid_dir)
    divergence = collect.divergence_summary(metrics) if len(metrics) else None
    source = "order given"
    if arm_order is None:
        arm_order, source = grid_arm_order(grid_dir, statuses)
    data = prepare(name=grid_dir.resolve().name, metrics=metrics, statuses=statuses, arm_order=arm_order,
                   grid_dir=grid_dir, divergence=divergence)
    return dataclasses.replace(data, arm_order_source=source, parents=_manifest_parents(grid_dir),
                               kind=_manifest_kind(grid_dir))


def shown_path(path: str | Path | None, grid_dir: Path | None) -> str:
    """A path as a report shows it: relative to the grid directory (``../matrix.yaml``), never the absolute path
    of the machine that ran the grid; the file name alone where no relative path exists (another drive)."""
    if path is None:
        return "(unknown)"
    p = Path(path)
    if not p.is_absolute() or grid_dir is None:
        return str(p) if not p.is_absolute() else p.name
    try:
        return os.path.relpath(p, Path(grid_dir).resolve())
    except ValueError:
        return p.name


def _manifest_kind(grid_dir: Path) -> str | None:
    """``kind`` of the grid manifest ('grid' or 'search'); None where there is none or it does not load."""
    try:
        manifest = collect.grid_manifest(grid_dir)
    except RunDirError:
        return None  # grid_arm_order already says in the report that the manifest does not load
    kind = (manifest or {}).get("kind")
    return str(kind) if kind is not None else None


def _manifest_parents(grid_dir: Path) -> dict[str, str | None] | None:
    """``parents`` of the grid manifest; None where there is no manifest, it does not load, or it has none."""
    try:
        manifest = collect.grid_manifest(grid_dir)
    except RunDirError:
        return None  # grid_arm_order already says in the report that the manifest does not load
    parents = (manifest or {}).get("parents")
    return {str(k): (None if v is None else str(v)) for k, v in parents.items()} if isinstance(parents, dict) else None


def grid_arm_order(grid_dir: Path, statuses: pd.DataFrame) -> tuple[list[str] | None, str]:
    """The ladder order of the arms and where it came from.

    The harness directory layout sorts arms by name, so the order comes from the grid
    manifest the harness writes (the matrix's arms in file order). A search's trial
    groups, and a grid run before the manifest existed, are ordered by when each arm's
    first run was created (``run_statuses``' ``created``); the returned source says which.
    """
    created = _creation_order(statuses)
    try:
        manifest = collect.grid_manifest(grid_dir)
    except RunDirError as e:
        return created, f"the grid manifest does not load ({e}); order in which each arm's first run was created"
    if manifest is None:
        why = "no grid manifest (the grid was run before the harness wrote one)"
    elif manifest.get("kind") == "search" or manifest.get("arms") is None:
        why = f"the trial groups of search spec {shown_path(manifest.get('source'), grid_dir)}"
    else:
        names = [str(a) for a in manifest["arms"]]
        order = [a for a in names if a in created] + [a for a in created if a not in names]
        return order, f"matrix file {shown_path(manifest.get('source'), grid_dir)} (grid manifest)"
    if created is None:
        return None, why + "; status table order, as no run has a harness.json"
    return created, why + "; order in which each arm's first run was created"


def _creation_order(statuses: pd.DataFrame) -> list[str] | None:
    """Arms by the creation time of their first run (ties by name), then arms without one in table order."""
    if "created" not in statuses.columns or not statuses["created"].notna().any():
        return None
    first = statuses.dropna(subset=["created"]).groupby(statuses["arm"].astype(str), sort=False)["created"].min()
    order = sorted(first.index, key=lambda a: (first[a], a))
    return order + [str(a) for a in pd.unique(statuses["arm"].astype(str)) if str(a) not in order]
