"""Telemetry tables from run directories (metrics written here in the trainer's format)."""

from __future__ import annotations

import io
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import pytest

from harness.collect import collect_grid, divergence_summary, publish_parquet, run_statuses
from harness.monitor import GridMonitor, render_table
from harness.store import MetricsTail, parse_metrics_lines, read_metrics, write_status


def _write_run(grid: Path, arm: str, seed: int, records: list[dict], *, state: str = "done",
               reason: str | None = None, torn: str = "") -> Path:
    d = grid / arm / f"seed-{seed}"
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r, separators=(",", ":")) + "\n")
        f.write(torn)
    write_status(d, state, step=max(r["step"] for r in records), reason=reason, pid=None)
    return d


def _train(step: int, loss: float | str = 0.5, gn: float | str = 1.0, spikes: int = 0, nonfinite: int = 0,
           **extra) -> dict:
    return {"step": step, "kind": "train", "loss/total": loss, "grad_norm/total": gn, "grad_norm/max": gn,
            "count/spikes": spikes, "count/nonfinite": nonfinite, "time/step_s": 0.01, "time/wall_s": step * 0.01,
            **extra}


def _val(step: int, loss: float) -> dict:
    return {"step": step, "kind": "val", "val/loss": loss, "time/wall_s": step * 0.01}


@pytest.fixture
def grid(tmp_path: Path) -> Path:
    g = tmp_path / "runs" / "g1"
    teacher = {"step": 0, "kind": "teacher", "teacher/fd": 3.0}
    # healthy: val falls
    _write_run(g, "a", 0, [teacher] + [_train(s) for s in range(1, 7)] + [_val(2, 1.0), _val(4, 0.9), _val(6, 0.8)])
    # spikes and a non-finite step at 5 (written as the string "nan" by the trainer), torn last line
    _write_run(g, "b", 0, [teacher, _train(1, gn=2.0), _train(2, gn=900.0, spikes=1, **{"event/spike": 1}),
                           _train(3, gn=5.0, spikes=1), _train(4, gn=1e4, spikes=2, **{"event/spike": 1}),
                           _train(5, loss="nan", gn="inf", spikes=2, nonfinite=1)],
               state="diverged", reason="non-finite loss at step 5", torn='{"step": 6, "kind": "tr')
    # over-fitting: val rises 3 times in a row from step 4 on
    _write_run(g, "c", 1, [_train(s) for s in range(1, 11)] +
               [_val(2, 1.0), _val(4, 0.7), _val(6, 0.8), _val(8, 0.9), _val(10, 1.2)])
    (g / ".harness").mkdir()  # the harness's own folder is not a run
    return g


def test_metrics_reader_skips_a_torn_last_line_only(tmp_path):
    text = '{"step":1,"a":1}\n{"step":2,"a":"nan"}\n{"step":3,"a'
    recs = parse_metrics_lines(text, where="x", complete=True).records
    assert [r["step"] for r in recs] == [1, 2]
    assert math.isnan(recs[1]["a"])
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        parse_metrics_lines('{"step":1}\n{"step":2,\n{"step":3}\n', where="x", complete=True)


def test_metrics_tail_reads_increments_and_restarts_after_truncation(tmp_path):
    p = tmp_path / "metrics.jsonl"
    tail = MetricsTail(p)
    assert tail.poll() == []
    p.write_text('{"step":1,"x":1}\n{"step":2,"x":2}\n{"step":3,"x"')
    assert [r["step"] for r in tail.poll()] == [1, 2]
    with open(p, "a") as f:
        f.write(':3}\n')
    assert [r["step"] for r in tail.poll()] == [3]
    assert tail.last["x"] == 3
    # a resume rewrites the file shorter (atomic replace): the tail starts over
    tmp = tmp_path / "new"
    tmp.write_text('{"step":1,"x":10}\n')
    os.replace(tmp, p)
    assert [r["x"] for r in tail.poll()] == [10]
    assert tail.last["step"] == 1


def test_collect_grid_table(grid):
    df = collect_grid(grid)
    assert list(df.columns[:6]) == ["grid", "arm", "seed", "run_dir", "kind", "step"]
    assert set(df["grid"]) == {"g1"}
    assert set(df["kind"]) == {"train", "val", "teacher"}
    assert df["seed"].dtype == np.int64 and df["step"].dtype == np.int64
    b = df[(df["arm"] == "b") & (df["kind"] == "train")]
    assert list(b["step"]) == [1, 2, 3, 4, 5]  # the torn step-6 line is skipped
    assert math.isnan(b["loss/total"].iloc[-1]) and math.isinf(b["grad_norm/total"].iloc[-1])
    assert df["loss/total"].dtype == np.float64
    # teacher record first within a run, val after the train record of the same step
    a = df[df["arm"] == "a"]
    assert a["kind"].iloc[0] == "teacher"
    assert list(a[a["step"] == 2]["kind"]) == ["train", "val"]
    assert len(df) == 10 + 5 + 1 + 15  # a: teacher + 6 + 3; b: teacher + 5; c: 10 + 5


def test_collect_cache_is_reused_and_invalidated(grid):
    cache = grid / ".harness" / "metrics.parquet"
    df1 = collect_grid(grid)
    assert cache.is_file()
    mtime = cache.stat().st_mtime_ns
    time.sleep(0.01)
    df2 = collect_grid(grid)
    assert cache.stat().st_mtime_ns == mtime  # served from the cache
    assert df1.equals(df2)
    with open(grid / "a" / "seed-0" / "metrics.jsonl", "a") as f:
        f.write(json.dumps(_train(7, loss=0.25)) + "\n")
    df3 = collect_grid(grid)
    assert cache.stat().st_mtime_ns != mtime
    assert df3[(df3["arm"] == "a") & (df3["step"] == 7)]["loss/total"].iloc[0] == 0.25
    # a new run appearing also invalidates
    _write_run(grid, "d", 0, [_train(1)])
    assert "d" in set(collect_grid(grid)["arm"])



def test_the_collected_table_is_published_where_ls_shows_it(grid):
    import pandas as pd

    with pytest.raises(FileNotFoundError, match="collect_grid writes it"):
        publish_parquet(grid)  # nothing collected yet: no stale or empty file appears
    assert not (grid / "metrics.parquet").exists()
    df = collect_grid(grid)
    out = publish_parquet(grid)
    assert out == grid / "metrics.parquet" and out.name in [p.name for p in grid.iterdir()]
    assert pd.read_parquet(out).equals(df)
    # the file beside the arms is not a run: collecting again sees the same runs and records
    assert collect_grid(grid, use_cache=False).equals(df)

def test_divergence_summary(grid):
    s = divergence_summary(collect_grid(grid), rise_k=3).set_index("arm")
    assert math.isnan(s.loc["a", "first_nonfinite_step"]) and s.loc["a", "n_spikes"] == 0
    assert s.loc["a", "max_grad_norm"] == 1.0 and math.isnan(s.loc["a", "val_rise_step"])
    assert s.loc["b", "first_nonfinite_step"] == 5
    assert s.loc["b", "n_spikes"] == 2
    assert s.loc["b", "max_grad_norm"] == 1e4  # the inf is non-finite, not a norm
    assert s.loc["c", "val_rise_step"] == 10  # rises at 6, 8, 10
    s2 = divergence_summary(collect_grid(grid), rise_k=2).set_index("arm")
    assert s2.loc["c", "val_rise_step"] == 8


def test_run_statuses(grid):
    st = run_statuses(grid).set_index("arm")
    assert st.loc["b", "state"] == "diverged" and st.loc["b", "reason"] == "non-finite loss at step 5"
    assert st.loc["a", "step"] == 6 and st.loc["a", "wall_s"] == pytest.approx(0.06)
    # a run left "running" by a killed process, with no harness on the grid, reads as interrupted
    write_status(grid / "c" / "seed-1", "running", step=0, pid=2**22 + 12345)
    assert run_statuses(grid).set_index("arm").loc["c", "state"] == "interrupted"


def test_live_table_shows_progress_and_eta(grid):
    runs = [("a", 0, grid / "a" / "seed-0", 6), ("b", 0, grid / "b" / "seed-0", 10),
            ("c", 1, grid / "c" / "seed-1", 10), ("new", 0, grid / "new" / "seed-0", 10)]
    write_status(grid / "c" / "seed-1", "running", step=0, pid=os.getpid())
    rows = GridMonitor(runs).rows(harness_live=True)
    by = {r.arm: r for r in rows}
    assert by["c"].state == "running" and by["c"].step == 10 and by["c"].val_loss == 1.2
    assert by["new"].state == "new" and by["new"].eta_s == pytest.approx(10 * 0.01)  # borrowed rate
    text = render_table(rows, slots=2)
    assert "diverged: non-finite loss at step 5" in text
    assert "grad norm" in text and "ETA" in text
    assert read_metrics(grid / "a" / "seed-0" / "metrics.jsonl")[0]["kind"] == "teacher"


def test_live_display_redraws_in_place_on_a_terminal():
    from harness.monitor import LiveDisplay

    out = io.StringIO()
    d = LiveDisplay(out, tty=True, every_s=0.0)
    assert d.due()
    d.draw("a\nb")
    d.draw("c\nd")
    assert out.getvalue() == "a\nb\n\x1b[2F\x1b[Jc\nd\n"  # the second table replaces the first
    plain = io.StringIO()
    p = LiveDisplay(plain, tty=False)
    p.draw("table")
    p.event("x/seed-0 started")
    assert "table" not in plain.getvalue() and plain.getvalue().endswith("x/seed-0 started\n")
