"""Independent checks of a built report against the run directories (plain json parsing, no reports code)."""

from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pandas as pd

from reports.formatting import fmt_int, fmt_num


def read_jsonl(path: Path) -> list[dict]:
    """metrics.jsonl parsed directly (an independent reader for the tests): the trainer writes
    non-finite numbers as strings, and a torn last line is skipped."""
    out = []
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            assert i == len(lines) - 1, f"{path}: bad line {i + 1}"
            continue
        out.append({k: (float(v) if isinstance(v, str) and v in ("nan", "inf", "-inf") else v)
                    for k, v in rec.items()})
    return out


def expected_run_values(run_dir: Path, nfe: list[int], primary: int) -> dict:
    """A run's summary numbers, computed with plain Python from its files."""
    recs = read_jsonl(run_dir / "metrics.jsonl")
    status = json.loads((run_dir / "status.json").read_text())
    train = [r for r in recs if r.get("kind") == "train"]
    val = sorted((r for r in recs if r.get("kind") == "val"), key=lambda r: r["step"])
    ok = status["state"] not in ("diverged", "failed")
    out: dict = {"state": status["state"]}
    finite_val = [r for r in val if isinstance(r.get("val/loss"), (int, float)) and math.isfinite(r["val/loss"])]
    best = min(finite_val, key=lambda r: (r["val/loss"], r["step"])) if finite_val else None
    out["best_val_loss"] = best["val/loss"] if best else math.nan
    out["best_val_step"] = best["step"] if best else math.nan
    last = val[-1] if val and ok else None
    out["final_val_loss"] = last["val/loss"] if last else math.nan
    for n in nfe:
        out[f"fd_nfe{n}"] = last[f"val/fd_nfe{n}"] if last else math.nan
    out[f"reward_nfe{primary}"] = last[f"val/reward_nfe{primary}"] if last else math.nan
    out[f"accuracy_nfe{primary}"] = last[f"val/accuracy_nfe{primary}"] if last else math.nan
    key = "grad_norm/max" if any("grad_norm/max" in r for r in train) else "grad_norm/total"
    norms = [r[key] for r in train if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    out["max_grad_norm"] = max(norms) if norms else math.nan
    out["spikes"] = [r["count/spikes"] for r in train if "count/spikes" in r][-1]
    walls = [r["time/wall_s"] for r in recs if isinstance(r.get("time/wall_s"), (int, float))]
    out["wall_s"] = walls[-1]
    if status["state"] == "diverged":
        reason = status["reason"]
        out["diverge_step"] = float(reason.rsplit("step ", 1)[1].rstrip(")"))
    return out


def md_table(md: str, header_start: str) -> list[dict[str, str]]:
    """Rows of the first Markdown table whose header row starts with ``header_start`` ("arm" or "arm | seed")."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start} |"))
    header = [c.strip() for c in lines[start].strip("|").split("|")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))]
        rows.append(dict(zip(header, cells)))
    return rows


def check_report(grid_dir: Path, out_dir: Path, *, arms: list[str], nfe: list[int], primary: int = 2) -> None:
    """The summary table (CSV and the Markdown cells) equals values computed here from the files."""
    runs = {}
    for arm in arms:
        for d in sorted((grid_dir / arm).glob("seed-*")):
            runs[(arm, int(d.name.split("-")[1]))] = expected_run_values(d, nfe, primary)
    summary = pd.read_csv(out_dir / "summary.csv", index_col="arm")
    assert list(summary.index) == arms
    md = (out_dir / "report.md").read_text()
    # the Summary's two tables: what the runs reached, how they went
    md_rows = {r["arm"].split(" (")[0]: r for r in md_table(md, "arm | runs done")}
    for r in md_table(md, "arm | max grad norm"):
        md_rows[r["arm"].split(" (")[0]].update(r)
    keys = ["best_val_loss", "final_val_loss", *[f"fd_nfe{n}" for n in nfe], f"reward_nfe{primary}",
            f"accuracy_nfe{primary}", "max_grad_norm", "spikes", "wall_s"]
    labels = {"best_val_loss": "best val loss", "final_val_loss": "final val loss", "max_grad_norm":
              "max grad norm", "spikes": "spikes/run", f"reward_nfe{primary}": f"reward@{primary}",
              f"accuracy_nfe{primary}": f"accuracy@{primary}", **{f"fd_nfe{n}": f"FD@{n}" for n in nfe}}
    for arm in arms:
        mine = [v for (a, _), v in runs.items() if a == arm]
        row = md_rows[arm]
        for key in keys:
            vals = [r[key] for r in mine if isinstance(r[key], (int, float)) and math.isfinite(r[key])]
            expected = sum(vals) / len(vals) if vals else math.nan
            got = summary.loc[arm, key]
            if math.isnan(expected):
                assert math.isnan(got), (arm, key)
            else:
                assert got == pytest_approx(expected), (arm, key, got, expected)
            if key in labels:
                cell = row[labels[key]]
                text = fmt_num(expected)
                if len(vals) < len(mine) and vals:
                    text += f" (n={len(vals)})"
                assert cell == text, (arm, key, cell, text)
        div = [r for r in mine if r["state"] == "diverged"]
        assert row["diverged"].startswith(f"{len(div)}/{len(mine)}")
        assert row["runs done"] == f"{sum(r['state'] == 'done' for r in mine)}/{len(mine)}"
        med = statistics.median(r["diverge_step"] for r in div) if div else math.nan
        assert row["diverged at step"] == fmt_int(med)
        best_steps = [r["best_val_step"] for r in mine if not math.isnan(r["best_val_step"])]
        assert row["best at step"] == fmt_int(statistics.median(best_steps) if best_steps else math.nan)


def pytest_approx(x):
    import pytest

    return pytest.approx(x, rel=1e-9, abs=1e-12)
