"""Telemetry of a grid as pandas tables, read from run directories alone.

Three functions with stable signatures (the reports package imports them):

``collect_grid(grid_dir, *, use_cache=True) -> DataFrame``
    One row per metrics record of every run. Columns: ``grid``, ``arm``, ``seed``
    (int), ``run_dir`` (str), ``kind`` (``train`` | ``val`` | ``teacher``), ``step``
    (int), then every metric key of the records (float; NaN where a record lacks
    the key, and where the trainer logged a non-finite value it stays non-finite).
    Sorted by arm, seed, step, kind. Cached in ``<grid>/.harness/metrics.parquet``; the
    cache holds the size and mtime of every metrics.jsonl it was built from and is
    rebuilt when any of them changes (or a run appears or disappears).

``run_statuses(grid_dir) -> DataFrame``
    One row per run: ``arm``, ``seed``, ``state``, ``reason``, ``step``, ``wall_s``,
    ``run_dir``, plus ``attempts`` and ``identity``. ``state`` is status.json's, except a
    ``running`` run that no harness and no live process is running, shown as
    ``interrupted``; ``wall_s`` is the run's last ``time/wall_s`` (summed over resumes).

``divergence_summary(df, *, rise_k=3) -> DataFrame``
    One row per run of a ``collect_grid`` table: ``grid``, ``arm``, ``seed``,
    ``run_dir``, ``first_nonfinite_step``, ``n_spikes``, ``max_grad_norm``,
    ``val_rise_step``, ``val_rise_k``. See the function's docstring for definitions.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .store import HARNESS_FILE, METRICS_FILE, iter_run_dirs, read_json, read_metrics, read_status

ID_COLUMNS = ["grid", "arm", "seed", "run_dir", "kind", "step"]
STATUS_COLUMNS = ["arm", "seed", "state", "reason", "step", "wall_s", "run_dir", "attempts", "identity"]
SUMMARY_COLUMNS = ["grid", "arm", "seed", "run_dir", "first_nonfinite_step", "n_spikes", "max_grad_norm",
                   "val_rise_step", "val_rise_k"]
CACHE_NAME = "metrics.parquet"
_MANIFEST_KEY = b"twinflow_lab.manifest"
_CACHE_VERSION = 1


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


def _kind(record: dict[str, Any]) -> str:
    kind = record.get("kind")
    if kind in ("train", "val", "teacher"):
        return kind
    if kind is not None:
        raise ValueError(f"unknown record kind {kind!r} (expected train, val or teacher)")
    return "val" if any(k.startswith("val/") for k in record) else "train"


def _build(grid_dir: Path) -> pd.DataFrame:
    grid = _grid_name(grid_dir)
    rows: list[dict[str, Any]] = []
    for arm, seed, run_dir in iter_run_dirs(grid_dir):
        for rec in read_metrics(run_dir / METRICS_FILE):
            row = {"grid": grid, "arm": arm, "seed": seed, "run_dir": str(run_dir), "kind": _kind(rec),
                   "step": int(rec["step"])}
            for k, v in rec.items():
                if k in ("kind", "step"):
                    continue
                row[k] = v
            rows.append(row)
    if not rows:
        return pd.DataFrame({c: pd.Series(dtype="int64" if c in ("seed", "step") else "object")
                             for c in ID_COLUMNS})
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
    return df[ID_COLUMNS + sorted(metric_cols)]


def collect_grid(grid_dir: str | Path, *, use_cache: bool = True) -> pd.DataFrame:
    """All metrics records of a grid as one table (see the module docstring for the columns)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    grid_dir = Path(grid_dir)
    if not grid_dir.is_dir():
        raise FileNotFoundError(f"grid directory {grid_dir} does not exist")
    cache = grid_dir / ".harness" / CACHE_NAME
    manifest = _manifest(grid_dir)
    if use_cache and cache.is_file():
        meta = pq.read_schema(cache).metadata or {}
        if meta.get(_MANIFEST_KEY) and json.loads(meta[_MANIFEST_KEY]) == manifest:
            return pq.read_table(cache).to_pandas()
    df = _build(grid_dir)
    if use_cache:
        table = pa.Table.from_pandas(df, preserve_index=False)
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               _MANIFEST_KEY: json.dumps(manifest).encode()})
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.tmp-{os.getpid()}")
        pq.write_table(table, tmp)
        with open(tmp, "rb") as f:  # the same atomic rule as every other file: fsync, then rename
            os.fsync(f.fileno())
        os.replace(tmp, cache)
    return df


def run_statuses(grid_dir: str | Path) -> pd.DataFrame:
    """One row per run of a grid: state, reason, last step, wall-clock seconds (see the module docstring)."""
    from .grid import grid_is_live
    from .monitor import pid_is_trainer

    grid_dir = Path(grid_dir)
    live = grid_is_live(grid_dir)
    rows = []
    for arm, seed, run_dir in iter_run_dirs(grid_dir):
        status = read_status(run_dir) or {}
        record = read_json(run_dir / HARNESS_FILE) or {}
        state = status.get("state", "new")
        if state == "running" and not live and not pid_is_trainer(status.get("pid")):
            state = "interrupted"
        records = read_metrics(run_dir / METRICS_FILE)
        train_steps = [int(r["step"]) for r in records if _kind(r) == "train"]
        walls = [r["time/wall_s"] for r in records if isinstance(r.get("time/wall_s"), (int, float))]
        step = max(train_steps + [int(status.get("step") or 0)]) if (train_steps or status) else 0
        rows.append({"arm": arm, "seed": seed, "state": state, "reason": status.get("reason"), "step": step,
                     "wall_s": float(walls[-1]) if walls else float("nan"), "run_dir": str(run_dir),
                     "attempts": len(record.get("attempts", [])), "identity": record.get("identity")})
    df = pd.DataFrame(rows, columns=STATUS_COLUMNS)
    df["seed"] = df["seed"].astype("int64")
    df["step"] = df["step"].astype("int64")
    df["attempts"] = df["attempts"].astype("int64")
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


def divergence_summary(df: pd.DataFrame, *, rise_k: int = 3) -> pd.DataFrame:
    """Per run of a ``collect_grid`` table: where and how it went wrong.

    - ``first_nonfinite_step``: first train record whose ``count/nonfinite`` is > 0 or
      ``event/nonfinite`` > 0, or whose loss or grad norm is non-finite (the step of the
      record, so exact when ``run.log_every`` is 1 and at most that late otherwise); NaN if none.
    - ``n_spikes``: the run's last ``count/spikes`` (a running total, so no spike between
      records is missed); the sum of ``event/spike`` when the total is absent; 0 when neither is logged.
    - ``max_grad_norm``: the largest finite pre-clip global norm seen, from
      ``grad_norm/max`` (max since the previous record) and ``grad_norm/total``.
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
        bad = pd.Series(False, index=train.index)
        for col in ("count/nonfinite", "event/nonfinite"):
            if col in train:
                bad |= train[col].fillna(0) > 0
        for col in ("loss/total", "grad_norm/total"):
            if col in train:
                # the trainer logs both on every train record, so a missing value is a logged NaN
                bad |= ~np.isfinite(train[col].to_numpy(dtype=float))
        first_bad = float(train.loc[bad, "step"].min()) if bad.any() else math.nan
        if "count/spikes" in train and train["count/spikes"].notna().any():
            n_spikes = int(train["count/spikes"].dropna().iloc[-1])
        elif "event/spike" in train:
            n_spikes = int(train["event/spike"].fillna(0).sum())
        else:
            n_spikes = 0
        norms = []
        for col in ("grad_norm/max", "grad_norm/total"):
            if col in train:
                v = train[col].to_numpy(dtype=float)
                norms.extend(v[np.isfinite(v)].tolist())
        max_norm = max(norms) if norms else math.nan
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

