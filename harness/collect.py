"""Telemetry of a grid as pandas tables, read from run directories alone.

Four functions with stable signatures (the reports package imports them):

``collect_grid(grid_dir, *, use_cache=True, on_bad_line="raise") -> DataFrame``
    One row per metrics record of every run (``event`` records, which are not
    metrics, are left out). Columns: ``grid``, ``arm``, ``seed``
    (int), ``run_dir`` (str), ``kind`` (``train`` | ``val`` | ``teacher``), ``step``
    (int), then every metric key of the records (float; NaN where a record lacks
    the key, and where the trainer logged a non-finite value it stays non-finite).
    A forked run's first steps are its parent's records (``rundir.read_run_metrics``),
    flagged 1.0 in the column ``fork/shared``.
    Sorted by arm, seed, step, kind. Cached in ``<grid>/.harness/metrics.parquet``; the
    cache holds the size and mtime of every metrics.jsonl it was built from and is
    rebuilt when any of them changes (or a run appears or disappears).
    A line that does not parse, other than a torn last line, raises naming it;
    with ``on_bad_line="skip"`` it is left out and listed in ``df.attrs["problems"]``
    (run_dir -> the first bad line), so one damaged file does not hide the grid.

``run_statuses(grid_dir) -> DataFrame``
    One row per run: ``arm``, ``seed``, ``state``, ``reason``, ``step``, ``wall_s``,
    ``run_dir``, plus ``attempts``, ``identity``, ``created`` (when the harness made the run directory,
    seconds since the epoch; NaN without ``harness.json``) and ``problem``. ``state`` is status.json's,
    except a ``running`` run that no harness and no live process is running, shown as
    ``interrupted``; ``step`` and ``wall_s`` (the last ``time/wall_s``, summed over resumes)
    come from the end of metrics.jsonl, read from the end of the file. ``problem`` names a
    file of the run that could not be read (status.json, harness.json, a bad metrics line
    in the part read); such a run is still listed. ``fork``: for a forked run, whose first steps
    it shares ("renoise/seed-0 after step 599"), else None.

``grid_manifest(grid_dir) -> dict | None``
    What the harness wrote about the grid as a whole (``<grid>/.harness/grid.json``): ``kind``
    (``grid`` | ``search``), ``source`` (the matrix or search spec), ``arms`` (the matrix's
    order; None for a search), ``parents`` (arm -> the arm it extends, None for a root; absent
    in manifests written before it was recorded), ``claims`` (``harness.claims.Claim.to_json``). None for a grid
    run before the harness wrote one; ``RunDirError`` when the file does not parse.

``divergence_summary(df, *, rise_k=3) -> DataFrame``
    One row per run of a ``collect_grid`` table: ``grid``, ``arm``, ``seed``,
    ``run_dir``, ``first_nonfinite_step``, ``n_spikes``, ``max_grad_norm``,
    ``val_rise_step``, ``val_rise_k``. See the function's docstring for definitions.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from twinflow_train.rundir import (FORK_FROM, RunDirError, atomic_path, fork_origin, read_run_metrics, record_kind,
                                   tail_metrics)

from .monitor import pid_is_trainer
from .store import HARNESS_FILE, METRICS_FILE, iter_run_dirs, read_grid_manifest, read_json, read_status

ID_COLUMNS = ["grid", "arm", "seed", "run_dir", "kind", "step"]
STATUS_COLUMNS = ["arm", "seed", "state", "reason", "step", "wall_s", "run_dir", "attempts", "identity", "created",
                  "problem", "fork"]
SHARED_COLUMN = "fork/shared"
"""1.0 on the records a forked run shares with its parent (read from the parent's own file), NaN on its own."""
SUMMARY_COLUMNS = ["grid", "arm", "seed", "run_dir", "first_nonfinite_step", "n_spikes", "max_grad_norm",
                   "val_rise_step", "val_rise_k"]
CACHE_NAME = "metrics.parquet"
_MANIFEST_KEY = b"twinflow_lab.manifest"
_CACHE_VERSION = 2  # 2: forked runs read their parents' records


def _grid_name(grid_dir: Path) -> str:
    return Path(grid_dir).resolve().name


def _manifest(grid_dir: Path) -> dict[str, Any]:
    files = {}
    for arm, seed, run_dir in iter_run_dirs(grid_dir):
        p = run_dir / METRICS_FILE
        if p.is_file():
            st = p.stat()
            files[f"{arm}/seed-{seed}"] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return {"version": _CACHE_VERSION, "files": files}


def _build(grid_dir: Path, *, strict: bool) -> tuple[pd.DataFrame, dict[str, str]]:
    grid = _grid_name(grid_dir)
    rows: list[dict[str, Any]] = []
    problems: dict[str, str] = {}
    for arm, seed, run_dir in iter_run_dirs(grid_dir):
        # a forked run's first steps are its parent's own records (rundir.read_run_metrics), never copies
        read = read_run_metrics(run_dir, strict=strict)
        if read.problem:
            problems[str(run_dir)] = read.problem
        for rec in read.records:
            kind = record_kind(rec)
            if kind == "event":
                continue
            row = {"grid": grid, "arm": arm, "seed": seed, "run_dir": str(run_dir), "kind": kind,
                   "step": int(rec["step"])}
            for k, v in rec.items():
                if k in ("kind", "step"):
                    continue
                if k == FORK_FROM:  # the path of the run whose file holds it: a flag in the table
                    row[SHARED_COLUMN] = 1.0
                    continue
                row[k] = v
            rows.append(row)
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("seed", "step") else "object")
                             for c in ID_COLUMNS}), problems
    df = pd.DataFrame.from_records(rows)
    metric_cols = [c for c in df.columns if c not in ID_COLUMNS]
    for c in metric_cols:
        # every logged value is a number; a non-number is kept as text so nothing is silently coerced
        converted = pd.to_numeric(df[c], errors="coerce")
        if converted.notna().sum() == df[c].notna().sum():
            df[c] = converted.astype("float64")
        else:
            df[c] = df[c].map(lambda v: None if v is None or (isinstance(v, float) and math.isnan(v)) else str(v))
    df["seed"] = df["seed"].astype("int64")
    df["step"] = df["step"].astype("int64")
    kind_order = {"teacher": 0, "train": 1, "val": 2}
    df = df.assign(_k=df["kind"].map(kind_order)).sort_values(["arm", "seed", "step", "_k"], kind="stable")
    df = df.drop(columns="_k").reset_index(drop=True)
    return df[ID_COLUMNS + sorted(metric_cols)], problems


def collect_grid(grid_dir: str | Path, *, use_cache: bool = True,
                 on_bad_line: Literal["raise", "skip"] = "raise") -> pd.DataFrame:
    """All metrics records of a grid as one table (see the module docstring for the columns)."""
    if on_bad_line not in ("raise", "skip"):
        raise ValueError(f"on_bad_line must be 'raise' or 'skip' (got {on_bad_line!r})")
    # lazy: pyarrow, for the parquet cache only; the reports that import this module need not pay for it
    import pyarrow as pa
    import pyarrow.parquet as pq

    grid_dir = Path(grid_dir)
    if not grid_dir.is_dir():
        raise FileNotFoundError(f"grid directory {grid_dir} does not exist")
    cache = grid_dir / ".harness" / CACHE_NAME
    manifest = _manifest(grid_dir)
    if use_cache and cache.is_file():
        meta = pq.read_schema(cache).metadata or {}
        cached = json.loads(meta[_MANIFEST_KEY]) if meta.get(_MANIFEST_KEY) else None
        if cached is not None and cached.get("files") == manifest["files"] and cached.get("version") == _CACHE_VERSION:
            problems = cached.get("problems", {})
            if problems and on_bad_line == "raise":
                raise RunDirError(next(iter(problems.values())) + " (only a torn last line is tolerated)")
            df = pq.read_table(cache).to_pandas()
            df.attrs["problems"] = problems
            return df
    # with a cache, read leniently once and keep the problems with it; raise afterwards if asked to
    df, problems = _build(grid_dir, strict=on_bad_line == "raise" and not use_cache)
    if use_cache:
        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               _MANIFEST_KEY: json.dumps({**manifest, "problems": problems}).encode()})
        with atomic_path(cache) as tmp:
            pq.write_table(table, tmp)
        if problems and on_bad_line == "raise":
            raise RunDirError(next(iter(problems.values())) + " (only a torn last line is tolerated)")
    df.attrs["problems"] = problems
    return df


def publish_parquet(grid_dir: str | Path) -> Path:
    """``<grid>/metrics.parquet``: a copy of the collected table where ``ls`` shows it (the cache under
    ``.harness/`` is the harness's own and is rebuilt whenever a run changes). Call after ``collect_grid``."""
    grid_dir = Path(grid_dir)
    cache = grid_dir / ".harness" / CACHE_NAME
    if not cache.is_file():
        raise FileNotFoundError(f"{cache} does not exist; collect_grid writes it")
    out = grid_dir / CACHE_NAME
    with atomic_path(out) as tmp:
        shutil.copyfile(cache, tmp)
    return out


def grid_manifest(grid_dir: str | Path) -> dict[str, Any] | None:
    """The grid manifest (see the module docstring)."""
    return read_grid_manifest(Path(grid_dir))


def run_statuses(grid_dir: str | Path) -> pd.DataFrame:
    """One row per run of a grid: state, reason, last step, wall-clock seconds (see the module docstring)."""
    from .lock import grid_is_live  # lazy: the lock brings runs and the matrix; readers (reports) do not load them

    grid_dir = Path(grid_dir)
    live = grid_is_live(grid_dir)
    rows = []
    for arm, seed, run_dir in iter_run_dirs(grid_dir):
        problems: list[str] = []
        status: dict[str, Any] = {}
        record: dict[str, Any] = {}
        try:
            status = read_status(run_dir) or {}
        except RunDirError as e:
            problems.append(str(e))
        try:
            record = read_json(run_dir / HARNESS_FILE) or {}
        except RunDirError as e:
            problems.append(str(e))
        state = status.get("state", "new" if not problems else "queued")
        if state == "running" and not live and not pid_is_trainer(status.get("pid")):
            state = "interrupted"
        tail = tail_metrics(run_dir / METRICS_FILE)
        problems += tail.problems[:1]
        train, val = tail.last.get("train"), tail.last.get("val")
        step = max([int(r["step"]) for r in (train,) if r] + [int(status.get("step") or 0)])
        # the newest record carries the latest wall clock (a val record follows the train record of its step)
        newest = max((r for r in (train, val) if r), key=lambda r: (int(r["step"]), r is val), default={})
        wall = newest.get("time/wall_s")
        try:
            origin = fork_origin(run_dir)
        except RunDirError as e:
            origin = None
            problems.append(str(e))
        fork = None if origin is None else (f"{Path(origin['parent_dir']).parent.name}/"
                                            f"{Path(origin['parent_dir']).name} after step {origin['step']}")
        rows.append({"arm": arm, "seed": seed, "state": state, "reason": status.get("reason"), "step": step,
                     "fork": fork,
                     "wall_s": float(wall) if isinstance(wall, (int, float)) else float("nan"),
                     "run_dir": str(run_dir), "attempts": len(record.get("attempts", [])),
                     "identity": record.get("identity"), "created": float(record.get("created") or "nan"),
                     "problem": "; ".join(problems) or None})
    df = pd.DataFrame(rows, columns=STATUS_COLUMNS)
    df["seed"] = df["seed"].astype("int64")
    df["step"] = df["step"].astype("int64")
    df["attempts"] = df["attempts"].astype("int64")
    df["created"] = df["created"].astype("float64")
    return df


def _first_rise(values: np.ndarray, steps: np.ndarray, k: int) -> float:
    """Step of the k-th consecutive rise of ``values`` (a non-finite value counts as a rise), or NaN."""
    run = 0
    prev = None
    for v, s in zip(values, steps):
        cur = v if math.isfinite(v) else math.inf
        if prev is not None and (cur > prev or not math.isfinite(v)):
            run += 1
            if run >= k:
                return float(s)
        else:
            run = 0
        prev = cur
    return math.nan


GRAD_NORM_KEYS = ("grad_norm/max", "grad_norm/total")
"""Pre-clip global grad-norm keys, preferred first: ``grad_norm/max`` (the largest norm since the previous
record) sees every step, ``grad_norm/total`` only the logged ones."""


def run_divergence(train: pd.DataFrame) -> dict[str, float]:
    """One run's divergence numbers from its train records sorted by step; the one place they are computed
    (``divergence_summary`` here and the reports' run table both call it).

    - ``first_nonfinite_step``: first record with ``count/nonfinite`` or ``event/nonfinite`` > 0, or a
      non-finite loss or grad norm (the trainer logs both on every train record, so a missing value there is a
      logged NaN); NaN if none.
    - ``n_spikes``: the last ``count/spikes`` (a running total, so no spike between records is missed); the
      sum of ``event/spike`` when the total is absent; 0 when neither is logged.
    - ``max_grad_norm``: the largest finite value of the grad-norm keys; NaN if none.
    - ``grad_norm_nonfinite``: logged non-finite values of the preferred grad-norm key.
    - ``nonfinite_steps``: the last ``count/nonfinite`` (the trainer's running count); NaN if not logged.
    """
    bad = pd.Series(False, index=train.index)
    for col in ("count/nonfinite", "event/nonfinite"):
        if col in train:
            bad |= train[col].fillna(0) > 0
    for col in ("loss/total", "grad_norm/total"):
        if col in train:
            bad |= ~np.isfinite(train[col].to_numpy(dtype=float))
    first_bad = float(train.loc[bad, "step"].min()) if bad.any() else math.nan
    if "count/spikes" in train and train["count/spikes"].notna().any():
        n_spikes = int(train["count/spikes"].dropna().iloc[-1])
    elif "event/spike" in train:
        n_spikes = int(train["event/spike"].fillna(0).sum())
    else:
        n_spikes = 0
    norms = [train[c].to_numpy(dtype=float) for c in GRAD_NORM_KEYS if c in train]
    finite = np.concatenate([v[np.isfinite(v)] for v in norms]) if norms else np.array([])
    preferred = norms[0] if norms else np.array([])
    counts = train["count/nonfinite"].dropna() if "count/nonfinite" in train else pd.Series(dtype=float)
    return {"first_nonfinite_step": first_bad, "n_spikes": n_spikes,
            "max_grad_norm": float(finite.max()) if finite.size else math.nan,
            "grad_norm_nonfinite": int((~np.isfinite(preferred) & ~np.isnan(preferred)).sum()),
            "nonfinite_steps": float(counts.iloc[-1]) if len(counts) else math.nan}


def divergence_summary(df: pd.DataFrame, *, rise_k: int = 3) -> pd.DataFrame:
    """Per run of a ``collect_grid`` table: where and how it went wrong.

    - ``first_nonfinite_step``, ``n_spikes``, ``max_grad_norm``: as ``run_divergence`` computes them (the
      step of the first bad record, so exact when ``run.log_every`` is 1 and at most that late otherwise).
    - ``val_rise_step``: the step of the validation at which ``val/loss`` has risen
      ``rise_k`` evaluations in a row (a non-finite validation loss counts as a rise); NaN if never.
    """
    if rise_k < 1:
        raise ValueError(f"rise_k must be >= 1 (got {rise_k})")
    out = []
    groups = df.groupby(["grid", "arm", "seed", "run_dir"], sort=True) if len(df) else []
    for (grid, arm, seed, run_dir), g in groups:
        train = g[g["kind"] == "train"].sort_values("step")
        val = g[g["kind"] == "val"].sort_values("step")
        div = run_divergence(train)
        first_bad, n_spikes, max_norm = div["first_nonfinite_step"], div["n_spikes"], div["max_grad_norm"]
        if "val/loss" in val and len(val):
            vl = val[["step", "val/loss"]].dropna(subset=["step"])
            rise = _first_rise(vl["val/loss"].to_numpy(dtype=float), vl["step"].to_numpy(), rise_k)
        else:
            rise = math.nan
        out.append({"grid": grid, "arm": arm, "seed": int(seed), "run_dir": run_dir,
                    "first_nonfinite_step": first_bad, "n_spikes": n_spikes, "max_grad_norm": max_norm,
                    "val_rise_step": rise, "val_rise_k": rise_k})
    types = {"seed": "int64", "first_nonfinite_step": "float64", "n_spikes": "int64", "max_grad_norm": "float64",
             "val_rise_step": "float64", "val_rise_k": "int64"}
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS).astype(types)

